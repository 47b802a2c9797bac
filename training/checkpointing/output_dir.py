"""``--output_dir`` kept safe: one run at a time, and nothing the suite did not write is ever
deleted or overwritten.

- ``.maskloom.lock`` (process id, host, start time) is created exclusively by a run's main
  process and removed when it ends; a second run on the folder is refused naming the first. A
  lock whose process is gone (same host) is taken over: a killed run leaves one behind.
- ``.maskloom-outputs.json`` lists the top-level files and folders runs in this folder own: a run
  claims the outputs it is about to create (the LoRA, ``metrics.jsonl``, the model card,
  ``validation/``, ``logs/``, ``cache/``) when they do not exist yet. Checkpoint folders are
  recognised by their name and ``training_state.json``.
- A run refuses to start when a file or folder it would write exists and is not the suite's (a
  data set's ``README.md``, say), when ``--output_dir`` is the training data folder or empty, and,
  without ``--resume_from_checkpoint`` or ``--overwrite_output_dir``, when the folder holds
  another run's checkpoints or finished outputs. ``--overwrite_output_dir`` deletes what the
  suite owns there, the latent cache excepted, and nothing else.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from training.checkpointing.checkpoints import complete_checkpoints

logger = logging.getLogger(__name__)

LOCK_FILE = ".maskloom.lock"
MANIFEST_FILE = ".maskloom-outputs.json"
# Top-level outputs a run writes: the LoRA (training.lora.adapters.LORA_WEIGHTS_NAME) or the
# multispectral adapter, metrics (training.metrics.METRICS_FILE), the model card
# (training.model_card.CARD_FILE), validation images (training.validation.VALIDATION_DIR) and
# accelerate's tracker logs.
RUN_OUTPUTS = (
    "pytorch_lora_weights.safetensors",
    "multispectral_adapter",
    "metrics.jsonl",
    "README.md",
    "validation",
    "logs",
)
# What only a finished run leaves (a killed one leaves metrics, not these): a fresh run there
# would replace it.
FINISHED_OUTPUTS = ("pytorch_lora_weights.safetensors", "multispectral_adapter")
# The latent cache: keyed by content, valid for any run; kept by --overwrite_output_dir.
CACHE = "cache"
_HIDDEN_CHECKPOINT = re.compile(r"\.checkpoint-\d+\.(partial|replaced)")


class OutputDirError(ValueError):
    """``--output_dir`` cannot be used as asked; the message says why and what to do."""


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


def _write_json(path: Path, content: dict) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(content))
    os.replace(partial, path)


def owned(root: Path) -> set[str]:
    """Top-level names in ``root`` that runs of the suite wrote. A folder of checkpoints without
    a manifest was written by a version that kept none: its run outputs are the suite's too."""
    manifest = root / MANIFEST_FILE
    names = set(_read_json(manifest).get("owned", []))
    checkpoints = [folder.name for _, folder in complete_checkpoints(root)]
    names |= set(checkpoints)
    if root.is_dir():
        names |= {path.name for path in root.iterdir() if _HIDDEN_CHECKPOINT.fullmatch(path.name)}
    if checkpoints and not manifest.exists():
        names |= {name for name in (*RUN_OUTPUTS, CACHE) if (root / name).exists()}
    return names


def claim(root: Path, names: list[str]) -> None:
    """Record ``names`` as the suite's in ``root``'s manifest (main process)."""
    manifest = root / MANIFEST_FILE
    known = set(_read_json(manifest).get("owned", []))
    if not set(names) <= known:
        _write_json(manifest, {"owned": sorted(known | set(names))})


