"""Where a LoRA's tensors sit in each tool's key layout: diffusers/peft module names and the kohya
names that ComfyUI and kohya's sd-scripts load, for every family the suite trains.

A LoRA on a layer ``W: [out, in]`` is a :class:`LoraPair`: ``down: [r, in]``, ``up: [out, r]``
and ``alpha``, the layer computing ``W x + (alpha / r) * up @ down @ x`` (a conv's pair is
``[r, in, kh, kw]`` / ``[out, r, 1, 1]``). peft names the pair ``lora_A`` / ``lora_B`` with
``lora_alpha``; kohya ``lora_down`` / ``lora_up`` with an ``.alpha`` tensor; both scale by
``alpha / r`` with ``r = down.shape[0]``, so a pair moves between them as it is.

Kohya's names, by family:

- FLUX.1 (dev, Kontext and Fill share the transformer): Black Forest Labs' own module names,
  ``double_blocks_<i>_img_attn_proj``, ``single_blocks_<i>_linear2``, ``img_in``..., where one
  linear computes what diffusers splits into several: q, k and v of a double block's image and
  text streams (``img_attn_qkv``, ``txt_attn_qkv``), and q, k, v and the MLP's input in a single
  block (``linear1``). A fused pair stacks its parts: ``down`` their downs along the rank,
  ``up`` their ups block-diagonally, so ``up @ down`` is the parts' deltas stacked row-wise
  (kohya's split-qkv LoRAs are saved so), and diffusers' kohya reader recognises the
  block-diagonal ``up`` and splits it back exactly. A part the LoRA does not adapt is a zero block.
- FLUX.2 ([klein] and [dev]): Black Forest Labs' names again, as diffusers' kohya FLUX.2 reader
  and its single-file converter spell them. The double blocks are FLUX.1's, q/k/v fused alike,
  with a SwiGLU MLP (``img_mlp_0`` -> ``ff.linear_in``); the single blocks' ``linear1`` is one
  diffusers module too (``attn.to_qkv_mlp_proj``), so nothing else is fused; the modulations
  are shared by all blocks (``double_stream_modulation_img_lin``, ``single_stream_modulation_lin``).
- Qwen-Image: the diffusers names with dots as underscores (ComfyUI's names for its modules).
- SD1.5: the UNet's diffusers names and the CLIP text encoder's (``text_model.``-prefixed, as
  ComfyUI and transformers 4 name them) with dots as underscores.

Every key prefix is ``lora_unet_`` (denoiser) or ``lora_te_`` (text encoder). Names with
underscores of their own (``to_q``, ``down_blocks``) are read back with each family's word list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


class LayoutError(ValueError):
    """A LoRA that a key layout cannot hold, or a file that is not in it; names the modules."""


@dataclass(frozen=True)
class LoraPair:
    """One layer's LoRA: ``down: [r, in(, kh, kw)]``, ``up: [out, r(, 1, 1)]``, and ``alpha``,
    the delta weight being ``(alpha / r) * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Mapped:
    """One kohya module (prefixed name) and the diffusers modules (``component.module``) it
    holds: one, or the parts of a fused projection in order."""

    kohya: str
    modules: tuple[str, ...]


