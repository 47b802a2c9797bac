"""Latent-space geometry losses for object insertion into a known mask (seed 001).

A model can lower a plain reconstruction loss while shrinking or growing the inserted object; these
terms anchor the object's size and contour to the target mask and keep the background unedited.
Latents are ``z: [B, C, H, W]``; masks are ``mask_latent: [B, 1, H, W]`` in [0, 1] at latent
resolution (see ``downsample_mask_area``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from losses._common import (
    check_choice,
    check_ndim,
    check_same_shape,
    masked_mean,
    per_sample,
    safe_sqrt,
    vector_norm,
    weighted_total,
)
from losses.distance import signed_distance_map_from_mask
from losses.mask_ops import as_mask_4d, boundary_band, sure_background

ChannelReduce = Literal["mean", "sum"]

# Floor on a change mask's temperature (see soft_change_mask_from_latents).
MIN_S = 1e-4


def _latent_mask(mask_latent: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``mask_latent`` as ``[B, 1, H, W]`` in ``z``'s dtype, checked against ``z: [B, C, H, W]``."""
    mask = as_mask_4d(mask_latent, "mask_latent").to(z.dtype)
    if mask.shape[0] != z.shape[0] or mask.shape[-2:] != z.shape[-2:]:
        raise ValueError(
            f"mask_latent {list(mask_latent.shape)} must match the latents' batch and spatial "
            f"size {[z.shape[0], 1, *z.shape[-2:]]}"
        )
    return mask


def _squared_error_map(
    a: torch.Tensor, b: torch.Tensor, channel_reduce: ChannelReduce, names: tuple[str, str]
) -> torch.Tensor:
    """``a, b: [B, C, H, W]`` -> squared error reduced over channels, ``[B, 1, H, W]``."""
    check_ndim(a, names[0], (4,), "[B, C, H, W]")
    check_same_shape(**dict(zip(names, (a, b), strict=True)))
    check_choice(channel_reduce, "channel_reduce", ("mean", "sum"))
    diff2 = F.mse_loss(a, b, reduction="none")  # one fused kernel, forward and backward
    return diff2.mean(1, keepdim=True) if channel_reduce == "mean" else diff2.sum(1, keepdim=True)


def weighted_masked_mse_latent(
    z_pred: torch.Tensor,
    z_tgt: torch.Tensor,
    mask_latent: torch.Tensor,
    *,
    band_r: int = 1,
    w_in: float = 1.0,
    w_band: float = 6.0,
    w_out: float = 0.2,
    channel_reduce: ChannelReduce = "mean",
) -> torch.Tensor:
    """Reconstruction MSE weighted by position relative to the mask contour.

    Args:
        z_pred, z_tgt: ``[B, C, H, W]``.
        mask_latent: ``[B, 1, H, W]`` in [0, 1]; binarised at 0.5.
        band_r: half-width of the boundary band in latent pixels.
        w_in, w_band, w_out: weights inside the object, on the band, and outside it.
        channel_reduce: ``"mean"`` or ``"sum"`` of the squared error over channels.

    Returns:
        Scalar: per sample the weighted mean ``sum(W * e) / sum(W)`` of the per-pixel error ``e``,
        then the batch mean. ``W`` partitions the grid: ``w_band`` on ``boundary_band(mask,
        band_r)``, ``w_in`` on the rest of the object, ``w_out`` on the rest of the background.
        Empty and full masks have no band and reduce to the plain MSE.
    """
    err = _squared_error_map(z_pred, z_tgt, channel_reduce, ("z_pred", "z_tgt"))
    inside = (_latent_mask(mask_latent, z_pred) > 0.5).to(err.dtype)
    band = boundary_band(inside, band_r)
    weight = band * w_band + (1 - band) * (inside * w_in + (1 - inside) * w_out)
    return masked_mean(err, weight, dim=(1, 2, 3)).mean()


