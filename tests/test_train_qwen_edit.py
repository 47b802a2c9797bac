"""train_qwen_edit_mask.py end to end on tiny random Qwen-Image-Edit (and Plus) pipelines.

The tiny pipelines still resize every condition image to about 1024x1024 (the pipelines' rule),
so encoding is the slow part: the runs share one latent cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from PIL import Image
from script_runs import (
    ROOT,
    TrainScript,
    assert_int8_run_resumes_exactly,
    assert_same_tensors,
    first_call,
    help_text,
    lora_tensors,
    model_card,
    pipeline_as_trained,
    unloadable_copy,
)

import train_qwen_edit_mask as qwen
from data.edit_masks import change_mask
from data.images import DataError
from data.rows import collate_items
from data.synthetic import write_text_edit_dataset
from data.text_edits import TextEditDataset
from losses import map_mask_to_latent, masked_flow_matching_loss
from models.qwen_processor import load_image_only_processor
from training.config import parse_config
from training.metrics import read_metrics
from training.validation import to_pil
from worlds.tiny_models import tiny_qwen_image_edit_pipeline, tiny_qwen_image_edit_plus_pipeline

RESOLUTION = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    tiny_qwen_image_edit_pipeline(seed=0).save_pretrained(root / "model")
    tiny_qwen_image_edit_plus_pipeline(seed=0).save_pretrained(root / "plus")
    write_text_edit_dataset(root / "data", n=3, resolution=RESOLUTION, seed=0)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen-cache")


SCRIPT = TrainScript(qwen, qwen.QwenEditConfig, RESOLUTION, seed=2, max_train_steps=3)


def run(assets: Path, output_dir: Path, cache: Path, **overrides) -> Path:
    return SCRIPT.run(assets, output_dir, cache_latents="true", cache_dir=cache, **overrides)


def load(assets: Path, name: str = "model", quantized: str = "none"):
    """The pipeline as training loads it (``quantized``: --quantize_base and
    --quantize_text_encoders)."""
    path = str(assets / name)
    config = qwen.QwenEditConfig(
        pretrained_model_name_or_path=path,
        train_data_dir=str(assets / "data"),
        quantize_base=quantized,
        quantize_text_encoders=quantized,
    )
    return pipeline_as_trained(
        qwen.pipeline_class(path),
        config,
        qwen.QWEN_ENCODERS,
        processor=load_image_only_processor(path),
    )


def base_and_adapted(
    assets: Path, lora: Path, name: str = "model", image=None, prompt: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The unquantized pipeline ``name``'s output without and with ``lora``, on ``image`` (one
    or a list) and ``prompt``, by default the first example's."""
    pipe = load(assets, name)
    if image is None:
        batch = batch_of(assets)
        image, prompt = to_pil(batch["context"][0]), batch["prompt"][0]
    call = {
        "image": image,
        "prompt": prompt,
        "height": RESOLUTION,
        "width": RESOLUTION,
        "num_inference_steps": 2,
        "true_cfg_scale": 1.0,
        "output_type": "np",
    }
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(lora)
    return plain, pipe(**call, generator=torch.Generator().manual_seed(0)).images


def batch_of(assets: Path, index: int = 0, **flags) -> dict:
    dataset = TextEditDataset.from_folder(assets / "data", resolution=RESOLUTION, **flags)
    return collate_items([dataset[index]])


def first_step_inputs(assets: Path, pipe, batch: dict, image) -> tuple[dict, dict]:
    """The transformer's kwargs at the pipeline's first step on ``image`` (one image or a list)
    and the first item of ``batch``'s prompt, and those training builds from ``batch`` for the
    same noise at sigma 1."""
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    with first_call(pipe.transformer) as seen:
        pipe(
            image=image,
            prompt=batch["prompt"][0],
            latents=pipe._pack_latents(noise, 1, 16, 4, 4),
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=2,
            true_cfg_scale=1.0,
            output_type="latent",
        )
    encoded = qwen.QwenEditEncoder(pipe, SCRIPT.config(assets))(batch)
    prompt_embeds, prompt_mask = qwen.pad_prompts(encoded["prompt_embeds"])
    built = qwen.qwen_transformer_inputs(
        noise,
        encoded["condition_tokens"],
        encoded["condition_shapes"],
        prompt_embeds,
        prompt_mask,
        torch.ones(1),
        pipe,
    )
    return seen["kwargs"], built


