"""``training.checkpointing.checkpoints``: finding complete checkpoints, and saving/restoring them
with a real Accelerator, a tiny FLUX transformer with a LoRA, AdamW and an LR schedule."""

import copy
import errno
import hashlib
import json
import pickle
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import FluxKontextPipeline
from diffusers.optimization import get_scheduler
from peft.utils import get_peft_model_state_dict
from script_runs import listed

from data.images import DataError
from training.checkpointing.checkpoints import (
    STATE_FILE,
    BatchLayout,
    Checkpointer,
    TrainingProgress,
    check_identity,
    complete_checkpoints,
    convert_progress,
    resolve_checkpoint,
    run_identity,
)
from training.config import TrainConfig
from training.lora.adapters import LoraFormat, add_lora
from training.lora.export import LORA_WEIGHTS_NAME
from training.optimizers import OPTIMIZERS, build_optimizer, scheduler_warmup_steps
from training.runtime import build_accelerator
from worlds.tiny_models import tiny_flux_kontext_pipeline

LAYERS = ("attn.to_q", "attn.to_k")
KONTEXT = LoraFormat(FluxKontextPipeline, "transformer")
LAYOUT = BatchLayout(num_processes=1, train_batch_size=1, gradient_accumulation_steps=1)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a filesystem that really fills up."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte with one file; returns it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def make_checkpoint(root: Path, step: int, complete: bool = True, name: str | None = None):
    folder = root / (name or f"checkpoint-{step}")
    folder.mkdir(parents=True)
    (folder / "optimizer.bin").write_bytes(b"x")
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"global_step": step}))
    return folder


class TestCompleteCheckpoints:
    def test_oldest_first_numerically(self, tmp_path):
        for step in (100, 9, 10):
            make_checkpoint(tmp_path, step)
        assert complete_checkpoints(tmp_path) == [
            (9, tmp_path / "checkpoint-9"),
            (10, tmp_path / "checkpoint-10"),
            (100, tmp_path / "checkpoint-100"),
        ]

    def test_skips_incomplete_partial_and_other_names(self, tmp_path):
        make_checkpoint(tmp_path, 5)
        make_checkpoint(tmp_path, 9, complete=False)  # half written
        make_checkpoint(tmp_path, 12, name=".checkpoint-12.partial")
        make_checkpoint(tmp_path, 13, name=".checkpoint-13.replaced")
        make_checkpoint(tmp_path, 14, name="checkpoint-14-old")
        make_checkpoint(tmp_path, 15, name="my-checkpoint-15")
        (tmp_path / "checkpoint-20").write_text("a file, not a folder")
        assert complete_checkpoints(tmp_path) == [(5, tmp_path / "checkpoint-5")]

    def test_missing_output_dir(self, tmp_path):
        assert complete_checkpoints(tmp_path / "not-there") == []


class TestResolveCheckpoint:
    def test_none(self, tmp_path):
        assert resolve_checkpoint(tmp_path, None) is None

    def test_latest_without_checkpoints(self, tmp_path):
        assert resolve_checkpoint(tmp_path, "latest") is None
        assert resolve_checkpoint(tmp_path / "not-there", "latest") is None

    def test_latest_skips_half_written_and_partial(self, tmp_path):
        make_checkpoint(tmp_path, 8)
        make_checkpoint(tmp_path, 10)
        make_checkpoint(tmp_path, 9)
        make_checkpoint(tmp_path, 11, complete=False)
        make_checkpoint(tmp_path, 12, name=".checkpoint-12.partial")
        assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"

    def test_latest_with_only_incomplete(self, tmp_path):
        make_checkpoint(tmp_path, 9, complete=False)
        assert resolve_checkpoint(tmp_path, "latest") is None

    def test_explicit_complete(self, tmp_path):
        folder = make_checkpoint(tmp_path, 3)
        assert resolve_checkpoint(tmp_path, str(folder)) == folder

    def test_explicit_incomplete_raises_naming_it(self, tmp_path):
        folder = make_checkpoint(tmp_path, 9, complete=False)
        with pytest.raises(ValueError, match=re.escape(str(folder))):
            resolve_checkpoint(tmp_path, str(folder))

    def test_explicit_missing_raises_naming_it(self, tmp_path):
        with pytest.raises(ValueError, match="checkpoint-77"):
            resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-77"))