def background_preservation_mse_latent(
    z_pred: torch.Tensor,
    z_ctx: torch.Tensor,
    mask_latent: torch.Tensor,
    *,
    band_r: int = 1,
    channel_reduce: ChannelReduce = "mean",
) -> torch.Tensor:
    """MSE between prediction and context outside the dilated mask: edits there are unwanted.

    Args:
        z_pred, z_ctx: ``[B, C, H, W]``.
        mask_latent: ``[B, 1, H, W]`` in [0, 1]; binarised at 0.5 and dilated by ``band_r``.

    Returns:
        Scalar: per-sample mean error over ``1 - dilate(mask, band_r)``, then the batch mean; a
        sample whose dilated mask covers the whole grid contributes 0.
    """
    err = _squared_error_map(z_pred, z_ctx, channel_reduce, ("z_pred", "z_ctx"))
    outside = sure_background(_latent_mask(mask_latent, z_pred), band_r)
    return masked_mean(err, outside, dim=(1, 2, 3)).mean()


@dataclass(frozen=True)
class ChangeMaskStats:
    """Per-sample threshold ``tau`` and temperature ``s`` of a soft change mask, ``[B,1,1,1]``."""

    tau: torch.Tensor
    s: torch.Tensor


def soft_change_mask_from_latents(
    z_pred: torch.Tensor,
    z_ctx: torch.Tensor,
    *,
    mask_latent: torch.Tensor | None = None,
    band_r: int = 1,
    k_sigma: float = 2.0,
    tau: float | torch.Tensor | None = None,
    s: float | torch.Tensor | None = None,
    min_s: float = MIN_S,
) -> tuple[torch.Tensor, ChangeMaskStats, torch.Tensor]:
    """Differentiable mask of where the prediction differs from the context.

    Args:
        z_pred, z_ctx: ``[B, C, H, W]``.
        mask_latent: ``[B, 1, H, W]`` target mask; when given, background statistics come from the
            sure background ``1 - dilate(mask > 0.5, band_r)`` (all pixels for a sample that has
            none), otherwise from all pixels.
        k_sigma: threshold in background standard deviations above the background mean.
        tau, s: fixed threshold and temperature (scalar, ``[B]`` or ``[B, 1, 1, 1]``) replacing
            the estimates.
        min_s: floor on the temperature. A background with zero spread (or ``s=0``) would make
            the sigmoid a step with 0/0 at the threshold; with the floor, ``tau = mean + k * s``
            still sits above a constant background, whose pixels then read ``sigmoid(-k_sigma)``
            exactly as background at its mean does in the general case.

    Returns:
        ``(M_hat, stats, D)``: ``D = ||z_pred - z_ctx||_2`` over channels ``[B, 1, H, W]``;
        ``M_hat = sigmoid((D - tau) / s)`` ``[B, 1, H, W]`` in (0, 1); ``stats`` as in
        :class:`ChangeMaskStats`. The statistics carry no gradient: the model should move the
        change mask, not the threshold that reads it.

    With the estimated statistics a background pixel at the background mean reads
    ``sigmoid(-k_sigma)`` (0.12 for the default) and noisy background averages about 0.15, so
    sums of ``M_hat`` overstate the change: see ``background_mask`` of :func:`area_ratio_loss`
    and ``zero_mean`` of :func:`boundary_loss`.
    """
    check_ndim(z_pred, "z_pred", (4,), "[B, C, H, W]")
    check_same_shape(z_pred=z_pred, z_ctx=z_ctx)
    # The gradient at an unchanged pixel (D = 0) is 0, not NaN.
    dist = vector_norm(z_pred - z_ctx, dim=1, keepdim=True)
    background = None
    if mask_latent is not None:
        background = sure_background(_latent_mask(mask_latent, dist), band_r)
    soft_mask, stats = _change_mask(dist, background, k_sigma, tau, s, min_s)
    return soft_mask, stats, dist


def _change_mask(
    dist: torch.Tensor,
    sure_background_mask: torch.Tensor | None,
    k_sigma: float,
    tau: float | torch.Tensor | None,
    s: float | torch.Tensor | None,
    min_s: float,
) -> tuple[torch.Tensor, ChangeMaskStats]:
    """:func:`soft_change_mask_from_latents` from the distance map ``dist: [B, 1, H, W]``."""
    if tau is None or s is None:
        mean, std = _reference_stats(dist.detach(), sure_background_mask)
    s_value = (per_sample(s, dist, "s") if s is not None else std).detach().clamp_min(min_s)
    tau_value = (
        per_sample(tau, dist, "tau").detach() if tau is not None else mean + k_sigma * s_value
    )
    soft_mask = torch.sigmoid((dist - tau_value) / s_value)
    return soft_mask, ChangeMaskStats(tau=tau_value, s=s_value)


