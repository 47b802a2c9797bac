"""train_kontext_lora.py end to end on a tiny random FLUX.1 Kontext and the synthetic set."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import fields
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from diffusers import AutoencoderKL, FluxKontextPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from script_runs import (
    ROOT,
    TrainScript,
    assert_int8_run_resumes_exactly,
    assert_same_tensors,
    first_call,
    listed,
    lock_held_elsewhere,
    lora_tensors,
    model_card,
    pipeline_as_trained,
    resume_copy,
    unloadable_copy,
)
from script_runs import help_text as script_help

import train_kontext_lora as kontext
from data.buckets import BucketBatchSampler
from data.edit_pairs import EditPairDataset
from data.images import DataError
from data.rows import collate_items
from data.synthetic import write_kontext_dataset
from scripts import export_lora
from training.config import parse_config
from training.inputs.flux import FLUX_ENCODERS, FLUX_LORA_LAYERS
from training.lora.adapters import add_lora
from training.lora.export import LORA_WEIGHTS_NAME
from training.metrics import read_metrics
from training.validation import to_pil
from worlds.tiny_models import tiny_flux_kontext_pipeline, write_tiny_dinov2

RESOLUTION = 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext")
    tiny_flux_kontext_pipeline(seed=0).save_pretrained(root / "model")
    write_kontext_dataset(root / "data", n=4, resolution=RESOLUTION, seed=0)
    return root


@pytest.fixture(scope="module")
def help_text() -> str:
    return script_help("train_kontext_lora.py")


SCRIPT = TrainScript(kontext, kontext.KontextConfig, RESOLUTION, seed=7)
run = SCRIPT.run
launch = SCRIPT.launch
kontext_config = SCRIPT.config


def first_item_batch(assets: Path) -> dict:
    dataset = EditPairDataset.from_folder(assets / "data", resolution=RESOLUTION)
    return collate_items([dataset[0]])


class TestOneStep:
    def test_only_lora_parameters_change(self, assets):
        pipe = FluxKontextPipeline.from_pretrained(assets / "model")
        config = kontext.KontextConfig(
            pretrained_model_name_or_path=str(assets / "model"),
            train_data_dir=str(assets / "data"),
            resolution=RESOLUTION,
            rank=4,
        )
        add_lora(pipe.transformer, config, FLUX_LORA_LAYERS, kontext.KONTEXT_LORA)
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
        expected = {"fm", "masked_samples", "geo_mse", "geo_bg", "geo_dice", "geo_area"}
        expected |= {"geo_bnd", "emb_identity", "emb_overlay"}  # emb_geometry: 0 on latents
        assert set(components) == expected
        assert all(torch.isfinite(v) for v in components.values())


@pytest.fixture(scope="module")
def latent_token_components(assets):
    """One batch's loss components with every term on, and the sigma it was drawn at."""
    pipe = FluxKontextPipeline.from_pretrained(assets / "model")
    config = kontext_config(assets, geometry_match_weight=0.5, w_in=1.0, w_band=1.0, w_out=1.0)
    encoder = kontext.KontextEncoder(pipe, config, None)
    batch = first_item_batch(assets)
    loss_fn = kontext.KontextLoss(pipe, config, encoder, None, False)
    with torch.no_grad():
        _, parts = loss_fn(pipe.transformer, batch, torch.Generator().manual_seed(11))
    # The same draws, in the loss's order: the noise, then the timestep.
    generator = torch.Generator().manual_seed(11)
    x0 = encoder(batch)["target_latents"]
    torch.randn(x0.shape, generator=generator)
    sigma = kontext.sample_sigmas(
        config, 1, x0.shape[-2] * x0.shape[-1] // 4, pipe.scheduler.config, generator
    )
    return parts, sigma.item()


class TestLatentTokenIdentities:
    """On latent tokens, x0_hat - x0 = -sigma (v - v*): some auxiliary terms are the
    flow-matching error reweighted by sigma**2, whatever the model predicts."""

    def test_geometry_match_is_64_sigma_squared_flow_matching(self, latent_token_components):
        parts, sigma = latent_token_components
        assert 0 < sigma < 1
        expected = 64 * sigma**2 * parts["fm"]
        torch.testing.assert_close(parts["emb_geometry"], expected, rtol=1e-5, atol=0)

    def test_unweighted_geometry_mse_is_sigma_squared_flow_matching(self, latent_token_components):
        parts, sigma = latent_token_components
        torch.testing.assert_close(parts["geo_mse"], sigma**2 * parts["fm"], rtol=1e-5, atol=0)

    def test_geometry_match_default_depends_on_the_embeddings(self, assets):
        assert kontext_config(assets).embedding_weights().geometry == 0
        with_encoder = kontext_config(assets, embedding_encoder="dinov2")
        assert with_encoder.embedding_weights().geometry == 0.5
        chosen = kontext_config(assets, geometry_match_weight=0.05)
        assert chosen.embedding_weights().geometry == 0.05

    def test_help_says_what_the_term_reduces_to(self, help_text):
        assert "64 * sigma**2 times the" in " ".join(help_text.split())


