"""Physical removal: fold the final gate values into the weights, then slice out what they zeroed.

Folding (exact for the function of `hooks`): z_width scales the input columns of the attention output /
FFN output dense, z_layer·z_hidden its rows and bias; z_hidden scales the three embedding tables (it acts
before their LayerNorm) and the weight and bias of every LayerNorm (it acts after them). Slicing then drops
heads and neurons whose gate is 0 (as `--method structured` does), hidden dims whose gate is 0 from every
matrix, embedding, LayerNorm, the pooler's and the head's inputs, and removed sub-layers, which become
`SkippedSublayer` (no residual branch, no LayerNorm, as CoFi's model skips them). The result is a plain
smaller model computing what the gated one computed (`cofi_structure` records its shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from losparse.core.layers import LoSparseLinear
from losparse.core.slicing import scale_, select
from losparse.methods.cofi.units import Shape, hidden_readers
from losparse.methods.structured.blocks import EncoderBlock, NoSelfAttention, encoder_blocks
from losparse.methods.structured.removal import new_linear, slice_linear


class SkippedSublayer(nn.Module):
    """A removed MHA or FFN sub-layer's output module: returns the residual input unchanged.

    `dense` is an empty (0 → H) matrix so the layer still reads as one of 0 heads / 0 neurons.
    """

    def __init__(self, hidden: int, like: torch.Tensor) -> None:
        super().__init__()
        self.dense = new_linear(0, hidden, False, like)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor


@dataclass
class Keep:
    """What removal keeps: hidden dim indices (None: all), per layer the kept heads / neurons (bool) and
    whether the MHA / FFN sub-layer stays."""

    hidden: Optional[torch.Tensor]
    heads: list[torch.Tensor]
    attention: list[bool]
    neurons: list[torch.Tensor]
    ffn: list[bool]


def sliced_linear(linear: nn.Module, rows: Optional[torch.Tensor] = None,
                  columns: Optional[torch.Tensor] = None) -> nn.Module:
    """A copy of `linear` keeping the output rows `rows` and input columns `columns` (indices; None: all).

    A training-form `LoSparseLinear` (`--method cofi_losparse`) is sliced part by part (`losparse.core.slicing`).
    """
    if isinstance(linear, LoSparseLinear):
        return select(linear, rows, columns)
    return slice_linear(linear, rows, columns)


def keep_from_gates(gates: Mapping[str, Optional[torch.Tensor]], shape: Shape) -> Keep:
    """The units final gates keep (a unit is kept where its gate is not 0)."""
    def rows(unit: str, width: int) -> list[torch.Tensor]:
        value = gates.get(unit)
        return [row.detach().cpu() != 0 for row in value] if value is not None else \
            [torch.ones(width, dtype=torch.bool)] * shape.layers

    hidden = gates.get("hidden")
    kept_hidden = None
    if hidden is not None and not bool((hidden != 0).all()):
        kept_hidden = torch.nonzero(hidden.reshape(-1).cpu()).flatten()
    return Keep(kept_hidden, rows("head", shape.heads), [bool(r[0]) for r in rows("mha_layer", 1)],
                rows("neuron", shape.neurons), [bool(r[0]) for r in rows("ffn_layer", 1)])


@torch.no_grad()
def fold_gates(model: nn.Module, gates: Mapping[str, Optional[torch.Tensor]], head_size: int) -> None:
    """Multiply the final gate values into the weights (in place), so the model without hooks computes the same."""
    hidden = gates.get("hidden")
    hidden = hidden.reshape(-1) if hidden is not None else None
    embeddings = model.base_model.embeddings
    if hidden is not None:
        for table in (embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings):
            table.weight.mul_(hidden.to(table.weight))
        _scale_norm(embeddings.LayerNorm, hidden)
    for index, block in enumerate(encoder_blocks(model, decomposed_ok=True)):
        head = gates.get("head")
        width = head[index].repeat_interleave(head_size) if head is not None else None
        neuron = gates.get("neuron")
        for dense, width_z, layer_z, residual in (
                (block.attention_output, width, gates.get("mha_layer"), block.layer.attention.output),
                (block.ffn_output, neuron[index] if neuron is not None else None, gates.get("ffn_layer"),
                 block.layer.output)):
            rows = torch.ones(dense.out_features, device=next(dense.parameters()).device)
            rows = rows * layer_z[index].to(rows) if layer_z is not None else rows
            rows = rows * hidden.to(rows) if hidden is not None else rows
            _scale_dense(dense, rows, width_z)
            if hidden is not None:
                _scale_norm(residual.LayerNorm, hidden)


def _scale_dense(dense: nn.Module, rows: torch.Tensor, columns: Optional[torch.Tensor]) -> None:
    """Rows (and bias) of the matrix times `rows`, its input columns times `columns`: plain or decomposed."""
    if isinstance(dense, LoSparseLinear):
        scale_(dense, rows, columns)
        return
    if columns is not None:
        dense.weight.mul_(columns.to(dense.weight)[None, :])
    dense.weight.mul_(rows.to(dense.weight)[:, None])
    if dense.bias is not None:
        dense.bias.mul_(rows.to(dense.bias))


def _scale_norm(norm: nn.LayerNorm, scale: torch.Tensor) -> None:
    norm.weight.mul_(scale.to(norm.weight))
    norm.bias.mul_(scale.to(norm.bias))


def _slice_norm(norm: nn.LayerNorm, index: torch.Tensor) -> None:
    index = index.to(norm.weight.device)
    norm.weight = nn.Parameter(norm.weight.detach()[index].clone())
    norm.bias = nn.Parameter(norm.bias.detach()[index].clone())
    norm.normalized_shape = (index.numel(),)


def _slice_embeddings(model: nn.Module, hidden: torch.Tensor) -> None:
    embeddings = model.base_model.embeddings
    for table in (embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings):
        table.weight = nn.Parameter(table.weight.detach()[:, hidden.to(table.weight.device)].clone())
        table.embedding_dim = hidden.numel()
    _slice_norm(embeddings.LayerNorm, hidden)
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        pooler.dense = sliced_linear(pooler.dense, columns=hidden)
    for name in hidden_readers(model):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, sliced_linear(getattr(owner, child), columns=hidden))


def _slice_attention(block: EncoderBlock, heads: torch.Tensor, present: bool, hidden: Optional[torch.Tensor]) -> None:
    attention, width = block.layer.attention, block.hidden_size if hidden is None else hidden.numel()
    like = block.attention_output.weight
    if not present:
        attention.self, attention.output = NoSelfAttention(), SkippedSublayer(width, like)
        return
    rows = torch.nonzero(heads.repeat_interleave(block.head_size)).flatten()
    if rows.numel() == 0:
        attention.self = NoSelfAttention()
    else:
        for name in ("query", "key", "value"):
            setattr(attention.self, name, sliced_linear(getattr(attention.self, name), rows=rows, columns=hidden))
        attention.self.num_attention_heads = int(heads.sum())
        attention.self.all_head_size = rows.numel()
    attention.output.dense = sliced_linear(block.attention_output, rows=hidden, columns=rows)
    if hidden is not None:
        _slice_norm(attention.output.LayerNorm, hidden)


def _slice_ffn(block: EncoderBlock, neurons: torch.Tensor, present: bool, hidden: Optional[torch.Tensor]) -> None:
    layer, width = block.layer, block.hidden_size if hidden is None else hidden.numel()
    like = block.ffn_output.weight
    if not present:
        layer.intermediate.dense = new_linear(width, 0, block.intermediate.bias is not None, like)
        layer.output = SkippedSublayer(width, like)
        return
    index = torch.nonzero(neurons).flatten()
    layer.intermediate.dense = sliced_linear(block.intermediate, rows=index, columns=hidden)
    layer.output.dense = sliced_linear(block.ffn_output, rows=hidden, columns=index)
    if hidden is not None:
        _slice_norm(layer.output.LayerNorm, hidden)


@torch.no_grad()
def slice_units(model: nn.Module, keep: Keep) -> nn.Module:
    """Remove what `keep` does not keep from `model` (in place; returns it); the weights kept are unchanged."""
    blocks = encoder_blocks(model, decomposed_ok=True)
    for index, block in enumerate(blocks):
        _slice_attention(block, keep.heads[index], keep.attention[index], keep.hidden)
        _slice_ffn(block, keep.neurons[index], keep.ffn[index], keep.hidden)
    if keep.hidden is not None:
        _slice_embeddings(model, keep.hidden)
    model.structure = cofi_structure(model)
    return model


def cofi_structure(model: nn.Module) -> dict[str, Any]:
    """The kept shape of a CoFi-pruned model: hidden size, and per layer heads, FFN width, sub-layers present."""
    blocks = encoder_blocks(model, decomposed_ok=True)
    layers = []
    for block in blocks:
        layers.append({"name": block.name, "heads": block.heads if block.has_attention else 0,
                       "intermediate_size": block.neurons,
                       "attention": not isinstance(block.layer.attention.output, SkippedSublayer),
                       "ffn": not isinstance(block.layer.output, SkippedSublayer)})
    return {"format": 1, "head_size": blocks[0].head_size, "hidden_size": model.base_model.embeddings.LayerNorm
            .normalized_shape[0], "layers": layers}


def remove_pruned_units(pruner: Any) -> dict[str, Any]:
    """Fix the final gates of a `CofiPruner` (if pruning has not), unhook, fold and slice its model; the facts.

    Returns the ratio the gates keep (`mask_remaining_ratio`), the expected one (1 − ŝ) and the units the
    budget rule removed (`forced_units`).
    """
    pruner.finalize()
    gates = pruner.final_gates
    facts = {"mask_remaining_ratio": pruner.achieved_kept_fraction(), "forced_units": dict(pruner.forced),
             "cofi_units": list(pruner.units)}
    pruner.detach()
    fold_gates(pruner.model, gates, pruner.shape.head_size)
    slice_units(pruner.model, keep_from_gates(gates, pruner.shape))
    return facts
