"""A LoRA's file in either key layout, diffusers' or kohya's: read, converted between them
(:mod:`training.lora.layouts`) and written. The warm start (:mod:`training.lora.adapters`), the
merge (:mod:`training.lora.merge`) and the scripts read LoRA files through it.

Files are safetensors only. A LoRA is given as a file or as a folder holding
``pytorch_lora_weights.safetensors`` (a training run's ``--output_dir``). Its family (``flux``:
FLUX.1 dev, Kontext and Fill; ``qwen-image``: Qwen-Image and its Edit models; ``sd15``;
``flux2``: FLUX.2 [klein] and [dev]) comes from the caller, from the base model's
``model_index.json``, from the module names, or from the training run's model card, in that
order.
"""

from __future__ import annotations

import json
import re
import textwrap
import traceback
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import diffusers
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from training.lora.layouts import LAYOUTS, LayoutError, LoraPair, Mapped, listed

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS, KOHYA = "diffusers", "kohya"
FAMILIES = tuple(LAYOUTS)
# The pipeline whose save_lora_weights writes a family's diffusers-format file.
SAVING_PIPELINES = {
    "flux": "FluxPipeline",
    "qwen-image": "QwenImagePipeline",
    "sd15": "StableDiffusionPipeline",
    "flux2": "Flux2KleinPipeline",
}
# model_index.json's pipeline class -> family.
PIPELINE_FAMILIES = {
    "FluxPipeline": "flux",
    "FluxKontextPipeline": "flux",
    "FluxFillPipeline": "flux",
    "QwenImagePipeline": "qwen-image",
    "QwenImageEditPipeline": "qwen-image",
    "QwenImageEditPlusPipeline": "qwen-image",
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionInpaintPipeline": "sd15",
    "Flux2KleinPipeline": "flux2",
    "Flux2Pipeline": "flux2",
}
# Model-card tags (training.model_card writes them) -> family.
TAG_FAMILIES = {
    "flux": "flux",
    "qwen-image": "qwen-image",
    "stable-diffusion": "sd15",
    "flux2": "flux2",
}


@dataclass(frozen=True)
class FamilyMarker:
    """Module names (diffusers' with the component, or kohya's with their prefix) that only
    ``families`` have; with a ``width``, only where the module has that many outputs per input
    (``up: [out, r]``, ``down: [r, in]``)."""

    families: tuple[str, ...]
    names: re.Pattern
    width: Fraction | None = None

    def marks(self, module: str, pair: LoraPair) -> bool:
        if not self.names.search(module):
            return False
        return self.width is None or Fraction(pair.up.shape[0], pair.down.shape[1]) == self.width


