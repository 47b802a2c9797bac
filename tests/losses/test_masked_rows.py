"""Mask terms on a batch's masked rows: which rows they see and how their value is weighted."""

import torch

from losses import masked_rows_loss, rows_of


def test_rows_of_selects_batch_first_tensors_only():
    tensors = {
        "x": torch.arange(6.0).reshape(3, 2),
        "flag": torch.tensor([True, False, True]),
        "shared": torch.ones(5),  # not batch-first: kept whole
        "name": "kept",
    }
    picked = rows_of(tensors, torch.tensor([True, False, True]))
    assert picked["x"].tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert picked["flag"].tolist() == [True, True]
    assert picked["shared"].shape == (5,) and picked["name"] == "kept"


def mean_of_x(rows):
    return rows["x"].mean()


def test_no_masked_row_calls_nothing():
    def never(_):
        raise AssertionError("called")

    assert masked_rows_loss(torch.zeros(3), {"x": torch.ones(3)}, never) is None


def test_every_row_masked_is_the_terms_themselves():
    x = torch.tensor([1.0, 2.0, 6.0])
    assert masked_rows_loss(torch.ones(3), {"x": x}, mean_of_x) == 3.0


def test_some_rows_masked_weighted_by_their_share():
    x = torch.tensor([1.0, 2.0, 6.0, 10.0], requires_grad=True)
    has_mask = torch.tensor([1, 0, 1, 0])
    value = masked_rows_loss(has_mask, {"x": x}, mean_of_x)
    # The masked rows' mean (1 + 6) / 2, times their share 2 / 4.
    assert value.item() == 3.5 / 2
    value.backward()
    assert x.grad.tolist() == [0.25, 0.0, 0.25, 0.0]