class TestSameInputsAsThePipeline:
    @pytest.mark.parametrize(
        "name,cls,quantized",
        [
            ("model", QwenImageEditPipeline, "none"),
            ("plus", QwenImageEditPlusPipeline, "none"),
            ("model", QwenImageEditPipeline, "int8"),
        ],
    )
    def test_first_denoising_step(self, assets, name, cls, quantized):
        pipe = load(assets, name, quantized)
        assert type(pipe) is cls
        batch = batch_of(assets)
        expected, built = first_step_inputs(assets, pipe, batch, to_pil(batch["context"][0]))
        # The condition at the pipeline's own size: about 1024x1024 area -> 64x64 tokens.
        assert expected["img_shapes"] == built["img_shapes"] == [[(1, 2, 2), (1, 64, 64)]]
        assert expected["hidden_states"].shape == built["hidden_states"].shape == (1, 4100, 64)
        assert torch.equal(built["hidden_states"], expected["hidden_states"])
        assert torch.equal(built["encoder_hidden_states"], expected["encoder_hidden_states"])
        assert expected["encoder_hidden_states_mask"] is None
        assert built["encoder_hidden_states_mask"] is None
        assert expected["timestep"].tolist() == built["timestep"].tolist() == [1.0]
        assert expected["guidance"] is None and "txt_seq_lens" not in expected