# Kohya names FLUX.1 and FLUX.2 share that their widths tell apart (outputs per input, FLUX.1's,
# FLUX.2's): FLUX.1's MLPs are 4 times the hidden size, FLUX.2's SwiGLU ones 3 times with an
# input projection of twice that, so a single block's linear1 (q, k, v and the MLP's input) is
# 3 + 4 or 3 + 6 hidden sizes wide and its linear2 reads 1 + 4 or 1 + 3.
_FLUX_WIDTHS = {
    r"single_blocks_\d+_linear1": (Fraction(7), Fraction(9)),
    r"single_blocks_\d+_linear2": (Fraction(1, 5), Fraction(1, 4)),
    r"double_blocks_\d+_(img|txt)_mlp_0": (Fraction(4), Fraction(6)),
    r"double_blocks_\d+_(img|txt)_mlp_2": (Fraction(1, 4), Fraction(1, 3)),
}
# FLUX.1, FLUX.2 and Qwen-Image name their double blocks' attention projections alike in
# diffusers' layout, and FLUX.1 and FLUX.2 all their blocks in kohya's, so a LoRA on those alone
# is marked by none, or by FLUX.1 and FLUX.2 both, and needs another hint.
_FAMILY_MARKERS = (
    FamilyMarker(
        ("flux",),
        re.compile(
            r"^transformer\.(single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out|"
            r"norm\.linear)$|.*\.ff(_context)?\.net\.|.*\.norm1(_context)?\.|"
            r"time_text_embed\.(text|guidance)_embedder)"
            r"|^lora_unet_(double_blocks_\d+_(img|txt)_mod_lin|single_blocks_\d+_modulation_lin|"
            r"vector_in_)"
        ),
    ),
    FamilyMarker(
        ("flux2",),
        re.compile(
            r"^transformer\.(single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)$|"
            r".*\.ff(_context)?\.linear_(in|out)$|(double|single)_stream_modulation|"
            r"time_guidance_embed\.)"
            r"|^lora_unet_(double_stream_modulation_(img|txt)|single_stream_modulation)_lin$"
        ),
    ),
    FamilyMarker(
        ("flux", "flux2"),
        re.compile(
            r"^transformer\.(x_embedder|context_embedder)$"
            r"|^lora_unet_(double_blocks|single_blocks|time_in|guidance_in|final_layer)_"
        ),
    ),
    *(
        FamilyMarker((family,), re.compile(rf"^lora_unet_{name}$"), width)
        for name, widths in _FLUX_WIDTHS.items()
        for family, width in zip(("flux", "flux2"), widths, strict=True)
    ),
    FamilyMarker(
        ("qwen-image",),
        re.compile(
            r"^transformer\.(img_in|txt_in|.*(img|txt)_(mod|mlp)\.)|^lora_unet_transformer_blocks_"
        ),
    ),
    FamilyMarker(
        ("sd15",),
        re.compile(
            r"^(unet|text_encoder)\.|^lora_unet_(down_blocks|mid_block|up_blocks)_|^lora_te_"
        ),
    ),
)
# Kohya modules that diffusers' kohya reader of a family (0.42) drops: FLUX.1's top-level ones,
# FLUX.2's guidance embedding, modulations and final norm. ComfyUI and kohya load them all.
_DIFFUSERS_SKIPS = {
    "flux": re.compile(r"^lora_unet_(?!(double|single)_blocks_)"),
    "flux2": re.compile(
        r"^lora_unet_(guidance_in|double_stream_modulation|single_stream_modulation|"
        r"final_layer_adaLN)_"
    ),
}
_DIFFUSERS_KEY = re.compile(
    r"^(?P<module>[^.]+\..+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|alpha)$"
)
_KOHYA_KEY = re.compile(
    r"^(?P<module>lora_[a-z0-9]+_[^.]+)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)$"
)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# What diffusers' LoRA loaders raise on keys or shapes they cannot take: bare asserts and
# KeyErrors in its key converters, ValueErrors listing leftover keys, RuntimeErrors of shapes
# that do not fit (NotImplementedError is one).
DIFFUSERS_LOAD_ERRORS = (AssertionError, KeyError, ValueError, RuntimeError)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read whole: ``pairs`` by module, named as its ``layout`` names them
    (diffusers: ``component.module``; kohya: ``lora_unet_...``), and the file's tensor count."""

    path: Path
    layout: str
    pairs: dict[str, LoraPair]
    tensors: int


def lora_file_path(path: str | Path) -> Path:
    """The safetensors file of ``path``: itself, or a folder's ``pytorch_lora_weights.safetensors``.

    Raises ``ValueError`` naming the path when there is no such file or it is not safetensors
    (pickled weights can run code when loaded, so they are never read).
    """
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read")
    return path


def _header(path: Path) -> tuple[list[str], dict[str, str]]:
    """The tensor names and the metadata of the safetensors file ``path``. Raises
    :class:`LayoutError` naming the file when it is not one."""
    try:
        with safe_open(path, "pt") as file:
            return list(file.keys()), file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise LayoutError(f"'{path}': not a readable safetensors LoRA ({error})") from error


def lora_layout(path: Path) -> str:
    """The key layout of the LoRA file ``path``. Raises :class:`LayoutError` naming an
    unreadable file."""
    return _layout(_header(path)[0])


def _layout(names) -> str:
    """Kohya's when the tensor ``names`` say ``lora_down``, diffusers' otherwise."""
    return KOHYA if any(".lora_down." in name for name in names) else DIFFUSERS


