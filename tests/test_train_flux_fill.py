"""train_flux_fill.py end to end on a tiny random FLUX.1 Fill and the synthetic inpainting set."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from grpo_checks import assert_ratios_are_one_on_policy
from PIL import Image
from safetensors.torch import save_file
from script_runs import (
    ROOT,
    TrainScript,
    assert_int8_run_resumes_exactly,
    assert_same_tensors,
    first_call,
    first_inpainting_batch,
    help_text,
    inpainting_call,
    lora_tensors,
    model_card,
    pipeline_as_trained,
    quiet_pipeline,
    resume_copy,
    write_assets,
)
from torch.distributions import Normal

import train_flux_fill as fill
from data.fill_latents import MANIFEST_FILE, FillLatentDataset, VaeScaling
from data.images import DataError
from data.inpainting import InpaintingDataset
from data.rows import collate_items
from data.synthetic import write_inpainting_dataset
from training.config import parse_config
from training.grpo.policy import sample_rollout, transition
from training.grpo.rewards import RewardError, RewardOptions, Rewards
from training.inputs.flux import FLUX_ENCODERS, FLUX_LORA_LAYERS
from training.lora.adapters import add_lora
from training.metrics import read_metrics
from training.validation import to_pil
from worlds.tiny_models import tiny_flux_fill_pipeline

RESOLUTION = 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill")
    return write_assets(root, tiny_flux_fill_pipeline(seed=0), write_inpainting_dataset, RESOLUTION)


SCRIPT = TrainScript(fill, fill.FillConfig, RESOLUTION, seed=3)
run = SCRIPT.run
config = SCRIPT.config


def first_batch(assets: Path) -> dict:
    return first_inpainting_batch(assets, RESOLUTION)


@pytest.fixture(scope="module")
def pipe(assets):
    return quiet_pipeline(FluxFillPipeline, assets)


@pytest.fixture(scope="module")
def precomputed_folder(assets, tmp_path_factory) -> Path:
    """Seed 004's precomputed folder of the assets' raw examples, by its script."""
    encoded = tmp_path_factory.mktemp("fill_encoded")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "precompute_flux_fill.py"),
            "--pretrained_model_name_or_path",
            str(assets / "model"),
            "--train_data_dir",
            str(assets / "data"),
            "--out",
            str(encoded),
            "--resolution",
            str(RESOLUTION),
        ],
        check=True,
        capture_output=True,
    )
    return encoded


class TestSameInputsAsThePipeline:
    @pytest.mark.parametrize("quantized", ["none", "int8"])
    def test_first_denoising_step(self, assets, quantized):
        # The pipeline as training loads it, with int8 transformer and text encoders or not.
        fill_config = config(assets, quantize_base=quantized, quantize_text_encoders=quantized)
        pipe = pipeline_as_trained(FluxFillPipeline, fill_config, FLUX_ENCODERS)
        batch = first_batch(assets)
        mask = batch["mask"][0, 0]
        # The synthetic mask is an ellipse: its edge cuts through 8x8 latent cells.
        cells = mask.reshape(RESOLUTION // 8, 8, RESOLUTION // 8, 8).mean(dim=(1, 3))
        assert ((cells > 0) & (cells < 1)).any()
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        with first_call(pipe.transformer) as seen:
            pipe(
                prompt=batch["prompt"][0],
                image=to_pil(batch["image"][0]),
                mask_image=Image.fromarray((mask.numpy() * 255).astype(np.uint8)),
                latents=pipe._pack_latents(noise, 1, 16, 8, 8),
                height=RESOLUTION,
                width=RESOLUTION,
                num_inference_steps=1,
                generator=torch.Generator().manual_seed(5),
                output_type="latent",
            )
        expected = seen["kwargs"]

        encoder = fill.FillEncoder(pipe, fill_config)
        loss = fill.FillLoss(pipe, fill_config, encoder, encoded=False)
        encoded = encoder(batch)
        conditioning = loss.sample_conditioning(encoded, torch.Generator().manual_seed(5))
        built = fill.fill_transformer_inputs(
            pipe,
            noise,
            conditioning,
            encoded["prompt_embeds"],
            encoded["pooled_prompt_embeds"],
            torch.ones(1),
            fill_config.guidance_scale,
        )
        assert built["hidden_states"].shape == expected["hidden_states"].shape == (1, 16, 384)
        assert torch.equal(built["hidden_states"][..., :64], expected["hidden_states"][..., :64])
        # The masked image's latents: the same VAE draw; the pipeline's image is channels-last in
        # memory, which changes the convolution kernels' rounding (1e-6), not the values.
        torch.testing.assert_close(
            built["hidden_states"][..., 64:128],
            expected["hidden_states"][..., 64:128],
            rtol=0,
            atol=1e-5,
        )
        assert torch.equal(built["hidden_states"][..., 128:], expected["hidden_states"][..., 128:])
        assert expected["guidance"].tolist() == [30.0] and expected["timestep"].tolist() == [1.0]
        assert expected["encoder_hidden_states"].shape[1] == 512
        for name in (
            "timestep",
            "guidance",
            "pooled_projections",
            "encoder_hidden_states",
            "txt_ids",
            "img_ids",
        ):
            assert torch.equal(built[name], expected[name]), name


def one_loss(pipe, fill_config, batch, encoded=False, seed=0):
    encoder = fill.FillEncoder(pipe, fill_config)
    loss_fn = fill.FillLoss(pipe, fill_config, encoder, encoded)
    with torch.no_grad():
        return loss_fn(pipe.transformer, batch, torch.Generator().manual_seed(seed))


class TestLoss:
    def test_mask_loss_disabled_is_plain_flow_matching(self, assets, pipe):
        batch = first_batch(assets)
        plain, _ = one_loss(pipe, config(assets), batch)
        # Any weights: disabled means the plain loss, bit for bit.
        weighted = config(assets)
        weighted.mask_loss.weight = 0.9
        weighted.mask_loss.text_region_weight = 7.0
        assert torch.equal(one_loss(pipe, weighted, batch)[0], plain)

    def test_empty_and_full_masks(self, assets, pipe):
        """An empty mask inpaints nothing: the region term weighs every token by the background
        weight (1), i.e. plain flow matching. An all-white mask regenerates the whole image:
        every token gets the region weight, (1 - a) + a * fg times the plain loss."""
        batch = first_batch(assets)
        enabled = config(assets)
        enabled.mask_loss.enabled = True
        for fill_value, factor in ((0.0, 1.0), (1.0, 0.7 + 0.3 * 2.0)):
            batch["mask"] = torch.full_like(batch["mask"], fill_value)
            batch["masked_image"] = batch["image"] * (1 - batch["mask"])
            plain, _ = one_loss(pipe, config(assets), batch)
            weighted, _ = one_loss(pipe, enabled, batch)
            assert torch.isfinite(weighted)
            torch.testing.assert_close(weighted, factor * plain, rtol=1e-6, atol=0)

    def test_precomputed_folder_gives_the_same_loss(self, assets, pipe, precomputed_folder):
        scaling = VaeScaling(pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor)
        precomputed = FillLatentDataset(precomputed_folder, scaling, require_latents=True)
        raw = InpaintingDataset.from_folder(assets / "data", resolution=RESOLUTION)
        assert len(precomputed) == len(raw) == 4
        fill_config = config(assets, background_preservation_weight=0.5)
        fill_config.mask_loss.enabled = True
        for index in range(4):
            from_raw = one_loss(pipe, fill_config, collate_items([raw[index]]), seed=index)
            from_disk = one_loss(
                pipe, fill_config, collate_items([precomputed[index]]), encoded=True, seed=index
            )
            assert torch.equal(from_raw[0], from_disk[0])
            assert from_raw[1].keys() == from_disk[1].keys() == {"fm", "bg"}


def base_and_adapted(assets: Path, lora: Path) -> tuple[np.ndarray, np.ndarray]:
    """The unquantized ``FluxFillPipeline``'s output on the first example, without and with the
    LoRA of ``lora``."""
    call = inpainting_call(assets, RESOLUTION)
    pipe = quiet_pipeline(FluxFillPipeline, assets)
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(lora)
    return plain, pipe(**call, generator=torch.Generator().manual_seed(0)).images


class TestTrainingRun:
    def test_outputs_and_pipeline_loads_the_lora(self, assets, tmp_path):
        out = run(
            assets,
            tmp_path / "out",
            validation_steps=4,
            validation_inference_steps=2,
            background_preservation_weight=0.5,
            **{"mask_loss.enabled": "true"},
        )
        records = read_metrics(out)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert all({"loss", "fm", "bg", "lr"} <= r.keys() for r in records)
        assert (out / "validation" / "step-000004.png").is_file()
        card = model_card(out)
        assert "flux-fill" in card.data.tags and "FluxFillPipeline" in card.text
        assert "| bg | 0.5 |" in card.text
        plain, adapted = base_and_adapted(assets, out)
        assert not np.allclose(plain, adapted)

    def test_int8_base_trains_resumes_and_its_lora_loads_unquantized(self, assets, tmp_path):
        out = assert_int8_run_resumes_exactly(SCRIPT, assets, tmp_path)
        plain, adapted = base_and_adapted(assets, out)
        assert not np.allclose(plain, adapted)

    def test_a_precomputed_folder_validates_on_the_raw_folder_given(
        self, assets, precomputed_folder, tmp_path
    ):
        validation = {"validation_steps": 2, "validation_inference_steps": 2}
        flags = {"train_data_dir": precomputed_folder, "max_train_steps": 2, **validation}
        out = run(assets, tmp_path / "out", validation_data_dir=assets / "data", **flags)
        grid = Image.open(out / "validation" / "step-000002.png")
        assert grid.width >= 4 * RESOLUTION and grid.height >= 2 * RESOLUTION
        # Without it the run trains and says why there are no images.
        assert not (run(assets, tmp_path / "plain", **flags) / "validation").exists()

    def test_exact_resume(self, assets, tmp_path):
        common = {"gradient_accumulation_steps": 2, "checkpointing_steps": 2}
        straight = run(assets, tmp_path / "straight", max_train_steps=4, **common)
        resumed = run(assets, tmp_path / "resumed", max_train_steps=2, **common)
        run(assets, resumed, max_train_steps=4, resume_from_checkpoint="latest", **common)
        assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
        assert read_metrics(straight) == read_metrics(resumed)

    def test_two_processes_then_resume_on_one(self, assets, tmp_path):
        two = tmp_path / "two"
        SCRIPT.launch(assets, two, max_train_steps=2, checkpointing_steps=1)
        assert [r["step"] for r in read_metrics(two)] == [1, 2]
        resumed = resume_copy(two, 1, tmp_path / "resumed")
        run(
            assets,
            resumed,
            max_train_steps=2,
            gradient_accumulation_steps=2,
            resume_from_checkpoint="latest",
        )
        for name, value in lora_tensors(two).items():
            torch.testing.assert_close(lora_tensors(resumed)[name], value, rtol=1e-4, atol=1e-6)

    def test_random_masks(self, assets, tmp_path):
        data = tmp_path / "data"
        write_inpainting_dataset(data, n=4, resolution=RESOLUTION, seed=0)
        rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
        lines = [json.dumps({k: v for k, v in row.items() if k != "mask"}) for row in rows]
        (data / "metadata.jsonl").write_text("\n".join(lines))
        with pytest.raises(DataError, match="missing key 'mask'"):
            run(assets, tmp_path / "refused", train_data_dir=data)
        out = run(
            assets, tmp_path / "out", train_data_dir=data, random_masks="true", cache_latents="true"
        )
        assert len(list((out / "cache").glob("*/*.safetensors"))) == 4


class TestBadInput:
    @pytest.fixture
    def encoded(self, assets, tmp_path):
        """A two-record precomputed folder in the seed's .pt form."""
        root = tmp_path / "encoded"
        records = []
        for index in range(2):
            name = f"fill_{index}.pt"
            tensors = {
                "prompt_embed": torch.zeros(8, 32),
                "pooled_prompt_embeds": torch.zeros(32),
                "text_ids": torch.zeros(8, 3),
                "masked_latents": torch.zeros(16, 8, 8),
                "mask_latents": torch.zeros(1, 8, 8),
                "latents": torch.zeros(16, 8, 8),
            }
            for folder, tensor in tensors.items():
                (root / folder).mkdir(parents=True, exist_ok=True)
                torch.save(tensor, root / folder / name)
            records.append(
                {
                    "caption": "a ball",
                    "prompt_embed_path": name,
                    "pooled_prompt_embeds_path": name,
                    "text_ids": name,
                    "masked_latents_path": name,
                    "mask_latents_path": name,
                    "latents_path": name,
                }
            )
        (root / MANIFEST_FILE).write_text(json.dumps(records))
        return root, records

    def read(self, root):
        return FillLatentDataset(root, VaeScaling(0.3611, 0.1159), require_latents=True)

    def test_seed_pt_files_are_read(self, encoded):
        root, _ = encoded
        item = self.read(root)[1]
        assert item["mask_latents"].shape == (64, 8, 8)
        assert torch.equal(item["masked_latents_std"], torch.zeros(16, 8, 8))
        torch.testing.assert_close(item["masked_latents_mean"], torch.full((16, 8, 8), 0.1159))

    def test_path_outside_the_folder_is_refused(self, encoded):
        root, records = encoded
        records[1]["latents_path"] = "../../secret.pt"
        (root / MANIFEST_FILE).write_text(json.dumps(records))
        with pytest.raises(
            DataError, match=r"record 1: 'latents_path' '\.\./\.\./secret\.pt' leaves"
        ):
            self.read(root)

    @pytest.mark.filterwarnings("ignore:Detected pickle protocol")
    def test_pickle_with_code_is_refused_and_never_runs(self, encoded, tmp_path):
        root, _ = encoded
        marker = tmp_path / "ran"

        class Payload:
            def __reduce__(self):
                return (Path.touch, (marker,))

        (root / "mask_latents" / "fill_0.pt").write_bytes(pickle.dumps(Payload()))
        with pytest.raises(DataError, match=r"mask_latents/fill_0\.pt': refused"):
            self.read(root)
        assert not marker.exists()

    def test_non_tensor_is_refused(self, encoded):
        root, _ = encoded
        torch.save({"a": 1}, root / "latents" / "fill_1.pt")
        with pytest.raises(DataError, match=r"fill_1\.pt': holds a dict, not a tensor"):
            self.read(root)

    def test_mask_of_another_size(self, encoded):
        root, _ = encoded
        save_file({"data": torch.zeros(64, 4, 4)}, root / "mask_latents" / "m.safetensors")
        records = json.loads((root / MANIFEST_FILE).read_text())
        records[0]["mask_latents_path"] = "m.safetensors"
        (root / MANIFEST_FILE).write_text(json.dumps(records))
        with pytest.raises(DataError, match=r"record 0: mask latents \[64, 4, 4\] vs latents"):
            self.read(root)

    def test_raw_mask_of_another_size(self, assets, tmp_path):
        data = tmp_path / "data"
        write_inpainting_dataset(data, n=2, resolution=RESOLUTION, seed=0)
        Image.new("L", (20, 20)).save(data / "masks" / "0001.png")
        with pytest.raises(
            DataError, match=r"masks/0001\.png'?: size 20x20 differs from the image"
        ):
            run(assets, tmp_path / "out", train_data_dir=data)


