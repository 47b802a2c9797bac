"""``metrics.jsonl``: one JSON object per optimizer step, written by the main process."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"


def mean_across_ranks(accelerator, values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each scalar of ``values`` averaged over the ranks, in one collective for them all.

    Every rank trains as many samples per step, so the mean of the ranks' means is the mean.
    """
    names = list(values)
    if not names:
        return {}
    stacked = torch.stack([values[name].detach().float().reshape(()) for name in names])
    return dict(zip(names, accelerator.reduce(stacked, reduction="mean").tolist(), strict=True))


class MetricsLog:
    """Appends one line per step to ``<output_dir>/metrics.jsonl``.

    On resume the lines past the resumed step (written by the interrupted run, which the resumed
    one is about to redo) are dropped first, so every step appears once.
    """

    def __init__(self, output_dir: str | Path, *, resume_step: int, enabled: bool) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if _step(line) is not None and _step(line) <= resume_step
            ]
            partial = self.path.with_suffix(".jsonl.partial")
            partial.write_text("".join(f"{line}\n" for line in kept))
            os.replace(partial, self.path)

    def write(self, record: dict[str, float | int]) -> None:
        """Append ``record`` (it must hold ``step``) as one line."""
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _step(line: str) -> int | None:
    """The step of a metrics line; None for a blank line or one a killed run cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return None


def read_metrics(output_dir: str | Path) -> list[dict]:
    """All records of ``<output_dir>/metrics.jsonl``, in order."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
