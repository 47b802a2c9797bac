"""Build (or reuse) a tiny pretrained world: the demo and the ablations train on it.

    python scripts/build_tiny_world.py --out outputs/world
    python scripts/build_tiny_world.py --out outputs/world --ship worlds/kontext_world_data
    python scripts/build_tiny_world.py --family qwen-edit --out outputs/qwen_world

``kontext`` (``worlds/kontext_world.py``) writes ``model/`` (a ``FluxKontextPipeline`` folder: a 4x
VAE trained on the synthetic domain and a transformer pretrained on the identity edit and on
prompt-named recolouring), ``train/`` and ``heldout/`` (placeholder-insertion edit pairs) and
``world.json`` (settings, VAE reconstruction PSNR, losses). ``qwen-edit``
(``worlds/qwen_world.py``) writes the same for Qwen-Image-Edit: a ``QwenImageEditPipeline``
with a 32x VAE trained on 1024x1024 text signs, a transformer pretrained on copying and
recolouring words, and text-edit folders with their text masks. A folder already built with
the same settings is reused as it is.

The repository ships the Kontext world of the default settings in ``worlds/kontext_world_data``
(the demo trains on it); ``--ship`` writes that copy of the world in ``--out`` (weights of the
VAE and transformer in float16), after building it if needed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Literal

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jsonargparse import auto_cli

from worlds.kontext_world import WorldSettings, build_tiny_world, ship_world
from worlds.qwen_world import QwenWorldSettings, build_qwen_world


def main(
    out: Path = Path("outputs/world"),
    family: Literal["kontext", "qwen-edit"] = "kontext",
    settings: WorldSettings | None = None,
    qwen_settings: QwenWorldSettings | None = None,
    ship: Path | None = None,
) -> None:
    """Build the world in ``out`` unless it already holds one built with the same settings.

    Args:
        out: folder of the world.
        family: ``kontext`` (FLUX.1 Kontext insertion) or ``qwen-edit`` (Qwen-Image-Edit text).
        settings: sizes, steps and seed of a Kontext build (default: ``WorldSettings()``).
        qwen_settings: the same for a Qwen build (default: ``QwenWorldSettings()``).
        ship: also write the shipped copy of the Kontext world here (``worlds/kontext_world_data``
            for the repository's).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if family == "kontext":
        record = build_tiny_world(out, settings or WorldSettings())
        if ship is not None:
            record = ship_world(out, ship)
    elif ship is not None:
        raise SystemExit("--ship writes the Kontext world only")
    else:
        record = build_qwen_world(out, qwen_settings or QwenWorldSettings())
    print(json.dumps({k: v for k, v in record.items() if k != "prompts"}, indent=2))


if __name__ == "__main__":
    auto_cli(main, as_positional=False)