def check_output_dir(output_dir: str, data_dirs: list[str | None]) -> None:
    """Refuse an empty ``--output_dir`` or one that is a training data folder, and one holding
    a file or folder the run would write that the suite did not.

    Raises:
        OutputDirError: naming the folder or the files.
    """
    if not str(output_dir).strip():
        raise OutputDirError("--output_dir is empty: name a folder for the run's outputs")
    root = Path(output_dir).resolve()
    for data in filter(None, data_dirs):
        if Path(data).resolve() == root:
            raise OutputDirError(
                f"--output_dir {output_dir} is the training data folder: the run's model card, "
                "metrics and checkpoints would be written among the data. Choose another folder."
            )
    ours = owned(root)
    foreign = [name for name in RUN_OUTPUTS if (root / name).exists() and name not in ours]
    if foreign:
        raise OutputDirError(
            f"{output_dir} holds {', '.join(foreign)}, which this suite did not write and a run "
            "would overwrite. Choose another --output_dir (or move them)."
        )


def prepare_output_dir(
    output_dir: str | Path,
    has_checkpoint_to_resume: bool,
    overwrite: bool,
    is_main_process: bool,
    cache_in_output_dir: bool = True,
) -> None:
    """Refuse to start a fresh run on top of another run's checkpoints or finished outputs, or,
    with ``overwrite``, delete what the suite owns there but the latent cache (main process);
    then claim the outputs this run will write.

    A fresh run there would mix two runs (``--resume_from_checkpoint latest`` could pick up the
    other's weights) or silently replace a finished LoRA and cut its metrics.

    Raises:
        OutputDirError: naming what the folder holds and the ways on.
    """
    root = Path(output_dir)
    ours = owned(root)
    checkpoints = [folder.name for _, folder in complete_checkpoints(root)]
    finished = [n for n in FINISHED_OUTPUTS if n in ours and (root / n).exists()]
    if not has_checkpoint_to_resume and (checkpoints or finished) and not overwrite:
        what = (
            f"checkpoints of another run ({', '.join(checkpoints)})"
            if checkpoints
            else f"a finished run ({', '.join(finished)})"
        )
        resume = " Pass --resume_from_checkpoint latest to continue it," if checkpoints else ""
        raise OutputDirError(
            f"{root} already holds {what}.{resume} Pass --overwrite_output_dir to delete what the "
            "suite wrote there and start afresh, or choose another --output_dir."
        )
    if not is_main_process:
        return
    root.mkdir(parents=True, exist_ok=True)
    if overwrite and not has_checkpoint_to_resume:
        for name in sorted(ours - {CACHE}):
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        kept = [CACHE] if CACHE in ours else []
        _write_json(root / MANIFEST_FILE, {"owned": kept})
        logger.info("--overwrite_output_dir: removed the earlier run's outputs from %s", root)
    new = [n for n in RUN_OUTPUTS if not (root / n).exists()]
    if cache_in_output_dir and not (root / CACHE).exists():
        new.append(CACHE)
    claim(root, new)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of one run on its ``--output_dir`` (main process)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputDirError` naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {**self.me, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _read_json(self.path)
                if not self._stale(holder):
                    raise OutputDirError(
                        f"{self.path.parent} is in use by another run: process "
                        f"{holder.get('pid')} on {holder.get('host')}, started "
                        f"{holder.get('started')}. Wait for it to end or choose another "
                        f"--output_dir (if that run is gone, delete {self.path})."
                    ) from None
                with_holder = f"process {holder.get('pid')}" if holder else "an unreadable lock"
                logger.warning(
                    "%s: taking over the lock of %s, which ended", self.path, with_holder
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(record, handle)
            atexit.register(self.release)
            return
        raise OutputDirError(f"could not take the lock {self.path}")

    def _stale(self, holder: dict) -> bool:
        """A lock of this process (an earlier run in it), or of a process of this host that
        ended. An unreadable lock counts as stale only when it is old enough to be no run's
        half-written one."""
        if not holder:
            return time.time() - self.path.stat().st_mtime > 10
        if holder.get("host") != self.me["host"]:
            return False
        pid = holder.get("pid")
        return pid == self.me["pid"] or not (isinstance(pid, int) and _process_alive(pid))

    def release(self) -> None:
        """Remove the lock if it is this process's."""
        if _read_json(self.path).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
