"""train_kontext_lora.py end to end on a tiny random FLUX.1 Kontext and the synthetic set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from datasets import Dataset
from datasets import Image as ImageFeature
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors.torch import load_file

import train_kontext_lora as kontext
from data.edit_pairs import EditPairDataset, collate_edit_pairs
from data.images import DataError
from data.synthetic import write_kontext_dataset
from models.tiny import tiny_flux_kontext_pipeline, write_tiny_dinov2
from training.config import parse_config
from training.lora import LORA_WEIGHTS_NAME, add_lora
from training.metrics import read_metrics
from training.validation import to_pil

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext")
    tiny_flux_kontext_pipeline(seed=0).save_pretrained(root / "model")
    write_kontext_dataset(root / "data", n=4, resolution=RESOLUTION, seed=0)
    return root


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons; give every in-process run a clean slate."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def base_args(assets: Path, output_dir: Path, **overrides) -> list[str]:
    values = {
        "pretrained_model_name_or_path": assets / "model",
        "train_data_dir": assets / "data",
        "output_dir": output_dir,
        "resolution": RESOLUTION,
        "max_train_steps": 4,
        "checkpointing_steps": 100,
        "learning_rate": 1e-3,
        "rank": 4,
        "seed": 7,
    }
    values.update(overrides)
    return [
        token
        for key, value in values.items()
        if value is not None
        for token in (f"--{key}", str(value))
    ]


def run(assets: Path, output_dir: Path, **overrides) -> Path:
    kontext.main(base_args(assets, output_dir, **overrides))
    return output_dir


def lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / LORA_WEIGHTS_NAME)


def first_item_batch(assets: Path) -> dict:
    dataset = EditPairDataset.from_folder(assets / "data", resolution=RESOLUTION)
    return collate_edit_pairs([dataset[0]])


class TestOneStep:
    def test_only_lora_parameters_change(self, assets):
        pipe = FluxKontextPipeline.from_pretrained(assets / "model")
        config = kontext.KontextConfig(
            pretrained_model_name_or_path=str(assets / "model"),
            train_data_dir=str(assets / "data"),
            resolution=RESOLUTION,
            rank=4,
        )
        add_lora(pipe.transformer, config, kontext.LORA_LAYERS)
        before = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
        frozen_before = {
            name: p.detach().clone()
            for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
            for name, p in module.named_parameters()
        }
        loss_fn = kontext.KontextLoss(
            pipe, config, kontext.KontextEncoder(pipe, config, None), None, False
        )
        optimizer = torch.optim.AdamW(
            [p for p in pipe.transformer.parameters() if p.requires_grad], lr=1e-2
        )
        loss, components = loss_fn(
            pipe.transformer, first_item_batch(assets), torch.Generator().manual_seed(0)
        )
        loss.backward()
        optimizer.step()
        changed = {
            name
            for name, p in pipe.transformer.named_parameters()
            if not torch.equal(p, before[name])
        }
        assert changed and all("lora_" in name for name in changed)
        assert all("lora_B" in name or "lora_A" in name for name in changed)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            for name, p in module.named_parameters():
                assert torch.equal(p, frozen_before[name]), name
        expected = {"fm", "geo_mse", "geo_bg", "geo_dice", "geo_area", "geo_bnd"}
        expected |= {"emb_identity", "emb_geometry", "emb_overlay"}
        assert set(components) == expected
        assert all(torch.isfinite(v) for v in components.values())


class TestTrainingRun:
    def test_outputs_and_pipeline_loads_the_lora(self, assets, tmp_path, fresh_accelerate):
        out = run(
            assets,
            tmp_path / "out",
            max_train_steps=4,
            checkpointing_steps=2,
            checkpoints_total_limit=1,
            validation_steps=4,
            validation_inference_steps=2,
            num_validation_images=2,
        )
        records = read_metrics(out)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        for record in records:
            assert {"loss", "lr", "fm", "geo_area", "emb_overlay"} <= record.keys()
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
        grid = Image.open(out / "validation" / "step-000004.png")
        assert grid.width == 4 * grid.width // 4 and grid.height > 2 * 32

        item = EditPairDataset.from_folder(assets / "data", resolution=RESOLUTION)[0]
        height, width = item["target"].shape[-2:]
        call = {
            "image": to_pil(item["context"]),
            "prompt": item["prompt"],
            "height": height,
            "width": width,
            "max_area": height * width,
            "_auto_resize": False,
            "num_inference_steps": 2,
            "output_type": "np",
        }
        pipe = FluxKontextPipeline.from_pretrained(assets / "model")
        plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(out)
        adapted = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        assert plain.shape == adapted.shape == (1, height, width, 3)
        assert not torch.allclose(torch.from_numpy(plain), torch.from_numpy(adapted))

    def test_exact_resume_skips_half_written_checkpoints(self, assets, tmp_path, fresh_accelerate):
        common = {"gradient_accumulation_steps": 2, "checkpointing_steps": 3}
        straight = run(assets, tmp_path / "straight", max_train_steps=6, **common)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        resumed = run(assets, tmp_path / "resumed", max_train_steps=3, **common)
        # Stray folders a crash (or a user) could leave: neither is a complete checkpoint.
        (resumed / "checkpoint-5").mkdir()
        (resumed / "checkpoint-5" / "optimizer.bin").write_bytes(b"half")
        (resumed / ".checkpoint-4.partial").mkdir()
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        run(
            assets,
            resumed,
            max_train_steps=6,
            resume_from_checkpoint="latest",
            **common,
        )
        expected, got = lora_tensors(straight), lora_tensors(resumed)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), name
        assert read_metrics(straight) == read_metrics(resumed)

    def test_cached_latents_train_identically(self, assets, tmp_path, fresh_accelerate):
        plain = run(assets, tmp_path / "plain")
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cached = run(assets, tmp_path / "cached", cache_latents="true")
        entries = list((cached / "cache").glob("*/*.safetensors"))
        assert len(entries) == 4
        for name, value in lora_tensors(plain).items():
            assert torch.equal(value, lora_tensors(cached)[name]), name

    def test_init_lora_weights_starts_from_the_file(self, assets, tmp_path, fresh_accelerate):
        first = run(assets, tmp_path / "first", max_train_steps=2)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        again = run(
            assets,
            tmp_path / "again",
            max_train_steps=0,
            init_lora_weights=first / LORA_WEIGHTS_NAME,
        )
        for name, value in lora_tensors(first).items():
            assert torch.equal(value, lora_tensors(again)[name]), name


def evaluate_components(assets: Path, lora_dir: Path | None) -> dict[str, float]:
    """Every loss component averaged over the synthetic set with fixed noise and timesteps."""
    pipe = FluxKontextPipeline.from_pretrained(assets / "model")
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    config = kontext.KontextConfig(
        pretrained_model_name_or_path=str(assets / "model"),
        train_data_dir=str(assets / "data"),
        resolution=RESOLUTION,
    )
    loss_fn = kontext.KontextLoss(
        pipe, config, kontext.KontextEncoder(pipe, config, None), None, False
    )
    dataset = EditPairDataset.from_folder(assets / "data", resolution=RESOLUTION)
    totals: dict[str, float] = {}
    draws = [(index, repeat) for index in range(len(dataset)) for repeat in range(4)]
    with torch.no_grad():
        for index, repeat in draws:
            generator = torch.Generator().manual_seed(1000 + 10 * index + repeat)
            batch = collate_edit_pairs([dataset[index]])
            _, components = loss_fn(pipe.transformer, batch, generator)
            for name, value in components.items():
                totals[name] = totals.get(name, 0.0) + value.item() / len(draws)
    return totals


@pytest.fixture(scope="module")
def untrained_components(assets):
    return evaluate_components(assets, None)


class TestEachTermAlone:
    @pytest.mark.parametrize("term", list(kontext.TERM_WEIGHT_FLAGS))
    def test_training_on_one_term_lowers_it(
        self, assets, tmp_path, fresh_accelerate, untrained_components, term
    ):
        weights = {flag: 0 for flag in kontext.TERM_WEIGHT_FLAGS.values()}
        weights[kontext.TERM_WEIGHT_FLAGS[term]] = 1
        out = run(
            assets,
            tmp_path / term,
            max_train_steps=30,
            learning_rate=1e-2,
            flow_matching_weight=0,
            **weights,
        )
        logged = read_metrics(out)
        assert all(set(r) - {"step", "epoch", "lr", "loss"} == {"fm", term} for r in logged)
        after = evaluate_components(assets, out)
        assert after[term] < untrained_components[term]


class TestInputsAndEncoders:
    def test_image_encoder_embeddings(self, assets, tmp_path, fresh_accelerate):
        encoder = write_tiny_dinov2(tmp_path / "dinov2")
        out = run(
            assets,
            tmp_path / "out",
            max_train_steps=2,
            embedding_encoder=encoder,
            cache_latents="true",
        )
        records = read_metrics(out)
        assert {"emb_identity", "emb_geometry", "emb_overlay"} <= records[-1].keys()
        assert all(torch.isfinite(torch.tensor(r["emb_geometry"])) for r in records)
        entry = next((out / "cache").glob("*/*.safetensors"))
        stored = load_file(entry)
        assert stored["target_embeds"].shape == (5, 32)  # class token + 2x2 patches, width 32
        assert "overlay_tokens" not in stored

    def test_hugging_face_dataset(self, assets, tmp_path, fresh_accelerate):
        rows = [
            json.loads(line)
            for line in (assets / "data" / "metadata.jsonl").read_text().splitlines()
        ]
        columns = {
            name: [str(assets / "data" / row[key]) for row in rows]
            for name, key in (("source", "context"), ("edited", "target"), ("region", "mask"))
        }
        dataset = Dataset.from_dict({**columns, "instruction": [row["prompt"] for row in rows]})
        for name in columns:
            dataset = dataset.cast_column(name, ImageFeature())
        dataset.save_to_disk(tmp_path / "hf")
        out = run(
            assets,
            tmp_path / "out",
            train_data_dir=None,
            dataset_name=tmp_path / "hf",
            context_column="source",
            target_column="edited",
            mask_column="region",
            prompt_column="instruction",
            max_train_steps=2,
        )
        assert [r["step"] for r in read_metrics(out)] == [1, 2]

    @pytest.mark.parametrize("name", ["kontext_tiny.yaml", "kontext.yaml"])
    def test_shipped_configs_parse(self, name):
        config = parse_config(
            kontext.KontextConfig,
            ["--config", str(ROOT / "configs" / name), "--train_data_dir", "data"],
        )
        assert config.resolution % 16 == 0 and config.max_train_steps > 0


class TestSameInputsAsThePipeline:
    def test_transformer_inputs_match_the_first_denoising_step(self, assets):
        pipe = FluxKontextPipeline.from_pretrained(assets / "model")
        pipe.set_progress_bar_config(disable=True)
        batch = first_item_batch(assets)
        height, width = batch["target"].shape[-2:]
        noise = torch.randn(
            1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(3)
        )
        seen = {}

        def record(module, args, kwargs):
            seen.setdefault("kwargs", kwargs)  # the first denoising step

        hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
        pipe(
            image=to_pil(batch["context"][0]),
            prompt=batch["prompt"][0],
            latents=pipe._pack_latents(noise, 1, 16, height // 8, width // 8),
            height=height,
            width=width,
            max_area=height * width,
            _auto_resize=False,
            num_inference_steps=1,
            output_type="latent",
        )
        hook.remove()
        config = kontext.KontextConfig(
            pretrained_model_name_or_path=str(assets / "model"),
            train_data_dir=str(assets / "data"),
            resolution=RESOLUTION,
        )
        encoded = kontext.KontextEncoder(pipe, config, None)(batch)
        built = kontext.kontext_transformer_inputs(
            pipe,
            noise,
            encoded["context_latents"],
            encoded["prompt_embeds"],
            encoded["pooled_prompt_embeds"],
            torch.ones(1),
            config.guidance_scale,
        )
        expected = seen["kwargs"]
        assert expected["encoder_hidden_states"].shape[1] == config.max_sequence_length == 512
        assert expected["guidance"].tolist() == [3.5] and expected["timestep"].tolist() == [1.0]
        context_ids = expected["img_ids"][(height // 16) * (width // 16) :]
        assert (context_ids[:, 0] == 1).all() and (
            expected["img_ids"][: context_ids.shape[0], 0] == 0
        ).all()
        target_tokens = (height // 16) * (width // 16)
        assert torch.equal(
            built["hidden_states"][:, :target_tokens], expected["hidden_states"][:, :target_tokens]
        )
        # The pipeline's preprocessed image is channels-last in memory, and the VAE's convolutions
        # pick another kernel for that layout: the same pixels encode to within float rounding
        # (1.6e-6 here), not bit for bit.
        torch.testing.assert_close(
            built["hidden_states"][:, target_tokens:],
            expected["hidden_states"][:, target_tokens:],
            rtol=0,
            atol=1e-5,
        )
        for name in (
            "timestep",
            "guidance",
            "pooled_projections",
            "encoder_hidden_states",
            "txt_ids",
            "img_ids",
        ):
            assert torch.equal(built[name], expected[name]), name


class TestBadInput:
    @pytest.mark.parametrize(
        "problem,expected",
        [
            ("mask_size", "masks/0000.png"),
            ("missing", "images/0001_target.png"),
            ("unreadable", "images/0002_context.png"),
            ("no_prompt", "prompt"),
        ],
    )
    def test_clear_error_before_the_first_step(
        self, assets, tmp_path, fresh_accelerate, problem, expected
    ):
        data = tmp_path / "data"
        write_kontext_dataset(data, n=4, resolution=RESOLUTION, seed=0)
        rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
        if problem == "mask_size":
            Image.new("L", (24, 24)).save(data / rows[0]["mask"])
        elif problem == "missing":
            (data / rows[1]["target"]).unlink()
        elif problem == "unreadable":
            (data / rows[2]["context"]).write_text("not an image")
        else:
            rows[3]["prompt"] = ""
            (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / "out"
        (out / "checkpoint-7").mkdir(parents=True)
        (out / "checkpoint-7" / "training_state.json").write_text("{}")
        with pytest.raises(DataError, match=expected.replace(".", r"\.")):
            run(assets, out, train_data_dir=data)
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-7"]


class TestCommandLine:
    def test_help_documents_every_flag(self):
        result = subprocess.run(
            [sys.executable, str(ROOT / "train_kontext_lora.py"), "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        for field in fields(kontext.KontextConfig):
            assert f"--{field.name}" in result.stdout, field.name

    def test_two_process_cpu_run(self, assets, tmp_path):
        out = tmp_path / "ddp"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                str(ROOT / "train_kontext_lora.py"),
                *base_args(assets, out, max_train_steps=4, checkpointing_steps=2),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 ranks" in result.stderr and "identical on all 2 ranks" in result.stderr
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
        for step in (2, 4):
            names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
            assert {"random_states_0.pkl", "random_states_1.pkl", LORA_WEIGHTS_NAME} <= names
        assert not list(out.glob(".checkpoint-*"))