def write_reference_edits(root: Path) -> Path:
    """Six edits with one or two references, in control folders and a musubi-style JSON Lines
    file over the same images: 0, 1: a 32x32 target, its context and a 24x40 product image;
    2, 3: a 32x32 target and its context; 4, 5: 48x32 (W x H) targets and their contexts."""
    rng = np.random.default_rng(0)
    records = []
    for index in range(6):
        size = (48, 32) if index >= 4 else (32, 32)
        context = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        target = context.copy()
        target[8:20, 8:20] = rng.integers(0, 255, 3)
        stem = f"{index:02d}"
        for folder, pixels in (("targets", target), ("contexts", context)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / folder / f"{stem}.png")
        (root / "targets" / f"{stem}.txt").write_text(f"put the product on sign {index}")
        record = {
            "image_path": f"targets/{stem}.png",
            "control_path_0": f"contexts/{stem}.png",
            "caption": f"put the product on sign {index}",
        }
        if index < 2:
            (root / "products").mkdir(exist_ok=True)
            product = rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)
            Image.fromarray(product).save(root / "products" / f"{stem}.png")
            record["control_path_1"] = f"products/{stem}.png"
        records.append(json.dumps(record))
    (root / "edits.jsonl").write_text("\n".join(records))
    return root


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Control folders of the two-reference edits (targets/, contexts/, products/) and the
    musubi file of all six."""
    root = write_reference_edits(tmp_path_factory.mktemp("references"))
    two = root / "two"
    for folder in ("targets", "contexts", "products"):
        (two / folder).mkdir(parents=True)
        for stem in ("00", "01"):
            for suffix in (".png", ".txt"):
                source = root / folder / f"{stem}{suffix}"
                if source.exists():
                    (two / folder / source.name).write_bytes(source.read_bytes())
    return root


def control_folder_flags(references: Path) -> dict:
    two = references / "two"
    return {
        "train_data_dir": two / "targets",
        "control_dirs": json.dumps([str(two / "contexts"), str(two / "products")]),
    }


def plus_dataset(references: Path) -> TextEditDataset:
    """The two-reference control folders as the script reads them for the Plus pipeline."""
    two = references / "two"
    config = SCRIPT.config(
        references,
        train_data_dir=str(two / "targets"),
        control_dirs=[str(two / "contexts"), str(two / "products")],
    )
    return qwen.text_edit_dataset(config, QwenImageEditPlusPipeline)


class TestSeveralReferences:
    @pytest.mark.parametrize("count", [2, 3])
    def test_first_denoising_step(self, assets, references, count):
        pipe = load(assets, "plus")
        dataset = plus_dataset(references)
        batch = collate_items([dataset[0]])
        # A third reference of yet another shape: the target itself at 32x24.
        if count == 3:
            third = batch["target"][0][:, :24]
            batch["references"][0] = [*batch["references"][0], third]
        images = [to_pil(image) for image in batch["references"][0]]
        assert np.array_equal(
            np.asarray(images[1]), np.asarray(Image.open(references / "products" / "00.png"))
        )
        expected, built = first_step_inputs(assets, pipe, batch, images)
        # Each reference at about 1024x1024 area in its own aspect, sides multiples of 32
        # (W x H: 24x40 -> 800x1312, 32x24 -> 1184x896), in 16-pixel tokens.
        shapes = [(1, 2, 2), (1, 64, 64), (1, 82, 50)] + ([(1, 56, 74)] if count == 3 else [])
        assert expected["img_shapes"] == built["img_shapes"] == [shapes]
        assert torch.equal(built["hidden_states"], expected["hidden_states"])
        # One picture placeholder per reference in the prompt the encoder reads.
        assert torch.equal(built["encoder_hidden_states"], expected["encoder_hidden_states"])
        assert expected["encoder_hidden_states_mask"] is None
        assert built["encoder_hidden_states_mask"] is None

    def test_the_edit_pipeline_refuses_two_naming_the_row_before_loading(
        self, assets, references, tmp_path
    ):
        broken = unloadable_copy(assets / "model", tmp_path / "model")
        flags = {**control_folder_flags(references), "pretrained_model_name_or_path": broken}
        with pytest.raises(
            DataError,
            match=r"contexts/00.png.*2 reference images; QwenImageEditPipeline .*reads at most 1",
        ):
            SCRIPT.run(assets, tmp_path / "out", **flags)

    def test_trains_from_control_folders_resumes_exactly_and_changes_a_two_image_edit(
        self, assets, references, tmp_path, cache
    ):
        flags = {
            **control_folder_flags(references),
            "pretrained_model_name_or_path": assets / "plus",
            "cache_latents": "true",
            "cache_dir": cache,
            "checkpointing_steps": 2,
        }
        straight = SCRIPT.run(assets, tmp_path / "straight", **flags, max_train_steps=3)
        resumed = SCRIPT.run(assets, tmp_path / "resumed", **flags, max_train_steps=2)
        SCRIPT.run(assets, resumed, **flags, max_train_steps=3, resume_from_checkpoint="latest")
        assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
        item = plus_dataset(references)[0]
        images = [to_pil(image) for image in item["references"]]
        plain, adapted = base_and_adapted(assets, straight, "plus", images, item["prompt"])
        assert np.isfinite(adapted).all() and not np.allclose(plain, adapted)

    def test_musubi_file_mixing_counts_and_sizes_trains_at_batch_2(
        self, assets, references, tmp_path, cache
    ):
        out = SCRIPT.run(
            assets,
            tmp_path / "out",
            pretrained_model_name_or_path=assets / "plus",
            train_data_dir=None,
            train_data_file=references / "edits.jsonl",
            train_batch_size=2,
            max_train_steps=3,
            resolution=64,  # buckets of two shapes: 64x64 and 80x48 (W x H)
            cache_latents="true",
            cache_dir=cache,
        )
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
        dataset = qwen.text_edit_dataset(
            SCRIPT.config(
                references,
                train_data_dir=None,
                train_data_file=str(references / "edits.jsonl"),
                resolution=64,
            ),
            QwenImageEditPlusPipeline,
        )
        # Two references of the same grids, one reference, the wider targets: three groups.
        assert dataset.batch_group_of_items == [0, 0, 1, 1, 2, 2]
        assert dataset.bucket_size(0) == (64, 64) and dataset.bucket_size(4) == (48, 80)


class TestLoss:
    def test_plain_without_masks_or_when_disabled(self, assets):
        pipe = load(assets)
        config = SCRIPT.config(assets)
        encoder = qwen.QwenEditEncoder(pipe, config)
        for flags, enabled in (({}, True), ({"use_text_mask": True}, False)):
            encoded = encoder(batch_of(assets, **flags))
            setting = SCRIPT.config(assets)
            setting.mask_loss.enabled = enabled
            loss_fn = qwen.QwenEditLoss(pipe, setting, encoder, encoded=True)
            with torch.no_grad():
                loss, parts = loss_fn(pipe.transformer, encoded, torch.Generator().manual_seed(3))
            assert torch.equal(loss, parts["fm"]) and parts["masked_samples"] == 0
            with torch.no_grad():
                velocity, target = self.velocities(pipe, encoded, 3)
            assert torch.equal(loss, ((velocity - target) ** 2).mean())

    def test_masked_and_unmasked_samples_mix(self, assets, tmp_path):
        """One sample with a mask, one without: the mean of the region-weighted loss of the
        first and the plain loss of the second, each as if alone."""
        pipe = load(assets)
        data = tmp_path / "data"
        write_text_edit_dataset(data, n=2, resolution=RESOLUTION, seed=0)
        (data / "text_masks" / "0001_target.png").unlink()
        dataset = TextEditDataset.from_folder(data, resolution=RESOLUTION, use_text_mask=True)
        config = SCRIPT.config(assets)
        config.mask_loss.enabled = True
        encoder = qwen.QwenEditEncoder(pipe, config)
        encoded = encoder(collate_items([dataset[0], dataset[1]]))
        assert encoded["has_mask"].tolist() == [True, False]
        loss_fn = qwen.QwenEditLoss(pipe, config, encoder, encoded=True)
        with torch.no_grad():
            loss, parts = loss_fn(pipe.transformer, encoded, torch.Generator().manual_seed(4))
            velocity, target = self.velocities(pipe, encoded, 4)
        region = masked_flow_matching_loss(
            velocity[:1], target[:1], encoded["mask_tokens"][:1], **config.region_loss_weights()
        )
        plain = masked_flow_matching_loss(velocity[1:], target[1:])
        torch.testing.assert_close(loss, (region + plain) / 2, rtol=1e-6, atol=0)
        assert parts["masked_samples"] == 0.5

    @staticmethod
    def velocities(pipe, encoded, seed):
        """The draws of the loss, in its order, and the transformer's velocity on them."""
        generator = torch.Generator().manual_seed(seed)
        x0 = encoded["target_latents"]
        noise = torch.randn(x0.shape, generator=generator)
        config = qwen.QwenEditConfig(pretrained_model_name_or_path="m", train_data_dir="d")
        sigmas = qwen.sample_sigmas(config, x0.shape[0], 4, pipe.scheduler.config, generator)
        embeds, mask = qwen.pad_prompts(encoded["prompt_embeds"])
        sigma = sigmas.view(-1, 1, 1, 1)
        inputs = qwen.qwen_transformer_inputs(
            (1 - sigma) * x0 + sigma * noise,
            encoded["condition_tokens"],
            encoded["condition_shapes"],
            embeds,
            mask,
            sigmas,
            pipe,
        )
        velocity = pipe.transformer(**inputs)[0][:, :4].float()
        return velocity, qwen.pack(pipe, noise - x0).float()

    def test_the_seeds_832x576_example_gives_1872_aligned_tokens(self, assets):
        pipe = load(assets)
        mask = torch.zeros(1, 1, 832, 576)
        mask[..., 100:300, 40:500] = 1
        tokens = map_mask_to_latent(mask[:, 0])
        assert tokens.shape == (1, 1872)
        cells = F.avg_pool2d(mask, 8)  # [1, 1, 104, 72]: the mask per latent pixel
        # Packed as the pipeline packs latents, each token holds its 2x2 cells.
        packed = pipe._pack_latents(cells, 1, 1, 104, 72)
        assert packed.shape == (1, 1872, 4)
        assert torch.equal(tokens, packed.amax(-1))


