"""Structural edits of a training-form `LoSparseLinear`: keep some output rows / input columns, scale them.

What a structured pruner built on top of LoSparse needs (`--method cofi_losparse` removes heads, sub-layers
and hidden dims from decomposed matrices): W = U·V + S, so keeping rows of W keeps those rows of U, S, the
bias and of a row mask; keeping columns keeps those columns of V and S (and of a column mask). Scaling rows
scales U's rows, S's rows and the bias; scaling columns scales V's and S's columns. Both are exact for the
layer's function: `select(layer, r, c)(x[..., c]) == layer(x)[..., r]` when the dropped columns' inputs are 0.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from losparse.core.layers import LoSparseLinear


def _index(values: Optional[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, device=device) if values is None else values.to(device)


@torch.no_grad()
def select(layer: LoSparseLinear, rows: Optional[torch.Tensor] = None,
           columns: Optional[torch.Tensor] = None) -> nn.Module:
    """A new layer keeping output rows `rows` and input columns `columns` (index tensors; None: all).

    A result with no input or no output left is an `nn.Linear` of that zero width (its output is its bias):
    there is nothing left to decompose or prune. A shrunk S (`--shrink_sparse`) or an LPAF layer is refused.
    """
    if layer.shrunk or layer.neuron_axis is None or not layer.sparse_active:
        raise ValueError("select: only an unshrunk, neuron-masked LoSparseLinear can be sliced")
    device = (layer.sparse if layer.sparse is not None else layer.low_rank_u).device
    rows, columns = _index(rows, layer.out_features, device), _index(columns, layer.in_features, device)
    like = layer.sparse if layer.sparse is not None else layer.low_rank_u
    if rows.numel() == 0 or columns.numel() == 0:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            empty = nn.Linear(columns.numel(), rows.numel(), bias=layer.bias is not None, device=device,
                              dtype=like.dtype)
        if layer.bias is not None:
            empty.bias.copy_(layer.bias[rows])
        return empty
    new = LoSparseLinear(columns.numel(), rows.numel(), layer.rank, bias=layer.bias is not None,
                         has_sparse=layer.sparse is not None, prune_dim=layer.prune_dim, device=device,
                         dtype=like.dtype, dense_type=layer.dense_type)
    if layer.low_rank_u is not None:
        new.low_rank_u.copy_(layer.low_rank_u[rows])
        new.low_rank_v.copy_(layer.low_rank_v[:, columns])
    if layer.sparse is not None:
        new.sparse.copy_(layer.sparse[rows][:, columns])
        new.sparse_mask.copy_(layer.sparse_mask[rows if layer.neuron_axis == 0 else columns])
    if layer.bias is not None:
        new.bias.copy_(layer.bias[rows])
    new.active_rank = layer.active_rank
    return new


@torch.no_grad()
def scale_(layer: LoSparseLinear, row_scale: Optional[torch.Tensor] = None,
           column_scale: Optional[torch.Tensor] = None) -> LoSparseLinear:
    """Multiply output row i of W (and bias i) by row_scale[i], input column j by column_scale[j], in place."""
    if row_scale is not None:
        for tensor in (layer.low_rank_u, layer.sparse):
            if tensor is not None:
                tensor.mul_(row_scale.to(tensor)[:, None])
        if layer.bias is not None:
            layer.bias.mul_(row_scale.to(layer.bias))
    if column_scale is not None:
        for tensor in (layer.low_rank_v, layer.sparse):
            if tensor is not None:
                tensor.mul_(column_scale.to(tensor)[None, :])
    return layer
