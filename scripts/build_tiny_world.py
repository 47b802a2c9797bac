"""Build (or reuse) the tiny pretrained FLUX.1 Kontext world that the demo and the ablation use.

    python scripts/build_tiny_world.py --out outputs/world

writes ``model/`` (a ``FluxKontextPipeline`` folder: a 4x VAE trained on the synthetic domain
and a transformer pretrained on the identity edit and on prompt-named recolouring),
``train/`` and ``heldout/`` (placeholder-insertion edit pairs) and ``world.json`` (settings, VAE
reconstruction PSNR, losses); see ``models/tiny_world.py``. A folder already built with the
same settings is reused as it is.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jsonargparse import auto_cli

from models.tiny_world import WorldSettings, build_tiny_world


def main(out: Path = Path("outputs/world"), settings: WorldSettings | None = None) -> None:
    """Build the world in ``out`` unless it already holds one built with ``settings``.

    Args:
        out: folder of the world.
        settings: sizes, steps and seed of the build (default: ``WorldSettings()``).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = build_tiny_world(out, settings or WorldSettings())
    print(json.dumps({k: v for k, v in record.items() if k != "prompts"}, indent=2))


if __name__ == "__main__":
    auto_cli(main, as_positional=False)
