"""The SD3 VAE adapted to multispectral images: a frozen ``AutoencoderKL`` between two adapters.

``AutoencoderKLMultispectralAdapter`` reconstructs an N-band image ``[B, N, H, W]`` through the
pretrained VAE, whose weights never change:

    bands --normalise--> [-1, 1] --spectral gate--> input adapter (N -> 3) --> VAE encoder
    --> latents [B, 16, H/8, W/8] --> VAE decoder (optional LoRA) --> output adapter (3 -> N)
    --denormalise--> bands, in the units of the input

Per-band normalisation maps each band's robust range (percentiles of the training set's leaf
pixels, kept in the config) to [-1, 1] and is inverted on the way out, so absolute values and band
ratios survive. Background and no-data (NaN) pixels are replaced by -1 before the encoder and
excluded from every loss, so they cannot affect the reconstruction of the leaf, the loss, or its
gradient. The losses are seed 002's: per-band MSE over leaf pixels (normalised units) and the
spectral angle (SAM, radians) between each leaf pixel's own N-band spectra (data units).

``save_pretrained`` writes the config (normalisation statistics included) and the weights the
adapter adds (``adapter_model.safetensors``), never the frozen VAE, which the config names;
``from_pretrained`` reads either such a folder or a plain SD3 VAE (then building a fresh adapter).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from losses import (
    LOW_COVERAGE,
    coverage_warning,
    mask_coverage_stats,
    masked_mse_per_channel,
    masked_sam_loss,
)

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
Placement = Literal["input", "output", "both"]
PLACEMENTS = ("input", "output", "both")
DEFAULT_DECODER_LORA_LAYERS = ("conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0")
# What background and no-data pixels become before the encoder: each band's low percentile.
BACKGROUND = -1.0
# Config keys that shape the added weights; a saved adapter loads only into a model that agrees.
_ARCHITECTURE_KEYS = (
    "num_bands",
    "adapter_placement",
    "use_spectral_attention",
    "adapter_hidden_channels",
    "decoder_lora_rank",
    "decoder_lora_alpha",
    "decoder_lora_layers",
)
# Config key of each normalisation statistic -> the buffer holding it (a buffer may not share a
# config key's name: ModelMixin exposes config keys as attributes).
_STATISTICS_BUFFERS = {
    "band_low": "low",
    "band_high": "high",
    "band_min": "range_min",
    "band_max": "range_max",
}


def band_groups(num_bands: int) -> list[np.ndarray]:
    """The bands behind the VAE's red, green and blue channels, in that order.

    The bands, in the order given (ascending wavelength, as sensors store them), are split into
    three contiguous groups (``np.array_split``); the last group feeds red, the middle green, the
    first blue. For 5 bands (blue, green, red, red edge, NIR): red <- NIR, green <- red and red
    edge, blue <- blue and green, a colour-infrared rendering.
    """
    return list(reversed(np.array_split(np.arange(num_bands), 3)))


def band_to_rgb_matrix(num_bands: int) -> torch.Tensor:
    """``[3, N]``: each RGB channel is the mean of its band group (see :func:`band_groups`)."""
    matrix = torch.zeros(3, num_bands)
    for channel, group in enumerate(band_groups(num_bands)):
        matrix[channel, group] = 1.0 / len(group)
    return matrix


def rgb_to_band_matrix(num_bands: int) -> torch.Tensor:
    """``[N, 3]``: the pseudo-inverse of :func:`band_to_rgb_matrix`, which copies each RGB
    channel to every band of its group."""
    return torch.linalg.pinv(band_to_rgb_matrix(num_bands))


def apply_matrix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix: [C_out, C_in]`` applied to every pixel of ``x: [B, C_in, H, W]``."""
    return torch.einsum("oc,bchw->bohw", matrix.to(x.dtype), x)


