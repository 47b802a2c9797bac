"""The step benchmarks run (one tiny block each): they import what the scripts export, so an
interface change breaks them here rather than on the day someone measures. No timings are
checked."""

import subprocess
import sys

import pytest
from script_runs import ROOT, reset_accelerate


def run_benchmark(script: str, *flags: str) -> str:
    """``benchmarks/<script> flags`` in a process of its own; what it printed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize(
    "script,variants",
    [
        ("kontext_step.py", ["flow matching only", "all losses"]),
        ("inpaint_step.py", ["Fill: + region + bg", "SD1.5: + region"]),
        ("qwen_edit_step.py", ["+ mask loss", "uncached (pixels)"]),
    ],
)
def test_benchmark_runs(script, variants):
    printed = run_benchmark(
        script, "--blocks", "1", "--steps", "1", "--resolution", "32", "--batch", "1"
    )
    for name in variants:
        assert name in printed and "ms/step" in printed


def test_low_memory_benchmark_runs():
    """The GPU table's code on the tiny Kontext: a row per variant, nf4 marked as CUDA's."""
    printed = run_benchmark(
        "low_memory.py",
        *("--tiny", "--device", "cpu", "--families", "kontext", "--blocks", "1", "--steps", "1"),
        *("--variants", "bf16", "int8 + offload", "nf4"),
    )
    rows = [line for line in printed.splitlines() if line.startswith("| FLUX.1 Kontext")]
    assert [row.split(" | ")[1] for row in rows] == ["bf16", "int8 + offload", "nf4"]
    assert "| 1.00 |" in rows[0] and "needs CUDA" in rows[2]


def test_grpo_benchmark_runs():
    printed = run_benchmark(
        "grpo_step.py",
        *("--blocks", "1", "--steps", "1", "--resolution", "32"),
        *("--generations", "2", "--sampling-steps", "2"),
    )
    for family in ("Fill:", "SD1.5:"):
        for phase in ("sampling", "reward", "update", "iteration"):
            assert f"{family:<7}{phase}" in printed
    assert "s/iteration" in printed


@pytest.mark.parametrize("script", ["train_kontext_lora.py", "train_flux2_edit_lora.py"])
def test_the_table_runs(capsys, script):
    """A script through ``benchmarks/run.py`` (every script takes minutes on a small CPU): a row
    with every column filled, the cache's columns included."""
    from benchmarks.run import HEADER, main

    reset_accelerate()  # the table's cache fill forms an accelerate state
    try:
        main(
            [
                *("--scripts", script, "--resolution", "32", "--items", "1"),
                *("--batch", "1", "--blocks", "1", "--steps", "1", "--passes", "1"),
            ]
        )
    finally:
        reset_accelerate()
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| script"))
    assert lines[header] == "| " + " | ".join(HEADER) + " |"
    row = lines[header + 2].strip("|").split("|")
    assert row[0].strip() == script
    assert len(row) == len(HEADER) and "n/a" not in lines[header + 2]
