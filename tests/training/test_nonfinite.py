"""Steps with a non-finite loss or gradient are skipped, counted, and end a run when they
persist: the shared loop on a small model whose loss is NaN on chosen items."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from script_runs import reset_accelerate
from torch.utils.data import Dataset

from data.buckets import BucketBatchSampler
from training.checkpointing.checkpoints import complete_checkpoints
from training.config import TrainConfig
from training.loop import TrainingParts, train
from training.metrics import read_metrics
from training.model_card import ModelCardInfo, edit_call, lora_usage
from training.runtime import build_accelerator


class Items(Dataset):
    """Eight items; ``bad`` ones make the loss NaN. ``describe`` names a file per item."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        return {"x": torch.full((4,), float(index)), "index": index}

    def describe(self, index: int) -> str:
        return f"image 'img-{index}.png'"


def collate(items):
    return {
        "x": torch.stack([i["x"] for i in items]),
        "index": torch.tensor([i["index"] for i in items]),
    }


def run(tmp_path: Path, bad: set[int], **config) -> tuple[Path, torch.nn.Module]:
    config = TrainConfig(
        pretrained_model_name_or_path="toy",
        train_data_dir="-",
        output_dir=str(tmp_path),
        learning_rate=0.1,
        seed=0,
        **config,
    )
    reset_accelerate()
    accelerator = build_accelerator(config)
    model = torch.nn.Linear(4, 1)
    dataset = Items(bad)

    def compute_loss(model, batch, generator):
        loss = model(batch["x"]).square().mean()
        if any(int(i) in dataset.bad for i in batch["index"]):
            loss = loss * float("nan")
        return loss, {}

    def save(model, folder):
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "w.safetensors"
        )

    def load(model, folder):
        model.load_state_dict(load_file(folder / "w.safetensors"))

    parts = TrainingParts(
        model=model,
        dataset=dataset,
        sampler=BucketBatchSampler([0] * 8, 1, seed=0, shuffle=False),
        collate_fn=collate,
        compute_loss=compute_loss,
        save_lora=save,
        load_lora=load,
        card=ModelCardInfo(
            "a linear model",
            ("test",),
            {"mse": 1.0},
            lora_usage("DiffusionPipeline", edit_call(None)),
        ),
    )
    train(accelerator, config, parts)
    return tmp_path, model


@pytest.mark.usefixtures("clean_accelerate_state")
class TestNonFiniteSteps:
    def test_a_nan_step_is_skipped_and_counted(self, tmp_path):
        out, model = run(tmp_path / "skip", {2, 5}, max_train_steps=8)
        records = read_metrics(out)
        assert [r["nonfinite_skipped"] for r in records] == [0, 0, 1, 0, 0, 1, 0, 0]
        assert all(torch.isfinite(p).all() for p in model.parameters())

    def test_nan_steps_leave_the_weights_alone(self, tmp_path):
        """Only NaN items after step 1: the run's weights are those of its first step."""
        _, one_step = run(tmp_path / "one", set(), max_train_steps=1)
        _, skipped = run(tmp_path / "nan", {1, 2, 3}, max_train_steps=4, max_nonfinite_steps=5)
        torch.testing.assert_close(skipped.weight, one_step.weight, rtol=0, atol=0)

    def test_too_many_in_a_row_stop_with_a_checkpoint_naming_the_files(self, tmp_path):
        with pytest.raises(RuntimeError) as error:
            run(tmp_path, {3, 4, 5}, max_train_steps=8, max_nonfinite_steps=3)
        message = str(error.value)
        assert "3 steps in a row had a non-finite loss or gradient" in message
        assert "image 'img-5.png'" in message and "--resume_from_checkpoint latest" in message
        assert [step for step, _ in complete_checkpoints(tmp_path)] == [6]

    def test_limit_must_be_positive(self):
        with pytest.raises(ValueError, match="--max_nonfinite_steps must be >= 1"):
            TrainConfig(
                pretrained_model_name_or_path="m", train_data_dir="d", max_nonfinite_steps=0
            )