def _reference_stats(
    dist: torch.Tensor, sure_background: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``dist: [B, 1, H, W]`` over each sample's sure background.

    Returns two ``[B, 1, 1, 1]`` tensors. A sample without sure background pixels (or a call
    without a mask, ``sure_background=None``) uses all its pixels.
    """
    reference = torch.ones_like(dist)
    if sure_background is not None:
        has_background = sure_background.flatten(1).any(dim=1)[:, None, None, None]
        reference = torch.where(has_background, sure_background, reference)
    mean = masked_mean(dist, reference, dim=(1, 2, 3))[:, None, None, None]
    var = masked_mean((dist - mean) ** 2, reference, dim=(1, 2, 3))[:, None, None, None]
    return mean, var.sqrt()


def _check_mask_pair(pred: torch.Tensor, target: torch.Tensor, names: tuple[str, str]) -> None:
    check_ndim(pred, names[0], (4,), "[B, 1, H, W]")
    check_same_shape(**dict(zip(names, (pred, target), strict=True)))


def dice_loss(
    pred_mask: torch.Tensor, target_mask: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """Soft Dice loss, batch mean of ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)``.

    ``pred_mask, target_mask: [B, 1, H, W]`` in [0, 1]. ``eps`` in both terms makes two empty
    masks a perfect match (loss 0) and keeps the ratio finite.
    """
    _check_mask_pair(pred_mask, target_mask, ("pred_mask", "target_mask"))
    overlap = (pred_mask * target_mask).flatten(1).sum(1)
    total = pred_mask.flatten(1).sum(1) + target_mask.flatten(1).sum(1)
    return (1 - (2 * overlap + eps) / (total + eps)).mean()


def _background_reading(mask: torch.Tensor, background_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``mask`` over ``background_mask`` per sample, ``[B, 1, 1, 1]`` (0 where empty).

    It stays in the graph, so the area built on it follows the change relative to the
    background: a uniform shift of the whole mask, which the next step's detached statistics
    would undo anyway, leaves the change above the reading as it is.
    """
    check_same_shape(pred_mask=mask, background_mask=background_mask)
    return masked_mean(mask, background_mask.to(mask.dtype), dim=(1, 2, 3))[:, None, None, None]