class TestCommandLine:
    def test_help_documents_every_flag(self):
        text = help_text("train_flux_fill.py")
        for field in fields(fill.FillConfig):
            assert f"--{field.name}" in text, field.name
        for name in ("enabled", "weight", "text_region_weight", "background_weight"):
            assert f"--mask_loss.{name}" in text

    @pytest.mark.parametrize(
        "name", ["flux_fill_tiny.yaml", "flux_fill.yaml", "flux_fill_24gb.yaml"]
    )
    def test_shipped_configs_parse(self, name):
        parsed = parse_config(
            fill.FillConfig,
            ["--config", str(ROOT / "configs" / name), "--train_data_dir", "data"],
        )
        assert parsed.guidance_scale == 30.0 and parsed.max_train_steps > 0
        assert parsed.objective == "sft"

    def test_shipped_grpo_configs_parse(self):
        def parsed(name):
            flags = ["--config", str(ROOT / "configs" / name), "--train_data_dir", "data"]
            return parse_config(fill.FillConfig, flags)

        real, tiny = parsed("flux_fill_grpo.yaml"), parsed("flux_fill_grpo_tiny.yaml")
        assert real.objective == tiny.objective == "grpo"
        # The tiny one leaves the precision to the machine: fp32 on a CPU.
        assert real.mixed_precision == "bf16" and tiny.mixed_precision == "auto"
        assert real.guidance_scale == tiny.guidance_scale == 30.0
        assert real.reward == "background:1,seam:0.5,fill:1" and real.num_generations == 8
        assert real.noise_level == 0.7 and real.max_sequence_length == 512
        assert tiny.resolution == 16 and tiny.max_train_steps == 50


