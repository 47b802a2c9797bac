"""Write the tiny random models that the tests and the tiny configs load with ``from_pretrained``.

    python scripts/make_tiny_models.py --out tiny-models [--seed 0]

writes ``flux-kontext``, ``flux-fill``, ``qwen-image-edit``, ``qwen-image-edit-plus``,
``flux2-klein``, ``flux2-dev``, ``sd15-inpaint`` (diffusers pipelines) and ``sd3-vae`` (an
``AutoencoderKL``) under ``--out``; see ``worlds/tiny_models.py`` and ``worlds/tiny_flux2.py``
for what each holds.
Nothing is downloaded: weights are random and tokenizers are built from a small vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jsonargparse import auto_cli

from worlds.tiny_set import write_tiny_models


def make_tiny_models(*, out: Path, seed: int = 0) -> None:
    """Write every tiny model family under one folder, one subfolder per family.

    Args:
        out: Folder to write into; created if missing, existing model folders are overwritten.
        seed: Torch seed for the random weights; the same seed writes the same weights.
    """
    for name, folder in write_tiny_models(out, seed=seed).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    auto_cli(make_tiny_models)