def read_lora(path: str | Path) -> LoraFile:
    """Every tensor of a LoRA file, as pairs, in its :func:`lora_layout`. Raises
    :class:`LayoutError` naming any tensor that is not part of a pair (DoRA magnitudes,
    biases...), so that nothing is dropped unnoticed."""
    path = lora_file_path(path)
    names, metadata = _header(path)
    tensors = load_file(path)
    if _layout(names) == KOHYA:
        return LoraFile(
            path, KOHYA, _pairs(tensors, _KOHYA_KEY, path, "lora_down", "lora_up"), len(tensors)
        )
    configs = json.loads(metadata.get(LORA_ADAPTER_METADATA_KEY, "{}"))
    pairs = _pairs(tensors, _DIFFUSERS_KEY, path, "lora_A", "lora_B")
    return LoraFile(path, DIFFUSERS, _with_peft_alphas(pairs, configs, path), len(tensors))


def _pairs(tensors: dict, key_pattern: re.Pattern, path: Path, down: str, up: str) -> dict:
    """Pairs by module from ``tensors`` keyed ``<module>.<down>.weight``, ``<module>.<up>.weight``
    and an optional ``<module>.alpha`` (the rank, scale 1, without one)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in tensors.items():
        match = key_pattern.match(key)
        if match is None:
            stray.append(key)
        else:
            found.setdefault(match["module"], {})[match["kind"].split(".")[0]] = tensor
    incomplete = [module for module, parts in found.items() if {down, up} - parts.keys()]
    if stray or incomplete:
        problems = [f"tensors outside {down}/{up}/alpha pairs: {listed(stray)}"] if stray else []
        problems += [f"modules lacking one of the pair: {listed(incomplete)}"] if incomplete else []
        raise LayoutError(f"{path}: not a plain LoRA; {'; '.join(problems)}")
    pairs = {}
    for module, parts in found.items():
        rank = parts[down].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        pairs[module] = LoraPair(parts[down], parts[up], alpha)
    return pairs


def _with_peft_alphas(pairs: dict[str, LoraPair], configs: dict, path: Path) -> dict:
    """``pairs`` of a diffusers file with each module's alpha from the file's peft config
    (``lora_alpha``, ``alpha_pattern``, rsLoRA's ``alpha / sqrt(r)`` scale as ``scale * r``), as
    diffusers' loader applies them; modules of a component without a config keep theirs."""
    out = {}
    for name, pair in pairs.items():
        component, module = name.split(".", 1)
        config = {
            k.split(".", 1)[1]: v for k, v in configs.items() if k.startswith(component + ".")
        }
        if config.get("use_dora"):
            raise LayoutError(f"{path}: a DoRA adapter; kohya's LoRA layout has no magnitudes")
        if "lora_alpha" not in config:
            out[name] = pair
            continue
        patterns = config.get("alpha_pattern") or {}
        alpha = patterns.get(get_pattern_key(patterns.keys(), module), config["lora_alpha"])
        scale = alpha / pair.rank**0.5 if config.get("use_rslora") else alpha / pair.rank
        out[name] = LoraPair(pair.down, pair.up, scale * pair.rank)
    return out


def families_of_modules(lora: LoraFile) -> list[str]:
    """The families ``lora``'s module names (and, where FLUX.1 and FLUX.2 share one, widths)
    belong to: those that every marked module allows, or when its modules disagree, every
    family one of them names (one, none, or several)."""
    marked = [
        set(marker.families)
        for module, pair in lora.pairs.items()
        for marker in _FAMILY_MARKERS
        if marker.marks(module, pair)
    ]
    if not marked:
        return []
    found = set.intersection(*marked) or set.union(*marked)
    return [family for family in FAMILIES if family in found]


def detect_family(
    lora: LoraFile, family: str | None = None, model: str | Path | None = None
) -> str:
    """``family`` when given, else the base ``model``'s (its ``model_index.json``), else the one
    family whose module names the LoRA has, else its training run's model card's. Raises
    ``ValueError`` saying what to pass when none decides."""
    if family is not None:
        return family
    if model is not None:
        pipeline = model_index(model)["_class_name"]
        if pipeline not in PIPELINE_FAMILIES:
            raise ValueError(f"{model}: {pipeline} is none of the families {', '.join(FAMILIES)}")
        return PIPELINE_FAMILIES[pipeline]
    matching = families_of_modules(lora)
    if len(matching) == 1:
        return matching[0]
    card = lora.path.parent / "README.md"
    if card.is_file():
        tags = ModelCard.load(card).data.tags or []
        tagged = [TAG_FAMILIES[tag] for tag in tags if tag in TAG_FAMILIES]
        if len(tagged) == 1:
            return tagged[0]
    why = (
        f"it has {' and '.join(matching)} names"
        if matching
        else "FLUX and Qwen-Image name attention alike"
    )
    raise ValueError(
        f"{lora.path}: cannot tell the model family from its module names ({why}); "
        f"pass --family ({', '.join(FAMILIES)}) or --model BASE"
    )


def model_index(model: str | Path) -> dict:
    """A local diffusers pipeline folder's ``model_index.json``."""
    path = Path(model) / "model_index.json"
    if not path.is_file():
        raise ValueError(f"{model}: not a diffusers pipeline folder (no model_index.json)")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Conversion:
    """A LoRA in another layout: ``pairs`` named as ``layout`` names them, ``mapped`` saying
    which kohya module holds which diffusers modules."""

    source: LoraFile
    family: str
    layout: str
    pairs: dict[str, LoraPair]
    mapped: list[Mapped]

    def report(self) -> list[str]:
        """The key-coverage report: each kind of mapping with its count (block indices as
        ``<i>``), and the totals."""
        kinds = Counter(
            (_pattern(entry.kohya), tuple(_pattern(module) for module in entry.modules))
            for entry in self.mapped
        )
        lines = [
            f"{self.source.path}: {len(self.source.pairs)} {self.family} LoRA modules "
            f"({self.source.tensors} tensors, {self.source.layout} layout) -> {self.layout}"
        ]
        for (kohya, modules), count in sorted(kinds.items()):
            held = " + ".join(modules) if modules else "nothing (all zero, left out)"
            fused = " (fused)" if len(modules) > 1 else ""
            lines.append(f"  {count:4d} x {kohya} <-> {held}{fused}")
        written = len(self.pairs) * 3 if self.layout == KOHYA else len(self.pairs) * 2
        lines.append(
            f"every tensor mapped: {len(self.source.pairs)} modules in, {len(self.pairs)} out "
            f"({written} tensors); none dropped"
        )
        skips = _DIFFUSERS_SKIPS.get(self.family)
        skipped = [e.kohya for e in self.mapped if skips and skips.search(e.kohya)]
        if skipped and self.layout == KOHYA:
            lines.append(
                f"note: ComfyUI and kohya load every module; diffusers' kohya {self.family} "
                f"reader (0.42) skips {', '.join(sorted(skipped))}"
            )
        return lines


def _pattern(name: str) -> str:
    return re.sub(r"(?<=[._])\d+(?=[._])", "<i>", name)


def convert(lora: LoraFile, to: str, family: str) -> Conversion:
    """``lora`` in layout ``to`` (``kohya`` or ``diffusers``) for ``family``.

    Raises :class:`LayoutError` naming the modules the target layout has no place for, and
    (a check of the mapping itself) any module that did not end up in exactly one target.
    """
    layout = LAYOUTS[family]
    if lora.layout == to:
        raise ValueError(f"{lora.path} is in the {to} layout already")
    try:
        if to == KOHYA:
            pairs, mapped = layout.to_kohya(lora.pairs)
            covered = Counter(module for entry in mapped for module in entry.modules)
        else:
            pairs, mapped = layout.from_kohya(lora.pairs)
            covered = Counter(entry.kohya for entry in mapped)
    except LayoutError as error:
        raise LayoutError(f"{lora.path}: {error}") from error
    unmapped = sorted(set(lora.pairs) - covered.keys())
    repeated = sorted(name for name, count in covered.items() if count > 1)
    if unmapped or repeated:
        raise LayoutError(f"{lora.path}: unmapped modules {unmapped}, mapped twice {repeated}")
    return Conversion(lora, family, to, pairs, mapped)


def describe_load_error(error: BaseException) -> str:
    """``error``, raised inside a diffusers loader (one of :data:`DIFFUSERS_LOAD_ERRORS`), in
    one line: its type, the function that raised it (a bare ``assert`` says nothing else) and
    the start of its message."""
    where = traceback.extract_tb(error.__traceback__)[-1].name
    message = textwrap.shorten(str(error), width=240, placeholder=" ...")
    return f"{type(error).__name__} in {where}" + (f": {message}" if message else "")


def write_conversion(conversion: Conversion, out: str | Path) -> Path:
    """Write ``conversion`` to the safetensors file ``out`` (its folder is created)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the file name must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    if conversion.layout == KOHYA:
        write_kohya(conversion.pairs, out)
    else:
        write_diffusers(conversion.pairs, conversion.family, out)
    return out


def write_kohya(pairs: dict[str, LoraPair], out: Path) -> None:
    """Kohya's file: ``<name>.lora_down.weight``, ``.lora_up.weight`` and a scalar float32
    ``.alpha`` per module, and sd-scripts' ``ss_network_dim``/``ss_network_alpha`` metadata (the
    most common rank and alpha)."""
    tensors = {}
    for name, pair in pairs.items():
        tensors[f"{name}.lora_down.weight"] = pair.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = pair.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(pair.alpha, dtype=torch.float32)
    rank, alpha = most_common_rank_alpha(pairs)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)}
    save_file(tensors, out, metadata={**metadata, "ss_network_alpha": str(alpha)})


def most_common_rank_alpha(pairs: dict[str, LoraPair]) -> tuple[int, float]:
    """The rank and the alpha most of ``pairs`` have."""
    rank = Counter(pair.rank for pair in pairs.values()).most_common(1)[0][0]
    alpha = Counter(pair.alpha for pair in pairs.values()).most_common(1)[0][0]
    return rank, alpha


def peft_config(pairs: dict[str, LoraPair]) -> LoraConfig:
    """The peft config of ``pairs`` (``module`` -> pair, one component): the most common rank and
    alpha, the others as patterns naming their modules, every module a target by full name."""
    rank, alpha = most_common_rank_alpha(pairs)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(pairs),
        rank_pattern={name: pair.rank for name, pair in pairs.items() if pair.rank != rank},
        alpha_pattern={name: pair.alpha for name, pair in pairs.items() if pair.alpha != alpha},
    )


def write_diffusers(modules: dict[str, LoraPair], family: str, out: Path) -> None:
    """Diffusers' file, as the family's pipeline writes it: ``component.module.lora_A.weight``
    and ``lora_B`` per module, each component's peft config as metadata."""
    components: dict[str, dict[str, LoraPair]] = {}
    for name, pair in modules.items():
        component, module = name.split(".", 1)
        components.setdefault(component, {})[module] = pair
    layers = {}
    for component, pairs in components.items():
        weights = {}
        for module, pair in pairs.items():
            # The parts of a projection trained fused share its down tensor (layouts.split), and
            # safetensors stores no tensor twice: each part gets its own copy.
            weights[f"{module}.lora_A.weight"] = pair.down.clone()
            weights[f"{module}.lora_B.weight"] = pair.up.contiguous()
        layers[component] = (weights, peft_config(pairs).to_dict())
    pipeline_cls = getattr(diffusers, SAVING_PIPELINES[family])
    save_lora_state_dicts(pipeline_cls, layers, out.parent, out.name)


def save_lora_state_dicts(
    pipeline_cls,
    layers: dict[str, tuple[dict[str, torch.Tensor], dict]],
    directory: str | Path,
    weight_name: str = LORA_WEIGHTS_NAME,
) -> Path:
    """Write ``{component: (peft state dict, LoRA config dict)}`` to ``directory/weight_name``
    with ``pipeline_cls.save_lora_weights``: diffusers' keys, each config as metadata."""
    arguments = {}
    for component, (state_dict, config) in layers.items():
        arguments[f"{component}_lora_layers"] = state_dict
        arguments[f"{component}_lora_adapter_metadata"] = config
    pipeline_cls.save_lora_weights(
        str(directory), **arguments, weight_name=weight_name, safe_serialization=True
    )
    return Path(directory) / weight_name


def diffusers_modules(lora: LoraFile, family: str) -> dict[str, LoraPair]:
    """``lora``'s pairs by diffusers module (``component.module``), converted when kohya's."""
    if lora.layout == DIFFUSERS:
        return lora.pairs
    return convert(lora, DIFFUSERS, family).pairs