class TestTrainingRun:
    def test_outputs_text_masks_and_pipeline_loads_the_lora(self, assets, tmp_path, cache):
        out = run(
            assets,
            tmp_path / "out",
            cache,
            validation_steps=3,
            validation_inference_steps=2,
            num_validation_images=1,
            **{"mask_loss.enabled": "true", "data.use_text_mask": "true"},
        )
        records = read_metrics(out)
        assert [r["step"] for r in records] == [1, 2, 3]
        assert all(r["masked_samples"] == 1.0 and "mask_loss" in r for r in records)
        assert (out / "validation" / "step-000003.png").is_file()
        card = model_card(out)
        assert "qwen-image" in card.data.tags and "QwenImageEditPipeline" in card.text
        assert "| flow matching | 0.7 |" in card.text  # 1 - mask_loss.weight
        plain, adapted = base_and_adapted(assets, out)
        assert np.isfinite(plain).all() and np.isfinite(adapted).all()
        assert not np.allclose(plain, adapted)

    def test_exact_resume_and_two_processes(self, assets, tmp_path, cache):
        common = {"checkpointing_steps": 2, "gradient_accumulation_steps": 2}
        straight = run(assets, tmp_path / "straight", cache, max_train_steps=3, **common)
        resumed = run(assets, tmp_path / "resumed", cache, max_train_steps=2, **common)
        run(assets, resumed, cache, resume_from_checkpoint="latest", **common)
        assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
        assert read_metrics(straight) == read_metrics(resumed)
        two = tmp_path / "two"
        SCRIPT.launch(assets, two, cache_latents="true", cache_dir=cache, max_train_steps=2, rank=4)
        assert [r["step"] for r in read_metrics(two)] == [1, 2]

    def test_int8_base_trains_resumes_and_its_lora_loads_unquantized(self, assets, tmp_path, cache):
        out = assert_int8_run_resumes_exactly(
            SCRIPT, assets, tmp_path, cache_latents="true", cache_dir=cache
        )
        plain, adapted = base_and_adapted(assets, out)
        assert not np.allclose(plain, adapted)

    def test_plus_checkpoint_trains(self, assets, tmp_path, cache):
        out = SCRIPT.run(
            assets,
            tmp_path / "plus",
            pretrained_model_name_or_path=assets / "plus",
            cache_latents="true",
            cache_dir=cache,
            max_train_steps=1,
        )
        state = QwenImageEditPlusPipeline.lora_state_dict(str(out))
        assert state and all(key.startswith("transformer.") for key in state)