# GRPO at 32 px (2x2 tokens) with a short T5 prompt: the tiny runs stay fast.
GRPO_RESOLUTION = 32
GRPO = {
    "objective": "grpo",
    "resolution": GRPO_RESOLUTION,
    "num_generations": 2,
    "sampling_steps": 3,
    "max_sequence_length": 16,
}


@pytest.fixture(scope="module")
def grpo(assets):
    """A pipeline of its own whose transformer has a random (non-zero) LoRA, its GRPO config
    and policy."""
    pipe = quiet_pipeline(FluxFillPipeline, assets)
    grpo_config = fill.FillConfig(
        pretrained_model_name_or_path=str(assets / "model"),
        train_data_dir=str(assets / "data"),
        rank=4,
        **GRPO,
    )
    add_lora(pipe.transformer, grpo_config, FLUX_LORA_LAYERS, fill.FILL_LORA)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    encoder = fill.FillEncoder(pipe, grpo_config)
    return pipe, grpo_config, fill.FillPolicy(pipe, grpo_config, encoder, encoded=False)


def grpo_batch(assets, count: int = 2) -> dict:
    dataset = InpaintingDataset.from_folder(assets / "data", resolution=GRPO_RESOLUTION)
    return collate_items([dataset[index] for index in range(count)])