class SpectralMap(nn.Module):
    """A learned per-pixel map ``[B, C_in, H, W] -> [B, C_out, H, W]``: a linear map that starts
    as ``init: [C_out, C_in]`` plus a one-hidden-layer MLP whose output layer starts at zero, so
    training starts from the fixed rule and learns what it misses."""

    def __init__(self, init: torch.Tensor, hidden_channels: int) -> None:
        super().__init__()
        channels_out, channels_in = init.shape
        self.linear = nn.Conv2d(channels_in, channels_out, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels_in, hidden_channels, 1),
            nn.SiLU(),
            nn.Conv2d(hidden_channels, channels_out, 1),
        )
        with torch.no_grad():
            self.linear.weight.copy_(init[..., None, None])
            self.linear.bias.zero_()
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


class SpectralGate(nn.Module):
    """Spectral attention: a per-pixel gate over the band axis computed from the pixel's own
    spectrum, ``g = 2 * sigmoid(W x + b)`` in (0, 2) per band. ``W`` and ``b`` start at zero, so
    the gate starts as the identity (``g = 1``). ``x: [B, N, H, W]`` -> ``(x * g, g)``."""

    def __init__(self, num_bands: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(num_bands, num_bands, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = 2.0 * torch.sigmoid(self.score(x))
        return x * gate, gate


class AutoencoderKLMultispectralAdapter(ModelMixin, ConfigMixin):
    """A frozen SD3 ``AutoencoderKL`` with trainable multispectral adapters (see the module doc).

    Build it with :meth:`from_pretrained` (an SD3 VAE or a saved adapter) or :meth:`from_vae`.

    Args:
        vae: the pretrained VAE (3 image channels); frozen here, never saved with the adapter.
        num_bands: N, bands per pixel (at least 3).
        adapter_placement: where learned adapters sit. ``"input"``: a learned N -> 3 map before
            the encoder, and the decoder's RGB copied back to the bands of its group (the fixed
            :func:`rgb_to_band_matrix`). ``"output"``: the encoder sees the fixed band-group means
            (:func:`band_to_rgb_matrix`), and a learned 3 -> N map follows the decoder.
            ``"both"``: learned maps on both sides. Learned maps start as the fixed rules.
        use_spectral_attention: gate the bands per pixel before the input map
            (:class:`SpectralGate`); ``losses["band_weights"]`` reads the mean gate out.
        use_sam_loss: compute the SAM term (and add it to the total with ``sam_weight``).
        sam_weight: weight of SAM (radians) in ``losses["total"]``.
        range_weight: weight of the range penalty: the masked mean squared excess of the
            reconstruction beyond each band's ``[band_min, band_max]``, in normalised units.
        adapter_hidden_channels: width of the learned maps' hidden layer.
        band_low, band_high: per band, the values mapped to -1 and 1 (robust percentiles of the
            training set's leaf pixels); default 0 and 1.
        band_min, band_max: per band, the data range the range penalty keeps reconstructions
            in; default ``band_low`` and ``band_high``.
        decoder_lora_rank: rank of a peft LoRA on the VAE decoder; 0 for none.
        decoder_lora_alpha: its alpha (default: the rank).
        decoder_lora_layers: decoder module names (or name suffixes) it adapts.
        decoder_lora_dropout: dropout on its branch.
        base_model_name_or_path, base_model_subfolder: where the VAE comes from, so that a saved
            adapter reloads it (set by :meth:`from_pretrained`).
    """

    ignore_for_config: ClassVar[list[str]] = ["vae"]

    @register_to_config
    def __init__(
        self,
        vae: AutoencoderKL | None = None,
        num_bands: int = 5,
        adapter_placement: Placement = "both",
        use_spectral_attention: bool = True,
        use_sam_loss: bool = True,
        sam_weight: float = 1.0,
        range_weight: float = 0.0,
        adapter_hidden_channels: int = 32,
        band_low: Sequence[float] | None = None,
        band_high: Sequence[float] | None = None,
        band_min: Sequence[float] | None = None,
        band_max: Sequence[float] | None = None,
        decoder_lora_rank: int = 0,
        decoder_lora_alpha: float | None = None,
        decoder_lora_layers: Sequence[str] = DEFAULT_DECODER_LORA_LAYERS,
        decoder_lora_dropout: float = 0.0,
        base_model_name_or_path: str | None = None,
        base_model_subfolder: str | None = None,
    ) -> None:
        super().__init__()
        if vae is None:
            raise ValueError("AutoencoderKLMultispectralAdapter needs the pretrained vae")
        if vae.config.in_channels != 3 or vae.config.out_channels != 3:
            raise ValueError(
                f"the VAE must take and give 3 channels, got {vae.config.in_channels} -> "
                f"{vae.config.out_channels}"
            )
        if num_bands < 3:
            raise ValueError(f"num_bands must be at least 3, got {num_bands}")
        if adapter_placement not in PLACEMENTS:
            raise ValueError(
                f"adapter_placement must be one of {list(PLACEMENTS)}, got {adapter_placement!r}"
            )
        self.vae = vae.requires_grad_(False).eval()
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
        self.register_buffer("to_rgb", band_to_rgb_matrix(num_bands), persistent=False)
        self.register_buffer("from_rgb", rgb_to_band_matrix(num_bands), persistent=False)
        self.gate = SpectralGate(num_bands) if use_spectral_attention else None
        learned_input = adapter_placement in ("input", "both")
        learned_output = adapter_placement in ("output", "both")
        hidden = adapter_hidden_channels
        self.input_adapter = SpectralMap(self.to_rgb, hidden) if learned_input else None
        self.output_adapter = SpectralMap(self.from_rgb, hidden) if learned_output else None
        for buffer in _STATISTICS_BUFFERS.values():
            self.register_buffer(buffer, torch.zeros(num_bands), persistent=False)
        self.set_band_statistics(band_low, band_high, band_min, band_max)
        if decoder_lora_rank > 0:
            self._add_decoder_lora()
        self._warned: set[str] = set()

    # ----------------------------------------------------------------- construction and I/O

    @classmethod
    def from_vae(cls, vae: AutoencoderKL, **config) -> AutoencoderKLMultispectralAdapter:
        """A fresh adapter around ``vae``; ``config`` holds any ``__init__`` argument."""
        return cls(vae=vae, **config)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        vae: AutoencoderKL | str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        **config,
    ) -> AutoencoderKLMultispectralAdapter:
        """Load a saved adapter, or build a fresh one around a pretrained SD3 VAE.

        - A folder written by :meth:`save_pretrained`: its weights and normalisation statistics,
          around the VAE its config names, or ``vae`` (a model or a path) when that has moved.
        - An ``AutoencoderKL`` (a folder or Hub id, or a pipeline whose ``vae`` subfolder is
          used when ``subfolder`` is not given): a fresh adapter, ``config`` as in ``__init__``
          (``num_bands=5, adapter_placement="both", ...``).

        ``torch_dtype`` is the VAE's dtype; the adapters stay float32.
        """
        found, subfolder = _read_config(cls, pretrained_model_name_or_path, subfolder)
        if found.get("_class_name") == cls.__name__:
            if config:
                raise TypeError(
                    f"{pretrained_model_name_or_path} is a saved adapter whose config fixes "
                    f"{sorted(config)}; load it without them"
                )
            saved = _folder(pretrained_model_name_or_path, subfolder)
            if not isinstance(vae, AutoencoderKL):
                base = vae or found.get("base_model_name_or_path")
                if base is None or (Path(base).is_absolute() and not Path(base).exists()):
                    raise ValueError(
                        f"{saved} was trained on the VAE at {base}, which is not there; pass "
                        "vae= (an AutoencoderKL or its folder)"
                    )
                vae_subfolder = None if vae else found.get("base_model_subfolder")
                vae = AutoencoderKL.from_pretrained(
                    base, subfolder=vae_subfolder, torch_dtype=torch_dtype
                )
            arguments = {k: v for k, v in found.items() if not k.startswith("_")}
            model = cls.from_vae(vae, **arguments)
            model.load_adapter(saved)
            return model.eval()
        if found.get("_class_name") != AutoencoderKL.__name__:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {found.get('_class_name')}, neither an "
                f"AutoencoderKL nor a saved {cls.__name__}"
            )
        base_vae = AutoencoderKL.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, torch_dtype=torch_dtype
        )
        local = Path(pretrained_model_name_or_path)
        base = str(local.resolve()) if local.is_dir() else str(pretrained_model_name_or_path)
        return cls.from_vae(
            base_vae, base_model_name_or_path=base, base_model_subfolder=subfolder, **config
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights this model adds to the VAE: adapters, gate and decoder LoRA."""
        return {
            name: param.detach()
            for name, param in self.named_parameters()
            if not name.startswith("vae.") or ".lora_" in name
        }

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True):
        """Write ``config.json`` (normalisation statistics included) and
        ``adapter_model.safetensors`` (the added weights only) into ``save_directory``."""
        if not is_main_process:
            return
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_config(folder)
        weights = {name: t.contiguous() for name, t in self.adapter_state_dict().items()}
        save_file(weights, folder / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})

    def load_adapter(self, folder: str | os.PathLike) -> None:
        """Load the weights and normalisation statistics saved in ``folder``.

        Raises:
            ValueError: naming the folder, when it was saved with another architecture (the
                differing settings are listed) or its weights do not fit this model.
        """
        folder = Path(folder)
        if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
            raise ValueError(f"{folder} holds no {ADAPTER_WEIGHTS_NAME}")
        saved = self.load_config(folder)
        differences = [
            f"{key}={saved.get(key)!r} (this model: {self.config[key]!r})"
            for key in _ARCHITECTURE_KEYS
            if _jsonable(saved.get(key)) != _jsonable(self.config[key])
        ]
        if differences:
            raise ValueError(f"{folder} was saved with {', '.join(differences)}")
        weights = load_file(folder / ADAPTER_WEIGHTS_NAME)
        expected = self.adapter_state_dict()
        if weights.keys() != expected.keys():
            missing = sorted(expected.keys() - weights.keys())
            extra = sorted(weights.keys() - expected.keys())
            raise ValueError(f"{folder}: weights do not fit, missing {missing}, unexpected {extra}")
        try:
            self.load_state_dict(weights, strict=False)
        except RuntimeError as error:
            raise ValueError(f"{folder}: weights do not fit ({error})") from error
        self.set_band_statistics(*(saved[key] for key in _STATISTICS_BUFFERS))

    # ----------------------------------------------------------------- normalisation

    def set_band_statistics(
        self,
        low: Sequence[float] | None,
        high: Sequence[float] | None,
        minimum: Sequence[float] | None = None,
        maximum: Sequence[float] | None = None,
    ) -> None:
        """Set the per-band values mapped to -1 and 1 (``low``, ``high``, each ``[N]``) and the
        range penalty's data range (``minimum``, ``maximum``; default ``low`` and ``high``), in
        the config and in the buffers the forward pass uses."""
        n = self.config.num_bands
        low = [0.0] * n if low is None else [float(v) for v in low]
        high = [1.0] * n if high is None else [float(v) for v in high]
        minimum = low if minimum is None else [float(v) for v in minimum]
        maximum = high if maximum is None else [float(v) for v in maximum]
        values = {"band_low": low, "band_high": high, "band_min": minimum, "band_max": maximum}
        for name, value in values.items():
            if len(value) != n:
                raise ValueError(f"{name} needs {n} values (one per band), got {len(value)}")
        flat = [band for band in range(n) if not high[band] > low[band]]
        if flat:
            raise ValueError(f"band_high must exceed band_low; it does not for bands {flat}")
        for name, value in values.items():
            getattr(self, _STATISTICS_BUFFERS[name]).copy_(torch.tensor(value))
        self.register_to_config(**values)

    def normalize(self, sample: torch.Tensor) -> torch.Tensor:
        """Data units -> each band's ``[band_low, band_high]`` as ``[-1, 1]``; ``[B, N, H, W]``."""
        return _to_unit(sample, self.low, self.high)

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`; ``[B, N, H, W]``."""
        low, high = self.low[:, None, None], self.high[:, None, None]
        return (normalized + 1.0) / 2.0 * (high - low) + low

    # ----------------------------------------------------------------- the model

    def leaf_mask(self, sample: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Check shapes; the pixels the losses use: ``mask > 0.5`` (or every pixel when
        ``mask`` is None) where every band is finite (NaN is no-data, never leaf).

        ``sample: [B, N, H, W]`` with ``H, W`` multiples of the VAE's downsampling;
        ``mask: [B, 1, H, W]`` or ``[B, N, H, W]`` -> bool of the mask's shape.
        """
        n = self.config.num_bands
        if sample.ndim != 4 or sample.shape[1] != n:
            raise ValueError(f"sample must be [B, {n}, H, W], got {list(sample.shape)}")
        b, _, h, w = sample.shape
        if h % self.downsampling or w % self.downsampling:
            raise ValueError(
                f"sample height and width must be multiples of {self.downsampling}, got {h}x{w}"
            )
        finite = torch.isfinite(sample).all(dim=1, keepdim=True)
        if mask is None:
            return finite
        if tuple(mask.shape) not in {(b, 1, h, w), (b, n, h, w)}:
            raise ValueError(
                f"mask {list(mask.shape)} does not match sample {list(sample.shape)}: "
                f"expected [{b}, 1, {h}, {w}] or [{b}, {n}, {h}, {w}]"
            )
        return (mask > 0.5) & finite

    def encode(self, sample: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (the posterior's mode) of ``sample: [B, N, H, W]`` in data units, background
        and no-data hidden: ``[B, C_latent, H/8, W/8]``."""
        normalized = self._hide_background(sample, self.leaf_mask(sample, mask))
        return self._encode_rgb(self._bands_to_rgb(normalized)[0])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents: [B, C_latent, h, w]`` -> bands ``[B, N, 8h, 8w]`` in data units."""
        return self.denormalize(self._decode_bands(latents))

    def forward(
        self, sample: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Reconstruct ``sample: [B, N, H, W]`` (data units; NaN allowed outside the leaf).

        ``mask: [B, 1, H, W]`` or ``[B, N, H, W]``, 1 = leaf, binarised at 0.5; ``None`` uses
        every finite pixel. Returns ``(reconstruction [B, N, H, W] in data units, losses)``:

        - ``mse_per_channel: [N]``: per-band MSE over leaf pixels, normalised units;
        - ``mse``: its mean over bands;
        - ``sam``: mean spectral angle (radians) over leaf pixels, data units (if use_sam_loss);
        - ``range``: the range penalty (if range_weight > 0);
        - ``band_weights: [N]``: the spectral gate's mean over leaf pixels (if attention);
        - ``mask_stats``: ``mask_coverage_stats`` of the leaf;
        - ``total``: ``mse + sam_weight * sam + range_weight * range``, what training minimises.
        """
        leaf = self.leaf_mask(sample, mask)
        normalized = self._hide_background(sample, leaf)
        rgb, gate = self._bands_to_rgb(normalized)
        output = self._decode_bands(self._encode_rgb(rgb))
        reconstruction = self.denormalize(output)
        losses = self._losses(output, normalized, reconstruction, sample, leaf)
        if gate is not None:
            losses["band_weights"] = _leaf_mean(gate.detach(), leaf)
        if mask is not None:
            self._warn_about_coverage(losses["mask_stats"]["coverage"])
        return reconstruction, losses

    def _hide_background(self, sample: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """Normalised sample with every pixel outside ``leaf`` set to ``BACKGROUND``: what the
        encoder sees then depends on the leaf only (``where``, so NaN cannot leak through)."""
        normalized = self.normalize(self._working(sample))
        return torch.where(leaf, normalized, torch.full_like(normalized, BACKGROUND))

    def _working(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the adapters' dtype (float32, or float64 after ``.double()``), whatever the
        input's or the VAE's."""
        return x.to(self.from_rgb.dtype)

    def _bands_to_rgb(self, normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        gate = None
        if self.gate is not None:
            normalized, gate = self.gate(normalized)
        if self.input_adapter is not None:
            return self.input_adapter(normalized), gate
        return apply_matrix(self.to_rgb, normalized), gate

    def _encode_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(rgb.to(self.vae.dtype)).latent_dist.mode()

    def _decode_bands(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> bands in normalised units ``[B, N, H, W]``."""
        rgb = self._working(self.vae.decode(latents, return_dict=False)[0])
        if self.output_adapter is not None:
            return self.output_adapter(rgb)
        return apply_matrix(self.from_rgb, rgb)

    def _losses(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        reconstruction: torch.Tensor,
        sample: torch.Tensor,
        leaf: torch.Tensor,
    ) -> dict:
        config = self.config
        mse_per_channel = masked_mse_per_channel(output, target, leaf)
        losses = {"mse_per_channel": mse_per_channel, "mse": mse_per_channel.mean()}
        total = losses["mse"]
        if config.use_sam_loss:
            losses["sam"] = masked_sam_loss(reconstruction, self._working(sample), leaf)
            total = total + config.sam_weight * losses["sam"]
        if config.range_weight > 0:
            low = _to_unit(self.range_min[:, None, None], self.low, self.high)
            high = _to_unit(self.range_max[:, None, None], self.low, self.high)
            excess = output - output.clamp(low, high)
            losses["range"] = masked_mse_per_channel(excess, torch.zeros_like(excess), leaf).mean()
            total = total + config.range_weight * losses["range"]
        losses["mask_stats"] = mask_coverage_stats(leaf.any(dim=1, keepdim=True))
        losses["total"] = total
        return losses

    def _warn_about_coverage(self, coverage: float) -> None:
        """Log the seed's low/high coverage warning, once per kind and model."""
        message = coverage_warning(coverage)
        if message is not None:
            kind = "low" if coverage < LOW_COVERAGE else "high"
            if kind not in self._warned:
                self._warned.add(kind)
                logger.warning("%s (logged once)", message)

    def _add_decoder_lora(self) -> None:
        config = self.config
        layers = list(config.decoder_lora_layers)
        names = [name for name, _ in self.vae.decoder.named_modules()]
        unknown = [
            layer
            for layer in layers
            if not any(n == layer or n.endswith(f".{layer}") for n in names)
        ]
        if unknown:
            raise ValueError(f"decoder_lora_layers names no decoder module: {', '.join(unknown)}")
        lora = LoraConfig(
            r=config.decoder_lora_rank,
            lora_alpha=config.decoder_lora_alpha or config.decoder_lora_rank,
            target_modules=layers,
            lora_dropout=config.decoder_lora_dropout,
        )
        inject_adapter_in_model(lora, self.vae.decoder)
        for name, param in self.vae.named_parameters():
            if ".lora_" in name:
                # LoRA weights train in float32 even when the frozen VAE runs in half precision.
                param.data = param.data.float()
                param.requires_grad_(True)


def _to_unit(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Per band, ``x: [..., N, H, W]`` with ``low, high: [N]`` mapped to -1 and 1."""
    low, high = low[:, None, None], high[:, None, None]
    return 2.0 * (x - low) / (high - low) - 1.0


def _leaf_mean(values: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """Per band, the mean of ``values: [B, N, H, W]`` over ``leaf`` (``[B, 1|N, H, W]``): ``[N]``;
    0 for a band without leaf pixels."""
    weights = leaf.to(values.dtype).expand_as(values)
    return (values * weights).sum((0, 2, 3)) / weights.sum((0, 2, 3)).clamp_min(1)


def _jsonable(value):
    """Config values as JSON would hold them (tuples become lists), for comparisons."""
    return list(value) if isinstance(value, tuple) else value


def _folder(path: str | os.PathLike, subfolder: str | None) -> Path:
    return Path(path) / subfolder if subfolder else Path(path)


def _read_config(
    cls: type[ConfigMixin], path: str | os.PathLike, subfolder: str | None
) -> tuple[dict, str | None]:
    """``(config, subfolder)`` of a model folder; a pipeline's ``vae`` subfolder when the folder
    itself holds no config and no subfolder was asked for."""
    try:
        return dict(cls.load_config(path, subfolder=subfolder)), subfolder
    except OSError:
        if subfolder is not None:
            raise
        return dict(cls.load_config(path, subfolder="vae")), "vae"
