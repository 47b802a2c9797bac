"""Mask terms on the rows of a batch that have a mask.

A batch may mix rows with a mask and rows without one (which train with flow matching alone).
The mask terms see only the masked rows, and their value is weighted by those rows' share of
the batch, so that a mask term's gradient per masked example does not grow as masks get rarer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def rows_of(tensors: Mapping[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The ``rows: [B]`` (bool) of every batch-first tensor in ``tensors``; other values (and
    tensors whose first dimension is not ``B``) as they are."""
    size = rows.shape[0]
    return {
        name: value[rows]
        if isinstance(value, torch.Tensor) and value.shape[:1] == (size,)
        else value
        for name, value in tensors.items()
    }


def masked_rows_loss(
    has_mask: torch.Tensor,
    tensors: Mapping[str, Any],
    terms: Callable[[Mapping[str, Any]], torch.Tensor],
) -> torch.Tensor | None:
    """``terms`` on the rows of ``tensors`` whose ``has_mask: [B]`` is set, times their share of
    the batch; ``terms(tensors)`` itself when every row has a mask, None when none has (``terms``
    is then not called). One host sync, to count the masked rows."""
    rows = has_mask.bool()
    masked = int(rows.sum())
    if masked == 0:
        return None
    if masked == rows.shape[0]:
        return terms(tensors)
    return masked / rows.shape[0] * terms(rows_of(tensors, rows))
