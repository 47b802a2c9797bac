"""``training.optimizers``: each --optimizer built from the flags, its state through the
checkpoint format, schedule-free's averaged weights, and one-line errors for what is missing."""

import importlib.util

import pytest
import torch

from training.checkpointing.state_io import load_state, save_state
from training.config import TrainConfig
from training.optimizers import (
    OPTIMIZERS,
    averaged_weights,
    build_optimizer,
    resume_training_weights,
    scheduler_warmup_steps,
)


def flags(**values) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", **values)


def trained(optimizer_name: str, steps: int = 3, **values):
    """A 64x128 weight (8192 elements, above bitsandbytes' 4096-element 8-bit threshold)
    stepped ``steps`` times with fixed gradients; returns (module, optimizer)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(128, 64, bias=False)
    optimizer = build_optimizer(flags(optimizer=optimizer_name, **values), module)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        module.weight.grad = torch.randn(module.weight.shape, generator=generator)
        optimizer.step()
    return module, optimizer


class TestBuild:
    @pytest.mark.parametrize("name", OPTIMIZERS)
    def test_only_trainable_parameters_and_the_flags(self, name):
        module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        module[0].requires_grad_(False)
        schedule = {"lr_scheduler": "constant"} if name == "schedulefree_adamw" else {}
        optimizer = build_optimizer(
            flags(optimizer=name, learning_rate=0.5, adam_weight_decay=0.25, **schedule), module
        )
        (group,) = optimizer.param_groups
        assert [p.shape for p in group["params"]] == [torch.Size([2, 4]), torch.Size([2])]
        assert group["lr"] == 0.5 and group["weight_decay"] == 0.25

    def test_8_bit_state_is_a_quarter_of_adamw_and_survives_the_checkpoint_format(self, tmp_path):
        _, adamw = trained("adamw")
        _, eight_bit = trained("adamw8bit")

        def state_bytes(optimizer):
            return sum(
                value.numel() * value.element_size()
                for state in optimizer.state.values()
                for value in state.values()
                if isinstance(value, torch.Tensor) and value.numel() > 1
            )

        # Two fp32 moments (8 bytes per element) against two uint8 moments plus one fp32
        # absmax per 256-element block each, and two 256-entry fp32 maps.
        assert state_bytes(adamw) == 8 * 8192
        assert state_bytes(eight_bit) == 2 * 8192 + 2 * 4 * (8192 // 256) + 2 * 4 * 256
        save_state(eight_bit.state_dict(), tmp_path, "optimizer")
        _, fresh = trained("adamw8bit", steps=1)
        fresh.load_state_dict(load_state(tmp_path, "optimizer"))
        restored = fresh.state[fresh.param_groups[0]["params"][0]]
        original = eight_bit.state[eight_bit.param_groups[0]["params"][0]]
        assert restored["state1"].dtype == torch.uint8
        for key, value in original.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(restored[key], value), key

    def test_adafactor_factors_the_second_moment(self):
        _, optimizer = trained("adafactor")
        state = next(iter(optimizer.state.values()))
        assert state["exp_avg_sq_row"].shape == (64,) and state["exp_avg_sq_col"].shape == (128,)
        assert "exp_avg" not in state


class TestScheduleFree:
    def test_its_own_warmup_replaces_the_schedules(self):
        config = flags(optimizer="schedulefree_adamw", lr_scheduler="constant", lr_warmup_steps=7)
        assert scheduler_warmup_steps(config) == 0
        assert scheduler_warmup_steps(flags(lr_warmup_steps=7)) == 7
        module = torch.nn.Linear(2, 2)
        assert build_optimizer(config, module).param_groups[0]["warmup_steps"] == 7

    def test_a_schedule_is_refused(self):
        with pytest.raises(ValueError, match="--lr_scheduler constant"):
            flags(optimizer="schedulefree_adamw", lr_scheduler="cosine")

    def test_averaged_weights_inside_the_block_training_weights_after(self):
        module, optimizer = trained("schedulefree_adamw", lr_scheduler="constant")
        group = optimizer.param_groups[0]
        beta1 = group["betas"][0]
        y = module.weight.detach().clone()
        z = optimizer.state[module.weight]["z"].clone()
        with averaged_weights(optimizer):
            x = module.weight.detach().clone()
            assert not group["train_mode"]
        # Schedule-free trains on y = (1 - beta1) z + beta1 x and returns x.
        torch.testing.assert_close(y, (1 - beta1) * z + beta1 * x)
        assert group["train_mode"]
        torch.testing.assert_close(module.weight.detach(), y)

    def test_other_optimizers_keep_their_weights(self):
        module, optimizer = trained("adamw")
        before = module.weight.detach().clone()
        with averaged_weights(optimizer):
            assert torch.equal(module.weight, before)
        resume_training_weights(optimizer)
        assert torch.equal(module.weight, before)


class TestMissingPackages:
    @pytest.mark.parametrize(
        "name,package",
        [
            ("adamw8bit", "bitsandbytes"),
            ("paged_adamw8bit", "bitsandbytes"),
            ("prodigy", "prodigyopt"),
            ("schedulefree_adamw", "schedulefree"),
        ],
    )
    def test_one_line_naming_the_extra(self, monkeypatch, name, package):
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == package else find_spec(n, *a)
        )
        schedule = {"lr_scheduler": "constant"} if name == "schedulefree_adamw" else {}
        with pytest.raises(ValueError) as error:
            flags(optimizer=name, **schedule)
        message = str(error.value)
        assert "\n" not in message and package in message and "'.[lowmem]'" in message
