"""Physical removal: slice the pruned heads and FFN neurons out of the matrices, the function unchanged.

The zeroed output-side columns make a pruned group contribute exactly nothing, which is why slicing keeps
the masked model's function exactly. A layer whose heads are all pruned gets `NoSelfAttention`.
"""


from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn

from losparse.core.errors import LoSparseUsageError
from losparse.methods.structured.blocks import (
    EncoderBlock,
    NoSelfAttention,
    encoder_blocks,
    group_sizes,
    select_groups,
    split_keep,
    target_params,
)


def new_linear(in_features: int, out_features: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    """An uninitialised `nn.Linear` on `like`'s device and dtype (0-element shapes allowed, without a warning)."""
    with warnings.catch_warnings():  # a layer with every head or neuron pruned has 0-element weights
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_features, out_features, bias=bias, device=like.device, dtype=like.dtype)


def empty_linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return new_linear(in_features, out_features, like.bias is not None, like.weight)


@torch.no_grad()
def slice_linear(linear: nn.Linear, rows: Optional[torch.Tensor] = None,
                 columns: Optional[torch.Tensor] = None) -> nn.Linear:
    """A copy of `linear` keeping the output rows `rows` and input columns `columns` (indices; None: all)."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        rows = rows.to(weight.device)
        weight, bias = weight[rows], bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns.to(weight.device)]
    new = new_linear(weight.shape[1], weight.shape[0], bias is not None, weight)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def _inferred_keep(block: EncoderBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups whose output-side columns are all zero contribute nothing: pruned (exact to remove)."""
    heads = block.attention_output.weight.detach().view(block.hidden_size, block.heads, block.head_size)
    neurons = block.ffn_output.weight.detach()
    return heads.abs().amax(dim=(0, 2)) > 0, neurons.abs().amax(dim=0) > 0


def _shrink_block(block: EncoderBlock, heads: torch.Tensor, neurons: torch.Tensor) -> None:
    heads, neurons = heads.cpu().bool(), neurons.cpu().bool()
    rows = torch.nonzero(heads.repeat_interleave(block.head_size)).flatten()
    kept_heads = int(heads.sum())
    attention = block.attention
    if kept_heads == 0:
        block.layer.attention.self = NoSelfAttention()
    elif kept_heads < heads.numel():
        device = block.attention_output.weight.device
        for name in ("query", "key", "value"):
            setattr(attention, name, slice_linear(getattr(attention, name), rows=rows.to(device)))
        attention.num_attention_heads = kept_heads
        attention.all_head_size = kept_heads * block.head_size
    if kept_heads < heads.numel():
        block.layer.attention.output.dense = slice_linear(block.attention_output, columns=rows.to(
            block.attention_output.weight.device))
    if int(neurons.sum()) < neurons.numel():
        index = torch.nonzero(neurons).flatten().to(block.intermediate.weight.device)
        block.layer.intermediate.dense = slice_linear(block.intermediate, rows=index)
        block.layer.output.dense = slice_linear(block.ffn_output, columns=index)


def structure_of(model: nn.Module) -> dict[str, Any]:
    """The kept structure of a (pruned) model: heads and FFN width per encoder layer, and the head size."""
    blocks = encoder_blocks(model)
    return {"format": 1, "head_size": blocks[0].head_size,
            "layers": [{"name": b.name, "heads": b.heads if b.has_attention else 0, "intermediate_size": b.neurons}
                       for b in blocks]}


@torch.no_grad()
def remove_pruned_structures(model: nn.Module) -> nn.Module:
    """Slice the pruned heads and FFN neurons out of `model` (in place; returns it), function unchanged.

    Which groups are pruned: the pruner's masks (`model.structured_keep`) if it has them, else every group
    whose output-side columns are all zero. Records the result in `model.structure` (see `save_structured`).
    """
    blocks = encoder_blocks(model)
    masks = getattr(model, "structured_keep", None)
    if masks is None or len(masks) != len(blocks):
        masks = [_inferred_keep(block) for block in blocks]
    for block, (heads, neurons) in zip(blocks, masks):
        if heads.numel() != block.heads or neurons.numel() != block.neurons:
            raise ValueError(f"{block.name}: masks of {heads.numel()} heads / {neurons.numel()} neurons for a layer "
                             f"of {block.heads} / {block.neurons} (already removed?)")
        _shrink_block(block, heads, neurons)
    model.structured_keep = None
    model.structure = structure_of(model)
    return model


def widths_text(report: dict[str, Any]) -> str:
    """"12h/1536, 9h/700, ...": heads and FFN width per encoder layer, for the methods' log lines."""
    return ", ".join(f"{h}h/{n}" for h, n in zip(report["heads"], report["intermediate_sizes"]))


def structured_report(model: nn.Module, dense_target_params: int, dense_model_params: int) -> dict[str, Any]:
    """A compression report with `losparse.deploy.compact.parameter_report`'s top-level fields (no per-layer list)."""
    blocks = encoder_blocks(model)
    now = target_params(blocks)
    total = sum(p.numel() for p in model.parameters())
    return {
        "num_layers": len(blocks), "target_dense_params": dense_target_params, "target_params": now,
        "remaining_ratio": now / dense_target_params if dense_target_params else 1.0,
        "low_rank_share": 0.0, "sparse_share": 0.0, "model_params_dense": dense_model_params, "model_params": total,
        "heads": [b.heads if b.has_attention else 0 for b in blocks], "intermediate_sizes": [b.neurons for b in blocks],
        "note": "structured: whole heads and FFN neurons removed; ratio = kept weights of q, k, v, attention output, "
                "intermediate and output matrices / their dense count",
    }


def build_structured_peer(dense_model: nn.Module, kept_fraction: float, scores: Optional[torch.Tensor] = None,
                          seed: int = 0) -> nn.Module:
    """A copy of `dense_model` with whole heads and FFN neurons removed to `kept_fraction` of the targeted weights.

    For timing against a LoSparse model of the same ratio: the groups kept are the best by `scores` (one per
    group, layout of `group_sizes`) or by random scores (seeded), under the global parameter-weighted rule.
    """
    if not 0.0 < kept_fraction <= 1.0:
        raise LoSparseUsageError(f"kept_fraction {kept_fraction!r} is out of range; it must be in (0, 1]")
    peer = copy.deepcopy(dense_model)
    blocks = encoder_blocks(peer)
    sizes = group_sizes(blocks)
    if scores is None:
        scores = torch.rand(sizes.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    elif scores.shape != sizes.shape:
        raise ValueError(f"build_structured_peer: {scores.numel()} scores given for {sizes.numel()} groups")
    peer.structured_keep = split_keep(blocks, select_groups(scores, sizes, kept_fraction))
    return remove_pruned_structures(peer)