class TestGRPOPolicy:
    def test_noise_free_sampling_is_the_pipelines(self, assets, grpo):
        """Four deterministic steps (noise level 0: Euler) and the decode give what
        FluxFillPipeline gives for the same noise, mask draw, schedule and guidance."""
        pipe, _, policy = grpo
        batch = first_inpainting_batch(assets, GRPO_RESOLUTION)
        noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
        conditioning, _ = policy.start(batch, 1, 4, torch.Generator().manual_seed(5))
        latents = pipe._pack_latents(noise, 1, 16, 4, 4)
        with torch.no_grad():
            for step in range(4):
                latents = policy.step_distribution(
                    pipe.transformer, latents, step, conditioning, stochastic=False
                )[0]
            expected = pipe(
                prompt=batch["prompt"][0],
                image=to_pil(batch["image"][0]),
                mask_image=to_pil(batch["mask"][0].expand(3, -1, -1) * 2 - 1),
                latents=pipe._pack_latents(noise, 1, 16, 4, 4),
                height=GRPO_RESOLUTION,
                width=GRPO_RESOLUTION,
                num_inference_steps=4,
                max_sequence_length=16,
                generator=torch.Generator().manual_seed(5),
                output_type="pt",
            ).images
            images = policy.decode(latents, conditioning)
        assert expected.shape == images.shape == (1, 3, GRPO_RESOLUTION, GRPO_RESOLUTION)
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-4)

    def test_step_log_density_is_the_gaussian_of_the_sde_step(self, assets, grpo):
        """The transformer called as the supervised loss calls it, Flow-GRPO's mean and std
        written out here, and torch's Normal."""
        pipe, grpo_config, policy = grpo
        conditioning, latents = policy.start(
            grpo_batch(assets), 2, 3, torch.Generator().manual_seed(2)
        )
        with torch.no_grad():
            result = transition(
                policy,
                pipe.transformer,
                latents,
                1,
                conditioning,
                generator=torch.Generator().manual_seed(3),
            )
            sigma, following = conditioning["sigmas"][1:3]
            inputs = fill.fill_transformer_inputs(
                pipe,
                pipe._unpack_latents(latents, GRPO_RESOLUTION, GRPO_RESOLUTION, 8),
                conditioning["conditioning"],
                conditioning["prompt_embeds"],
                conditioning["pooled"],
                torch.full((4,), sigma),
                30.0,
            )
            velocity = pipe.transformer(**inputs)[0]
        level = grpo_config.noise_level * math.sqrt(sigma / (1 - sigma))
        drift = velocity + level**2 / (2 * sigma) * (latents + (1 - sigma) * velocity)
        mean = latents + drift * (following - sigma)
        std = level * math.sqrt(sigma - following)
        expected = Normal(mean, std).log_prob(result.next_latents).flatten(1).mean(dim=1)
        torch.testing.assert_close(result.log_prob, expected, rtol=1e-5, atol=1e-5)
        assert result.std.item() == pytest.approx(std)

    def test_ratio_is_one_before_the_first_update(self, assets, grpo):
        """Sampled log-probabilities vs the same steps recomputed as training computes them
        (gradients on, the LoRA trainable), with an SDE window of 2 of 4 steps."""
        pipe, grpo_config, policy = grpo
        windowed = dataclasses.replace(grpo_config, sampling_steps=4, sde_window=2)
        rewards = Rewards("background,seam", RewardOptions(), "cpu")
        rollout = sample_rollout(
            policy,
            pipe.transformer,
            grpo_batch(assets),
            windowed,
            torch.Generator().manual_seed(4),
            rewards,
        )
        assert len(rollout.trained) == 2 and rollout.rewards.keys() == {"background", "seam"}
        assert_ratios_are_one_on_policy(policy, pipe.transformer, rollout, samples=4)


