"""Numerics and input checks shared by every loss module.

Nothing here is public API; the loss modules build on these so that every guard
(zero vectors, masked means over zero pixels, reductions) is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Reduction = Literal["mean", "sum", "none"]
Agg = Literal["mean", "max", "sum"]


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the arguments unless all tensors share one shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"shapes must match: {listed}")


def check_ndim(t: torch.Tensor, name: str, ndims: Sequence[int], expected: str) -> None:
    """Raise ``ValueError`` unless ``t.ndim`` is in ``ndims``; ``expected`` reads ``[B, D]``."""
    if t.ndim not in ndims:
        raise ValueError(f"{name} must be {expected}, got shape {list(t.shape)}")


def check_choice(value: str, name: str, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def per_sample(value: float | torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """``value``, a number or one per sample (``[B]``, ``[B, 1, ...]``), as ``[B, 1, ..., 1]``
    with ``like``'s number of dims, dtype and device, ready to broadcast against ``like``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    batch, ones = like.shape[0], [1] * (like.ndim - 1)
    if value.numel() not in (1, batch):
        raise ValueError(
            f"{name} must be a number or one value per sample ([B] = [{batch}]), "
            f"got shape {list(value.shape)}"
        )
    return value.reshape(-1, *ones).expand(batch, *ones)


def weighted_total(weights: object, components: dict[str, torch.Tensor], like: torch.Tensor):
    """``sum(getattr(weights, name) * value)`` over ``components``; a 0 on ``like``'s device
    when there is none."""
    total = like.new_zeros(())
    for name, value in components.items():
        total = total + getattr(weights, name) * value
    return total


def masked_mean(values: torch.Tensor, weights: torch.Tensor, dim: Sequence[int]) -> torch.Tensor:
    """Weighted mean ``sum(v * w) / sum(w)`` over ``dim``; 0 with zero gradient where ``sum(w)=0``.

    ``values`` and ``weights`` broadcast against each other; the result keeps no reduced dims.
    Where every weight is 0 the numerator is exactly 0, so dividing by the clamped denominator
    gives 0, and the gradient to ``values`` is ``weights / sum(w) = 0``.
    """
    dim = tuple(dim)
    if weights.shape != values.shape:
        weights = weights.expand(torch.broadcast_shapes(values.shape, weights.shape))
    weight = weights.sum(dim=dim)
    return (values * weights).sum(dim=dim) / weight.clamp_min(torch.finfo(weight.dtype).tiny)


def safe_sqrt(squares: torch.Tensor) -> torch.Tensor:
    """``sqrt`` of non-negative ``squares`` whose gradient at 0 is 0, not infinite.

    Clamping at the dtype's smallest normal number keeps the derivative finite; the value there
    (about 1e-19 in float32) is zero for every practical purpose.
    """
    return squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt()


def vector_norm(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm along ``dim``, with gradient 0 (not NaN) at a zero vector.

    ``torch.linalg.vector_norm`` is several times slower on CPU when ``dim`` is not the last
    dimension (4.6x for a norm over the channels of ``[2, 16, 32, 32]``); summing squares is not.
    Along the last dimension torch's own is the faster, and its gradient at 0 is 0 as well.
    """
    if dim in (-1, x.ndim - 1):
        return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)
    return safe_sqrt(x.square().sum(dim=dim, keepdim=keepdim))


def safe_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """``x / ||x||`` along ``dim``; a vector of norm below ``eps`` maps to zero, with zero gradient.

    ``torch.nn.functional.normalize`` divides by ``max(||x||, eps)`` instead, whose gradient at a
    zero vector is ``1/eps`` (1e12 for its default): one degenerate embedding would blow up a step.
    """
    norm = vector_norm(x, dim=dim, keepdim=True)
    tiny = norm < eps
    unit = x / torch.where(tiny, torch.ones_like(norm), norm)
    return torch.where(tiny, torch.zeros_like(unit), unit)


def cosine_similarity(
    a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = 1e-8
) -> torch.Tensor:
    """Cosine similarity along ``dim``; 0, with a finite gradient, when either vector is zero.

    ``a`` and ``b`` broadcast; the result drops ``dim``. Computed as ``a.b / (|a| |b|)`` from
    reductions, so no normalised copy of either input is materialised.
    """
    dot = (a * b).sum(dim=dim)
    norm_a = vector_norm(a, dim=dim)
    norm_b = vector_norm(b, dim=dim)
    tiny = (norm_a < eps) | (norm_b < eps)
    ratio = dot / torch.where(tiny, torch.ones_like(dot), norm_a * norm_b)
    return torch.where(tiny, torch.zeros_like(ratio), ratio)


def aggregate(x: torch.Tensor, agg: Agg, start_dim: int = 1) -> torch.Tensor:
    """Reduce every dim from ``start_dim`` on with ``agg`` (``mean``, ``max`` or ``sum``).

    ``x: [B, ...]`` -> ``[B]`` for the default ``start_dim=1``; a tensor with no dims past
    ``start_dim`` is returned unchanged.
    """
    check_choice(agg, "agg", ("mean", "max", "sum"))
    if x.ndim <= start_dim:
        return x
    flat = x.flatten(start_dim)
    if agg == "mean":
        return flat.mean(dim=-1)
    if agg == "sum":
        return flat.sum(dim=-1)
    return flat.amax(dim=-1)


def reduce_samples(
    per_sample: torch.Tensor,
    reduction: Reduction = "mean",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-sample losses ``[B]`` to a scalar (``mean``/``sum``) or keep them (``none``).

    With per-sample ``weights: [B]`` the mean is the weighted mean ``sum(w * l) / sum(w)``
    (0 when every weight is 0), ``sum`` is ``sum(w * l)`` and ``none`` returns ``w * l``.
    """
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    if weights is None:
        if reduction == "none":
            return per_sample
        return per_sample.mean() if reduction == "mean" else per_sample.sum()
    weights = weights.to(device=per_sample.device, dtype=per_sample.dtype)
    check_same_shape(per_sample_loss=per_sample, weights=weights)
    if reduction == "none":
        return per_sample * weights
    if reduction == "sum":
        return (per_sample * weights).sum()
    return masked_mean(per_sample, weights, dim=(0,))
