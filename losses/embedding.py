"""Embedding-only losses for object-replacement editing.

Every loss here consumes precomputed embeddings (VAE latents, CLIP/DINO tokens, U-Net feature
maps, ...) shaped ``[B, ..., D]``: ``[B, D]`` global vectors, ``[B, P, D]`` tokens or
``[B, H, W, D]`` grids. Per-token values are reduced over the non-batch dims with ``agg``
(``mean``, ``max`` or ``sum``) and per-sample losses with ``reduction``.

Besides the generic metric-learning losses (contrastive pairs, triplet and multi-negative
ranking, InfoNCE) there are wrappers for the three failure modes of a before/after editing
LoRA: no edit at all (output stays at the source), distorted geometry, and the new object
painted over the old one (overlay), plus ``embedding_starter_loss`` mixing the three.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from losses._common import (
    Agg,
    Reduction,
    aggregate,
    check_choice,
    check_same_shape,
    cosine_similarity,
    reduce_samples,
    safe_normalize,
    weighted_total,
)

Dist = Literal["cos", "l2"]
FeatureKind = Literal["l2", "l1", "cos"]
Negatives = torch.Tensor | Sequence[torch.Tensor]

_DISTS = ("cos", "l2")
_AGGS = ("mean", "max", "sum")


def _check_embeddings(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the argument unless all tensors are one ``[B, ..., D]`` shape."""
    for name, t in tensors.items():
        if t.ndim < 2:
            raise ValueError(
                f"{name} must be [B, ..., D] (at least 2 dims), got shape {list(t.shape)}"
            )
    check_same_shape(**tensors)


def _check_per_sample(t: torch.Tensor | None, name: str, batch: int) -> None:
    """Raise ``ValueError`` unless ``t`` is ``None`` or shaped ``[batch]``."""
    if t is not None and tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must be [B] = [{batch}], got shape {list(t.shape)}")


def _stack_negatives(negatives: Negatives, like: torch.Tensor, name: str) -> torch.Tensor:
    """Negatives as ``[B, K, ..., D]``, from one tensor or K tensors shaped like ``like``."""
    if isinstance(negatives, torch.Tensor):
        expected = [like.shape[0], "K", *like.shape[1:]]
        if negatives.ndim != like.ndim + 1 or (
            negatives.shape[:1] + negatives.shape[2:] != like.shape
        ):
            raise ValueError(f"{name} must be {expected}, got shape {list(negatives.shape)}")
        if negatives.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one negative (K >= 1)")
        return negatives
    if len(negatives) == 0:
        raise ValueError(f"{name} must hold at least one negative, got an empty sequence")
    for k, neg in enumerate(negatives):
        if neg.shape != like.shape:
            raise ValueError(
                f"{name}[{k}] must have the anchor's shape {list(like.shape)}, "
                f"got {list(neg.shape)}"
            )
    return torch.stack(list(negatives), dim=1)


def _token_distance(a: torch.Tensor, b: torch.Tensor, dist: str, eps: float) -> torch.Tensor:
    """Per-token distance over the last dim (inputs broadcast): ``[..., D]`` -> ``[...]``."""
    if dist == "cos":
        return 1.0 - cosine_similarity(a, b, eps=eps)
    return (a - b).square().sum(dim=-1)


