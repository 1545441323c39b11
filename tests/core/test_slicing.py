"""`losparse.core.slicing`: kept rows/columns and scaling of a training-form LoSparseLinear are exact."""

import pytest
import torch
from torch import nn

from losparse.core.decompose import decompose_linear
from losparse.core.slicing import scale_, select


def _layer(seed=0, prune_dim="rows"):
    torch.manual_seed(seed)
    layer = decompose_linear(nn.Linear(12, 10), 0.2, prune_dim)
    mask = torch.rand(layer.sparse_mask.shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    layer.set_sparse_mask(mask)
    return layer


@pytest.mark.parametrize("prune_dim", ["rows", "columns"])
def test_select_keeps_the_function_on_the_kept_rows_and_columns(prune_dim):
    layer = _layer(prune_dim=prune_dim)
    rows, columns = torch.tensor([0, 3, 4, 9]), torch.tensor([1, 2, 5, 6, 11])
    x = torch.randn(3, 12)
    x[:, [i for i in range(12) if i not in columns.tolist()]] = 0.0  # the dropped inputs are 0
    sliced = select(layer, rows, columns)
    torch.testing.assert_close(sliced(x[:, columns]), layer(x)[:, rows])
    assert (sliced.in_features, sliced.out_features, sliced.rank) == (5, 4, layer.rank)
    kept_mask = layer.sparse_mask[rows] if prune_dim == "rows" else layer.sparse_mask[columns]
    assert torch.equal(sliced.sparse_mask, kept_mask)


def test_select_to_zero_width_gives_the_bias_alone():
    layer = _layer()
    empty = select(layer, columns=torch.tensor([], dtype=torch.long))
    assert isinstance(empty, nn.Linear) and empty.in_features == 0
    torch.testing.assert_close(empty(torch.randn(2, 0)), layer.bias.expand(2, -1))


def test_scale_multiplies_rows_and_columns_of_the_effective_weight():
    layer = _layer()
    before = layer.effective_weight().clone()
    rows, columns = torch.rand(10) + 0.5, torch.rand(12) + 0.5
    bias = layer.bias.clone()
    scale_(layer, rows, columns)
    torch.testing.assert_close(layer.effective_weight(), before * rows[:, None] * columns[None, :])
    torch.testing.assert_close(layer.bias, bias * rows)
