"""How much GPU memory a training run needs, before it starts: the same plan every train script
logs before its first step.

    python scripts/plan_memory.py --config configs/kontext_24gb.yaml
    python scripts/plan_memory.py --config configs/qwen_edit.yaml --quantize_base int8 --json

Any train flag works, as on the train script's command line (flags win over the file). The
family comes from the base model (its ``model_index.json`` when it is a local folder, its name
otherwise) or from ``--family``. A local checkpoint is planned from its own configs; a Hub name
at the family's published size, built on the meta device (nothing is downloaded or allocated).

Byte counts per device: the denoiser's weights (as quantized), the LoRA and its gradients
(fp32), the optimizer state, the encoders when they stay on the device, and the activations of
one step (an estimate; see ``training.memory.plan``). ``--json`` prints them as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

import train_flux2_edit_lora
import train_flux_fill
import train_kontext_lora
import train_qwen_edit_mask
import train_sd15_inpaint
from training.config import parse_config
from training.memory.plan import device_memory, plan_memory

# family -> (train script, its config class).
FAMILIES = {
    "kontext": (train_kontext_lora, train_kontext_lora.KontextConfig),
    "qwen-edit": (train_qwen_edit_mask, train_qwen_edit_mask.QwenEditConfig),
    "flux-fill": (train_flux_fill, train_flux_fill.FillConfig),
    "sd15-inpaint": (train_sd15_inpaint, train_sd15_inpaint.SD15InpaintConfig),
    "flux2": (train_flux2_edit_lora, train_flux2_edit_lora.Flux2EditConfig),
}
# A local checkpoint's pipeline class, or words of a Hub name, -> family.
PIPELINES = {
    "FluxKontextPipeline": "kontext",
    "QwenImageEditPipeline": "qwen-edit",
    "QwenImageEditPlusPipeline": "qwen-edit",
    "FluxFillPipeline": "flux-fill",
    "StableDiffusionInpaintPipeline": "sd15-inpaint",
    "Flux2KleinPipeline": "flux2",
    "Flux2Pipeline": "flux2",
}
NAME_WORDS = {"kontext": "kontext", "qwen": "qwen-edit", "fill": "flux-fill", "flux.2": "flux2"}
NAME_WORDS["inpainting"] = "sd15-inpaint"


def flag_value(argv: list[str], name: str) -> str | None:
    """``--name``'s value on the command line, else in the last ``--config`` file holding it."""
    value = None
    for index, token in enumerate(argv[:-1]):
        if token == "--config":
            content = yaml.safe_load(Path(argv[index + 1]).read_text()) or {}
            value = content.get(name, value)
    for index, token in enumerate(argv[:-1]):
        if token == f"--{name}":
            value = argv[index + 1]
    return value


def family_of(model: str) -> str:
    """The family of base model ``model`` (a local folder or a Hub name).

    Raises:
        SystemExit: when neither tells, asking for --family.
    """
    index = Path(model) / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name")
        if name in PIPELINES:
            return PIPELINES[name]
    for word, family in NAME_WORDS.items():
        if word in model.lower():
            return family
    raise SystemExit(f"cannot tell the family of {model}: give --family {{{','.join(FAMILIES)}}}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=tuple(FAMILIES), help="default: from the base model")
    parser.add_argument("--json", action="store_true", help="print one JSON object of bytes")
    own, train_flags = parser.parse_known_args(argv)
    model = flag_value(train_flags, "pretrained_model_name_or_path")
    if model is None:
        parser.error("give --pretrained_model_name_or_path (or a --config holding it)")
    family = own.family or family_of(str(model))
    script, config_cls = FAMILIES[family]
    if not any(flag_value(train_flags, name) for name in ("train_data_dir", "dataset_name")):
        train_flags = [*train_flags, "--train_data_dir", "."]  # a plan reads no data
    config = parse_config(config_cls, train_flags)
    plan = plan_memory(config, script.MEMORY_PLAN)
    if own.json:
        print(json.dumps(plan.as_dict()))
        return
    precision = config.mixed_precision
    if precision == "auto":
        precision = "auto (planned as bf16, what a current GPU trains in)"
    print(
        f"{family} at {config.largest_resolution} px, batch {config.train_batch_size}, "
        f"--mixed_precision {precision}, --quantize_base {config.quantize_base}, "
        f"--optimizer {config.optimizer}, --gradient_checkpointing "
        f"{str(config.gradient_checkpointing).lower()}, --offload_blocks {config.offload_blocks}"
    )
    print(plan.describe(device_memory()))


if __name__ == "__main__":
    main()
