"""Every tiny random model the suite trains on, written to one folder: what
``scripts/make_tiny_models.py`` writes and the tiny configs load."""

from __future__ import annotations

from pathlib import Path

from worlds.tiny_flux2 import tiny_flux2_klein_pipeline, tiny_flux2_pipeline
from worlds.tiny_models import (
    save_qwen_edit_pipeline,
    tiny_flux_fill_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_qwen_image_edit_pipeline,
    tiny_qwen_image_edit_plus_pipeline,
    tiny_sd3_vae,
    tiny_sd15_inpaint_pipeline,
)

# Folder name -> factory, in the order `write_tiny_models` writes them.
TINY_MODEL_FACTORIES = {
    "flux-kontext": tiny_flux_kontext_pipeline,
    "flux-fill": tiny_flux_fill_pipeline,
    "qwen-image-edit": tiny_qwen_image_edit_pipeline,
    "qwen-image-edit-plus": tiny_qwen_image_edit_plus_pipeline,
    "flux2-klein": tiny_flux2_klein_pipeline,
    "flux2-dev": tiny_flux2_pipeline,
    "sd15-inpaint": tiny_sd15_inpaint_pipeline,
    "sd3-vae": tiny_sd3_vae,
}


def write_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build every tiny model with ``seed`` and save it under ``out_dir/<name>``.

    Returns ``{name: folder}`` for ``flux-kontext``, ``flux-fill``, ``qwen-image-edit``,
    ``qwen-image-edit-plus``, ``flux2-klein``, ``flux2-dev``, ``sd15-inpaint`` (pipelines) and
    ``sd3-vae`` (an ``AutoencoderKL``). Each loads with its class's ``from_pretrained(folder)``;
    the Qwen pipelines name the standard ``Qwen2VLProcessor``, which transformers builds only
    with torchvision, so without it pass ``processor=load_image_only_processor(folder)``.
    """
    out_dir = Path(out_dir)
    folders = {}
    for name, factory in TINY_MODEL_FACTORIES.items():
        folders[name] = out_dir / name
        if name.startswith("qwen"):
            save_qwen_edit_pipeline(factory(seed), folders[name])
        else:
            factory(seed).save_pretrained(folders[name])
    return folders