ONE = BatchLayout(num_processes=1, train_batch_size=2, gradient_accumulation_steps=4)
TWO = BatchLayout(num_processes=2, train_batch_size=2, gradient_accumulation_steps=2)
FOUR = BatchLayout(num_processes=4, train_batch_size=2, gradient_accumulation_steps=1)


class TestConvertProgress:
    def test_same_layout_unchanged(self, tmp_path):
        progress = TrainingProgress(7, 1, 12)
        assert convert_progress(progress, TWO, TWO, tmp_path) is progress

    @pytest.mark.parametrize(
        "saved,current,batches,expected",
        [(TWO, ONE, 6, 12), (ONE, TWO, 12, 6), (FOUR, ONE, 3, 12), (ONE, FOUR, 8, 2)],
    )
    def test_same_global_batch_is_recounted(self, tmp_path, saved, current, batches, expected):
        converted = convert_progress(TrainingProgress(9, 2, batches), saved, current, tmp_path)
        assert converted == TrainingProgress(9, 2, expected)
        # every rank resumes at a whole optimizer step
        assert converted.batches_in_epoch % current.gradient_accumulation_steps == 0

    def test_other_global_batch_is_refused_with_a_way_out(self, tmp_path):
        fewer = BatchLayout(num_processes=1, train_batch_size=2, gradient_accumulation_steps=1)
        with pytest.raises(ValueError) as error:
            convert_progress(TrainingProgress(4, 0, 4), TWO, fewer, tmp_path / "checkpoint-4")
        message = str(error.value)
        assert "checkpoint-4" in message and "2 process(es)" in message
        assert "--gradient_accumulation_steps 4" in message and "--init_lora_weights" in message

    def test_other_batch_size_is_refused(self, tmp_path):
        bigger = BatchLayout(num_processes=2, train_batch_size=4, gradient_accumulation_steps=2)
        with pytest.raises(ValueError, match="batch 2 = 8 items per step"):
            convert_progress(TrainingProgress(4, 0, 4), TWO, bigger, tmp_path)


