"""Running a train script in tests: in this process, or as two CPU ranks with accelerate."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import PIPE

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from training.lora.export import LORA_WEIGHTS_NAME
from training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300
# The defaults are what a GPU run wants; a test on tiny models spends its time on neither.
CPU_TEST_FLAGS = {"gradient_checkpointing": "false", "cache_latents": "false"}


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; a new in-process run needs a clean slate."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def script_args(values: dict) -> list[str]:
    """``{"rank": 4, "seed": None, "control_dirs": ["a", "b"]}`` -> ``["--rank", "4",
    "--control_dirs", "a", "b"]``: None leaves a flag out, a list gives its items."""
    return [
        token
        for key, value in values.items()
        if value is not None
        for token in (f"--{key}", *map(str, value if isinstance(value, list) else [value]))
    ]


def run_in_process(main: Callable[[list[str]], None], values: dict) -> Path:
    """``main(args)`` with a fresh accelerate state; returns the output folder."""
    reset_accelerate()
    try:
        main(script_args(values))
    finally:
        reset_accelerate()
    return Path(values["output_dir"])


def free_port() -> int:
    """A TCP port nobody listens on, so that launches never meet a previous run's store."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_running(marker: str) -> list[int]:
    """The ids of the processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def launch_two_ranks(script: str, values: dict) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 script`` on the CPU; asserts success."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONFAULTHANDLER": "1",
    }
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launcher += ["--num_processes", "2", "--num_machines", "1"]
    launcher += ["--main_process_port", str(free_port())]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*launcher, str(ROOT / script), *script_args(values)]
    with subprocess.Popen(
        command, stdout=PIPE, stderr=PIPE, text=True, env=env, cwd=ROOT, start_new_session=True
    ) as launch:
        try:
            stdout, stderr = launch.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # SIGABRT makes the launcher and every rank print where it waits (PYTHONFAULTHANDLER)
            # and exit; the ranks run in sessions of their own and may outlive the launcher.
            for pid in [launch.pid, *processes_running(str(values["output_dir"]))]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
            stdout, stderr = launch.communicate()
            pytest.fail(f"two-rank run hung for {LAUNCH_TIMEOUT_S} s:\n{stderr[-8000:]}")
    result = subprocess.CompletedProcess(command, launch.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def help_text(script: str) -> str:
    """What ``python script --help`` prints, from the script's own ``main`` in this process (the
    two-process tests run each script's command line for real)."""
    module = importlib.import_module(Path(script).stem)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    return printed.getvalue()


def resume_copy(source: Path, step: int, destination: Path) -> Path:
    """A new output folder holding only ``source``'s ``checkpoint-<step>`` and its metrics."""
    destination.mkdir()
    shutil.copytree(source / f"checkpoint-{step}", destination / f"checkpoint-{step}")
    shutil.copy(source / "metrics.jsonl", destination / "metrics.jsonl")
    return destination


def listed(folder: Path) -> list[str]:
    """The names in ``folder``, without the suite's bookkeeping (its run lock and the list of
    what it wrote there)."""
    from training.checkpointing.output_dir import LOCK_FILE, MANIFEST_FILE

    return sorted(p.name for p in folder.iterdir() if p.name not in (LOCK_FILE, MANIFEST_FILE))


def lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / LORA_WEIGHTS_NAME)