class TestGRPORun:
    def test_outputs_and_exact_resume(self, assets, tmp_path):
        common = {**GRPO, "checkpointing_steps": 2, "reward": "background,seam:0.5"}
        straight = run(
            assets,
            tmp_path / "straight",
            max_train_steps=4,
            validation_steps=4,
            validation_inference_steps=2,
            **common,
        )
        resumed = run(assets, tmp_path / "resumed", max_train_steps=2, **common)
        run(assets, resumed, max_train_steps=4, resume_from_checkpoint="latest", **common)
        assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
        records = read_metrics(straight)
        assert read_metrics(resumed) == records
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        names = {"loss", "lr", "reward", "reward_background", "reward_seam", "reward_group_std"}
        names |= {"advantage_abs", "ratio_mean", "ratio_min", "ratio_max", "clip_fraction"}
        assert all(names | {"approx_kl"} <= r.keys() for r in records)
        for r in records:
            assert r["reward"] == pytest.approx(r["reward_background"] + 0.5 * r["reward_seam"])
            # One update per set of samples: every update is the first, on-policy one.
            assert r["ratio_min"] == pytest.approx(1, abs=1e-5)
            assert r["ratio_max"] == pytest.approx(1, abs=1e-5)
        for name in ("step-000004.png", "rewards-step-000004.png"):
            assert (straight / "validation" / name).is_file()
        assert "| reward (maximised) | background,seam:0.5 |" in model_card(straight).text
        state = FluxFillPipeline.lora_state_dict(str(straight))
        assert state and all(name.startswith("transformer.") for name in state)

    def test_on_an_int8_base_the_first_update_is_on_policy(self, assets, tmp_path):
        out = run(assets, tmp_path / "out", quantize_base="int8", max_train_steps=2, **GRPO)
        for record in read_metrics(out):
            assert record["ratio_min"] == pytest.approx(1, abs=1e-5)
            assert record["ratio_max"] == pytest.approx(1, abs=1e-5)
            assert math.isfinite(record["loss"]) and record["reward_group_std"] > 0

    def test_two_ranks_sample_whole_groups(self, assets, tmp_path):
        """2 ranks x 1 micro-batch and 1 rank x 2 micro-batches sample the same groups from the
        same generators, so each group's advantages, the rewards and the update agree."""
        two = tmp_path / "two"
        result = SCRIPT.launch(assets, two, max_train_steps=2, **GRPO)
        assert "identical on all 2 ranks" in result.stderr
        one = run(
            assets, tmp_path / "one", max_train_steps=2, gradient_accumulation_steps=2, **GRPO
        )
        first_two, first_one = read_metrics(two)[0], read_metrics(one)[0]
        for name in ("reward", "reward_group_std", "advantage_abs", "ratio_mean"):
            assert first_two[name] == pytest.approx(first_one[name], rel=1e-5, abs=1e-7), name
        # Then only the order of float sums differs (the gradient all-reduce), which Adam's
        # first steps amplify where a gradient is near zero: weights of about 2e-3 agree to 1e-5.
        for name, value in lora_tensors(one).items():
            torch.testing.assert_close(lora_tensors(two)[name], value, rtol=1e-4, atol=1e-5)

    def test_a_short_run_raises_the_mean_reward(self, assets, tmp_path):
        """The default rewards on the tiny random model: 4 groups of 8 per step at 16 px.
        The first and last tenth of the run are what docs/guides/grpo.md reports."""
        out = run(
            assets,
            tmp_path / "rise",
            **{**GRPO, "resolution": 16, "num_generations": 8, "sampling_steps": 4},
            train_batch_size=4,
            max_train_steps=50,
            learning_rate=3e-2,
            seed=0,
        )
        rewards = [r["reward"] for r in read_metrics(out)]
        first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
        print(f"mean reward: first tenth {first:.5f}, last tenth {last:.5f}")
        assert last > first + 0.001, (first, last)

    def test_a_trigger_word_cannot_reach_precomputed_prompts(self, assets, tmp_path):
        encoded = tmp_path / "encoded"
        encoded.mkdir()
        (encoded / MANIFEST_FILE).write_text("[]")
        with pytest.raises(ValueError, match="precomputed folder: its prompts are already"):
            run(assets, tmp_path / "out", train_data_dir=encoded, trigger_word="ohwx")

    def test_several_sizes_cannot_resize_precomputed_latents(self, assets, tmp_path):
        encoded = tmp_path / "encoded"
        encoded.mkdir()
        (encoded / MANIFEST_FILE).write_text("[]")
        with pytest.raises(ValueError, match="--resolution 16,32 cannot resize them"):
            run(assets, tmp_path / "out", train_data_dir=encoded, resolution=[16, 32])

    def test_precomputed_folder_is_refused(self, assets, tmp_path):
        encoded = tmp_path / "encoded"
        encoded.mkdir()
        (encoded / MANIFEST_FILE).write_text("[]")
        with pytest.raises(ValueError, match="precomputed folder: --objective grpo scores"):
            run(assets, tmp_path / "out", train_data_dir=encoded, **GRPO)

    def test_a_failing_reward_stops_the_run_naming_it(self, assets, tmp_path, monkeypatch):
        (tmp_path / "flaky_rewards.py").write_text(
            "def server(images, prompts, masks, sources):\n"
            "    raise TimeoutError('no answer from the reward server')\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        out = tmp_path / "out"
        with pytest.raises(RewardError, match=r"reward 'server' .* TimeoutError: no answer"):
            run(assets, out, reward="background,flaky_rewards:server", **GRPO)
        assert not (out / "pytorch_lora_weights.safetensors").exists()