@dataclass
class Run:
    """One training run's parts, as the loop prepares them."""

    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    checkpointer: Checkpointer
    output_dir: Path

    def lora(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def train_step(self, seed: int) -> None:
        """An optimizer and scheduler step with random gradients."""
        g = torch.Generator().manual_seed(seed)
        for param in self.model.parameters():
            if param.requires_grad:
                param.grad = torch.randn(param.shape, generator=g)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def start_run(
    output_dir: Path, lora_seed: int = 0, total_limit: int | None = None, **config
) -> Run:
    config = TrainConfig(
        **{
            "pretrained_model_name_or_path": "m",
            "train_data_dir": "d",
            "output_dir": str(output_dir),
            "rank": 4,
            "lora_layers": ",".join(LAYERS),
            "learning_rate": 1e-2,
            "lr_scheduler": "linear",
            "lr_warmup_steps": 2,
            **config,
        }
    )
    accelerator = build_accelerator(config)
    transformer = tiny_flux_kontext_pipeline(0).transformer
    torch.manual_seed(lora_seed)  # the LoRA's init
    add_lora(transformer, config, LAYERS, KONTEXT)
    optimizer = build_optimizer(config, transformer)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=scheduler_warmup_steps(config),
        num_training_steps=10,
    )
    model, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    checkpointer = Checkpointer(
        accelerator,
        output_dir,
        total_limit,
        KONTEXT.save,
        KONTEXT.load,
        LAYOUT,
        run_identity(config, transformer),
        (model, optimizer, scheduler),
    )
    return Run(accelerator, model, optimizer, scheduler, checkpointer, output_dir)


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def assert_same_nested(actual, expected, path: str = "") -> None:
    """Equal structures: tensors bit for bit, everything else by ``==``."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for key in expected:
            assert_same_nested(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_nested(a, e, f"{path}/{index}")
    else:
        assert actual == expected, path


def assert_same_optimizer_state(actual: dict, expected: dict) -> None:
    assert actual["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert state.keys() == actual["state"][index].keys()
        for name, value in state.items():
            assert torch.equal(actual["state"][index][name], value), (index, name)
    assert [g["lr"] for g in actual["param_groups"]] == [g["lr"] for g in expected["param_groups"]]


@pytest.mark.usefixtures("clean_accelerate_state")
class TestCheckpointer:
    def test_save_layout(self, tmp_path):
        run = start_run(tmp_path)
        run.train_step(0)
        folder = run.checkpointer.save(TrainingProgress(3, 1, 5))
        assert folder == tmp_path / "checkpoint-3"
        assert listed(tmp_path) == ["checkpoint-3"]  # nothing partial
        files = sorted(p.name for p in folder.iterdir())
        assert files == [
            "optimizer.json",
            "optimizer.safetensors",
            LORA_WEIGHTS_NAME,
            "rng-0.json",
            "rng-0.safetensors",
            "scheduler.json",
            STATE_FILE,
        ]
        assert not [name for name in files if name.endswith((".bin", ".pkl", ".pt"))]
        state = json.loads((folder / STATE_FILE).read_text())
        assert {k: state[k] for k in ("global_step", "epoch", "batches_in_epoch", "layout")} == {
            "global_step": 3,
            "epoch": 1,
            "batches_in_epoch": 5,
            "layout": {"num_processes": 1, "train_batch_size": 1, "gradient_accumulation_steps": 1},
        }
        assert sorted(state["files"]) == sorted(set(files) - {STATE_FILE})
        assert state["identity"]["script"] == "TrainConfig"
        assert state["identity"]["trainable"] == {
            name: list(p.shape)
            for name, p in run.accelerator.unwrap_model(run.model).named_parameters()
            if p.requires_grad
        }
        # the LoRA file is the adapter, in diffusers' format; no frozen base weights anywhere
        state = FluxKontextPipeline.lora_state_dict(str(folder))
        expected = run.lora()
        assert_same_tensors(state, {f"transformer.{k}": v for k, v in expected.items()})
        total = sum(p.stat().st_size for p in folder.iterdir())
        base_bytes = sum(
            p.numel() * p.element_size() for p in run.model.parameters() if not p.requires_grad
        )
        assert total < base_bytes
        assert complete_checkpoints(tmp_path) == [(3, folder)]

    def test_total_limit_keeps_newest(self, tmp_path):
        run = start_run(tmp_path, total_limit=2)
        half_written = make_checkpoint(tmp_path, 99, complete=False)
        for step in (1, 2, 3, 10):
            run.train_step(step)
            run.checkpointer.save(TrainingProgress(step))
        assert [step for step, _ in complete_checkpoints(tmp_path)] == [3, 10]
        assert not (tmp_path / "checkpoint-1").exists()
        assert not (tmp_path / "checkpoint-2").exists()
        assert half_written.is_dir()  # not a checkpoint: left alone
        assert not [name for name in listed(tmp_path) if name.startswith(".")]

    def test_never_deletes_the_checkpoint_it_just_wrote(self, tmp_path):
        """A run resumed at step 2 while an interrupted history reached step 6."""
        make_checkpoint(tmp_path, 2)
        make_checkpoint(tmp_path, 6)
        run = start_run(tmp_path, total_limit=1, resume_from_checkpoint="checkpoint-2")
        folder = run.checkpointer.save(TrainingProgress(4))
        assert complete_checkpoints(tmp_path) == [(4, folder)]
        assert resolve_checkpoint(tmp_path, "latest") == folder

    def test_limit_two_keeps_the_newest_earlier_one(self, tmp_path):
        for step in (1, 2, 8):
            make_checkpoint(tmp_path, step)
        run = start_run(tmp_path, total_limit=2, resume_from_checkpoint="checkpoint-2")
        run.checkpointer.save(TrainingProgress(3))
        assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 3]

    @pytest.mark.parametrize("limit", [0, -1])
    def test_limit_below_one_is_refused(self, tmp_path, limit):
        with pytest.raises(ValueError, match="checkpoints_total_limit must be >= 1"):
            start_run(tmp_path, total_limit=limit)
        with pytest.raises(ValueError, match="checkpoints_total_limit must be >= 1"):
            TrainConfig(
                pretrained_model_name_or_path="m", train_data_dir="d", checkpoints_total_limit=limit
            )

    def test_without_limit_keeps_all(self, tmp_path):
        run = start_run(tmp_path)
        for step in (1, 2, 3):
            run.checkpointer.save(TrainingProgress(step))
        assert [step for step, _ in complete_checkpoints(tmp_path)] == [1, 2, 3]

    def test_same_step_twice_replaces(self, tmp_path):
        run = start_run(tmp_path)
        run.checkpointer.save(TrainingProgress(4, 0, 4))
        run.train_step(1)
        newer = run.lora()
        folder = run.checkpointer.save(TrainingProgress(4, 1, 0))
        assert listed(tmp_path) == ["checkpoint-4"]
        assert json.loads((folder / STATE_FILE).read_text())["epoch"] == 1
        state = FluxKontextPipeline.lora_state_dict(str(folder))
        assert_same_tensors(state, {f"transformer.{k}": v for k, v in newer.items()})

    def test_replaces_a_half_written_folder_of_the_same_step(self, tmp_path):
        run = start_run(tmp_path)
        make_checkpoint(tmp_path, 6, complete=False)
        folder = run.checkpointer.save(TrainingProgress(6))
        assert (folder / STATE_FILE).is_file() and (folder / LORA_WEIGHTS_NAME).is_file()
        assert listed(tmp_path) == ["checkpoint-6"]

    def test_full_disk_leaves_earlier_checkpoints_intact(self, small_disk):
        """On a real full filesystem, where safetensors reports the failure its own way."""
        run = start_run(small_disk)
        run.train_step(0)
        saved = run.lora()
        first = run.checkpointer.save(TrainingProgress(5))
        run.train_step(1)
        filler = fill(small_disk)
        for step in (6, 5):  # a new step, and the same step again
            with pytest.raises(RuntimeError) as error:
                run.checkpointer.save(TrainingProgress(step))
            message = str(error.value)
            assert f"could not write checkpoint-{step}" in message
            assert "checkpoint-5 untouched" in message
            assert "--resume_from_checkpoint latest" in message
        assert complete_checkpoints(small_disk) == [(5, first)]
        assert resolve_checkpoint(small_disk, "latest") == first
        state = FluxKontextPipeline.lora_state_dict(str(first))
        assert_same_tensors(state, {f"transformer.{k}": v for k, v in saved.items()})
        # the failed saves' partial folders are gone, freeing what they took
        assert listed(small_disk) == ["checkpoint-5", filler.name]
        filler.unlink()
        for step in (6, 5):  # a rerun reaching these steps
            run.checkpointer.save(TrainingProgress(step))
        assert [step for step, _ in complete_checkpoints(small_disk)] == [5, 6]
        assert listed(small_disk) == ["checkpoint-5", "checkpoint-6"]

    def test_restore_after_changes(self, tmp_path):
        run = start_run(tmp_path)
        for step in range(3):
            run.train_step(step)
        lora = run.lora()
        optimizer_state = copy.deepcopy(run.optimizer.state_dict())
        last_lr = run.scheduler.get_last_lr()
        folder = run.checkpointer.save(TrainingProgress(3, 2, 7))
        draws = torch.rand(5)
        for step in range(3, 6):
            run.train_step(step)
        assert any(not torch.equal(run.lora()[k], v) for k, v in lora.items())
        progress = run.checkpointer.restore(folder)
        assert progress == TrainingProgress(3, 2, 7)
        assert_same_tensors(run.lora(), lora)
        assert_same_optimizer_state(run.optimizer.state_dict(), optimizer_state)
        assert run.scheduler.get_last_lr() == last_lr
        assert torch.equal(torch.rand(5), draws)  # RNG state as at the save

    def test_restore_into_a_fresh_run(self, tmp_path):
        run = start_run(tmp_path, lora_seed=0)
        for step in range(3):
            run.train_step(step)
        lora = run.lora()
        optimizer_state = copy.deepcopy(run.optimizer.state_dict())
        run.checkpointer.save(TrainingProgress(3, 0, 3))
        run.train_step(3)
        after_one_more = run.lora()

        # a new process: fresh accelerate state, a differently initialised adapter
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        resumed = start_run(tmp_path, lora_seed=1, resume_from_checkpoint="latest")
        assert any(not torch.equal(resumed.lora()[k], v) for k, v in lora.items())
        folder = resolve_checkpoint(tmp_path, "latest")
        assert folder == tmp_path / "checkpoint-3"
        assert resumed.checkpointer.restore(folder) == TrainingProgress(3, 0, 3)
        assert_same_tensors(resumed.lora(), lora)
        assert_same_optimizer_state(resumed.optimizer.state_dict(), optimizer_state)
        resumed.train_step(3)
        assert_same_tensors(resumed.lora(), after_one_more)  # as if never interrupted


@pytest.mark.usefixtures("clean_accelerate_state")
class TestEveryOptimizerResumes:
    @pytest.mark.parametrize("optimizer", OPTIMIZERS)
    def test_bit_exactly_from_safetensors_and_json(self, tmp_path, optimizer):
        schedule = {"lr_scheduler": "constant"} if optimizer == "schedulefree_adamw" else {}
        run = start_run(tmp_path, optimizer=optimizer, **schedule)
        for step in range(3):
            run.train_step(step)
        folder = run.checkpointer.save(TrainingProgress(3, 0, 3))
        for step in (3, 4):
            run.train_step(step)
        expected, expected_state = run.lora(), copy.deepcopy(run.optimizer.state_dict())

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        resumed = start_run(
            tmp_path, lora_seed=1, optimizer=optimizer, resume_from_checkpoint="latest", **schedule
        )
        resumed.checkpointer.restore(folder)
        for step in (3, 4):
            resumed.train_step(step)
        assert_same_tensors(resumed.lora(), expected)
        assert {path.suffix for path in folder.iterdir()} == {".json", ".safetensors"}
        assert_same_nested(resumed.optimizer.state_dict(), expected_state)


class Payload:
    """A pickle that, once unpickled, creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.usefixtures("clean_accelerate_state")
