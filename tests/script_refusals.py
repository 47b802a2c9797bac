"""A command-line script in ``scripts/`` run as a user runs it, for how it refuses: exit status 2
and one ``<script>: error: <message>`` line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def refusal(script: str, *argv) -> str:
    """Run ``scripts/<script> argv`` in a new interpreter; assert that it refused (exit status 2,
    no traceback, stderr ending in one error line) and return that line's message."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=TIMEOUT_S,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.rstrip("\n").rsplit("\n", 1)[-1]
    prefix = f"{script}: error: "
    assert last.startswith(prefix), done.stderr
    return last.removeprefix(prefix)