def listed(names, limit: int = 12) -> str:
    """``names`` sorted and comma-separated, the first ``limit`` of them and a count of the rest."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- Names with dots as underscores (Qwen-Image, SD1.5) -------------------------------------


def _unflatten(flat: str, words: frozenset[str]) -> str:
    """``flat``'s underscore-separated tokens joined by dots, except runs that spell one of
    ``words`` (longest first), which keep their underscores."""
    tokens = flat.split("_")
    longest = max((word.count("_") + 1 for word in words), default=1)
    parts, i = [], 0
    while i < len(tokens):
        for length in range(min(longest, len(tokens) - i), 0, -1):
            candidate = "_".join(tokens[i : i + length])
            if length == 1 or candidate in words:
                parts.append(candidate)
                i += length
                break
    return ".".join(parts)


@dataclass(frozen=True)
class FlatNames:
    """Kohya names of ``component``: ``prefix`` + ``root`` + the module name, dots as
    underscores. ``words`` are the name segments with underscores of their own, which reading a
    name back keeps whole; ``root`` is a leading module path that kohya's names carry and this
    suite's do not (transformers 5 dropped CLIP's ``text_model.``)."""

    component: str
    prefix: str
    words: frozenset[str]
    root: str = ""

    def to_kohya(self, modules: Mapping[str, LoraPair]) -> list[tuple[str, LoraPair, tuple]]:
        """``(kohya name, pair, (module,))`` for every module (named with or without the
        ``root``); a name that would read back as another is refused."""
        out, ambiguous = [], []
        for module, pair in modules.items():
            bare = module.removeprefix(self.root)
            flat = (self.root + bare).replace(".", "_")
            if self.module_name(flat) != bare:
                ambiguous.append(module)
            out.append((self.prefix + flat, pair, (module,)))
        if ambiguous:
            raise LayoutError(
                f"kohya's {self.component} names cannot tell these modules apart once their dots "
                f"are underscores: {listed(ambiguous)}"
            )
        return out

    def module_name(self, flat: str) -> str:
        return _unflatten(flat, self.words).removeprefix(self.root)

    def from_kohya(self, flat: str, pair: LoraPair) -> list[tuple[str, LoraPair]]:
        """``[(module, pair)]`` of the kohya module ``flat`` (its name without the prefix)."""
        return [(self.module_name(flat), pair)]


# --- FLUX: Black Forest Labs' names, q/k/v fused ---------------------------------------------


@dataclass(frozen=True)
class FluxEntry:
    """A kohya FLUX module and the diffusers modules it stands for. ``parts`` are fused row-wise
    when more than one, part ``j`` being ``widths[j] * in_features`` rows (FLUX's projections are
    as wide as the hidden size, the single blocks' MLP 4 times). ``swap_halves``: the two halves
    of the output are in the other order (the final norm: shift, scale vs diffusers' scale,
    shift)."""

    kohya: str
    parts: tuple[str, ...]
    widths: tuple[int, ...] = (1,)
    swap_halves: bool = False


_QKV = (1, 1, 1)
# Per block: kohya's name after `double_blocks_<i>_` / `single_blocks_<i>_` -> diffusers' after
# `transformer_blocks.<i>.` / `single_transformer_blocks.<i>.`
FLUX_DOUBLE_BLOCK = (
    FluxEntry("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), _QKV),
    FluxEntry("img_attn_proj", ("attn.to_out.0",)),
    FluxEntry("img_mlp_0", ("ff.net.0.proj",)),
    FluxEntry("img_mlp_2", ("ff.net.2",)),
    FluxEntry("img_mod_lin", ("norm1.linear",)),
    FluxEntry("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), _QKV),
    FluxEntry("txt_attn_proj", ("attn.to_add_out",)),
    FluxEntry("txt_mlp_0", ("ff_context.net.0.proj",)),
    FluxEntry("txt_mlp_2", ("ff_context.net.2",)),
    FluxEntry("txt_mod_lin", ("norm1_context.linear",)),
)
FLUX_SINGLE_BLOCK = (
    FluxEntry("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, 4)),
    FluxEntry("linear2", ("proj_out",)),
    FluxEntry("modulation_lin", ("norm.linear",)),
)
FLUX_TOP_LEVEL = (
    FluxEntry("img_in", ("x_embedder",)),
    FluxEntry("txt_in", ("context_embedder",)),
    FluxEntry("time_in_in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    FluxEntry("time_in_out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    FluxEntry("vector_in_in_layer", ("time_text_embed.text_embedder.linear_1",)),
    FluxEntry("vector_in_out_layer", ("time_text_embed.text_embedder.linear_2",)),
    FluxEntry("guidance_in_in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    FluxEntry("guidance_in_out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    FluxEntry("final_layer_linear", ("proj_out",)),
    FluxEntry("final_layer_adaLN_modulation_1", ("norm_out.linear",), swap_halves=True),
)
# (kohya block prefix, diffusers block prefix, entries); the top level has no index.
_FLUX_BLOCKS = (
    ("double_blocks", "transformer_blocks", FLUX_DOUBLE_BLOCK),
    ("single_blocks", "single_transformer_blocks", FLUX_SINGLE_BLOCK),
)
# FLUX.2's blocks under FLUX.1's kohya names: SwiGLU MLPs (ff.linear_in / linear_out), and single
# blocks whose fused projection diffusers keeps whole (attn.to_qkv_mlp_proj).
FLUX2_DOUBLE_BLOCK = (
    FluxEntry("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), _QKV),
    FluxEntry("img_attn_proj", ("attn.to_out.0",)),
    FluxEntry("img_mlp_0", ("ff.linear_in",)),
    FluxEntry("img_mlp_2", ("ff.linear_out",)),
    FluxEntry("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), _QKV),
    FluxEntry("txt_attn_proj", ("attn.to_add_out",)),
    FluxEntry("txt_mlp_0", ("ff_context.linear_in",)),
    FluxEntry("txt_mlp_2", ("ff_context.linear_out",)),
)
FLUX2_SINGLE_BLOCK = (
    FluxEntry("linear1", ("attn.to_qkv_mlp_proj",)),
    FluxEntry("linear2", ("attn.to_out",)),
)
FLUX2_TOP_LEVEL = (
    FluxEntry("img_in", ("x_embedder",)),
    FluxEntry("txt_in", ("context_embedder",)),
    FluxEntry("time_in_in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    FluxEntry("time_in_out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    FluxEntry("guidance_in_in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    FluxEntry("guidance_in_out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    FluxEntry("double_stream_modulation_img_lin", ("double_stream_modulation_img.linear",)),
    FluxEntry("double_stream_modulation_txt_lin", ("double_stream_modulation_txt.linear",)),
    FluxEntry("single_stream_modulation_lin", ("single_stream_modulation.linear",)),
    FluxEntry("final_layer_linear", ("proj_out",)),
    FluxEntry("final_layer_adaLN_modulation_1", ("norm_out.linear",), swap_halves=True),
)
_FLUX2_BLOCKS = (
    ("double_blocks", "transformer_blocks", FLUX2_DOUBLE_BLOCK),
    ("single_blocks", "single_transformer_blocks", FLUX2_SINGLE_BLOCK),
)
_BLOCK_NAME = re.compile(r"^(?P<block>[a-z_]+?)[._](?P<index>\d+)[._](?P<rest>.+)$")


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first])


def fuse(parts: Sequence[LoraPair | None], widths: Sequence[int]) -> LoraPair:
    """One pair computing ``parts`` stacked row-wise (None: a part without LoRA, a zero block).

    ``down: [k * r, in]`` is the parts' downs, each zero-padded to the largest rank ``r``; ``up:
    [sum(widths) * in, k * r]`` their ups block-diagonally, each times its scale over the first
    part's, which the fused ``alpha = scale * k * r`` then carries. Raises :class:`LayoutError`
    when a part's shape does not fit ``widths``.
    """
    present = [pair for pair in parts if pair is not None]
    reference = present[0]
    in_features, rank = reference.down.shape[1], max(pair.rank for pair in present)
    downs, ups = [], []
    for pair, width in zip(parts, widths, strict=True):
        down = reference.down.new_zeros(rank, in_features)
        up = reference.up.new_zeros(width * in_features, rank)
        if pair is not None:
            if pair.down.shape[1] != in_features or pair.up.shape[0] != up.shape[0]:
                raise LayoutError(
                    f"a part of shape up {tuple(pair.up.shape)} down {tuple(pair.down.shape)} "
                    f"does not fit a fused projection of {in_features} inputs"
                )
            down[: pair.rank] = pair.down
            up[:, : pair.rank] = pair.up * (pair.scale / reference.scale)
        downs.append(down)
        ups.append(up)
    return LoraPair(torch.cat(downs), torch.block_diag(*ups), reference.scale * rank * len(parts))


def split(pair: LoraPair, widths: Sequence[int]) -> list[LoraPair | None]:
    """The parts of a fused pair, the inverse of :func:`fuse`: a block-diagonal ``up`` gives
    each part its own rank-``r / k`` slice (zero padding trimmed, a zero part None); any other
    (a projection trained fused) gives each part the shared ``down`` and its rows of ``up``."""
    in_features = pair.down.shape[1]
    rows = [width * in_features for width in widths]
    if sum(rows) != pair.up.shape[0]:
        raise LayoutError(
            f"a fused projection of {in_features} inputs has {sum(rows)} outputs here, "
            f"not {pair.up.shape[0]}"
        )
    ups = pair.up.split(rows)
    count = len(widths)
    part_rank = pair.rank // count
    diagonal = pair.rank % count == 0 and all(
        not torch.cat([up[:, : j * part_rank], up[:, (j + 1) * part_rank :]], dim=1).any()
        for j, up in enumerate(ups)
    )
    if not diagonal:
        return [LoraPair(pair.down, up, pair.alpha) if up.any() else None for up in ups]
    parts = []
    for j, (down, up) in enumerate(zip(pair.down.split(part_rank), ups, strict=True)):
        up = up[:, j * part_rank : (j + 1) * part_rank]
        used = (down.flatten(1).abs().sum(1) + up.abs().sum(0)).nonzero()
        if len(used) == 0:
            parts.append(None)
            continue
        keep = int(used[-1]) + 1
        parts.append(LoraPair(down[:keep], up[:, :keep], pair.scale * keep))
    return parts


class FluxTransformerNames:
    """Kohya names of a FLUX transformer (Black Forest Labs' module names, q/k/v fused): ``blocks``
    as ``(kohya block prefix, diffusers block prefix, entries)``, the ``top_level`` entries, and
    the ``model`` that errors name."""

    component = "transformer"
    prefix = "lora_unet_"

    def __init__(
        self,
        model: str,
        blocks: Sequence[tuple[str, str, Sequence[FluxEntry]]],
        top_level: Sequence[FluxEntry],
    ) -> None:
        self.model = model
        self._kohya_blocks = [kohya_block for kohya_block, _, _ in blocks]
        self._blocks = [block for _, block, _ in blocks]
        # (diffusers block kind, name within the block) -> (kohya block kind, entry, part), and
        # (kohya block kind, name within the block) -> (diffusers block kind, entry); the block
        # index carries over unchanged. The top level's block kind is "".
        self._by_module: dict[tuple[str, str], tuple[str, FluxEntry, int]] = {}
        self._by_kohya: dict[tuple[str, str], tuple[str, FluxEntry]] = {}
        for kohya_block, block, entries in (*blocks, ("", "", top_level)):
            for entry in entries:
                self._by_kohya[(kohya_block, entry.kohya)] = (block, entry)
                for j, part in enumerate(entry.parts):
                    self._by_module[(block, part)] = (kohya_block, entry, j)

    @staticmethod
    def _split_name(name: str, blocks: Sequence[str]) -> tuple[str, str, str]:
        """``(block kind, index, rest)`` of a block module's name, ``("", "", name)`` else."""
        match = _BLOCK_NAME.match(name)
        if match and match["block"] in blocks:
            return match["block"], match["index"], match["rest"]
        return "", "", name

    def to_kohya(self, modules: Mapping[str, LoraPair]) -> list[tuple[str, LoraPair, tuple]]:
        groups: dict[str, tuple[FluxEntry, dict[int, str]]] = {}
        unknown = []
        for module in modules:
            block, index, rest = self._split_name(module, self._blocks)
            found = self._by_module.get((block, rest))
            if found is None:
                unknown.append(module)
                continue
            kohya_block, entry, part = found
            name = f"{kohya_block}_{index}_{entry.kohya}" if kohya_block else entry.kohya
            groups.setdefault(name, (entry, {}))[1][part] = module
        if unknown:
            raise LayoutError(f"kohya's {self.model} layout has no name for: {listed(unknown)}")
        out = []
        for name, (entry, parts) in groups.items():
            pairs = [modules[parts[j]] if j in parts else None for j in range(len(entry.parts))]
            try:
                pair = fuse(pairs, entry.widths) if len(pairs) > 1 else pairs[0]
            except LayoutError as error:
                raise LayoutError(f"{self.prefix}{name}: {error}") from error
            if entry.swap_halves:
                pair = LoraPair(pair.down, _swap_halves(pair.up), pair.alpha)
            names = tuple(parts[j] for j in sorted(parts))
            out.append((self.prefix + name, pair, names))
        return out

    def from_kohya(self, flat: str, pair: LoraPair) -> list[tuple[str, LoraPair]]:
        """``[(module, pair)]`` of the kohya module ``flat`` (its name without the prefix): its
        parts when fused, zero parts left out."""
        kohya_block, index, rest = self._split_name(flat, self._kohya_blocks)
        found = self._by_kohya.get((kohya_block, rest))
        if found is None:
            raise LayoutError(f"{self.prefix}{flat} is no {self.model} module in kohya's layout")
        block, entry = found
        if entry.swap_halves:
            pair = LoraPair(pair.down, _swap_halves(pair.up), pair.alpha)
        try:
            parts = split(pair, entry.widths) if len(entry.parts) > 1 else [pair]
        except LayoutError as error:
            raise LayoutError(f"{self.prefix}{flat}: {error}") from error
        return [
            (f"{block}.{index}.{part}" if block else part, part_pair)
            for part, part_pair in zip(entry.parts, parts, strict=True)
            if part_pair is not None
        ]


# --- Families -------------------------------------------------------------------------------

# Name segments with underscores of their own, as diffusers' and transformers' modules spell them.
QWEN_WORDS = frozenset(
    "transformer_blocks img_mod txt_mod img_mlp txt_mlp to_q to_k to_v to_out to_add_out "
    "add_q_proj add_k_proj add_v_proj img_in txt_in proj_out norm_out time_text_embed "
    "timestep_embedder linear_1 linear_2".split()
)
UNET_WORDS = frozenset(
    "down_blocks up_blocks mid_block transformer_blocks to_q to_k to_v to_out proj_in proj_out "
    "time_emb_proj conv_shortcut conv_in conv_out time_embedding linear_1 linear_2".split()
)
CLIP_WORDS = frozenset("text_model self_attn q_proj k_proj v_proj out_proj".split())


@dataclass(frozen=True)
class Layout:
    """A family's kohya layout: the names of each component it adapts."""

    family: str
    components: tuple[FlatNames | FluxTransformerNames, ...]

    def to_kohya(self, modules: Mapping[str, LoraPair]) -> tuple[dict[str, LoraPair], list[Mapped]]:
        """Kohya pairs by name for ``modules`` (``component.module`` -> pair), and what each
        holds. Raises :class:`LayoutError` naming every module the layout has no place for."""
        by_component: dict[str, dict[str, LoraPair]] = {}
        for name, pair in modules.items():
            component, module = name.split(".", 1)
            by_component.setdefault(component, {})[module] = pair
        known = {names.component: names for names in self.components}
        foreign = [name for name in modules if name.split(".", 1)[0] not in known]
        if foreign:
            raise LayoutError(
                f"the {self.family} kohya layout covers {', '.join(known)} only; "
                f"it has no place for {listed(foreign)}"
            )
        pairs, mapped = {}, []
        for component, component_modules in by_component.items():
            for kohya, pair, names in known[component].to_kohya(component_modules):
                pairs[kohya] = pair
                mapped.append(Mapped(kohya, tuple(f"{component}.{name}" for name in names)))
        return pairs, mapped

    def from_kohya(self, pairs: Mapping[str, LoraPair]) -> tuple[dict[str, LoraPair], list[Mapped]]:
        """Diffusers pairs (``component.module`` -> pair) of kohya ``pairs`` by name, and what
        each kohya module became; zero parts of fused projections are dropped. Raises
        :class:`LayoutError` naming every kohya module it cannot place."""
        modules: dict[str, LoraPair] = {}
        mapped, problems = [], []
        for kohya, pair in pairs.items():
            names = next((n for n in self.components if kohya.startswith(n.prefix)), None)
            if names is None:
                prefixes = " or ".join(n.prefix for n in self.components)
                problems.append(f"{kohya} (the {self.family} layout's names start {prefixes})")
                continue
            try:
                parts = names.from_kohya(kohya.removeprefix(names.prefix), pair)
            except LayoutError as error:
                problems.append(str(error))
                continue
            for module, part in parts:
                modules[f"{names.component}.{module}"] = part
            mapped.append(Mapped(kohya, tuple(f"{names.component}.{m}" for m, _ in parts)))
        if problems:
            raise LayoutError("cannot place these kohya modules: " + "; ".join(problems[:12]))
        return modules, mapped


_CLIP = FlatNames("text_encoder", "lora_te_", CLIP_WORDS, root="text_model.")
LAYOUTS = {
    "flux": Layout("flux", (FluxTransformerNames("FLUX", _FLUX_BLOCKS, FLUX_TOP_LEVEL),)),
    "qwen-image": Layout("qwen-image", (FlatNames("transformer", "lora_unet_", QWEN_WORDS),)),
    "sd15": Layout("sd15", (FlatNames("unet", "lora_unet_", UNET_WORDS), _CLIP)),
    "flux2": Layout("flux2", (FluxTransformerNames("FLUX.2", _FLUX2_BLOCKS, FLUX2_TOP_LEVEL),)),
}
