"""Write a small synthetic dataset in the layout a family's training script reads.

python scripts/make_synthetic_data.py --family kontext --out data/kontext-synthetic
python scripts/make_synthetic_data.py --family multispectral --out data/leaves --n 12
"""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jsonargparse import auto_cli

from data.synthetic import Family, write_synthetic_dataset


def main(family: Family, out: Path, n: int = 8, resolution: int = 128, seed: int = 0) -> None:
    """Write a synthetic dataset for one model family; the same seed writes the same files.

    Args:
        family: model family whose data layout to write (kontext: an edit-pair folder of
            context/target/mask PNGs and metadata.jsonl, for object insertion; flux-fill and
            sd15-inpaint: an inpainting folder of image/mask PNGs and metadata.jsonl;
            multispectral: 5-band leaf images, as TIFFs or folders of 16-bit band PNGs, with
            leaf masks or NaN no-data backgrounds).
        out: folder to write into; it must not already hold a dataset.
        n: number of examples.
        resolution: side of the square examples; others are 1.25x longer on one side
            (multispectral: wider, or 0.75x as tall; training crops or pads them). A multiple
            of 16.
        seed: random seed.
    """
    index = write_synthetic_dataset(family, out, n=n, resolution=resolution, seed=seed)
    print(f"wrote {n} {family} examples: {index}")


if __name__ == "__main__":
    auto_cli(main, as_positional=False)