class TestSafeResume:
    @pytest.fixture
    def written(self, tmp_path):
        run = start_run(tmp_path / "out")
        run.train_step(0)
        folder = run.checkpointer.save(TrainingProgress(2, 0, 2))
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return folder

    def resume(self, folder: Path, **config):
        return start_run(folder.parent, resume_from_checkpoint="latest", **config).checkpointer

    @pytest.mark.parametrize(
        "name",
        [
            LORA_WEIGHTS_NAME,
            "optimizer.safetensors",
            "optimizer.json",
            "scheduler.json",
            "rng-0.safetensors",
            "rng-0.json",
        ],
    )
    def test_a_planted_pickle_is_refused_by_name_and_never_runs(self, written, tmp_path, name):
        marker = tmp_path / "code-ran"
        (written / name).write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(DataError, match=re.escape(f"{written / name}': changed since")):
            self.resume(written).restore(written)
        assert not marker.exists()

    def test_a_pickle_beside_the_files_is_never_read(self, written, tmp_path):
        marker = tmp_path / "code-ran"
        for name in ("pytorch_lora_weights.bin", "optimizer.bin", "random_states_0.pkl"):
            (written / name).write_bytes(pickle.dumps(Payload(marker)))
        assert self.resume(written).restore(written) == TrainingProgress(2, 0, 2)
        assert not marker.exists()

    def test_state_that_matches_its_digest_is_still_parsed_safely(self, written, tmp_path):
        """Even re-sealed (digests updated), a pickle in a safetensors file is not unpickled."""
        marker = tmp_path / "code-ran"
        target = written / "optimizer.safetensors"
        target.write_bytes(pickle.dumps(Payload(marker)))
        state = json.loads((written / STATE_FILE).read_text())
        state["files"]["optimizer.safetensors"] = hashlib.sha256(target.read_bytes()).hexdigest()
        (written / STATE_FILE).write_text(json.dumps(state))
        with pytest.raises(DataError, match=re.escape(f"'{target}': not a readable safetensors")):
            self.resume(written).restore(written)
        assert not marker.exists()

    def test_corrupt_or_missing_rng_is_refused(self, written):
        (written / "rng-0.safetensors").write_bytes(b"\x00" * 16)
        with pytest.raises(DataError, match=r"rng-0\.safetensors': changed since"):
            self.resume(written).restore(written)
        (written / "rng-0.safetensors").unlink()
        with pytest.raises(DataError, match=r"rng-0\.safetensors': listed in .* but missing"):
            self.resume(written).restore(written)

    def test_old_pickled_checkpoints_are_refused(self, written):
        (written / STATE_FILE).write_text(json.dumps({"global_step": 2}))
        with pytest.raises(DataError, match="not a checkpoint of this version"):
            self.resume(written).restore(written)

    @pytest.mark.parametrize(
        "change,expected",
        [
            (
                {"rank": 8},
                r"of another shape .*\[4, 32\] in the checkpoint, \[8, 32\] now",
            ),
            ({"lora_layers": "attn.to_q"}, r"trainable tensors differ: \d+ not in this run"),
            ({"pretrained_model_name_or_path": "other"}, r"base model 'm', this run 'other'"),
            # Flags that define the run: what it trains on, with what, from which seed.
            ({"seed": 3}, r"settings differ: --seed 0 -> 3"),
            ({"learning_rate": 0.5}, r"--learning_rate 0\.01 -> 0\.5"),
            ({"train_data_dir": "elsewhere"}, r"--train_data_dir 'd' -> 'elsewhere'"),
            ({"lora_alpha": 8}, r"--lora_alpha None -> 8"),
        ],
    )
    def test_another_run_is_refused_saying_what_differs(self, written, change, expected):
        with pytest.raises(DataError, match=expected):
            self.resume(written, **change).restore(written)

    def test_how_long_and_how_often_may_change_and_the_log_says_so(self, written, caplog):
        caplog.set_level("INFO")
        changes = {"max_train_steps": 40, "validation_steps": 5, "checkpointing_steps": 7}
        assert self.resume(written, **changes).restore(written) == TrainingProgress(2, 0, 2)
        assert "resuming with --max_train_steps 40 (it was None)" in caplog.text
        assert "resuming with --checkpointing_steps 7 (it was 500)" in caplog.text

    def test_another_quantization_of_the_base_is_refused_naming_both(self, written):
        saved = json.loads((written / STATE_FILE).read_text())["identity"]
        assert saved["quantize_base"] == "none"
        with pytest.raises(DataError, match="--quantize_base 'none', this run 'nf4'"):
            check_identity(saved, {**saved, "quantize_base": "nf4"}, written)
        # Written before the flag existed: trained on an unquantized base.
        del saved["quantize_base"]
        check_identity(saved, {**saved, "quantize_base": "none"}, written)
        with pytest.raises(DataError, match="--quantize_base 'none', this run 'int8'"):
            check_identity(saved, {**saved, "quantize_base": "int8"}, written)
