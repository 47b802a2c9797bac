"""Tests for the embedding-only object-replacement losses in ``losses.embedding``.

Every function is compared with a naive reference below that walks samples, tokens and
negatives in plain Python on lists of floats, so a bug shared with ``losses._common`` cannot
cancel out.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from losses.embedding import (
    EmbeddingLossWeights,
    contrastive_pair_loss,
    embedding_starter_loss,
    feature_match_loss,
    info_nce_loss,
    loss_geometry_match,
    loss_no_edit_identity,
    loss_overlay_avoidance,
    margin_ranking_on_distances,
    multi_negative_ranking_loss,
    pair_distance,
    triplet_margin_loss,
)

B, D = 4, 6
SHAPES = [(B, D), (B, 3, D), (B, 2, 3, D)]
SHAPE_IDS = ["BD", "BPD", "BHWD"]
AGGS = ["mean", "max", "sum"]
REDUCTIONS = [
    ("mean", False),
    ("mean", True),
    ("sum", False),
    ("sum", True),
    ("none", False),
    ("none", True),
]
REDUCTION_IDS = [f"{r}-{'w' if w else 'nw'}" for r, w in REDUCTIONS]
WEIGHTS = [0.5, 2.0, 0.0, 1.5]
F64 = torch.float64


# ---------------------------------------------------------------- naive reference


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _tokens(x: torch.Tensor) -> list[list[list[float]]]:
    """``[B, ..., D]`` -> nested lists ``[B][tokens][D]``."""
    return x.detach().reshape(x.shape[0], -1, x.shape[-1]).tolist()


def _dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def _norm(u: list[float]) -> float:
    return math.sqrt(_dot(u, u))


def _cos_sim(u: list[float], v: list[float], eps: float = 1e-8) -> float:
    nu, nv = _norm(u), _norm(v)
    if nu < eps or nv < eps:
        return 0.0
    return _dot(u, v) / (nu * nv)


def _sq_l2(u: list[float], v: list[float]) -> float:
    return sum((a - b) ** 2 for a, b in zip(u, v, strict=True))


def _l1(u: list[float], v: list[float]) -> float:
    return sum(abs(a - b) for a, b in zip(u, v, strict=True))


def _tok_dist(u: list[float], v: list[float], dist: str) -> float:
    return 1.0 - _cos_sim(u, v) if dist == "cos" else _sq_l2(u, v)


def _agg(values: list[float], agg: str) -> float:
    if agg == "mean":
        return sum(values) / len(values)
    return max(values) if agg == "max" else sum(values)


def _reduce(per_sample: list[float], reduction: str, weighted: bool) -> torch.Tensor:
    """Reduce like the module, using the per-sample ``WEIGHTS`` when ``weighted``."""
    w = WEIGHTS if weighted else [1.0] * len(per_sample)
    weighted = [wi * li for wi, li in zip(w, per_sample, strict=True)]
    if reduction == "none":
        return torch.tensor(weighted, dtype=F64)
    if reduction == "sum":
        return torch.tensor(sum(weighted), dtype=F64)
    return torch.tensor(sum(weighted) / sum(w), dtype=F64)


def _ref_pair_distance(a, b, dist, agg) -> list[float]:
    return [
        _agg([_tok_dist(u, v, dist) for u, v in zip(ta, tb, strict=True)], agg)
        for ta, tb in zip(_tokens(a), _tokens(b), strict=True)
    ]


def _ref_feature_match(pred, target, kind, agg) -> list[float]:
    fn = {"l2": _sq_l2, "l1": _l1, "cos": lambda u, v: 1.0 - _cos_sim(u, v)}[kind]
    return [
        _agg([fn(u, v) for u, v in zip(tp, tt, strict=True)], agg)
        for tp, tt in zip(_tokens(pred), _tokens(target), strict=True)
    ]


def _ref_contrastive(z1, z2, y, margin, dist, agg) -> list[float]:
    out = []
    for t1, t2, yi in zip(_tokens(z1), _tokens(z2), y.tolist(), strict=True):
        if dist == "l2":
            per_tok = [math.sqrt(_sq_l2(u, v)) for u, v in zip(t1, t2, strict=True)]
        else:
            per_tok = [1.0 - _cos_sim(u, v) for u, v in zip(t1, t2, strict=True)]
        d = _agg(per_tok, agg)
        out.append(yi * d**2 + (1 - yi) * max(0.0, margin - d) ** 2)
    return out


def _ref_triplet(a, p, n, margin, dist, agg) -> list[float]:
    d_pos = _ref_pair_distance(a, p, dist, agg)
    d_neg = _ref_pair_distance(a, n, dist, agg)
    return [max(0.0, dp - dn + margin) for dp, dn in zip(d_pos, d_neg, strict=True)]


def _ref_multi_negative(a, p, negs, margin, dist, agg, neg_agg) -> list[float]:
    """``negs``: a list of K tensors shaped like ``a``."""
    d_pos = _ref_pair_distance(a, p, dist, agg)
    d_negs = [_ref_pair_distance(a, n, dist, agg) for n in negs]
    return [
        _agg([max(0.0, d_pos[i] - d_negs[k][i] + margin) for k in range(len(negs))], neg_agg)
        for i in range(len(d_pos))
    ]


def _ref_sim(u_toks, v_toks, normalize, agg) -> float:
    sim = _cos_sim if normalize else _dot
    return _agg([sim(u, v) for u, v in zip(u_toks, v_toks, strict=True)], agg)


def _ref_cross_entropy(logits: list[float], target: int) -> float:
    top = max(logits)
    return top + math.log(sum(math.exp(x - top) for x in logits)) - logits[target]


def _ref_info_nce(a, p, negs, temperature, normalize, agg) -> list[float]:
    """``negs``: ``None`` (in-batch) or a list of K tensors shaped like ``a``."""
    ta, tp = _tokens(a), _tokens(p)
    out = []
    for i in range(len(ta)):
        if negs is None:
            logits = [_ref_sim(ta[i], tp[j], normalize, agg) / temperature for j in range(len(tp))]
            out.append(_ref_cross_entropy(logits, i))
        else:
            sims = [_ref_sim(ta[i], tp[i], normalize, agg)]
            sims += [_ref_sim(ta[i], _tokens(n)[i], normalize, agg) for n in negs]
            out.append(_ref_cross_entropy([s / temperature for s in sims], 0))
    return out


def _weights(weighted: bool) -> torch.Tensor | None:
    return torch.tensor(WEIGHTS, dtype=F64) if weighted else None


def _assert_finite_small_grad(x: torch.Tensor) -> None:
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    # F.normalize would put ~1/eps = 1e8..1e12 here for a zero vector.
    assert x.grad.abs().max() < 1e3


# ---------------------------------------------------------------- pair_distance


class TestPairDistance:
    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize("dist", ["cos", "l2"])
    def test_matches_reference(self, shape, agg, dist):
        a, b = _randn(*shape, seed=1), _randn(*shape, seed=2)
        out = pair_distance(a, b, dist=dist, agg=agg)
        assert out.shape == (B,)
        expected = torch.tensor(_ref_pair_distance(a, b, dist, agg), dtype=F64)
        torch.testing.assert_close(out, expected)

    @pytest.mark.parametrize(
        ("u", "v", "dist", "expected"),
        [
            ([1.0, 0.0], [0.0, 1.0], "cos", 1.0),
            ([2.0, 0.0], [-3.0, 0.0], "cos", 2.0),
            ([1.0, 2.0], [2.0, 4.0], "cos", 0.0),
            ([0.0, 0.0], [1.0, 1.0], "cos", 1.0),
            ([1.0, 0.0], [0.0, 1.0], "l2", 2.0),
            ([3.0, 4.0], [0.0, 0.0], "l2", 25.0),
        ],
    )
    def test_known_values(self, u, v, dist, expected):
        out = pair_distance(torch.tensor([u], dtype=F64), torch.tensor([v], dtype=F64), dist=dist)
        torch.testing.assert_close(out, torch.tensor([expected], dtype=F64))

    @pytest.mark.parametrize(("agg", "expected"), [("mean", 1.0), ("max", 2.0), ("sum", 2.0)])
    def test_token_aggregation(self, agg, expected):
        # token 0 identical (distance 0), token 1 opposite (distance 2)
        a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)
        b = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]], dtype=F64)
        out = pair_distance(a, b, dist="cos", agg=agg)
        torch.testing.assert_close(out, torch.tensor([expected], dtype=F64))

    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize("dist", ["cos", "l2"])
    def test_gradcheck(self, agg, dist):
        a = _randn(2, 3, 4, seed=3).requires_grad_()
        b = _randn(2, 3, 4, seed=4).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x, y: pair_distance(x, y, dist=dist, agg=agg), (a, b)
        )

    def test_zero_vector_cos_is_finite(self):
        a = _randn(B, 3, D, seed=5)
        a[0, 1] = 0.0
        a.requires_grad_()
        b = _randn(B, 3, D, seed=6)
        out = pair_distance(a, b, dist="cos")
        assert torch.isfinite(out).all()
        out.sum().backward()
        _assert_finite_small_grad(a)
        # the zero token contributes distance 1 and no gradient
        torch.testing.assert_close(a.grad[0, 1], torch.zeros(D, dtype=F64))

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)}, r"shapes must match: a \[2, 3\]"),
            ({"a": torch.zeros(3), "b": torch.zeros(3)}, r"a must be \[B, \.\.\., D\]"),
            ({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3), "dist": "l1"}, "dist"),
            ({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3), "agg": "median"}, "agg"),
        ],
    )
    def test_errors(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            pair_distance(**kwargs)


# ---------------------------------------------------------------- feature_match_loss


class TestFeatureMatchLoss:
    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize("kind", ["l2", "l1", "cos"])
    def test_per_sample_matches_reference(self, shape, agg, kind):
        pred, target = _randn(*shape, seed=1), _randn(*shape, seed=2)
        out = feature_match_loss(pred, target, kind=kind, agg=agg, reduction="none")
        expected = torch.tensor(_ref_feature_match(pred, target, kind, agg), dtype=F64)
        torch.testing.assert_close(out, expected)

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize(("reduction", "weighted"), REDUCTIONS, ids=REDUCTION_IDS)
    def test_reduction_matches_reference(self, shape, reduction, weighted):
        pred, target = _randn(*shape, seed=3), _randn(*shape, seed=4)
        w = _weights(weighted)
        out = feature_match_loss(pred, target, kind="l1", reduction=reduction, weights=w)
        per_sample = _ref_feature_match(pred, target, "l1", "mean")
        torch.testing.assert_close(out, _reduce(per_sample, reduction, weighted))

    @pytest.mark.parametrize(("kind", "expected"), [("l2", 14.0), ("l1", 6.0), ("cos", 1.0)])
    def test_known_values(self, kind, expected):
        pred = torch.tensor([[1.0, -2.0, 3.0]], dtype=F64)
        target = torch.zeros(1, 3, dtype=F64) if kind != "cos" else torch.tensor([[2.0, 1.0, 0.0]])
        out = feature_match_loss(pred, target.to(F64), kind=kind)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=F64))

    def test_weighted_mean_known_value(self):
        pred = torch.tensor([[1.0], [3.0]], dtype=F64)
        target = torch.zeros(2, 1, dtype=F64)
        w = torch.tensor([3.0, 1.0], dtype=F64)
        # per-sample l1 = [1, 3]; weighted mean = (3 * 1 + 1 * 3) / 4
        out = feature_match_loss(pred, target, kind="l1", weights=w)
        torch.testing.assert_close(out, torch.tensor(1.5, dtype=F64))

    @pytest.mark.parametrize("kind", ["l2", "l1", "cos"])
    def test_gradcheck(self, kind):
        pred = _randn(3, 2, 4, seed=5).requires_grad_()
        target = _randn(3, 2, 4, seed=6).requires_grad_()
        w = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
        assert torch.autograd.gradcheck(
            lambda p, t: feature_match_loss(p, t, kind=kind, weights=w), (pred, target)
        )

    def test_zero_vector_cos_is_finite(self):
        pred = torch.zeros(2, D, dtype=F64, requires_grad=True)
        target = _randn(2, D, seed=7)
        out = feature_match_loss(pred, target, kind="cos")
        torch.testing.assert_close(out, torch.tensor(1.0, dtype=F64))
        out.backward()
        _assert_finite_small_grad(pred)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"target": torch.zeros(4, 5)}, r"shapes must match: pred \[4, 6\], target \[4, 5\]"),
            ({"kind": "huber"}, "kind"),
            ({"agg": "min"}, "agg"),
            ({"reduction": "batchmean"}, "reduction"),
            ({"weights": torch.ones(3)}, r"weights must be \[B\] = \[4\]"),
            ({"weights": torch.ones(4, 1)}, "weights"),
        ],
    )
    def test_errors(self, kwargs, match):
        args = {"pred": torch.zeros(4, 6), "target": torch.zeros(4, 6), **kwargs}
        with pytest.raises(ValueError, match=match):
            feature_match_loss(args.pop("pred"), args.pop("target"), **args)


# ---------------------------------------------------------------- contrastive_pair_loss


class TestContrastivePairLoss:
    Y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize(("dist", "margin"), [("l2", 4.0), ("cos", 1.0)])
    def test_per_sample_matches_reference(self, shape, agg, dist, margin):
        z1, z2 = _randn(*shape, seed=1), _randn(*shape, seed=2)
        out = contrastive_pair_loss(
            z1, z2, self.Y, margin=margin, dist=dist, agg=agg, reduction="none"
        )
        expected = _ref_contrastive(z1, z2, self.Y, margin, dist, agg)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=F64))

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize(("reduction", "weighted"), REDUCTIONS, ids=REDUCTION_IDS)
    def test_reduction_matches_reference(self, shape, reduction, weighted):
        z1, z2 = _randn(*shape, seed=3), _randn(*shape, seed=4)
        w = _weights(weighted)
        out = contrastive_pair_loss(z1, z2, self.Y, margin=4.0, reduction=reduction, weights=w)
        per_sample = _ref_contrastive(z1, z2, self.Y, 4.0, "l2", "mean")
        torch.testing.assert_close(out, _reduce(per_sample, reduction, weighted))

    @pytest.mark.parametrize(
        ("u", "v", "y", "margin", "dist", "expected"),
        [
            ([0.0, 0.0], [3.0, 4.0], 1.0, 1.0, "l2", 25.0),  # D = 5, positive: D^2
            ([0.0, 0.0], [3.0, 4.0], 0.0, 1.0, "l2", 0.0),  # negative with D >= margin
            ([0.0, 0.0], [3.0, 4.0], 0.0, 5.0, "l2", 0.0),  # D == margin exactly
            ([0.0, 0.0], [0.3, 0.4], 0.0, 1.0, "l2", 0.25),  # (1 - 0.5)^2
            ([1.0, 2.0], [1.0, 2.0], 0.0, 2.0, "l2", 4.0),  # identical negative: margin^2
            ([1.0, 2.0], [1.0, 2.0], 1.0, 2.0, "l2", 0.0),  # identical positive
            ([1.0, 0.0], [0.0, 1.0], 1.0, 1.0, "cos", 1.0),  # cos distance 1
            ([1.0, 0.0], [-1.0, 0.0], 0.0, 1.0, "cos", 0.0),  # cos distance 2 >= margin
            ([1.0, 0.0], [0.0, 1.0], 0.0, 1.5, "cos", 0.25),  # (1.5 - 1)^2
        ],
    )
    def test_known_values(self, u, v, y, margin, dist, expected):
        out = contrastive_pair_loss(
            torch.tensor([u], dtype=F64),
            torch.tensor([v], dtype=F64),
            torch.tensor([y], dtype=F64),
            margin=margin,
            dist=dist,
        )
        torch.testing.assert_close(out, torch.tensor(expected, dtype=F64))

    def test_tokens_aggregate_distance_before_squaring(self):
        # token distances 3 and 5: D = mean = 4, so a positive pair costs 16 (not (9 + 25) / 2)
        z1 = torch.zeros(1, 2, 2, dtype=F64)
        z2 = torch.tensor([[[3.0, 0.0], [0.0, 5.0]]], dtype=F64)
        out = contrastive_pair_loss(z1, z2, torch.ones(1, dtype=F64))
        torch.testing.assert_close(out, torch.tensor(16.0, dtype=F64))

    def test_bool_and_int_labels(self):
        z1, z2 = _randn(B, D, seed=5), _randn(B, D, seed=6)
        ref = contrastive_pair_loss(z1, z2, self.Y, margin=4.0)
        torch.testing.assert_close(contrastive_pair_loss(z1, z2, self.Y.bool(), margin=4.0), ref)
        torch.testing.assert_close(contrastive_pair_loss(z1, z2, self.Y.long(), margin=4.0), ref)

    @pytest.mark.parametrize(("dist", "margin"), [("l2", 10.0), ("cos", 5.0)])
    @pytest.mark.parametrize("agg", AGGS)
    def test_gradcheck(self, dist, margin, agg):
        z1 = _randn(4, 2, 3, seed=7).requires_grad_()
        z2 = _randn(4, 2, 3, seed=8).requires_grad_()
        w = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=F64)
        assert torch.autograd.gradcheck(
            lambda a, b: contrastive_pair_loss(
                a, b, self.Y, margin=margin, dist=dist, agg=agg, weights=w
            ),
            (z1, z2),
        )

    @pytest.mark.parametrize("y", [1.0, 0.0])
    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    def test_identical_embeddings_have_finite_gradient(self, y, shape):
        z1 = _randn(*shape, seed=9).requires_grad_()
        z2 = z1.detach().clone().requires_grad_()
        out = contrastive_pair_loss(z1, z2, torch.full((B,), y, dtype=F64), margin=2.0)
        torch.testing.assert_close(out, torch.tensor(0.0 if y else 4.0, dtype=F64))
        out.backward()
        for t in (z1, z2):
            _assert_finite_small_grad(t)

    def test_one_identical_token_has_finite_gradient(self):
        z1 = _randn(B, 3, D, seed=10)
        z2 = _randn(B, 3, D, seed=11)
        z2[:, 0] = z1[:, 0]
        z1.requires_grad_()
        contrastive_pair_loss(z1, z2, self.Y, margin=4.0).backward()
        _assert_finite_small_grad(z1)

    def test_zero_vector_cos_is_finite(self):
        z1 = torch.zeros(B, D, dtype=F64, requires_grad=True)
        out = contrastive_pair_loss(z1, _randn(B, D, seed=12), self.Y, dist="cos", margin=2.0)
        # cos distance to a zero vector is 1: y=1 -> 1, y=0 -> (2 - 1)^2 = 1
        torch.testing.assert_close(out, torch.tensor(1.0, dtype=F64))
        out.backward()
        _assert_finite_small_grad(z1)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"z2": torch.zeros(4, 5)}, r"z1 \[4, 6\], z2 \[4, 5\]"),
            ({"z1": torch.zeros(6), "z2": torch.zeros(6)}, "z1 must be"),
            ({"y": torch.ones(3)}, r"y must be \[B\] = \[4\]"),
            ({"y": torch.ones(4, 1)}, "y must be"),
            ({"dist": "dot"}, "dist"),
            ({"agg": "median"}, "agg"),
            ({"reduction": "avg"}, "reduction"),
            ({"weights": torch.ones(5)}, "weights"),
        ],
    )
    def test_errors(self, kwargs, match):
        args = {"z1": torch.zeros(4, 6), "z2": torch.zeros(4, 6), "y": torch.ones(4), **kwargs}
        with pytest.raises(ValueError, match=match):
            contrastive_pair_loss(args.pop("z1"), args.pop("z2"), args.pop("y"), **args)


# ---------------------------------------------------------------- triplet_margin_loss


class TestTripletMarginLoss:
    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize(("dist", "margin"), [("cos", 0.3), ("l2", 2.0)])
    def test_per_sample_matches_reference(self, shape, agg, dist, margin):
        a, p, n = (_randn(*shape, seed=s) for s in (1, 2, 3))
        out = triplet_margin_loss(a, p, n, margin=margin, dist=dist, agg=agg, reduction="none")
        expected = _ref_triplet(a, p, n, margin, dist, agg)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=F64))

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize(("reduction", "weighted"), REDUCTIONS, ids=REDUCTION_IDS)
    def test_reduction_matches_reference(self, shape, reduction, weighted):
        a, p, n = (_randn(*shape, seed=s) for s in (4, 5, 6))
        w = _weights(weighted)
        out = triplet_margin_loss(a, p, n, margin=0.5, reduction=reduction, weights=w)
        per_sample = _ref_triplet(a, p, n, 0.5, "cos", "mean")
        torch.testing.assert_close(out, _reduce(per_sample, reduction, weighted))

    @pytest.mark.parametrize(
        ("a", "p", "n", "margin", "expected"),
        [
            ([1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], 0.2, 0.0),  # 0 - 2 + 0.2 < 0: inactive
            ([1.0, 0.0], [2.0, 0.0], [0.0, 3.0], 1.0, 0.0),  # 0 - 1 + 1 == 0: at the kink
            ([1.0, 0.0], [0.0, 1.0], [1.0, 0.0], 0.2, 1.2),  # 1 - 0 + 0.2
            ([1.0, 0.0], [0.0, 1.0], [0.0, -1.0], 0.2, 0.2),  # 1 - 1 + 0.2
        ],
    )
    def test_known_values(self, a, p, n, margin, expected):
        a, p, n = (torch.tensor([v], dtype=F64) for v in (a, p, n))
        out = triplet_margin_loss(a, p, n, margin=margin)
        assert out.item() == pytest.approx(expected, abs=1e-12)

    def test_inactive_hinge_is_exactly_zero(self):
        a = torch.tensor([[1.0, 0.0]], dtype=F64, requires_grad=True)
        out = triplet_margin_loss(a, a.detach(), -a.detach(), margin=0.2)
        assert out.item() == 0.0
        out.backward()
        assert torch.equal(a.grad, torch.zeros_like(a))

    @pytest.mark.parametrize(("dist", "margin"), [("cos", 3.0), ("l2", 100.0)])
    @pytest.mark.parametrize("agg", AGGS)
    def test_gradcheck(self, dist, margin, agg):
        a, p, n = (_randn(3, 2, 4, seed=s).requires_grad_() for s in (7, 8, 9))
        w = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
        assert torch.autograd.gradcheck(
            lambda x, y, z: triplet_margin_loss(
                x, y, z, margin=margin, dist=dist, agg=agg, weights=w
            ),
            (a, p, n),
        )

    def test_zero_vector_cos_is_finite(self):
        a = torch.zeros(B, D, dtype=F64, requires_grad=True)
        p, n = _randn(B, D, seed=10), _randn(B, D, seed=11)
        out = triplet_margin_loss(a, p, n, margin=0.2)
        # both distances are 1 for a zero anchor
        torch.testing.assert_close(out, torch.tensor(0.2, dtype=F64))
        out.backward()
        _assert_finite_small_grad(a)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"negative": torch.zeros(4, 5)}, r"negative \[4, 5\]"),
            ({"positive": torch.zeros(3, 6)}, r"positive \[3, 6\]"),
            (
                {"anchor": torch.zeros(6), "positive": torch.zeros(6), "negative": torch.zeros(6)},
                "anchor must be",
            ),
            ({"dist": "l1"}, "dist"),
            ({"agg": "min"}, "agg"),
            ({"reduction": "avg"}, "reduction"),
            ({"weights": torch.ones(2)}, "weights"),
        ],
    )
    def test_errors(self, kwargs, match):
        args = {
            "anchor": torch.zeros(4, 6),
            "positive": torch.zeros(4, 6),
            "negative": torch.zeros(4, 6),
            **kwargs,
        }
        tensors = [args.pop(k) for k in ("anchor", "positive", "negative")]
        with pytest.raises(ValueError, match=match):
            triplet_margin_loss(*tensors, **args)


# ---------------------------------------------------------------- margin_ranking_on_distances


class TestMarginRankingOnDistances:
    @pytest.mark.parametrize(("reduction", "weighted"), REDUCTIONS, ids=REDUCTION_IDS)
    @pytest.mark.parametrize("margin", [0.0, 0.2, 1.0])
    def test_matches_reference(self, reduction, weighted, margin):
        d_pos, d_neg = _randn(B, seed=1).abs(), _randn(B, seed=2).abs()
        w = _weights(weighted)
        out = margin_ranking_on_distances(
            d_pos, d_neg, margin=margin, reduction=reduction, weights=w
        )
        per_sample = [
            max(0.0, dp - dn + margin)
            for dp, dn in zip(d_pos.tolist(), d_neg.tolist(), strict=True)
        ]
        torch.testing.assert_close(out, _reduce(per_sample, reduction, weighted))

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_matches_torch_margin_ranking_loss(self, reduction):
        d_pos, d_neg = _randn(8, seed=3), _randn(8, seed=4)
        out = margin_ranking_on_distances(d_pos, d_neg, margin=0.3, reduction=reduction)
        # relu(-y * (x1 - x2) + margin) with x1 = d_neg, x2 = d_pos, y = 1
        expected = F.margin_ranking_loss(
            d_neg, d_pos, torch.ones(8, dtype=F64), margin=0.3, reduction=reduction
        )
        torch.testing.assert_close(out, expected)

    def test_known_values(self):
        d_pos = torch.tensor([0.1, 0.5, 0.0], dtype=F64)
        d_neg = torch.tensor([1.0, 0.4, 0.2], dtype=F64)
        out = margin_ranking_on_distances(d_pos, d_neg, margin=0.2, reduction="none")
        torch.testing.assert_close(out, torch.tensor([0.0, 0.3, 0.0], dtype=F64))

    def test_gradcheck(self):
        d_pos = _randn(B, seed=5).requires_grad_()
        d_neg = _randn(B, seed=6).requires_grad_()
        w = torch.tensor(WEIGHTS, dtype=F64)
        assert torch.autograd.gradcheck(
            lambda p, n: margin_ranking_on_distances(p, n, margin=10.0, weights=w), (d_pos, d_neg)
        )

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"d_pos": torch.zeros(4, 1), "d_neg": torch.zeros(4, 1)}, r"d_pos must be \[B\]"),
            ({"d_neg": torch.zeros(3)}, r"d_neg \[3\]"),
            ({"reduction": "avg"}, "reduction"),
            ({"weights": torch.ones(3)}, "weights"),
        ],
    )
    def test_errors(self, kwargs, match):
        args = {"d_pos": torch.zeros(4), "d_neg": torch.zeros(4), **kwargs}
        with pytest.raises(ValueError, match=match):
            margin_ranking_on_distances(args.pop("d_pos"), args.pop("d_neg"), **args)


# ---------------------------------------------------------------- multi_negative_ranking_loss


class TestMultiNegativeRankingLoss:
    K = 3

    def _inputs(self, shape, seed=0):
        a = _randn(*shape, seed=seed + 1)
        p = _randn(*shape, seed=seed + 2)
        negs = [_randn(*shape, seed=seed + 10 + k) for k in range(self.K)]
        return a, p, negs

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize("neg_agg", AGGS)
    @pytest.mark.parametrize(("dist", "margin"), [("cos", 0.3), ("l2", 2.0)])
    def test_per_sample_matches_reference(self, shape, agg, neg_agg, dist, margin):
        a, p, negs = self._inputs(shape)
        out = multi_negative_ranking_loss(
            a,
            p,
            torch.stack(negs, dim=1),
            margin=margin,
            dist=dist,
            agg=agg,
            neg_agg=neg_agg,
            reduction="none",
        )
        assert out.shape == (B,)
        expected = _ref_multi_negative(a, p, negs, margin, dist, agg, neg_agg)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=F64))

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize(("reduction", "weighted"), REDUCTIONS, ids=REDUCTION_IDS)
    def test_reduction_matches_reference(self, shape, reduction, weighted):
        a, p, negs = self._inputs(shape, seed=20)
        w = _weights(weighted)
        out = multi_negative_ranking_loss(a, p, negs, margin=0.5, reduction=reduction, weights=w)
        per_sample = _ref_multi_negative(a, p, negs, 0.5, "cos", "mean", "mean")
        torch.testing.assert_close(out, _reduce(per_sample, reduction, weighted))

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    def test_list_equals_stacked(self, shape, agg):
        a, p, negs = self._inputs(shape, seed=30)
        kwargs = {"agg": agg, "neg_agg": "max", "reduction": "none", "margin": 0.5}
        from_list = multi_negative_ranking_loss(a, p, negs, **kwargs)
        from_tuple = multi_negative_ranking_loss(a, p, tuple(negs), **kwargs)
        stacked = multi_negative_ranking_loss(a, p, torch.stack(negs, dim=1), **kwargs)
        torch.testing.assert_close(from_list, stacked)
        torch.testing.assert_close(from_tuple, stacked)

    @pytest.mark.parametrize("dist", ["cos", "l2"])
    @pytest.mark.parametrize("agg", AGGS)
    def test_single_negative_equals_triplet(self, dist, agg):
        a, p, negs = self._inputs((B, 3, D), seed=40)
        out = multi_negative_ranking_loss(
            a, p, negs[:1], margin=0.4, dist=dist, agg=agg, reduction="none"
        )
        expected = triplet_margin_loss(
            a, p, negs[0], margin=0.4, dist=dist, agg=agg, reduction="none"
        )
        torch.testing.assert_close(out, expected)

    @pytest.mark.parametrize(
        ("neg_agg", "expected"), [("mean", 0.2 / 3), ("max", 0.2), ("sum", 0.2)]
    )
    def test_known_values(self, neg_agg, expected):
        a = torch.tensor([[1.0, 0.0]], dtype=F64)
        # distances to the negatives: 2, 1, 0 -> hinges 0, 0, 0.2
        negs = torch.tensor([[[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]], dtype=F64)
        out = multi_negative_ranking_loss(a, a, negs, margin=0.2, neg_agg=neg_agg)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=F64))

    def test_token_distances_reduced_before_hinge(self):
        # [B, K, P, D]: per negative, tokens at cos distance 0 and 2 average to 1 (agg="mean");
        # a hinge on unreduced tokens would give mean(relu(0 - 0 + 0.5), relu(0 - 2 + 0.5)) instead
        a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)
        negs = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]]], dtype=F64)
        out = multi_negative_ranking_loss(a, a, negs, margin=0.5, reduction="none")
        torch.testing.assert_close(out, torch.tensor([0.0], dtype=F64))
        out = multi_negative_ranking_loss(a, a, negs, margin=1.5, reduction="none")
        torch.testing.assert_close(out, torch.tensor([0.5], dtype=F64))

    @pytest.mark.parametrize("neg_agg", AGGS)
    @pytest.mark.parametrize(("dist", "margin"), [("cos", 3.0), ("l2", 100.0)])
    def test_gradcheck(self, neg_agg, dist, margin):
        a = _randn(3, 2, 4, seed=50).requires_grad_()
        p = _randn(3, 2, 4, seed=51).requires_grad_()
        negs = _randn(3, 2, 2, 4, seed=52).requires_grad_()
        w = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
        assert torch.autograd.gradcheck(
            lambda x, y, z: multi_negative_ranking_loss(
                x, y, z, margin=margin, dist=dist, neg_agg=neg_agg, weights=w
            ),
            (a, p, negs),
        )

    def test_zero_negative_cos_is_finite(self):
        a, p, negs = self._inputs((B, 3, D), seed=60)
        negs[1] = torch.zeros_like(negs[1])
        stacked = torch.stack(negs, dim=1).requires_grad_()
        a.requires_grad_()
        out = multi_negative_ranking_loss(a, p, stacked, margin=3.0)
        assert torch.isfinite(out)
        out.backward()
        _assert_finite_small_grad(a)
        _assert_finite_small_grad(stacked)

    @pytest.mark.parametrize(
        ("negs", "kwargs", "match"),
        [
            (torch.zeros(4, 6), {}, r"z_negs must be \[4, 'K', 6\]"),
            (torch.zeros(4, 2, 5), {}, "z_negs must be"),
            (torch.zeros(3, 2, 6), {}, "z_negs must be"),
            (torch.zeros(4, 0, 6), {}, "at least one negative"),
            ([], {}, "z_negs must hold at least one negative"),
            ([torch.zeros(4, 6), torch.zeros(4, 5)], {}, r"z_negs\[1\]"),
            (torch.zeros(4, 2, 6), {"neg_agg": "median"}, "neg_agg"),
            (torch.zeros(4, 2, 6), {"agg": "median"}, "agg"),
            (torch.zeros(4, 2, 6), {"dist": "l1"}, "dist"),
            (torch.zeros(4, 2, 6), {"reduction": "avg"}, "reduction"),
            (torch.zeros(4, 2, 6), {"weights": torch.ones(2)}, "weights"),
        ],
    )
    def test_errors(self, negs, kwargs, match):
        with pytest.raises(ValueError, match=match):
            multi_negative_ranking_loss(torch.zeros(4, 6), torch.zeros(4, 6), negs, **kwargs)

    def test_anchor_positive_mismatch_error(self):
        with pytest.raises(ValueError, match=r"z_anchor \[4, 6\], z_positive \[4, 5\]"):
            multi_negative_ranking_loss(torch.zeros(4, 6), torch.zeros(4, 5), torch.zeros(4, 2, 6))


# ---------------------------------------------------------------- info_nce_loss


class TestInfoNCELoss:
    K = 3

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize("normalize", [True, False])
    def test_in_batch_matches_reference(self, shape, agg, normalize):
        a, p = _randn(*shape, seed=1), _randn(*shape, seed=2)
        out = info_nce_loss(a, p, temperature=0.5, normalize=normalize, agg=agg, reduction="none")
        expected = _ref_info_nce(a, p, None, 0.5, normalize, agg)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=F64))

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize("normalize", [True, False])
    def test_explicit_negatives_match_reference(self, shape, agg, normalize):
        a, p = _randn(*shape, seed=3), _randn(*shape, seed=4)
        negs = [_randn(*shape, seed=10 + k) for k in range(self.K)]
        out = info_nce_loss(
            a,
            p,
            torch.stack(negs, dim=1),
            temperature=0.5,
            normalize=normalize,
            agg=agg,
            reduction="none",
        )
        expected = _ref_info_nce(a, p, negs, 0.5, normalize, agg)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=F64))

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("explicit", [False, True])
    def test_reduction_matches_reference(self, reduction, explicit):
        a, p = _randn(B, 3, D, seed=5), _randn(B, 3, D, seed=6)
        negs = [_randn(B, 3, D, seed=20 + k) for k in range(self.K)] if explicit else None
        out = info_nce_loss(a, p, negs, reduction=reduction)
        per_sample = _ref_info_nce(a, p, negs, 0.07, True, "mean")
        torch.testing.assert_close(out, _reduce(per_sample, reduction, False))

    @pytest.mark.parametrize("normalize", [True, False])
    def test_in_batch_equals_cross_entropy(self, normalize):
        a, p = _randn(8, D, seed=7), _randn(8, D, seed=8)
        if normalize:
            logits = F.cosine_similarity(a.unsqueeze(1), p.unsqueeze(0), dim=-1)
        else:
            logits = a @ p.T
        expected = F.cross_entropy(logits / 0.1, torch.arange(8))
        out = info_nce_loss(a, p, temperature=0.1, normalize=normalize)
        torch.testing.assert_close(out, expected)

    @pytest.mark.parametrize("agg", AGGS)
    def test_explicit_equals_cross_entropy(self, agg):
        a, p = _randn(B, 3, D, seed=9), _randn(B, 3, D, seed=10)
        negs = _randn(B, self.K, 3, D, seed=11)
        logits = torch.empty(B, self.K + 1, dtype=F64)
        for i in range(B):
            for k, other in enumerate([p[i], *negs[i]]):
                tok = F.cosine_similarity(a[i], other, dim=-1)
                logits[i, k] = {"mean": tok.mean(), "max": tok.max(), "sum": tok.sum()}[agg]
        expected = F.cross_entropy(logits / 0.2, torch.zeros(B, dtype=torch.long))
        out = info_nce_loss(a, p, negs, temperature=0.2, agg=agg)
        torch.testing.assert_close(out, expected)

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    def test_list_equals_stacked(self, shape):
        a, p = _randn(*shape, seed=12), _randn(*shape, seed=13)
        negs = [_randn(*shape, seed=30 + k) for k in range(self.K)]
        stacked = info_nce_loss(a, p, torch.stack(negs, dim=1), reduction="none")
        torch.testing.assert_close(info_nce_loss(a, p, negs, reduction="none"), stacked)
        torch.testing.assert_close(info_nce_loss(a, p, tuple(negs), reduction="none"), stacked)

    @pytest.mark.parametrize("normalize", [True, False])
    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    def test_identical_logits_give_log_n(self, normalize, shape):
        z = _randn(*shape[1:], seed=14).expand(*shape)
        out = info_nce_loss(z, z, normalize=normalize, reduction="none")
        torch.testing.assert_close(out, torch.full((B,), math.log(B), dtype=F64))
        negs = z.unsqueeze(1).expand(B, self.K, *shape[1:])
        out = info_nce_loss(z, z, negs, normalize=normalize)
        torch.testing.assert_close(out, torch.tensor(math.log(self.K + 1), dtype=F64))

    def test_separated_positive_gives_near_zero(self):
        a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
        # cos(a_i, p_i) = 1, cos(a_i, p_j) = 0: loss = log(1 + exp(-1 / T))
        out = info_nce_loss(a, a, temperature=0.1, reduction="none")
        torch.testing.assert_close(out, torch.full((2,), math.log1p(math.exp(-10)), dtype=F64))

    @pytest.mark.parametrize("normalize", [True, False])
    @pytest.mark.parametrize("explicit", [False, True])
    @pytest.mark.parametrize("agg", AGGS)
    def test_gradcheck(self, normalize, explicit, agg):
        a = _randn(3, 2, 4, seed=15).requires_grad_()
        p = _randn(3, 2, 4, seed=16).requires_grad_()
        negs = _randn(3, 2, 2, 4, seed=17).requires_grad_()
        kwargs = {"temperature": 0.5, "normalize": normalize, "agg": agg}
        if explicit:
            assert torch.autograd.gradcheck(
                lambda x, y, n: info_nce_loss(x, y, n, **kwargs), (a, p, negs)
            )
        else:
            assert torch.autograd.gradcheck(lambda x, y: info_nce_loss(x, y, **kwargs), (a, p))

    @pytest.mark.parametrize("explicit", [False, True])
    def test_zero_vector_is_finite(self, explicit):
        a = _randn(B, 3, D, seed=18)
        a[0] = 0.0
        a.requires_grad_()
        p = _randn(B, 3, D, seed=19)
        negs = _randn(B, self.K, 3, D, seed=20) if explicit else None
        out = info_nce_loss(a, p, negs, reduction="none")
        assert torch.isfinite(out).all()
        # a zero anchor scores 0 against everything: uniform over the candidates
        n_candidates = self.K + 1 if explicit else B
        assert out[0].item() == pytest.approx(math.log(n_candidates))
        out.sum().backward()
        _assert_finite_small_grad(a)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"positive": torch.zeros(4, 5)}, r"anchor \[4, 6\], positive \[4, 5\]"),
            ({"anchor": torch.zeros(6), "positive": torch.zeros(6)}, "anchor must be"),
            ({"negatives": torch.zeros(4, 6)}, "negatives must be"),
            ({"negatives": torch.zeros(4, 2, 5)}, "negatives must be"),
            ({"negatives": [torch.zeros(4, 6), torch.zeros(2, 6)]}, r"negatives\[1\]"),
            ({"negatives": []}, "negatives must hold"),
            ({"temperature": 0.0}, "temperature"),
            ({"temperature": -1.0}, "temperature"),
            ({"agg": "median"}, "agg"),
            ({"reduction": "avg"}, "reduction"),
        ],
    )
    def test_errors(self, kwargs, match):
        args = {"anchor": torch.zeros(4, 6), "positive": torch.zeros(4, 6), **kwargs}
        with pytest.raises(ValueError, match=match):
            info_nce_loss(args.pop("anchor"), args.pop("positive"), **args)


# ---------------------------------------------------------------- task wrappers


class TestTaskWrappers:
    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize(("reduction", "weighted"), REDUCTIONS, ids=REDUCTION_IDS)
    def test_no_edit_identity_matches_reference(self, shape, agg, reduction, weighted):
        pred, gt, src = (_randn(*shape, seed=s) for s in (1, 2, 3))
        w = _weights(weighted)
        out = loss_no_edit_identity(
            pred, gt, src, margin=0.4, agg=agg, reduction=reduction, weights=w
        )
        per_sample = _ref_triplet(pred, gt, src, 0.4, "cos", agg)
        torch.testing.assert_close(out, _reduce(per_sample, reduction, weighted))

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize(("reduction", "weighted"), REDUCTIONS, ids=REDUCTION_IDS)
    def test_overlay_avoidance_matches_reference(self, shape, agg, reduction, weighted):
        pred, gt, overlay = (_randn(*shape, seed=s) for s in (4, 5, 6))
        w = _weights(weighted)
        out = loss_overlay_avoidance(
            pred, gt, overlay, margin=0.4, dist="l2", agg=agg, reduction=reduction, weights=w
        )
        per_sample = _ref_triplet(pred, gt, overlay, 0.4, "l2", agg)
        torch.testing.assert_close(out, _reduce(per_sample, reduction, weighted))

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    @pytest.mark.parametrize("agg", AGGS)
    @pytest.mark.parametrize(("reduction", "weighted"), REDUCTIONS, ids=REDUCTION_IDS)
    def test_geometry_match_matches_reference(self, shape, agg, reduction, weighted):
        pred, gt = _randn(*shape, seed=7), _randn(*shape, seed=8)
        w = _weights(weighted)
        out = loss_geometry_match(pred, gt, agg=agg, reduction=reduction, weights=w)
        per_sample = _ref_feature_match(pred, gt, "l2", agg)
        torch.testing.assert_close(out, _reduce(per_sample, reduction, weighted))

    def test_no_edit_known_values(self):
        pred = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64)
        gt = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
        src = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
        # sample 0 edited (closer to gt): 0 - 1 + 0.2 < 0; sample 1 unedited: 1 - 0 + 0.2
        out = loss_no_edit_identity(pred, gt, src, reduction="none")
        torch.testing.assert_close(out, torch.tensor([0.0, 1.2], dtype=F64))

    def test_wrappers_equal_generic_losses(self):
        pred, gt, neg = (_randn(B, 3, D, seed=s) for s in (9, 10, 11))
        kwargs = {"agg": "max", "reduction": "none", "weights": torch.tensor(WEIGHTS, dtype=F64)}
        torch.testing.assert_close(
            loss_no_edit_identity(pred, gt, neg, margin=0.3, **kwargs),
            triplet_margin_loss(pred, gt, neg, margin=0.3, **kwargs),
        )
        torch.testing.assert_close(
            loss_overlay_avoidance(pred, gt, neg, margin=0.3, **kwargs),
            triplet_margin_loss(pred, gt, neg, margin=0.3, **kwargs),
        )
        torch.testing.assert_close(
            loss_geometry_match(pred, gt, kind="l1", **kwargs),
            feature_match_loss(pred, gt, kind="l1", **kwargs),
        )

    def test_gradcheck(self):
        pred, gt, neg = (_randn(3, 2, 4, seed=s).requires_grad_() for s in (12, 13, 14))
        assert torch.autograd.gradcheck(
            lambda x, y, z: loss_no_edit_identity(x, y, z, margin=3.0), (pred, gt, neg)
        )
        assert torch.autograd.gradcheck(
            lambda x, y, z: loss_overlay_avoidance(x, y, z, margin=3.0), (pred, gt, neg)
        )
        assert torch.autograd.gradcheck(lambda x, y: loss_geometry_match(x, y), (pred, gt))

    def test_zero_vector_cos_is_finite(self):
        pred = torch.zeros(B, D, dtype=F64, requires_grad=True)
        gt, neg = _randn(B, D, seed=15), _randn(B, D, seed=16)
        out = loss_no_edit_identity(pred, gt, neg) + loss_overlay_avoidance(pred, gt, neg)
        torch.testing.assert_close(out, torch.tensor(0.4, dtype=F64))
        out.backward()
        _assert_finite_small_grad(pred)

    @pytest.mark.parametrize(
        ("fn", "names"),
        [
            (loss_no_edit_identity, ("z_pred", "z_gt", "z_src")),
            (loss_overlay_avoidance, ("z_pred", "z_gt", "z_overlay")),
            (loss_geometry_match, ("z_pred", "z_gt")),
        ],
    )
    def test_shape_errors_name_arguments(self, fn, names):
        for bad in range(len(names)):
            tensors = [torch.zeros(4, 6) for _ in names]
            tensors[bad] = torch.zeros(4, 5)
            with pytest.raises(ValueError, match=rf"{names[bad]} \[4, 5\]"):
                fn(*tensors)
        with pytest.raises(ValueError, match="z_pred must be"):
            fn(*[torch.zeros(6) for _ in names])

    @pytest.mark.parametrize(
        ("kwargs", "match"), [({"dist": "l1"}, "dist"), ({"reduction": "x"}, "reduction")]
    )
    def test_option_errors(self, kwargs, match):
        z = torch.zeros(4, 6)
        with pytest.raises(ValueError, match=match):
            loss_no_edit_identity(z, z, z, **kwargs)
        with pytest.raises(ValueError, match=match):
            loss_overlay_avoidance(z, z, z, **kwargs)

    def test_geometry_kind_error(self):
        z = torch.zeros(4, 6)
        with pytest.raises(ValueError, match="kind"):
            loss_geometry_match(z, z, kind="cosine")


# ---------------------------------------------------------------- embedding_starter_loss


class TestEmbeddingStarterLoss:
    def _inputs(self, shape=(B, 3, D)):
        return tuple(_randn(*shape, seed=s) for s in (1, 2, 3, 4))

    def test_defaults_are_the_recommended_mix(self):
        w = EmbeddingLossWeights()
        assert (w.identity, w.geometry, w.overlay) == (1.0, 0.5, 0.7)
        assert (w.identity_margin, w.overlay_margin) == (0.25, 0.25)

    def test_weights_are_frozen(self):
        with pytest.raises(dataclasses.FrozenInstanceError):
            EmbeddingLossWeights().identity = 2.0  # type: ignore[misc]

    @pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
    def test_default_total_is_recommended_mix(self, shape):
        pred, gt, src, overlay = self._inputs(shape)
        total, parts = embedding_starter_loss(pred, gt, src, overlay)
        identity = loss_no_edit_identity(pred, gt, src, margin=0.25, dist="cos")
        geometry = loss_geometry_match(pred, gt, kind="l2")
        overlay_term = loss_overlay_avoidance(pred, gt, overlay, margin=0.25, dist="cos")
        assert set(parts) == {"identity", "geometry", "overlay"}
        torch.testing.assert_close(parts["identity"], identity)
        torch.testing.assert_close(parts["geometry"], geometry)
        torch.testing.assert_close(parts["overlay"], overlay_term)
        torch.testing.assert_close(total, 1.0 * identity + 0.5 * geometry + 0.7 * overlay_term)

    def test_components_match_reference(self):
        pred, gt, src, overlay = self._inputs()
        w = EmbeddingLossWeights(identity=2.0, geometry=0.1, overlay=3.0, identity_margin=0.6)
        total, parts = embedding_starter_loss(pred, gt, src, overlay, weights=w)
        identity = sum(_ref_triplet(pred, gt, src, 0.6, "cos", "mean")) / B
        geometry = sum(_ref_feature_match(pred, gt, "l2", "mean")) / B
        overlay_term = sum(_ref_triplet(pred, gt, overlay, 0.25, "cos", "mean")) / B
        assert parts["identity"].item() == pytest.approx(identity)
        assert parts["geometry"].item() == pytest.approx(geometry)
        assert parts["overlay"].item() == pytest.approx(overlay_term)
        assert total.item() == pytest.approx(2.0 * identity + 0.1 * geometry + 3.0 * overlay_term)

    @pytest.mark.parametrize("off", ["identity", "geometry", "overlay"])
    def test_zero_weight_term_is_absent(self, off):
        pred, gt, src, overlay = self._inputs()
        w = dataclasses.replace(EmbeddingLossWeights(), **{off: 0.0})
        total, parts = embedding_starter_loss(pred, gt, src, overlay, weights=w)
        assert off not in parts
        assert len(parts) == 2
        expected = sum(getattr(w, name) * term for name, term in parts.items())
        torch.testing.assert_close(total, expected)

    def test_overlay_skipped_without_negative(self):
        pred, gt, src, _ = self._inputs()
        total, parts = embedding_starter_loss(pred, gt, src)
        assert set(parts) == {"identity", "geometry"}
        torch.testing.assert_close(total, parts["identity"] + 0.5 * parts["geometry"])

    def test_all_weights_zero_gives_zero(self):
        pred, gt, src, overlay = self._inputs()
        w = EmbeddingLossWeights(identity=0.0, geometry=0.0, overlay=0.0)
        total, parts = embedding_starter_loss(pred, gt, src, overlay, weights=w)
        assert parts == {}
        torch.testing.assert_close(total, torch.tensor(0.0, dtype=F64))

    def test_gradcheck(self):
        pred, gt, src, overlay = (_randn(3, 2, 4, seed=s).requires_grad_() for s in (5, 6, 7, 8))
        # margins past the largest cosine gap keep both hinges active, away from the kink
        w = EmbeddingLossWeights(identity_margin=3.0, overlay_margin=3.0)
        assert torch.autograd.gradcheck(
            lambda *z: embedding_starter_loss(*z, weights=w)[0], (pred, gt, src, overlay)
        )

    def test_zero_prediction_is_finite(self):
        _, gt, src, overlay = self._inputs()
        pred = torch.zeros_like(gt, requires_grad=True)
        total, _ = embedding_starter_loss(pred, gt, src, overlay)
        assert torch.isfinite(total)
        total.backward()
        _assert_finite_small_grad(pred)

    @pytest.mark.parametrize("bad", ["z_pred", "z_gt", "z_src", "z_overlay"])
    def test_shape_errors_name_arguments(self, bad):
        tensors = {name: torch.zeros(4, 6) for name in ("z_pred", "z_gt", "z_src", "z_overlay")}
        tensors[bad] = torch.zeros(4, 5)
        with pytest.raises(ValueError, match=rf"{bad} \[4, 5\]"):
            embedding_starter_loss(*tensors.values())

    def test_overlay_shape_checked_even_when_weight_is_zero(self):
        z = torch.zeros(4, 6)
        with pytest.raises(ValueError, match="z_overlay"):
            embedding_starter_loss(
                z, z, z, torch.zeros(4, 5), weights=EmbeddingLossWeights(overlay=0.0)
            )

    def test_ndim_error(self):
        z = torch.zeros(6)
        with pytest.raises(ValueError, match="z_pred must be"):
            embedding_starter_loss(z, z, z)