def area_ratio_loss(
    pred_mask: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    eps: float = 1.0,
    background_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared log ratio of areas, batch mean of ``log((A_pred + eps) / (A_tgt + eps))^2``.

    Args:
        pred_mask, target_mask: ``[B, 1, H, W]`` in [0, 1]; areas are sums in pixels.
        eps: one pixel. It keeps the log of a zero area finite and, unlike a tiny epsilon, keeps
            the gradient at zero predicted area moderate (``2 log(ratio) / eps`` per pixel).
        background_mask: ``[B, 1, H, W]`` pixels known to be unchanged (``sure_background`` of
            the target mask). When given, the predicted area is the change above their mean
            reading ``b``: ``A_pred = max(0, (sum(p) - N * b) / (1 - b))`` over the ``N``
            pixels, unbiased when unchanged pixels read ``b`` on average. Without it a soft
            change mask over a background larger than the object overstates the area, and the
            loss then rewards shrinking the object.
    """
    _check_mask_pair(pred_mask, target_mask, ("pred_mask", "target_mask"))
    area_pred = pred_mask.flatten(1).sum(1)
    area_tgt = target_mask.flatten(1).sum(1)
    if background_mask is not None:
        reading = _background_reading(pred_mask, background_mask).flatten()
        pixels = pred_mask[0].numel()
        area_pred = ((area_pred - pixels * reading) / (1 - reading)).clamp_min(0)
    return (torch.log((area_pred + eps) / (area_tgt + eps)) ** 2).mean()


def boundary_loss(
    pred_soft_mask: torch.Tensor,
    signed_distance_map: torch.Tensor,
    *,
    zero_mean: bool = False,
) -> torch.Tensor:
    """Boundary loss ``mean(p * phi)`` (Kervadec et al.).

    ``pred_soft_mask: [B, 1, H, W]`` in [0, 1]; ``signed_distance_map: [B, 1, H, W]`` of the
    ground-truth mask (``signed_distance_map_from_mask``). Mass predicted outside costs its
    distance to the object, mass inside earns its depth, so the optimum is negative.

    ``zero_mean=True`` uses ``phi - mean(phi)`` per sample: a uniform level of ``p`` then costs
    nothing. A soft change mask has such a level (its background reading), and its detached
    threshold re-estimates it every step, so without this most of the gradient goes into a level
    the next step undoes.
    """
    _check_mask_pair(pred_soft_mask, signed_distance_map, ("pred_soft_mask", "signed_distance_map"))
    phi = signed_distance_map.to(pred_soft_mask.dtype)
    if zero_mean:
        phi = phi - phi.mean(dim=(1, 2, 3), keepdim=True)
    return (pred_soft_mask * phi).mean()


@dataclass(frozen=True)
class GeometryLossWeights:
    """Weights of seed 001's starter mix; a zero weight skips its term entirely."""

    mse: float = 1.0
    bg: float = 0.6
    dice: float = 0.9
    area: float = 0.2
    bnd: float = 0.4


def geometry_starter_loss(
    z_pred: torch.Tensor,
    z_tgt: torch.Tensor,
    z_ctx: torch.Tensor,
    mask_latent: torch.Tensor,
    *,
    weights: GeometryLossWeights = GeometryLossWeights(),
    signed_distance_map: torch.Tensor | None = None,
    band_r: int = 1,
    w_in: float = 1.0,
    w_band: float = 6.0,
    w_out: float = 0.2,
    k_sigma: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Seed 001's recommended total ``1.0 mse + 0.6 bg + 0.9 dice + 0.2 area + 0.4 bnd``.

    Args:
        z_pred, z_tgt, z_ctx: ``[B, C, H, W]`` predicted, target and context latents.
        mask_latent: ``[B, 1, H, W]`` target mask at latent resolution, in [0, 1].
        weights: per-term weights.
        signed_distance_map: ``[B, 1, H, W]`` map of ``mask_latent > 0.5``; precompute it in the
            data pipeline (it is a NumPy EDT per mask); computed here with ``normalize=True``
            only when missing.
        band_r, w_in, w_band, w_out, k_sigma: as in the component functions.

    Returns:
        ``(total, components)``: the weighted sum and the unweighted terms keyed ``mse``, ``bg``,
        ``dice``, ``area``, ``bnd``. The area term measures the change above the sure
        background's reading and the boundary term ignores a uniform level of the change mask
        (see :func:`area_ratio_loss`, :func:`boundary_loss`). A term with weight 0 is neither
        computed nor listed, and the soft change mask is built only when Dice, area or boundary
        is on; with no term left the total is a constant 0.
    """
    components: dict[str, torch.Tensor] = {}
    if weights.mse:
        components["mse"] = weighted_masked_mse_latent(
            z_pred, z_tgt, mask_latent, band_r=band_r, w_in=w_in, w_band=w_band, w_out=w_out
        )
    uses_change_mask = weights.dice or weights.area or weights.bnd
    if not (weights.bg or uses_change_mask):
        return weighted_total(weights, components, z_pred), components
    # Background preservation and the change mask both read (z_pred - z_ctx)^2 summed over
    # channels, and both use the sure background: compute them once.
    check_same_shape(z_pred=z_pred, z_ctx=z_ctx)
    target = _latent_mask(mask_latent, z_pred)
    background = sure_background(target, band_r)
    change = F.mse_loss(z_pred, z_ctx, reduction="none").sum(1, keepdim=True)
    if weights.bg:
        components["bg"] = masked_mean(change / z_pred.shape[1], background, (1, 2, 3)).mean()
    if uses_change_mask:
        soft_mask, _ = _change_mask(safe_sqrt(change), background, k_sigma, None, None, MIN_S)
        if weights.dice:
            components["dice"] = dice_loss(soft_mask, target)
        if weights.area:
            components["area"] = area_ratio_loss(soft_mask, target, background_mask=background)
        if weights.bnd:
            if signed_distance_map is None:
                signed_distance_map = signed_distance_map_from_mask(target > 0.5, normalize=True)
            components["bnd"] = boundary_loss(soft_mask, signed_distance_map, zero_mean=True)
    return weighted_total(weights, components, z_pred), components
