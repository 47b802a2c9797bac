"""Killed, preempted and interrupted runs lose nothing: train_kontext_lora.py on the tiny model,
and GRPO runs of the inpainting scripts killed at a random moment.

A child process trains and dies by SIGKILL at a chosen point (the point is chosen by wrapping
one of our own functions in the child, so that it kills the process from inside: while a
checkpoint's files are being written, after it is sealed but before it is renamed, halfway
through a metrics line, while old checkpoints are rotated away, between steps). A resumed run
must then end exactly where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from script_runs import ROOT, TrainScript, assert_same_tensors, lora_tensors, script_args

import train_flux_fill as fill
import train_kontext_lora as kontext
import train_sd15_inpaint as sd15
from data.synthetic import write_inpainting_dataset, write_kontext_dataset
from training.checkpointing.checkpoints import complete_checkpoints
from training.lora.export import LORA_WEIGHTS_NAME
from training.metrics import read_metrics
from worlds.tiny_models import (
    tiny_flux_fill_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_sd15_inpaint_pipeline,
)

RESOLUTION = 32
STEPS = 6
SCRIPT = TrainScript(
    kontext,
    kontext.KontextConfig,
    RESOLUTION,
    seed=5,
    max_train_steps=STEPS,
    checkpointing_steps=2,
    checkpoints_total_limit=2,
)

# Python run in the child: wrap one function of ours so that it kills the process.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {root!r})
    import training.checkpointing.checkpoints as checkpoint
    import training.metrics as metrics
    import train_kontext_lora as kontext

    point, args = json.loads(sys.argv[1])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_when(module, name, condition, after=False):
        original = getattr(module, name)
        def wrapper(*a, **k):
            if condition(*a, **k) and not after:
                die()
            result = original(*a, **k)
            if condition(*a, **k) and after:
                die()
            return result
        setattr(module, name, wrapper)

    if point == "writing-checkpoint":  # checkpoint-4: LoRA and optimizer written, not the rest
        kill_when(checkpoint, "save_state", lambda state, folder, name: name == "scheduler"
                  and folder.name == ".checkpoint-4.partial")
    elif point == "sealed-not-renamed":  # checkpoint-4 complete but still under its hidden name
        kill_when(checkpoint, "_write_json", lambda path, data: data.get("global_step") == 4,
                  after=True)
    elif point == "half-a-metrics-line":
        original = metrics.MetricsLog.write
        def write(self, record):
            if record["step"] == 3:
                with open(self.path, "a") as handle:
                    handle.write(json.dumps(record)[:20])
                die()
            original(self, record)
        metrics.MetricsLog.write = write
    elif point == "rotating":  # checkpoint-6 renamed into place, checkpoint-2 not yet removed
        kill_when(checkpoint.Checkpointer, "_rotate", lambda self, step: step == 6)
    elif point == "between-steps":
        original = metrics.MetricsLog.write
        def write(self, record):
            original(self, record)
            if record["step"] == 5:
                die()
        metrics.MetricsLog.write = write
    kontext.main(args)
    """
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    tiny_flux_kontext_pipeline(seed=0).save_pretrained(root / "model")
    write_kontext_dataset(root / "data", n=3, resolution=RESOLUTION, seed=0)
    return root


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    return SCRIPT.run(assets, out, checkpoints_total_limit=None)


def run_child(assets: Path, out: Path, point: str) -> subprocess.CompletedProcess:
    args = script_args(SCRIPT.values(assets, out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), json.dumps([point, args])],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_script(file: str, args: list[str]) -> subprocess.Popen:
    """The train script ``file`` in a child process, offline and on the CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [sys.executable, str(ROOT / file), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(process: subprocess.Popen, ready, seconds: float = 240) -> None:
    """Poll ``ready()`` while ``process`` runs; fail if it ends or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)


def assert_intact_checkpoints(out: Path, uninterrupted: Path) -> None:
    """Every complete checkpoint holds the LoRA the uninterrupted run had at its step."""
    for step, folder in complete_checkpoints(out):
        expected = load_file(uninterrupted / f"checkpoint-{step}" / LORA_WEIGHTS_NAME)
        assert_same_tensors(expected, load_file(folder / LORA_WEIGHTS_NAME))