def assert_same_tensors(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


def model_card(out: Path) -> ModelCard:
    """The run's ``README.md`` as the Hub reads it, checked for what every card has: diffusers'
    library, the last step's metrics, the snippet loading the run's own folder."""
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers"
    assert f"At step {read_metrics(out)[-1]['step']} " in card.text
    assert f'"{out}"' in card.text
    return card


class TrainScript:
    """A train script under test, with the tiny model and data of a test module's ``assets``
    folder (``assets/<model>``, ``assets/data``) and the flags every test run shares."""

    def __init__(
        self, module, config_cls: type, resolution: int, model: str = "model", **defaults
    ) -> None:
        self.module = module
        self.model = model
        self.file = f"{module.__name__}.py"
        self.config_cls = config_cls
        self.resolution = resolution
        self.defaults = defaults

    def values(self, assets: Path, output_dir: Path, **overrides) -> dict:
        return {
            "pretrained_model_name_or_path": assets / self.model,
            "train_data_dir": assets / "data",
            "output_dir": output_dir,
            "resolution": self.resolution,
            "max_train_steps": 4,
            "checkpointing_steps": 100,
            "learning_rate": 1e-3,
            "rank": 4,
            **CPU_TEST_FLAGS,
            **self.defaults,
            **overrides,
        }

    def run(self, assets: Path, output_dir: Path, **overrides) -> Path:
        """The script's ``main`` in this process; returns the output folder."""
        return run_in_process(self.module.main, self.values(assets, output_dir, **overrides))

    def launch(self, assets: Path, output_dir: Path, **overrides) -> subprocess.CompletedProcess:
        """The script on two CPU ranks."""
        return launch_two_ranks(self.file, self.values(assets, output_dir, **overrides))

    def config(self, assets: Path, **overrides):
        """The script's config for the assets, as its ``main`` would parse it."""
        return self.config_cls(
            **{
                "pretrained_model_name_or_path": str(assets / self.model),
                "train_data_dir": str(assets / "data"),
                "resolution": self.resolution,
                **{name: value == "true" for name, value in CPU_TEST_FLAGS.items()},
                **overrides,
            }
        )


def assert_int8_run_resumes_exactly(
    script: TrainScript, assets: Path, tmp_path: Path, **flags
) -> Path:
    """A run on an int8 base (``--quantize_base int8`` plus ``flags``) with 8-bit AdamW,
    resumed from its step-2 checkpoint, ends with the uninterrupted run's LoRA, bit for bit; the
    LoRA has the keys, shapes and dtypes of one trained on the unquantized base. Returns the
    uninterrupted run's folder."""
    quantized = {
        "quantize_base": "int8",
        "optimizer": "adamw8bit",
        "checkpointing_steps": 2,
        "max_train_steps": 4,
        **flags,
    }
    straight = script.run(assets, tmp_path / "straight", **quantized)
    resumed = script.run(assets, tmp_path / "resumed", **{**quantized, "max_train_steps": 2})
    script.run(assets, resumed, resume_from_checkpoint="latest", **quantized)
    assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
    plain = script.run(assets, tmp_path / "plain", **{**flags, "max_train_steps": 1})

    def layout(folder: Path) -> dict:
        return {name: (t.shape, t.dtype) for name, t in lora_tensors(folder).items()}

    assert layout(straight) == layout(plain)
    return straight


def write_assets(root: Path, pipeline, write_data: Callable[..., Path], resolution: int) -> Path:
    """``root/model`` (the saved tiny ``pipeline``) and ``root/data`` (four synthetic items)."""
    pipeline.save_pretrained(root / "model")
    write_data(root / "data", n=4, resolution=resolution, seed=0)
    return root


def first_inpainting_batch(assets: Path, resolution: int) -> dict:
    """The first item of ``assets/data`` as a batch of one."""
    from data.inpainting import InpaintingDataset
    from data.rows import collate_items

    dataset = InpaintingDataset.from_folder(assets / "data", resolution=resolution)
    return collate_items([dataset[0]])


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from training.checkpointing.output_dir import RunLock
RunLock({folder!r}).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[int]:
    """Inside the block another process holds the run lock on ``folder``; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER.format(root=str(ROOT), folder=str(folder))],
        stdout=PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def inpainting_call(assets: Path, resolution: int) -> dict:
    """An inpainting pipeline's arguments for the first item of ``assets/data`` (2 steps)."""
    from training.validation import to_pil

    batch = first_inpainting_batch(assets, resolution)
    return {
        "prompt": batch["prompt"][0],
        "image": to_pil(batch["image"][0]),
        "mask_image": to_pil(batch["mask"][0].expand(3, -1, -1) * 2 - 1),
        "height": resolution,
        "width": resolution,
        "num_inference_steps": 2,
        "output_type": "np",
    }


def pipeline_as_trained(pipeline_cls, config, frozen, **components):
    """The pipeline as a train script loads it (``training.runtime.pretrained_pipeline``); its
    transformer's linear weights are int8 exactly when ``config.quantize_base`` says so."""
    from training.runtime import pretrained_pipeline

    pipe = pretrained_pipeline(pipeline_cls, config, frozen, **components)
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert ("Int8" in type(weight).__name__) == (config.quantize_base == "int8")
    return pipe


def quiet_pipeline(pipeline_cls, assets: Path, name: str = "model"):
    """The pipeline of ``assets/<name>``, without progress bars."""
    pipe = pipeline_cls.from_pretrained(assets / name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def first_call(module: torch.nn.Module) -> Iterator[dict]:
    """Inside the block, record ``module``'s first forward call: ``{"args", "kwargs"}`` (a
    pipeline's first denoising step)."""
    seen: dict = {}

    def record(_, args, kwargs):
        if not seen:
            seen.update(args=args, kwargs=kwargs)

    hook = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def unloadable_copy(model: Path, out: Path, component: str = "transformer") -> Path:
    """A copy of the pipeline folder ``model`` whose ``component`` weights are not safetensors:
    a run that reaches them fails on loading, so an error it gives first comes before loading."""
    shutil.copytree(model, out)
    for weights in (out / component).glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    return out