def base_and_adapted(assets: Path, lora: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The unquantized ``FluxKontextPipeline``'s output on the first pair, without and with
    the LoRA in ``lora`` (a folder or file)."""
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
        "output_type": "pt",
    }
    pipe = FluxKontextPipeline.from_pretrained(assets / "model")
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(lora)
    adapted = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    return plain.permute(0, 2, 3, 1), adapted.permute(0, 2, 3, 1)


class TestLowMemory:
    def test_int8_base_trains_resumes_and_its_lora_loads_unquantized_and_exports(
        self, assets, tmp_path, fresh_accelerate
    ):
        out = assert_int8_run_resumes_exactly(
            SCRIPT, assets, tmp_path, quantize_text_encoders="int8"
        )
        card = model_card(out).text
        assert "int8 weights (`--quantize_base int8`)" in card and "| adamw8bit |" in card
        plain, adapted = base_and_adapted(assets, out)
        assert not torch.allclose(plain, adapted)
        # To the kohya/ComfyUI layout and back (diffusers' own kohya reader assumes FLUX.1's
        # real widths for the single blocks' fused projection, which the tiny model lacks).
        kohya, back = tmp_path / "kohya.safetensors", tmp_path / "back.safetensors"
        export_lora.main([str(out), "--to", "kohya", "--out", str(kohya)])
        export_lora.main([str(kohya), "--to", "diffusers", "--out", str(back)])
        _, from_kohya = base_and_adapted(assets, back)
        torch.testing.assert_close(from_kohya, adapted, rtol=0, atol=1e-5)

    def test_fp8_base_trains_in_bf16(self, assets, tmp_path, fresh_accelerate):
        out = run(
            assets,
            tmp_path / "out",
            quantize_base="fp8",
            mixed_precision="bf16",
            max_train_steps=2,
        )
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(out))
        ups = [t for name, t in lora_tensors(out).items() if "lora_B" in name]
        assert all(t.dtype == torch.float32 for t in ups) and any(t.abs().sum() > 0 for t in ups)

    def test_offloaded_blocks_train_the_same_lora_and_validate(
        self, assets, tmp_path, fresh_accelerate
    ):
        common = {"gradient_checkpointing": "true", "max_train_steps": 2}
        whole = run(assets, tmp_path / "whole", **common)
        offloaded = run(
            assets,
            tmp_path / "offloaded",
            offload_blocks="all",
            validation_steps=2,
            validation_inference_steps=2,
            num_validation_images=1,
            **common,
        )
        for name, value in lora_tensors(whole).items():
            torch.testing.assert_close(lora_tensors(offloaded)[name], value, rtol=1e-5, atol=1e-7)
        assert (offloaded / "validation" / "step-000002.png").is_file()

    def test_the_run_logs_its_memory_plan_before_the_first_step(
        self, assets, tmp_path, fresh_accelerate, caplog
    ):
        caplog.set_level("INFO")
        run(assets, tmp_path / "out", max_train_steps=1, quantize_base="int8")
        text = caplog.text
        assert "memory plan of this run" in text and "denoiser weights" in text
        assert text.index("memory plan of this run") < text.index("training 1 steps")

    def test_offload_needs_gradient_checkpointing(self, assets, capsys):
        with pytest.raises(SystemExit):
            flags = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]
            off = ["--gradient_checkpointing", "false"]  # on by default
            parse_config(kontext.KontextConfig, [*flags, *off, "--offload_blocks", "4"])
        assert "--offload_blocks needs --gradient_checkpointing" in capsys.readouterr().err

    def test_resuming_on_another_quantization_is_refused(self, assets, tmp_path, fresh_accelerate):
        out = run(assets, tmp_path / "out", quantize_base="int8", checkpointing_steps=2)
        with pytest.raises(DataError, match="--quantize_base 'int8', this run 'none'"):
            run(assets, out, max_train_steps=6, resume_from_checkpoint="latest")


class TestStoppingOnBadData:
    def test_a_file_bad_mid_run_stops_after_a_checkpoint_of_the_last_step(
        self, assets, tmp_path, fresh_accelerate, caplog
    ):
        data = tmp_path / "data"
        shutil.copytree(assets / "data", data)
        dataset = EditPairDataset.from_folder(data, resolution=RESOLUTION)
        sampler = BucketBatchSampler(dataset.bucket_of_items, 1, seed=7)
        sampler.set_epoch(0)
        third = list(sampler)[2][0]  # the item the run's third step reads
        target = dataset.rows[third].images["target"].source
        target.write_bytes(target.read_bytes()[:200])  # header intact: passes the check
        caplog.set_level("INFO")
        with pytest.raises(DataError, match="image data is corrupt or truncated"):
            run(assets, tmp_path / "out", train_data_dir=data, checkpointing_steps=100)
        out = tmp_path / "out"
        assert [r["step"] for r in read_metrics(out)] == [1, 2]
        assert "checkpoint-2" in listed(out)
        assert "saved checkpoint-2 before stopping on the data error" in caplog.text


class TestOutputFolder:
    def test_a_finished_run_stays_until_overwritten_and_the_users_files_always(
        self, assets, tmp_path, fresh_accelerate, capsys
    ):
        out = run(assets, tmp_path / "out", max_train_steps=1)
        (out / "notes.txt").write_text("mine")
        finished = lora_tensors(out)
        with pytest.raises(SystemExit) as stopped:
            run(assets, out, max_train_steps=1, seed=1)
        assert stopped.value.code == 2
        assert "already holds a finished run (pytorch_lora_weights" in capsys.readouterr().err
        assert_same_tensors(lora_tensors(out), finished)
        run(assets, out, max_train_steps=1, seed=1, overwrite_output_dir="true")
        assert (out / "notes.txt").read_text() == "mine"
        assert lora_tensors(out).keys() == finished.keys()

    def test_a_folder_another_run_uses_is_refused_with_exit_2(
        self, assets, tmp_path, fresh_accelerate, capsys
    ):
        out = tmp_path / "out"
        with lock_held_elsewhere(out) as pid:
            with pytest.raises(SystemExit) as stopped:
                run(assets, out, max_train_steps=1)
        assert stopped.value.code == 2
        assert f"in use by another run: process {pid} on" in capsys.readouterr().err
        assert listed(out) == []

    @pytest.mark.parametrize("where", ["empty", "data"])
    def test_no_name_or_the_data_folder_is_refused_before_loading(
        self, assets, tmp_path, fresh_accelerate, capsys, where
    ):
        data = tmp_path / "data"
        write_kontext_dataset(data, n=2, resolution=RESOLUTION, seed=0)
        (data / "README.md").write_text("the data set's card")
        output = {"empty": "", "data": data}[where]
        with pytest.raises(SystemExit) as stopped:
            run(assets, output, train_data_dir=data, pretrained_model_name_or_path="missing")
        assert stopped.value.code == 2
        expected = {"empty": "--output_dir is empty", "data": "is the training data folder"}
        assert expected[where] in capsys.readouterr().err
        assert (data / "README.md").read_text() == "the data set's card"


def pairs_without_masks(root: Path) -> Path:
    """Control folders of the synthetic pairs: targets/ with .txt captions and contexts/ at
    twice the targets' size, and no masks."""
    source = root / "source"
    write_kontext_dataset(source, n=4, resolution=RESOLUTION, seed=0)
    for index, line in enumerate((source / "metadata.jsonl").read_text().splitlines()):
        row = json.loads(line)
        for folder in ("targets", "contexts"):
            (root / folder).mkdir(exist_ok=True)
        Image.open(source / row["target"]).save(root / "targets" / f"{index}.png")
        (root / "targets" / f"{index}.txt").write_text(row["prompt"])
        context = Image.open(source / row["context"])
        context.resize((context.width * 2, context.height * 2)).save(
            root / "contexts" / f"{index}.png"
        )
    return root


class TestWithoutMasks:
    def loss_of(self, assets, items):
        pipe = FluxKontextPipeline.from_pretrained(assets / "model")
        config = kontext_config(assets)
        loss_fn = kontext.KontextLoss(
            pipe, config, kontext.KontextEncoder(pipe, config, None), None, False
        )
        with torch.no_grad():
            return loss_fn(pipe.transformer, collate_items(items), torch.Generator().manual_seed(0))

    def test_rows_without_a_mask_train_with_flow_matching_alone(self, assets):
        dataset = EditPairDataset.from_folder(assets / "data", resolution=RESOLUTION)
        first, second = dataset[0], dataset[1]
        assert first["target"].shape == second["target"].shape  # one bucket
        plain = {**second, "has_mask": torch.tensor(False)}
        loss, parts = self.loss_of(assets, [plain, {**plain, "index": 0}])
        assert set(parts) == {"fm", "masked_samples"} and parts["masked_samples"] == 0
        assert loss == parts["fm"]
        loss, parts = self.loss_of(assets, [first, plain])
        assert parts["masked_samples"] == 0.5
        # The mask terms (of the masked row alone) count by the masked rows' share of the batch.
        weights = kontext_config(assets)
        aux = sum(
            getattr(weights, kontext.TERM_WEIGHT_FLAGS[name]) * value
            for name, value in parts.items()
            if name in kontext.TERM_WEIGHT_FLAGS
        )
        torch.testing.assert_close(loss, parts["fm"] + 0.5 * aux)

    def test_control_folders_without_masks_and_larger_contexts_train(
        self, assets, tmp_path, fresh_accelerate
    ):
        data = pairs_without_masks(tmp_path / "data")
        out = run(
            assets,
            tmp_path / "out",
            train_data_dir=data / "targets",
            control_dirs=json.dumps([str(data / "contexts")]),
            max_train_steps=2,
        )
        records = read_metrics(out)
        assert [r["masked_samples"] for r in records] == [0.0, 0.0]
        assert all("geo_mse" not in r for r in records)
        assert (out / LORA_WEIGHTS_NAME).is_file()

    def test_a_data_error_comes_before_the_model_loads(self, assets, tmp_path, fresh_accelerate):
        broken = unloadable_copy(assets / "model", tmp_path / "model")
        data = pairs_without_masks(tmp_path / "data")
        flags = {
            "pretrained_model_name_or_path": broken,
            "train_data_dir": data / "targets",
            "control_dirs": json.dumps([str(data / "contexts")]),
            "max_train_steps": 1,
        }
        with pytest.raises(Exception, match="transformer") as loading:
            run(assets, tmp_path / "good", **flags)
        assert not isinstance(loading.value, DataError)
        (data / "targets" / "2.txt").unlink()
        with pytest.raises(DataError, match=r"no caption file '2\.txt'"):
            run(assets, tmp_path / "bad", **flags)


class TestTrainingRun:
    def test_outputs_and_pipeline_loads_the_lora(self, assets, tmp_path, fresh_accelerate, caplog):
        caplog.set_level(logging.INFO)
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
        assert f"step 4: validation images in {out / 'validation' / 'step-000004.png'}" in (
            caplog.text
        )
        records = read_metrics(out)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        for record in records:
            assert {"loss", "lr", "fm", "geo_area", "emb_overlay"} <= record.keys()
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
        grid = Image.open(out / "validation" / "step-000004.png")
        assert grid.width == 4 * grid.width // 4 and grid.height > 2 * 32
        card = model_card(out)
        assert "flux-kontext" in card.data.tags and "FluxKontextPipeline" in card.text
        assert "| geo_dice | 0.9 |" in card.text and "(validation/step-000004.png)" in card.text

        plain, adapted = base_and_adapted(assets, out)
        assert plain.shape == adapted.shape == (1, RESOLUTION, RESOLUTION, 3)
        assert not torch.allclose(plain, adapted)

    def test_the_final_lora_in_bf16_checkpoints_in_fp32(self, assets, tmp_path, fresh_accelerate):
        common = {"max_train_steps": 2, "checkpointing_steps": 2}
        full = run(assets, tmp_path / "fp32", **common)
        half = run(assets, tmp_path / "bf16", save_dtype="bf16", **common)
        wide, narrow = lora_tensors(full), lora_tensors(half)
        assert wide.keys() == narrow.keys()
        assert all(narrow[name].dtype == torch.bfloat16 for name in narrow)
        assert_same_tensors({n: t.to(torch.bfloat16) for n, t in wide.items()}, narrow)
        checkpoint = load_file(half / "checkpoint-2" / LORA_WEIGHTS_NAME)
        assert all(t.dtype == torch.float32 for t in checkpoint.values())
        plain, adapted = base_and_adapted(assets, half)  # loads, LoRA config read back
        assert not torch.allclose(plain, adapted)

    def test_exact_resume_skips_half_written_checkpoints(self, assets, tmp_path, fresh_accelerate):
        common = {"gradient_accumulation_steps": 2, "checkpointing_steps": 3}
        straight = run(assets, tmp_path / "straight", max_train_steps=6, **common)
        resumed = run(assets, tmp_path / "resumed", max_train_steps=3, **common)
        # Stray folders a crash (or a user) could leave: neither is a complete checkpoint.
        (resumed / "checkpoint-5").mkdir()
        (resumed / "checkpoint-5" / "optimizer.bin").write_bytes(b"half")
        (resumed / ".checkpoint-4.partial").mkdir()
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
        cached = run(assets, tmp_path / "cached", cache_latents="true")
        entries = list((cached / "cache").glob("*/*.safetensors"))
        assert len(entries) == 4
        for name, value in lora_tensors(plain).items():
            assert torch.equal(value, lora_tensors(cached)[name]), name

    def test_replaced_encoder_weights_miss_the_cache(self, assets, tmp_path, fresh_accelerate):
        model = tmp_path / "model"
        shutil.copytree(assets / "model", model)
        out = run(
            assets, tmp_path / "out", pretrained_model_name_or_path=model, cache_latents="true"
        )
        first = {p.relative_to(out) for p in (out / "cache").glob("*/*.safetensors")}
        # New VAE weights at the same path: same configs, same file names and sizes.
        vae = AutoencoderKL.from_pretrained(model / "vae")
        with torch.no_grad():
            for param in vae.parameters():
                param.mul_(1.5)
        vae.save_pretrained(model / "vae")
        run(
            assets,
            out,
            pretrained_model_name_or_path=model,
            cache_latents="true",
            overwrite_output_dir="true",
        )
        entries = {p.relative_to(out) for p in (out / "cache").glob("*/*.safetensors")}
        assert len(first) == 4 and len(entries) == 8 and first < entries

    def test_init_lora_weights_starts_from_the_file(self, assets, tmp_path, fresh_accelerate):
        first = run(assets, tmp_path / "first", max_train_steps=2, lora_alpha=16)
        # No --rank or --lora_alpha: both come from the file's metadata (rank 4, alpha 16). One
        # step of a negligible learning rate: the LoRA is the file's (a fresh one differs by
        # about 1e-2, the step by about 1e-30).
        again = run(
            assets,
            tmp_path / "again",
            max_train_steps=1,
            learning_rate=1e-30,
            rank=None,
            init_lora_weights=first / LORA_WEIGHTS_NAME,
        )
        for name, value in lora_tensors(first).items():
            torch.testing.assert_close(lora_tensors(again)[name], value, rtol=0, atol=1e-20)
        with safe_open(str(again / LORA_WEIGHTS_NAME), "pt") as handle:
            metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
        assert metadata["transformer.lora_alpha"] == 16 and metadata["transformer.r"] == 4

    def test_init_lora_weights_refuses_a_conflicting_flag(self, assets, tmp_path, fresh_accelerate):
        first = run(assets, tmp_path / "first", max_train_steps=1, lora_alpha=16)
        with pytest.raises(ValueError, match=r"--lora_alpha 4\.0 but the file has 16"):
            run(
                assets,
                tmp_path / "again",
                lora_alpha=4,
                init_lora_weights=first / LORA_WEIGHTS_NAME,
            )


def evaluate_components(assets: Path, lora_dir: Path | None) -> dict[str, float]:
    """Every loss component averaged over the synthetic set with fixed noise and timesteps."""
    pipe = FluxKontextPipeline.from_pretrained(assets / "model")
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    # Every term on, the latent-token geometry match included, so that each can be read.
    config = kontext_config(assets, geometry_match_weight=0.5)
    loss_fn = kontext.KontextLoss(
        pipe, config, kontext.KontextEncoder(pipe, config, None), None, False
    )
    dataset = EditPairDataset.from_folder(assets / "data", resolution=RESOLUTION)
    totals: dict[str, float] = {}
    draws = [(index, repeat) for index in range(len(dataset)) for repeat in range(4)]
    with torch.no_grad():
        for index, repeat in draws:
            generator = torch.Generator().manual_seed(1000 + 10 * index + repeat)
            batch = collate_items([dataset[index]])
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
        bookkeeping = {"step", "epoch", "lr", "loss", "nonfinite_skipped", "masked_samples"}
        assert all(set(r) - bookkeeping == {"fm", term} for r in logged)
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

    @pytest.mark.parametrize("name", ["kontext_tiny.yaml", "kontext.yaml", "kontext_24gb.yaml"])
    def test_shipped_configs_parse(self, name):
        config = parse_config(
            kontext.KontextConfig,
            ["--config", str(ROOT / "configs" / name), "--train_data_dir", "data"],
        )
        assert config.resolution % 16 == 0 and config.max_train_steps > 0


class TestSameInputsAsThePipeline:
    @pytest.mark.parametrize("quantized", ["none", "int8"])
    def test_transformer_inputs_match_the_first_denoising_step(self, assets, quantized):
        # The pipeline as training loads it: with --quantize_base int8 its transformer and text
        # encoders hold int8 weights, and both sides use them.
        config = kontext_config(assets, quantize_base=quantized, quantize_text_encoders=quantized)
        pipe = pipeline_as_trained(FluxKontextPipeline, config, FLUX_ENCODERS)
        batch = first_item_batch(assets)
        height, width = batch["target"].shape[-2:]
        noise = torch.randn(
            1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(3)
        )
        with first_call(pipe.transformer) as seen:
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
            run(assets, out, train_data_dir=data, resume_from_checkpoint="latest")
        assert listed(out) == ["checkpoint-7"]


class TestCommandLine:
    def test_help_documents_every_flag(self, help_text):
        for field in fields(kontext.KontextConfig):
            assert f"--{field.name}" in help_text, field.name

    def test_two_process_cpu_run_on_an_int8_base(self, assets, tmp_path):
        # DDP leaves the frozen (here quantized) weights alone: each rank loaded its own.
        out = tmp_path / "ddp"
        result = launch(
            assets,
            out,
            max_train_steps=4,
            checkpointing_steps=2,
            quantize_base="int8",
            optimizer="adamw8bit",
        )
        assert "2 ranks" in result.stderr and "identical on all 2 ranks" in result.stderr
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
        for step in (2, 4):
            names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
            assert {"rng-0.safetensors", "rng-1.safetensors", LORA_WEIGHTS_NAME} <= names
        assert not list(out.glob(".checkpoint-*"))


class TestResumeOnAnotherNumberOfProcesses:
    """Two ranks, or one accumulating two micro-batches: the same global batch, data order,
    noise and schedule. Resuming across them continues the same run; the final LoRAs agree to
    float rounding (DDP averages gradients where accumulation sums halves)."""

    # Four items, batch 1: two optimizer steps per epoch; checkpoint-1 is mid-epoch.
    COMMON: ClassVar[dict] = {
        "max_train_steps": 3,
        "checkpointing_steps": 1,
        "lr_scheduler": "linear",
    }

    @staticmethod
    def assert_same_run(expected: Path, got: Path) -> None:
        for name, value in lora_tensors(expected).items():
            torch.testing.assert_close(lora_tensors(got)[name], value, rtol=1e-4, atol=1e-6)
        want, have = read_metrics(expected), read_metrics(got)
        assert [r["step"] for r in have] == [1, 2, 3]
        assert [r["lr"] for r in have] == [r["lr"] for r in want]
        assert [r["lr"] for r in have] == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0])
        for before, after in zip(want, have, strict=True):
            assert after["loss"] == pytest.approx(before["loss"], rel=1e-4)

    def test_two_ranks_then_one(self, assets, tmp_path, fresh_accelerate):
        two = tmp_path / "two"
        launch(assets, two, **self.COMMON)
        resumed = resume_copy(two, 1, tmp_path / "resumed")
        run(
            assets,
            resumed,
            gradient_accumulation_steps=2,
            resume_from_checkpoint="latest",
            **self.COMMON,
        )
        self.assert_same_run(two, resumed)

    def test_one_then_two_ranks(self, assets, tmp_path, fresh_accelerate):
        one = run(assets, tmp_path / "one", gradient_accumulation_steps=2, **self.COMMON)
        resumed = resume_copy(one, 1, tmp_path / "resumed")
        launch(assets, resumed, resume_from_checkpoint="latest", **self.COMMON)
        self.assert_same_run(one, resumed)

    def test_another_global_batch_is_refused(self, assets, tmp_path, fresh_accelerate):
        one = run(assets, tmp_path / "one", gradient_accumulation_steps=2, **self.COMMON)
        resumed = resume_copy(one, 1, tmp_path / "resumed")
        with pytest.raises(ValueError, match="--gradient_accumulation_steps 2"):
            run(assets, resumed, resume_from_checkpoint="latest", **self.COMMON)
