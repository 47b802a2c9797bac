"""Flow-matching MSE on packed latents with seed 000's optional region weighting."""

from __future__ import annotations

import torch

from losses._common import check_ndim, check_same_shape, per_sample


def masked_flow_matching_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    alpha: float = 0.3,
    fg_weight: float = 2.0,
    bg_weight: float = 1.0,
    weighting: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow-matching MSE, optionally mixed with a region-weighted MSE.

    Args:
        pred: ``[B, L, D]`` packed velocity prediction.
        target: ``[B, L, D]`` packed target (``noise - x0``).
        mask: ``[B, L]`` token weights in [0, 1] (see ``map_mask_to_latent``), or None.
        alpha: share of the region-weighted term.
        fg_weight: weight of tokens inside the mask (seed 000's ``text_region_weight``).
        bg_weight: weight of tokens outside the mask (seed 000's ``background_weight``).
        weighting: per-sample flow-matching loss weighting, ``[B]`` (or ``[B, 1, 1]``), as
            diffusers' ``compute_loss_weighting_for_sd3`` gives it; multiplies the squared error
            of both terms.

    Returns:
        Scalar. With ``err = weighting * (pred - target)^2`` and ``plain = mean(err)``:
        ``plain`` when ``mask`` is None, else
        ``(1 - alpha) * plain + alpha * mean(err * (mask * fg_weight + (1 - mask) * bg_weight))``.
        Inputs in half precision are upcast to float32 before squaring.
    """
    check_ndim(pred, "pred", (3,), "[B, L, D]")
    check_same_shape(pred=pred, target=target)
    compute_dtype = torch.promote_types(pred.dtype, torch.float32)
    err = (pred.to(compute_dtype) - target.to(compute_dtype)) ** 2
    if weighting is not None:
        err = err * per_sample(weighting, err, "weighting")
    if mask is None:
        return err.mean()
    if tuple(mask.shape) != tuple(pred.shape[:2]):
        raise ValueError(
            f"mask must be [B, L] = {list(pred.shape[:2])} to match pred, got {list(mask.shape)}"
        )
    mask = mask.to(compute_dtype)[..., None]
    region_weight = mask * fg_weight + (1 - mask) * bg_weight
    # Both terms average the same err, so one pass with a per-token factor computes their mix.
    return (err * ((1 - alpha) + alpha * region_weight)).mean()
