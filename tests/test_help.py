"""Every train script's --help: printed before torch and the models' stack load, its flags under
topic headings, the shipped configs named, and no specification numbers in it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import HELP_TOPICS, build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path.name for path in ROOT.glob("train_*.py"))
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "PIL")

# Runs a script as the program with --help, then reports which heavy packages got imported.
PROBE = """
import runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as end:
    code = end.code or 0
print("EXIT", code)
print("HEAVY", sorted(name for name in {heavy!r} if name in sys.modules))
"""


@pytest.fixture(scope="module", params=SCRIPTS)
def printed(request) -> tuple[str, str]:
    script = request.param
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(script=script, heavy=HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "", "PYTHONPATH": str(ROOT), "COLUMNS": "100"},
    )
    assert done.returncode == 0, done.stderr
    return script, done.stdout


def test_help_exits_cleanly_without_the_heavy_stack(printed):
    _, out = printed
    assert "EXIT 0" in out
    assert "HEAVY []" in out


def test_help_is_grouped_by_topic(printed):
    _, out = printed
    headings = [line[:-1] for line in out.splitlines() if line.endswith(":") and line[0] != " "]
    expected = [title for title in HELP_TOPICS.values() if f"\n{title}:\n" in out]
    assert [h for h in headings if h in HELP_TOPICS.values()] == expected
    for must in ("model and LoRA", "data", "loss", "optimization", "outputs and checkpoints"):
        assert must in headings


def test_help_names_the_shipped_configs(printed):
    script, out = printed
    listed = re.findall(r"^  configs/(\S+\.yaml)", out, flags=re.MULTILINE)
    prefix = {
        "train_kontext_lora.py": "kontext",
        "train_qwen_edit_mask.py": "qwen_edit",
        "train_flux_fill.py": "flux_fill",
        "train_sd15_inpaint.py": "sd15_inpaint",
        "train_multispectral_vae.py": "multispectral",
        "train_flux2_edit_lora.py": "flux2",
    }[script]
    assert listed == sorted(path.name for path in (ROOT / "configs").glob(f"{prefix}*.yaml"))
    assert len(listed) >= 2


def test_help_speaks_of_what_flags_do_not_of_specification_numbers(printed):
    _, out = printed
    assert not re.search(r"seed 0\d\d", out, flags=re.IGNORECASE)


def _script_config(script: str):
    module = __import__(Path(script).stem)
    return next(
        value
        for name, value in vars(module).items()
        if name.endswith("Config") and getattr(value, "__module__", None) == module.__name__
    )


def _topic_of_each_flag(script: str) -> dict[str, str]:
    parser = build_parser(_script_config(script))
    titles = {title: key for key, title in HELP_TOPICS.items()}
    topics = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            topics[action.dest] = titles.get(group.title, group.title)
    return topics


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_under_a_topic(script):
    untitled = {
        dest
        for dest, topic in _topic_of_each_flag(script).items()
        if topic not in HELP_TOPICS and dest not in ("help", "config", "print_config")
    }
    assert untitled == set()


@pytest.mark.parametrize(
    "script,flag,topic",
    [
        ("train_kontext_lora.py", "pretrained_model_name_or_path", "model"),
        ("train_kontext_lora.py", "guidance_scale", "model"),
        ("train_kontext_lora.py", "control_dirs", "data"),
        ("train_kontext_lora.py", "w_band", "loss"),
        ("train_kontext_lora.py", "dice_weight", "loss"),
        ("train_kontext_lora.py", "learning_rate", "optimization"),
        ("train_kontext_lora.py", "quantize_base", "memory"),
        ("train_kontext_lora.py", "save_dtype", "outputs"),
        ("train_kontext_lora.py", "validation_steps", "validation"),
        ("train_kontext_lora.py", "report_to", "logging"),
        ("train_qwen_edit_mask.py", "mask_loss.weight", "loss"),
        ("train_qwen_edit_mask.py", "data.use_text_mask", "data"),
        ("train_flux2_edit_lora.py", "background_weight", "loss"),
        ("train_flux2_edit_lora.py", "max_sequence_length", "model"),
        ("train_flux_fill.py", "reward", "grpo"),
        ("train_flux_fill.py", "noise_level", "grpo"),
        ("train_sd15_inpaint.py", "eta", "grpo"),
        ("train_sd15_inpaint.py", "snr_gamma", "loss"),
        ("train_multispectral_vae.py", "bands", "data"),
        ("train_multispectral_vae.py", "sam_weight", "loss"),
        ("train_multispectral_vae.py", "holdout_images", "validation"),
    ],
)
def test_flags_sit_under_their_topic(script, flag, topic):
    assert _topic_of_each_flag(script)[flag] == topic