class TestData:
    def test_text_masks_are_found_by_target_name(self, assets):
        item = batch_of(assets, use_text_mask=True)
        assert item["has_mask"].tolist() == [True] and item["mask"].sum() > 0
        assert batch_of(assets)["has_mask"].tolist() == [False]  # use_text_mask off: none

    def test_strict_masks(self, assets, tmp_path, cache):
        data = tmp_path / "data"
        write_text_edit_dataset(data, n=2, resolution=RESOLUTION, seed=0)
        (data / "text_masks" / "0001_target.png").unlink()
        with pytest.raises(DataError, match=r"1 row\(s\) without a mask.*0001_target"):
            run(
                assets,
                tmp_path / "out",
                cache,
                train_data_dir=data,
                strict_masks="true",
                **{"data.use_text_mask": "true"},
            )

    def test_mask_of_another_size(self, assets, tmp_path, cache):
        data = tmp_path / "data"
        write_text_edit_dataset(data, n=2, resolution=RESOLUTION, seed=0)
        Image.new("L", (8, 8)).save(data / "text_masks" / "0000_target.png")
        with pytest.raises(DataError, match=r"0000_target\.png'?: size 8x8 differs"):
            run(
                assets,
                tmp_path / "out",
                cache,
                train_data_dir=data,
                **{"data.use_text_mask": "true"},
            )

    def test_seed_yaml_with_init_args(self, tmp_path):
        path = tmp_path / "config.yaml"
        path.write_text(
            "mask_loss:\n  enabled: true\n  weight: 0.3\n"
            "data:\n  init_args:\n    use_text_mask: true\n    mask_dir_name: ocr\n"
        )
        config = parse_config(
            qwen.QwenEditConfig,
            [
                "--config",
                str(path),
                "--pretrained_model_name_or_path",
                "m",
                "--train_data_dir",
                "d",
            ],
        )
        assert config.data.use_text_mask and config.data.mask_dir_name == "ocr"
        assert config.mask_loss.enabled and config.timestep_shift == "auto"


