"""``--caption_dropout``: which prompts go, what replaces them, cached or not, and resume."""

import pytest
import torch
from safetensors.torch import load_file
from script_runs import TrainScript, reset_accelerate, resume_copy

import train_flux_fill as fill
import train_kontext_lora as kontext
import train_qwen_edit_mask as qwen
from data.synthetic import write_kontext_dataset
from training.inputs.captions import CaptionDropout
from training.lora.export import LORA_WEIGHTS_NAME
from worlds.tiny_models import tiny_flux_kontext_pipeline

RESOLUTION = 32


class TestCaptionDropout:
    def batch(self, size: int) -> dict:
        generator = torch.Generator().manual_seed(1)
        return {
            "index": torch.arange(size),
            "prompt_embeds": torch.randn(size, 3, 2, generator=generator),
            "pooled_prompt_embeds": torch.randn(size, 2, generator=generator),
            "target_latents": torch.randn(size, 4, generator=generator),
        }

    def test_each_example_goes_with_the_rate_drawn_from_the_step_generator(self):
        empty = {
            "prompt_embeds": torch.full((1, 3, 2), 7.0),
            "pooled_prompt_embeds": -torch.ones(1, 2),
        }
        batch = self.batch(64)
        out = CaptionDropout(0.3, empty)(batch, torch.Generator().manual_seed(5))
        expected = torch.rand(64, generator=torch.Generator().manual_seed(5)) < 0.3
        assert 5 < int(expected.sum()) < 40  # the draw is not degenerate
        for row in range(64):
            if expected[row]:
                assert torch.equal(out["prompt_embeds"][row], empty["prompt_embeds"][0])
                assert torch.equal(
                    out["pooled_prompt_embeds"][row], empty["pooled_prompt_embeds"][0]
                )
            else:
                assert torch.equal(out["prompt_embeds"][row], batch["prompt_embeds"][row])
                assert torch.equal(
                    out["pooled_prompt_embeds"][row], batch["pooled_prompt_embeds"][row]
                )
        assert out["target_latents"] is batch["target_latents"]

    def test_raw_prompts_become_empty_strings(self):
        batch = {"index": torch.arange(6), "prompt": [f"p{i}" for i in range(6)]}
        out = CaptionDropout(0.5, {})(batch, torch.Generator().manual_seed(0))
        expected = torch.rand(6, generator=torch.Generator().manual_seed(0)) < 0.5
        assert out["prompt"] == ["" if drop else f"p{i}" for i, drop in enumerate(expected)]
        assert batch["prompt"] == [f"p{i}" for i in range(6)]

    def test_rate_zero_changes_nothing_and_draws_nothing(self):
        batch, generator = self.batch(4), torch.Generator().manual_seed(3)
        assert CaptionDropout(0.0, {})(batch, generator) is batch
        assert torch.equal(
            torch.rand(2, generator=generator),
            torch.rand(2, generator=torch.Generator().manual_seed(3)),
        )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    tiny_flux_kontext_pipeline(seed=0).save_pretrained(root / "model")
    write_kontext_dataset(root / "data", n=4, resolution=RESOLUTION, seed=0)
    return root


SCRIPT = TrainScript(kontext, kontext.KontextConfig, RESOLUTION, seed=3, max_train_steps=4)


def lora(out) -> dict[str, torch.Tensor]:
    return load_file(out / LORA_WEIGHTS_NAME)


def run(assets, out, **flags):
    reset_accelerate()
    return SCRIPT.run(assets, out, train_batch_size=2, **flags)


def test_cached_runs_drop_to_what_the_encoder_makes_of_the_empty_prompt(assets, tmp_path):
    # Every prompt dropped: the cached run trains on the empty prompt's embeddings computed once,
    # the uncached one encodes "" each step; the same LoRA shows both are the pipeline's.
    cached = run(assets, tmp_path / "cached", caption_dropout=1.0, cache_latents="true")
    raw = run(assets, tmp_path / "raw", caption_dropout=1.0)
    plain = run(assets, tmp_path / "plain")
    for name, value in lora(cached).items():
        torch.testing.assert_close(value, lora(raw)[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(value, lora(plain)[name]) for name, value in lora(raw).items())


def test_a_resumed_run_drops_what_the_uninterrupted_one_did(assets, tmp_path):
    flags = {"caption_dropout": 0.5, "checkpointing_steps": 2}
    straight = run(assets, tmp_path / "straight", **flags)
    resumed = resume_copy(straight, 2, tmp_path / "resumed")
    run(assets, resumed, resume_from_checkpoint="latest", **flags)
    for name, value in lora(straight).items():
        assert torch.equal(value, lora(resumed)[name]), name


def test_where_it_cannot_apply_it_is_refused(assets):
    common = {"pretrained_model_name_or_path": "m", "train_data_dir": str(assets / "data")}
    with pytest.raises(ValueError, match="--caption_dropout needs --cache_latents false"):
        qwen.QwenEditConfig(**common, caption_dropout=0.1)
    assert qwen.QwenEditConfig(**common, caption_dropout=0.1, cache_latents=False).caption_dropout
    with pytest.raises(ValueError, match="--caption_dropout applies to supervised training"):
        fill.FillConfig(**common, caption_dropout=0.1, objective="grpo")
    with pytest.raises(ValueError, match=r"--caption_dropout must be in \[0, 1\]"):
        kontext.KontextConfig(**common, caption_dropout=1.5)
