"""The Kontext world the repository ships (``worlds/kontext_world_data``, what ``make demo`` trains
on) is the world ``build_tiny_world`` builds now: same settings and architecture, the same data,
a VAE that reconstructs as recorded. A change to the recipe fails here until the world is shipped
again:

    python scripts/build_tiny_world.py --out outputs/world --ship worlds/kontext_world_data
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors import safe_open

from worlds.fitting import WORLD_FILE
from worlds.kontext_world import (
    SHIPPED_HALF_COMPONENTS,
    SHIPPED_WORLD,
    WORLD_MAX_SEQUENCE_LENGTH,
    WorldSettings,
    heldout_reconstruction_psnr,
    pretraining_pairs,
    split_pretraining_pairs,
    world_transformer,
    world_vae,
    write_world_data,
)
from worlds.tiny_models import tiny_flux_kontext_pipeline

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = WorldSettings()
# world.json rounds the PSNR to 0.01 dB; the float16 weights (read back as float32) move it by
# about 0.0003 dB, a decoder whose output is scaled by 1.02 by 0.016 dB.
PSNR_TOLERANCE_DB = 0.01
# A few MB in git: the data and the float16 weights are about 4 MB.
MAX_SHIPPED_BYTES = 5_000_000


def _record() -> dict:
    return json.loads((SHIPPED_WORLD / WORLD_FILE).read_text(encoding="utf-8"))


def _files(folder: Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
    )


def _config(config) -> dict:
    """A model config without diffusers' bookkeeping (class name, version, source path), as
    JSON reads it back (tuples become lists)."""
    kept = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    return json.loads(json.dumps(kept))


@pytest.fixture(scope="module")
def pipe() -> FluxKontextPipeline:
    return FluxKontextPipeline.from_pretrained(SHIPPED_WORLD / "model", local_files_only=True)


def test_the_shipped_world_records_the_settings_a_build_uses_now():
    assert _record()["settings"] == asdict(SETTINGS)
    size = sum(path.stat().st_size for path in SHIPPED_WORLD.rglob("*") if path.is_file())
    assert size < MAX_SHIPPED_BYTES


def test_the_demo_trains_on_the_shipped_world():
    demo = yaml.safe_load((ROOT / "configs" / "kontext_demo.yaml").read_text(encoding="utf-8"))
    assert (ROOT / demo["pretrained_model_name_or_path"]).resolve() == SHIPPED_WORLD / "model"
    assert (ROOT / demo["train_data_dir"]).resolve() == SHIPPED_WORLD / "train"
    assert demo["resolution"] == SETTINGS.resolution
    assert demo["max_sequence_length"] == WORLD_MAX_SEQUENCE_LENGTH
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    shipped = SHIPPED_WORLD.relative_to(ROOT).as_posix()
    assert f"SHIPPED_WORLD := {shipped}\n" in makefile
    assert "demo_report.py --world $(SHIPPED_WORLD)" in makefile


def test_the_shipped_models_have_the_architecture_and_encoders_a_build_uses_now(pipe):
    assert _config(pipe.transformer.config) == _config(world_transformer(SETTINGS.seed).config)
    # The latent shift and scale are fitted by the build; everything else is the layout.
    fitted = ("shift_factor", "scaling_factor")
    vae = {k: v for k, v in _config(pipe.vae.config).items() if k not in fitted}
    built_vae = {
        k: v for k, v in _config(world_vae(SETTINGS.seed).config).items() if k not in fitted
    }
    assert vae == built_vae
    # The text encoders, tokenizers and scheduler are the tiny pipeline's, untrained.
    reference = tiny_flux_kontext_pipeline(SETTINGS.seed)
    for name in ("text_encoder", "text_encoder_2"):
        shipped = getattr(pipe, name).state_dict()
        built = getattr(reference, name).state_dict()
        assert shipped.keys() == built.keys()
        for key, value in built.items():
            assert torch.equal(shipped[key], value), f"{name}.{key}"
    prompts = _record()["prompts"]
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(pipe, name)(prompts).input_ids == getattr(reference, name)(prompts).input_ids
    assert _config(pipe.scheduler.config) == _config(reference.scheduler.config)


def test_the_shipped_data_is_what_the_generator_writes_now(tmp_path):
    write_world_data(tmp_path, SETTINGS)
    for folder in ("train", "heldout"):
        shipped, written = SHIPPED_WORLD / folder, tmp_path / folder
        assert _files(shipped) == _files(written)
        metadata = (shipped / "metadata.jsonl").read_bytes()
        assert metadata == (written / "metadata.jsonl").read_bytes()
        assert metadata.count(b"\n") == getattr(SETTINGS, f"n_{folder}")
        for name in _files(written):
            if name.endswith(".png"):
                with Image.open(shipped / name) as ours, Image.open(written / name) as theirs:
                    assert (ours.mode, ours.size) == (theirs.mode, theirs.size), name
                    assert np.array_equal(np.asarray(ours), np.asarray(theirs)), name


def test_the_shipped_weights_are_stored_as_recorded_and_load_as_float32(pipe):
    stored = _record()["stored_dtypes"]
    assert sorted(stored) == sorted(SHIPPED_HALF_COMPONENTS)
    for name, dtype in stored.items():
        for weights in (SHIPPED_WORLD / "model" / name).glob("*.safetensors"):
            with safe_open(weights, "pt") as tensors:
                dtypes = {str(tensors.get_slice(key).get_dtype()) for key in tensors.keys()}
            assert dtypes == {"F16"} and dtype == "float16"
    assert {
        component.dtype for component in pipe.components.values() if hasattr(component, "dtype")
    } == {torch.float32}


def test_the_shipped_vae_reconstructs_the_held_out_pairs_as_recorded(pipe):
    _, heldout = split_pretraining_pairs(pretraining_pairs(SETTINGS))
    assert len(heldout.prompts) == 64
    psnr = heldout_reconstruction_psnr(pipe.vae, heldout)
    assert psnr == pytest.approx(_record()["vae_reconstruction_psnr_db"], abs=PSNR_TOLERANCE_DB)