class TestEditMasks:
    def test_recovers_changed_rectangles(self, tmp_path):
        rng = np.random.default_rng(0)
        ious = []
        for _ in range(6):
            context = rng.integers(60, 200, (96, 128, 3)).astype(np.uint8)
            context = np.asarray(Image.fromarray(context).resize((128, 96), Image.BILINEAR))
            target = context.copy()
            top, left = rng.integers(5, 40), rng.integers(5, 60)
            height, width = rng.integers(15, 40), rng.integers(20, 60)
            patch = rng.integers(0, 255, (height, width, 3)).astype(np.uint8)
            target[top : top + height, left : left + width] = patch
            truth = np.zeros((96, 128), bool)
            truth[top : top + height, left : left + width] = True
            found = change_mask(Image.fromarray(context), Image.fromarray(target))
            ious.append((found & truth).sum() / (found | truth).sum())
        assert min(ious) > 0.9

    def test_script_writes_masks_the_trainer_finds(self, tmp_path):
        data = tmp_path / "data"
        write_text_edit_dataset(data, n=2, resolution=RESOLUTION, seed=0)
        made = tmp_path / "made"
        made.mkdir()
        for path in ("images", "metadata.jsonl"):
            subprocess.run(["cp", "-r", str(data / path), str(made)], check=True)
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_edit_masks.py"), "--dataset", str(made)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in (made / "text_masks").iterdir()) == [
            "0000_target.png",
            "0001_target.png",
        ]
        assert (made / "text_masks_preview" / "0000_target.png").is_file()
        dataset = TextEditDataset.from_folder(made, resolution=RESOLUTION, use_text_mask=True)
        drawn = np.asarray(Image.open(data / "text_masks" / "0000_target.png")) > 127
        made_mask = dataset[0]["mask"][0].numpy() > 0.5
        assert (drawn & made_mask).sum() / (drawn | made_mask).sum() > 0.6


class TestCommandLine:
    def test_help_documents_every_flag(self):
        text = help_text("train_qwen_edit_mask.py")
        for field in fields(qwen.QwenEditConfig):
            assert f"--{field.name}" in text, field.name
        for name in ("data.use_text_mask", "data.mask_dir_name", "mask_loss.weight"):
            assert f"--{name}" in text

    @pytest.mark.parametrize(
        "name",
        ["qwen_edit_tiny.yaml", "qwen_edit.yaml", "qwen_edit_24gb.yaml", "qwen_edit_48gb.yaml"],
    )
    def test_shipped_configs_parse(self, name):
        parsed = parse_config(
            qwen.QwenEditConfig,
            ["--config", str(ROOT / "configs" / name), "--train_data_dir", "data"],
        )
        assert parsed.max_train_steps > 0 and parsed.data.mask_dir_name == "text_masks"
        assert json.dumps(parsed.mask_loss.__dict__)