@pytest.mark.parametrize(
    "point,resumes_from",
    [
        ("writing-checkpoint", 2),
        ("sealed-not-renamed", 2),
        ("half-a-metrics-line", 2),
        ("rotating", 6),
        ("between-steps", 4),
    ],
)
def test_sigkill_then_resume_ends_as_an_uninterrupted_run(
    assets, uninterrupted, tmp_path, point, resumes_from
):
    out = tmp_path / "out"
    killed = run_child(assets, out, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert complete_checkpoints(out)[-1][0] == resumes_from
    assert_intact_checkpoints(out, uninterrupted)
    assert not (out / LORA_WEIGHTS_NAME).exists()

    SCRIPT.run(assets, out, resume_from_checkpoint="latest")
    assert_same_tensors(lora_tensors(uninterrupted), lora_tensors(out))
    assert read_metrics(out) == read_metrics(uninterrupted)  # each step once, same values
    # The limit of 2 applies at the next save; a run resumed at its last step saves none.
    assert {4, 6} <= {step for step, _ in complete_checkpoints(out)}
    assert_intact_checkpoints(out, uninterrupted)
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")] or point == "rotating"


def test_sigterm_saves_at_the_step_boundary_and_exits_cleanly(assets, tmp_path):
    """A scheduler's SIGTERM mid-run: a checkpoint at the end of the current step, exit 0, no
    final LoRA (the run is not finished); the resumed run ends as an uninterrupted one."""
    out = tmp_path / "out"
    values = SCRIPT.values(assets, out, max_train_steps=10_000, checkpointing_steps=10_000)
    process = start_script(SCRIPT.file, script_args(values))
    wait_until(process, lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    stopped_at = read_metrics(out)[-1]["step"]
    assert "SIGTERM received" in stderr and f"stopped at step {stopped_at}" in stderr
    assert [step for step, _ in complete_checkpoints(out)] == [stopped_at]
    assert not (out / LORA_WEIGHTS_NAME).exists()

    total = stopped_at + 2
    SCRIPT.run(assets, out, max_train_steps=total, resume_from_checkpoint="latest")
    straight = SCRIPT.run(assets, tmp_path / "straight", max_train_steps=total)
    assert_same_tensors(lora_tensors(straight), lora_tensors(out))
    assert [r["step"] for r in read_metrics(out)] == list(range(1, total + 1))
    assert read_metrics(out) == read_metrics(straight)


# GRPO runs of both inpainting scripts, small enough for a step of a fraction of a second.
GRPO_FLAGS = {
    "objective": "grpo",
    "num_generations": 2,
    "sampling_steps": 3,
    "seed": 3,
    "max_train_steps": 12,
    "checkpointing_steps": 2,
}
GRPO_SCRIPTS = {
    "flux-fill": (
        TrainScript(fill, fill.FillConfig, 32, max_sequence_length=16, **GRPO_FLAGS),
        tiny_flux_fill_pipeline,
    ),
    "sd15": (
        TrainScript(sd15, sd15.SD15InpaintConfig, 32, **GRPO_FLAGS),
        tiny_sd15_inpaint_pipeline,
    ),
}


@pytest.mark.parametrize("family", sorted(GRPO_SCRIPTS))
def test_grpo_killed_at_a_random_moment_resumes_as_an_uninterrupted_run(tmp_path, family):
    """SIGKILL from outside at a moment drawn at random after the first checkpoint (sampling,
    scoring, updating or saving: wherever the run is), then a resume: the LoRA and every
    metrics line of the uninterrupted run."""
    script, pipeline = GRPO_SCRIPTS[family]
    pipeline(seed=0).save_pretrained(tmp_path / "model")
    write_inpainting_dataset(tmp_path / "data", n=2, resolution=32, seed=0)
    uninterrupted = script.run(tmp_path, tmp_path / "uninterrupted")
    out = tmp_path / "out"
    process = start_script(script.file, script_args(script.values(tmp_path, out)))
    wait_until(process, lambda: out.is_dir() and bool(complete_checkpoints(out)))
    time.sleep(random.uniform(0, 0.5))
    process.kill()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended first: {stderr[-2000:]}"
    script.run(tmp_path, out, resume_from_checkpoint="latest")
    assert_same_tensors(lora_tensors(uninterrupted), lora_tensors(out))
    assert read_metrics(out) == read_metrics(uninterrupted)
