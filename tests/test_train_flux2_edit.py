"""train_flux2_edit_lora.py end to end on tiny random FLUX.2 [klein] and [dev] pipelines: the
transformer's inputs equal the pipelines' with one and two references, the mask terms, runs
that train, resume exactly and load in the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from PIL import Image
from script_runs import (
    ROOT,
    TrainScript,
    assert_same_tensors,
    first_call,
    lora_tensors,
    model_card,
    quiet_pipeline,
    reset_accelerate,
)

import train_flux2_edit_lora as flux2
from data.rows import collate_items
from data.synthetic import write_kontext_dataset
from training.config import parse_config
from training.inputs.flux2 import latent_grid, reference_grid, reference_size
from training.metrics import read_metrics
from training.validation import to_pil
from worlds.tiny_flux2 import tiny_flux2_klein_pipeline, tiny_flux2_pipeline

RESOLUTION = 96


def add_second_references(folder: Path) -> Path:
    """``folder``'s rows with a second reference each: a 64x144 image of noise (another size
    than the target's, so the pipeline's own rule sizes it), in ``metadata.jsonl``'s context
    list."""
    rng = np.random.default_rng(1)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for index, row in enumerate(rows):
        name = f"images/{index:04d}_product.png"
        Image.fromarray(rng.integers(0, 255, (64, 144, 3), dtype=np.uint8)).save(folder / name)
        row["context"] = [row["context"], name]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    tiny_flux2_klein_pipeline(seed=0).save_pretrained(root / "model")
    tiny_flux2_pipeline(seed=0).save_pretrained(root / "dev")
    write_kontext_dataset(root / "data", n=3, resolution=RESOLUTION, seed=0)
    write_kontext_dataset(root / "two", n=3, resolution=RESOLUTION, seed=0)
    add_second_references(root / "two")
    return root


SCRIPT = TrainScript(flux2, flux2.Flux2EditConfig, RESOLUTION, seed=2, max_train_steps=3)


def first_batch(assets: Path, data: str) -> dict:
    dataset = flux2.text_edit_dataset(SCRIPT.config(assets, train_data_dir=str(assets / data)))
    return collate_items([dataset[0]])


class TestSameInputsAsThePipeline:
    @pytest.mark.parametrize(
        "model,cls,data,references",
        [
            ("model", Flux2KleinPipeline, "data", 1),
            ("model", Flux2KleinPipeline, "two", 2),
            ("dev", Flux2Pipeline, "data", 1),
            ("dev", Flux2Pipeline, "two", 2),
        ],
    )
    def test_first_denoising_step(self, assets, model, cls, data, references):
        pipe = quiet_pipeline(cls, assets, model)
        assert type(pipe) is cls
        batch = first_batch(assets, data)
        images = [to_pil(image) for image in batch["references"][0]]
        assert len(images) == references
        height, width = batch["target"].shape[-2:]
        noise = torch.randn(1, 128, height // 16, width // 16, generator=torch.Generator())
        with first_call(pipe.transformer) as seen:
            pipe(
                image=images,
                prompt=batch["prompt"][0],
                latents=noise,
                height=height,
                width=width,
                num_inference_steps=2,
                guidance_scale=3.0 if cls is Flux2Pipeline else 1.0,
                output_type="latent",
            )
        expected = seen["kwargs"]
        config = SCRIPT.config(assets, pretrained_model_name_or_path=str(assets / model))
        encoded = flux2.Flux2Encoder(pipe, config)(batch)
        built = flux2.flux2_transformer_inputs(
            pipe,
            noise,
            encoded["reference_tokens"],
            encoded["reference_ids"],
            encoded["prompt_embeds"],
            torch.ones(1),
            3.0,
        )
        target_tokens = (height // 16) * (width // 16)
        reference_tokens = sum(
            h * w for h, w in (reference_grid((i.height, i.width)) for i in images)
        )
        assert built["hidden_states"].shape == (1, target_tokens + reference_tokens, 128)
        for name in ("hidden_states", "img_ids", "encoder_hidden_states", "txt_ids"):
            assert torch.equal(built[name], expected[name]), name
        # Target at t = 0, the references at t = 10, 20.
        times = built["img_ids"][0, :, 0].unique().tolist()
        assert times == [0, *range(10, 10 * references + 1, 10)]
        assert expected["timestep"].tolist() == built["timestep"].tolist() == [1.0]
        if cls is Flux2Pipeline:  # [dev]: guidance-distilled, the scale as an embedding
            assert expected["guidance"].tolist() == built["guidance"].tolist() == [3.0]
        else:
            assert expected["guidance"] is None and built["guidance"] is None

    def test_a_large_reference_is_sized_by_the_pipelines_rule(self):
        # Scaled (truncating) to 1024x1024 area, then cropped to multiples of 16.
        assert reference_size((1500, 2000)) == (880, 1168)
        assert reference_size((96, 130)) == (96, 128)
        assert reference_grid((2048, 2048)) == (64, 64)


def test_a_run_trains_resumes_exactly_and_changes_the_pipelines_output(assets, tmp_path):
    flags = {"train_data_dir": assets / "two", "checkpointing_steps": 2, "max_train_steps": 4}
    reset_accelerate()
    straight = SCRIPT.run(assets, tmp_path / "straight", learning_rate=3e-2, **flags)
    resumed = SCRIPT.run(
        assets, tmp_path / "resumed", learning_rate=3e-2, **{**flags, "max_train_steps": 2}
    )
    SCRIPT.run(assets, resumed, resume_from_checkpoint="latest", learning_rate=3e-2, **flags)
    reset_accelerate()
    assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
    records = read_metrics(straight)
    assert records == read_metrics(resumed)
    assert {"fm", "geo_mse", "geo_bg", "masked_samples"} <= records[-1].keys()
    assert "Flux2Klein edit LoRA" in model_card(straight).text

    pipe = quiet_pipeline(Flux2KleinPipeline, assets)
    batch = first_batch(assets, "two")
    call = {
        "image": [to_pil(image) for image in batch["references"][0]],
        "prompt": batch["prompt"][0],
        "height": RESOLUTION,
        "width": RESOLUTION,
        "num_inference_steps": 2,
        "guidance_scale": 1.0,
        "output_type": "np",
    }
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(straight)
    adapted = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(adapted - plain).max() > 1e-3


class TestLoss:
    def test_the_token_grid_inverts_the_pipelines_packing(self, assets):
        pipe = quiet_pipeline(Flux2KleinPipeline, assets)
        grid = torch.randn(2, 128, 3, 5)
        assert torch.equal(latent_grid(pipe._pack_latents(grid), 3, 5), grid)

    def test_mask_terms_see_the_masked_rows_weighted_by_their_share(self, assets):
        pipe = quiet_pipeline(Flux2KleinPipeline, assets)
        config = SCRIPT.config(assets)
        encoder = flux2.Flux2Encoder(pipe, config)
        one = encoder(first_batch(assets, "two"))
        assert one["has_mask"].tolist() == [True]
        # The same example twice: the rows differ only by the noise and sigma drawn for each.
        two = {name: torch.cat([value, value]) for name, value in one.items()}
        loss = flux2.Flux2Loss(pipe, config, encoder, encoded=True)

        def run(has_mask: list[bool]) -> tuple[float, dict]:
            batch = {**two, "has_mask": torch.tensor(has_mask)}
            with torch.no_grad():
                total, parts = loss(pipe.transformer, batch, torch.Generator().manual_seed(3))
            return total.item(), parts

        plain, parts = run([False, False])
        fm = parts["fm"].item()
        assert plain == pytest.approx(config.flow_matching_weight * fm, abs=0)
        assert not any(name.startswith("geo_") for name in parts)
        first, parts = run([True, False])
        assert parts["fm"].item() == fm and parts["masked_samples"].item() == 0.5
        second, _ = run([False, True])
        both, parts = run([True, True])
        assert {"geo_mse", "geo_bg", "geo_dice", "geo_area", "geo_bnd"} <= parts.keys()
        # Each row's terms count half when alone in a batch of two; together, their mean.
        assert both - plain == pytest.approx((first - plain) + (second - plain), rel=1e-5)
        assert first - plain > 0 and second - plain > 0


CONFIGS = sorted(path.name for path in (ROOT / "configs").glob("flux2*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_parse(name):
    config = parse_config(
        flux2.Flux2EditConfig, ["--config", str(ROOT / "configs" / name), "--train_data_dir", "d"]
    )
    assert config.largest_resolution % 16 == 0 and config.max_train_steps > 0


def test_the_tiny_config_trains_caches_and_validates_on_two_references(assets, tmp_path):
    """configs/flux2_klein_tiny.yaml as shipped (latent cache on, validation), shortened."""
    out = tmp_path / "out"
    reset_accelerate()
    flux2.main(
        [
            *("--config", str(ROOT / "configs" / "flux2_klein_tiny.yaml")),
            *("--pretrained_model_name_or_path", str(assets / "model")),
            *("--train_data_dir", str(assets / "two"), "--output_dir", str(out)),
            *("--max_train_steps", "2", "--validation_steps", "2"),
            *("--validation_inference_steps", "2", "--resolution", str(RESOLUTION)),
        ]
    )
    reset_accelerate()
    assert len(list((out / "cache").glob("*/*.safetensors"))) == 3
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        "step-000000.png",
        "step-000002.png",
    ]
    grid = Image.open(out / "validation" / "step-000002.png")
    assert grid.width >= 4 * RESOLUTION  # reference | target | prediction | mask overlay
    assert [record["step"] for record in read_metrics(out)] == [1, 2]
