"""Physical removal of masked decoder groups: slice them out of the matrices, the function unchanged.

For a block with kept key/value groups K (query rows / o_proj columns Q = the G·d channels of each, key and
value rows R = the d channels of each) and kept neurons N:

    q_proj ← q_proj[Q, :]   k_proj, v_proj ← [R, :]   o_proj ← o_proj[:, Q]   (biases sliced alike)
    gate_proj, up_proj ← [N, :]                        down_proj ← down_proj[:, N]

The masked groups contribute exactly nothing (their output-side columns are zero, the compensation is in the
bias, which is kept whole), so the sliced model computes what the masked one did. transformers 5.x's
attention forward infers the head count from the projections' shapes (`view(..., -1, head_dim)`) and reads
`num_key_value_groups`, which stays G because whole key/value groups go with their query heads; the widths are
also written on the modules (`DecoderBlock.record_widths`). An attention that lost every group becomes
`EmptyAttention` (zeros + o_proj's bias); an MLP that lost every neuron keeps (H → 0) and (0 → H) linears,
whose output is down_proj's bias.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from losparse.methods.structured.decoder_blocks import DecoderBlock, EmptyAttention, decoder_blocks
from losparse.methods.structured.decoder_structure import decoder_structure_of
from losparse.methods.structured.removal import slice_linear


def inferred_decoder_keep(block: DecoderBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups whose output-side columns (o_proj, down_proj) are not all zero: kept (the rest is exact to remove)."""
    o_columns = block.o_proj.weight.detach().abs().amax(dim=0).view(block.kv_groups, block.group_width)
    return (o_columns.amax(dim=1) > 0).cpu(), (block.down_proj.weight.detach().abs().amax(dim=0) > 0).cpu()


def _indices(keep: torch.Tensor, like: nn.Linear) -> torch.Tensor:
    return torch.nonzero(keep.cpu().bool()).flatten().to(like.weight.device)


def _shrink_attention(block: DecoderBlock, keep_kv: torch.Tensor) -> None:
    attention = block.attention
    if int(keep_kv.sum()) == keep_kv.numel():
        return
    columns = _indices(block.query_rows(keep_kv), block.o_proj)
    o_proj = slice_linear(block.o_proj, columns=columns)
    if int(keep_kv.sum()) == 0:
        block.layer.self_attn = EmptyAttention(o_proj, block.head_dim, getattr(attention, "layer_idx", None))
        return
    kv_rows = _indices(block.kv_rows(keep_kv), block.o_proj)
    attention.q_proj = slice_linear(attention.q_proj, rows=columns)
    attention.k_proj = slice_linear(attention.k_proj, rows=kv_rows)
    attention.v_proj = slice_linear(attention.v_proj, rows=kv_rows)
    attention.o_proj = o_proj


def _shrink_mlp(block: DecoderBlock, keep_neurons: torch.Tensor) -> None:
    if int(keep_neurons.sum()) == keep_neurons.numel():
        return
    mlp = block.layer.mlp
    index = _indices(keep_neurons, block.down_proj)
    mlp.gate_proj = slice_linear(mlp.gate_proj, rows=index)
    mlp.up_proj = slice_linear(mlp.up_proj, rows=index)
    mlp.down_proj = slice_linear(mlp.down_proj, columns=index)


@torch.no_grad()
def remove_pruned_groups(model: nn.Module,
                         masks: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None) -> nn.Module:
    """Slice the masked key/value groups and FFN neurons out of a decoder (in place; returns it).

    masks: (keep kv groups (kv_groups,), keep neurons (neurons,)) per block; default `model.decoder_keep` (set
    by `structured_decoder_oneshot(..., remove=False)`), else every group whose output-side columns are all
    zero. Records the result in `model.structure` (`decoder_structure_of`), which `save_structured` writes.
    """
    blocks = decoder_blocks(model)
    masks = masks if masks is not None else getattr(model, "decoder_keep", None)
    if masks is None or len(masks) != len(blocks):
        masks = [inferred_decoder_keep(block) for block in blocks]
    for block, (keep_kv, keep_neurons) in zip(blocks, masks):
        if keep_kv.numel() != block.kv_groups or keep_neurons.numel() != block.neurons:
            raise ValueError(f"{block.name}: masks of {keep_kv.numel()} key/value groups / {keep_neurons.numel()} "
                             f"neurons for a layer of {block.kv_groups} / {block.neurons} (already removed?)")
        _shrink_attention(block, keep_kv.bool().cpu())
        _shrink_mlp(block, keep_neurons.bool().cpu())
        block.record_widths()
    model.decoder_keep = None
    model.structure = decoder_structure_of(model)
    return model