def _euclidean(sq: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt(sq)``, but 0 with zero gradient where ``sq < eps**2``.

    ``d sqrt(s)/ds`` is infinite at ``s = 0`` (identical embeddings), which turns the chain rule
    into ``0 * inf = nan``; below the threshold (a difference vector shorter than ``eps``, the
    same cut-off ``safe_normalize`` uses) the root is taken of a dummy 1 and masked out.
    """
    tiny = sq < eps * eps
    root = torch.sqrt(torch.where(tiny, torch.ones_like(sq), sq))
    return torch.where(tiny, torch.zeros_like(root), root)


def pair_distance(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    dist: Dist = "cos",
    agg: Agg = "mean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Per-sample distance between two embeddings.

    ``a, b: [B, ..., D]`` -> ``[B]``. Per token ``d = 1 - cos(a, b)`` for ``dist="cos"`` (a zero
    vector has similarity 0, so distance 1) or ``d = sum_D (a - b)^2`` for ``dist="l2"``; the
    per-token values are then reduced over ``...`` with ``agg``.
    """
    _check_embeddings(a=a, b=b)
    check_choice(dist, "dist", _DISTS)
    return aggregate(_token_distance(a, b, dist, eps), agg)


def feature_match_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: FeatureKind = "l2",
    agg: Agg = "mean",
    reduction: Reduction = "mean",
    weights: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Pull predicted features onto the target features.

    ``pred, target: [B, ..., D]``, ``weights: [B]`` -> scalar, or ``[B]`` for ``reduction="none"``.
    Per token ``sum_D (pred - target)^2`` (``kind="l2"``), ``sum_D |pred - target|`` (``"l1"``) or
    ``1 - cos(pred, target)`` (``"cos"``); ``agg`` over tokens, then ``reduction`` over samples
    (with ``weights`` the mean is ``sum(w * l) / sum(w)``).
    """
    _check_embeddings(pred=pred, target=target)
    check_choice(kind, "kind", ("l2", "l1", "cos"))
    _check_per_sample(weights, "weights", pred.shape[0])
    if kind == "l1":
        per_token = (pred - target).abs().sum(dim=-1)
    else:
        per_token = _token_distance(pred, target, kind, eps)
    return reduce_samples(aggregate(per_token, agg), reduction, weights)


def contrastive_pair_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    y: torch.Tensor,
    *,
    margin: float = 1.0,
    dist: Dist = "l2",
    agg: Agg = "mean",
    reduction: Reduction = "mean",
    weights: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Contrastive pair loss (Hadsell, Chopra and LeCun, 2006).

    ``z1, z2: [B, ..., D]``, ``y: [B]`` (1 for a positive pair, 0 for a negative one),
    ``weights: [B]`` -> scalar, or ``[B]`` for ``reduction="none"``. Per sample
    ``L = y * D^2 + (1 - y) * relu(margin - D)^2`` where ``D`` is ``agg`` over tokens of the
    Euclidean distance ``||z1 - z2||`` (``dist="l2"``, not squared) or of ``1 - cos(z1, z2)``
    (``dist="cos"``). Identical embeddings (``D = 0``) have a finite gradient.
    """
    _check_embeddings(z1=z1, z2=z2)
    check_choice(dist, "dist", _DISTS)
    _check_per_sample(y, "y", z1.shape[0])
    _check_per_sample(weights, "weights", z1.shape[0])
    per_token = _token_distance(z1, z2, dist, eps)
    if dist == "l2":
        per_token = _euclidean(per_token, eps)
    d = aggregate(per_token, agg)
    y = y.to(dtype=d.dtype, device=d.device)
    per_sample = y * d.square() + (1.0 - y) * F.relu(margin - d).square()
    return reduce_samples(per_sample, reduction, weights)


def triplet_margin_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float = 0.2,
    dist: Dist = "cos",
    agg: Agg = "mean",
    reduction: Reduction = "mean",
    weights: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Triplet hinge loss (FaceNet, Schroff et al., 2015).

    ``anchor, positive, negative: [B, ..., D]``, ``weights: [B]`` -> scalar, or ``[B]`` for
    ``reduction="none"``. Per sample ``L = relu(d(a, p) - d(a, n) + margin)`` with ``d`` the
    :func:`pair_distance` for ``dist`` and ``agg``.
    """
    _check_embeddings(anchor=anchor, positive=positive, negative=negative)
    _check_per_sample(weights, "weights", anchor.shape[0])
    d_pos = pair_distance(anchor, positive, dist=dist, agg=agg, eps=eps)
    d_neg = pair_distance(anchor, negative, dist=dist, agg=agg, eps=eps)
    return reduce_samples(F.relu(d_pos - d_neg + margin), reduction, weights)


def margin_ranking_on_distances(
    d_pos: torch.Tensor,
    d_neg: torch.Tensor,
    *,
    margin: float = 0.2,
    reduction: Reduction = "mean",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinge ranking on precomputed distances.

    ``d_pos, d_neg, weights: [B]`` -> scalar, or ``[B]`` for ``reduction="none"``. Per sample
    ``L = relu(d_pos - d_neg + margin)``, i.e. ``F.margin_ranking_loss`` with target ``-1``.
    """
    if d_pos.ndim != 1:
        raise ValueError(f"d_pos must be [B], got shape {list(d_pos.shape)}")
    check_same_shape(d_pos=d_pos, d_neg=d_neg)
    _check_per_sample(weights, "weights", d_pos.shape[0])
    return reduce_samples(F.relu(d_pos - d_neg + margin), reduction, weights)


def multi_negative_ranking_loss(
    z_anchor: torch.Tensor,
    z_positive: torch.Tensor,
    z_negs: Negatives,
    *,
    margin: float = 0.2,
    dist: Dist = "cos",
    agg: Agg = "mean",
    neg_agg: Agg = "mean",
    reduction: Reduction = "mean",
    weights: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Hinge ranking of one positive against K negatives.

    ``z_anchor, z_positive: [B, ..., D]``, ``z_negs: [B, K, ..., D]`` or a sequence of K tensors
    shaped like the anchor, ``weights: [B]`` -> scalar, or ``[B]`` for ``reduction="none"``.
    Per sample ``L = neg_agg_k relu(d(a, p) - d(a, n_k) + margin)`` with ``d`` the
    :func:`pair_distance` for ``dist`` and ``agg`` (each ``d(a, n_k)`` is reduced over all
    token dims, so the hinge is ``[B, K]`` for any embedding shape).
    """
    _check_embeddings(z_anchor=z_anchor, z_positive=z_positive)
    check_choice(dist, "dist", _DISTS)
    check_choice(agg, "agg", _AGGS)
    check_choice(neg_agg, "neg_agg", _AGGS)
    _check_per_sample(weights, "weights", z_anchor.shape[0])
    negs = _stack_negatives(z_negs, z_anchor, "z_negs")
    d_pos = pair_distance(z_anchor, z_positive, dist=dist, agg=agg, eps=eps)
    d_neg = aggregate(_token_distance(z_anchor.unsqueeze(1), negs, dist, eps), agg, start_dim=2)
    hinge = F.relu(d_pos.unsqueeze(1) - d_neg + margin)
    return reduce_samples(aggregate(hinge, neg_agg), reduction, weights)


def info_nce_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: Negatives | None = None,
    *,
    temperature: float = 0.07,
    normalize: bool = True,
    agg: Agg = "mean",
    reduction: Reduction = "mean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """InfoNCE: cross-entropy that picks the positive among negatives.

    ``anchor, positive: [B, ..., D]``; ``negatives: [B, K, ..., D]``, a sequence of K tensors
    shaped like the anchor, or ``None`` for in-batch negatives. Returns a scalar, or ``[B]`` for
    ``reduction="none"``. The similarity ``s(u, v)`` of two samples is ``agg`` over tokens of the
    per-token cosine (``normalize=True``) or dot product; per sample
    ``L_i = -log(exp(s(a_i, p_i) / T) / sum_j exp(s_ij / T))`` where ``s_ij`` runs over
    ``s(a_i, p_j)`` for every ``j`` in the batch (in-batch) or over ``s(a_i, p_i)`` and
    ``s(a_i, n_ik)`` (explicit negatives).
    """
    _check_embeddings(anchor=anchor, positive=positive)
    check_choice(agg, "agg", _AGGS)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch, dim = anchor.shape[0], anchor.shape[-1]
    a, p = anchor, positive
    if normalize:
        a, p = safe_normalize(a, eps=eps), safe_normalize(p, eps=eps)
    if negatives is None:
        # One [B, B, tokens] contraction: broadcasting [B, 1, ...] against [1, B, ...] would
        # materialise B * B * tokens * D products.
        a_tok, p_tok = a.reshape(batch, -1, dim), p.reshape(batch, -1, dim)
        sims = aggregate(torch.einsum("itd,jtd->ijt", a_tok, p_tok), agg, start_dim=2)
        target = torch.arange(batch, device=anchor.device)
    else:
        n = _stack_negatives(negatives, anchor, "negatives")
        if normalize:
            n = safe_normalize(n, eps=eps)
        pos = aggregate((a * p).sum(dim=-1), agg)
        neg = aggregate((a.unsqueeze(1) * n).sum(dim=-1), agg, start_dim=2)
        sims = torch.cat([pos.unsqueeze(1), neg], dim=1)
        target = torch.zeros(batch, dtype=torch.long, device=anchor.device)
    per_sample = F.cross_entropy(sims / temperature, target, reduction="none")
    return reduce_samples(per_sample, reduction)


def loss_no_edit_identity(
    z_pred: torch.Tensor,
    z_gt: torch.Tensor,
    z_src: torch.Tensor,
    *,
    margin: float = 0.2,
    dist: Dist = "cos",
    agg: Agg = "mean",
    reduction: Reduction = "mean",
    weights: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Penalise an output that stays closer to the source (before) than to the target (after).

    ``z_pred, z_gt, z_src: [B, ..., D]``, ``weights: [B]`` -> scalar, or ``[B]`` for
    ``reduction="none"``. :func:`triplet_margin_loss` with anchor ``z_pred``, positive ``z_gt``
    and negative ``z_src``: ``relu(d(pred, gt) - d(pred, src) + margin)``.
    """
    _check_embeddings(z_pred=z_pred, z_gt=z_gt, z_src=z_src)
    return triplet_margin_loss(
        z_pred,
        z_gt,
        z_src,
        margin=margin,
        dist=dist,
        agg=agg,
        reduction=reduction,
        weights=weights,
        eps=eps,
    )


def loss_geometry_match(
    z_pred: torch.Tensor,
    z_gt: torch.Tensor,
    *,
    kind: FeatureKind = "l2",
    agg: Agg = "mean",
    reduction: Reduction = "mean",
    weights: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Pull the output's structure onto the target's: :func:`feature_match_loss` of pred vs gt.

    ``z_pred, z_gt: [B, ..., D]``, ``weights: [B]`` -> scalar, or ``[B]`` for
    ``reduction="none"``. Most useful with a structure-aware encoder (patch or spatial features).
    """
    _check_embeddings(z_pred=z_pred, z_gt=z_gt)
    return feature_match_loss(
        z_pred, z_gt, kind=kind, agg=agg, reduction=reduction, weights=weights, eps=eps
    )


def loss_overlay_avoidance(
    z_pred: torch.Tensor,
    z_gt: torch.Tensor,
    z_overlay: torch.Tensor,
    *,
    margin: float = 0.2,
    dist: Dist = "cos",
    agg: Agg = "mean",
    reduction: Reduction = "mean",
    weights: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Penalise an output closer to an overlay negative (new object pasted over the old one).

    ``z_pred, z_gt, z_overlay: [B, ..., D]``, ``weights: [B]`` -> scalar, or ``[B]`` for
    ``reduction="none"``. :func:`triplet_margin_loss` with anchor ``z_pred``, positive ``z_gt``
    and negative ``z_overlay``: ``relu(d(pred, gt) - d(pred, overlay) + margin)``.
    """
    _check_embeddings(z_pred=z_pred, z_gt=z_gt, z_overlay=z_overlay)
    return triplet_margin_loss(
        z_pred,
        z_gt,
        z_overlay,
        margin=margin,
        dist=dist,
        agg=agg,
        reduction=reduction,
        weights=weights,
        eps=eps,
    )


@dataclass(frozen=True)
class EmbeddingLossWeights:
    """Weights and margins of :func:`embedding_starter_loss`; the defaults are the starting mix.

    A weight of 0 switches its term off entirely (it is not computed).
    """

    identity: float = 1.0
    geometry: float = 0.5
    overlay: float = 0.7
    identity_margin: float = 0.25
    overlay_margin: float = 0.25


def embedding_starter_loss(
    z_pred: torch.Tensor,
    z_gt: torch.Tensor,
    z_src: torch.Tensor,
    z_overlay: torch.Tensor | None = None,
    *,
    weights: EmbeddingLossWeights = EmbeddingLossWeights(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Starting mix of the identity, geometry and overlay terms.

    ``z_pred, z_gt, z_src, z_overlay: [B, ..., D]`` -> ``(total, components)`` with a scalar
    ``total = w_id * identity + w_geo * geometry + w_ov * overlay`` and the unweighted scalar
    terms keyed ``"identity"`` (:func:`loss_no_edit_identity`, cosine, ``identity_margin``),
    ``"geometry"`` (:func:`loss_geometry_match`, squared L2) and ``"overlay"``
    (:func:`loss_overlay_avoidance`, cosine, ``overlay_margin``). A term with weight 0 is neither
    computed nor listed, nor is ``"overlay"`` without ``z_overlay``; with no term left the total
    is a constant 0.
    """
    tensors = {"z_pred": z_pred, "z_gt": z_gt, "z_src": z_src}
    if z_overlay is not None:
        tensors["z_overlay"] = z_overlay
    _check_embeddings(**tensors)
    terms: dict[str, torch.Tensor] = {}
    use_overlay = weights.overlay != 0 and z_overlay is not None
    negatives = {
        name: z
        for name, z, on in (
            ("identity", z_src, weights.identity != 0),
            ("overlay", z_overlay, use_overlay),
        )
        if on
    }
    if negatives:
        # One cosine pass of the prediction against target and negatives together: d[0] is
        # d(pred, gt), which both triplets rank against.
        others = torch.stack([z_gt, *negatives.values()])
        d = aggregate(_token_distance(z_pred.unsqueeze(0), others, "cos", 1e-8), "mean", 2)
        margins = {"identity": weights.identity_margin, "overlay": weights.overlay_margin}
        for k, name in enumerate(negatives, start=1):
            terms[name] = margin_ranking_on_distances(d[0], d[k], margin=margins[name])
    if weights.geometry != 0:
        terms["geometry"] = loss_geometry_match(z_pred, z_gt, kind="l2")
    return weighted_total(weights, terms, z_pred), terms
