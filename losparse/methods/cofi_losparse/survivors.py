"""Which rows of S survive the current CoFi gates: the LoSparse budget is a share of those (Appendix F).

With `--prune_dim rows` a neuron of S is an output row of one matrix. Per encoder layer l:
    q, k, v rows          belong to a head:       alive iff head[l, row // d] and mha_layer[l]
    attention output rows  are hidden dims:        alive iff mha_layer[l], hidden[row] and a head of l is kept
    intermediate rows      are FFN neurons:        alive iff ffn_layer[l] (and neuron[l, row] when gated)
    output rows            are hidden dims:        alive iff ffn_layer[l] and hidden[row]
A gate that is not trained counts as 1.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from losparse.core.layers import LoSparseLinear
from losparse.methods.structured.blocks import encoder_blocks


def neuron_roles(model: nn.Module, layers: Sequence[LoSparseLinear]) -> list[tuple[int, str]]:
    """(layer index, role) of each LoSparse layer: "head", "mha_out", "ffn_in" or "ffn_out"."""
    role_of: dict[int, tuple[int, str]] = {}
    for index, block in enumerate(encoder_blocks(model, decomposed_ok=True)):
        for linear in block.qkv:
            role_of[id(linear)] = (index, "head")
        role_of[id(block.attention_output)] = (index, "mha_out")
        role_of[id(block.intermediate)] = (index, "ffn_in")
        role_of[id(block.ffn_output)] = (index, "ffn_out")
    missing = [layer for layer in layers if id(layer) not in role_of]
    if missing:
        raise ValueError(f"{len(missing)} decomposed layers are not q, k, v, attention output, intermediate or output")
    return [role_of[id(layer)] for layer in layers]


def _nonzero(gate: Optional[torch.Tensor], index: int) -> Optional[torch.Tensor]:
    return None if gate is None else gate[index].reshape(-1) != 0


def alive_neurons(roles: Sequence[tuple[int, str]], layers: Sequence[LoSparseLinear],
                  gates: Mapping[str, Optional[torch.Tensor]], head_size: int) -> torch.Tensor:
    """(Σ rows,) bool: the S rows of `layers` (in order) that the gates keep (module docstring)."""
    hidden = gates.get("hidden")
    hidden = hidden.reshape(-1) != 0 if hidden is not None else None
    parts = []
    for (index, role), layer in zip(roles, layers):
        alive = torch.ones(layer.out_features, dtype=torch.bool, device=layer.sparse_mask.device)
        heads = _nonzero(gates.get("head"), index)
        factors = {
            "head": [heads.repeat_interleave(head_size) if heads is not None else None,
                     _nonzero(gates.get("mha_layer"), index)],
            "mha_out": [_nonzero(gates.get("mha_layer"), index), hidden,
                        heads.any().expand(layer.out_features) if heads is not None else None],
            "ffn_in": [_nonzero(gates.get("ffn_layer"), index), _nonzero(gates.get("neuron"), index)],
            "ffn_out": [_nonzero(gates.get("ffn_layer"), index), hidden],
        }[role]
        for factor in factors:
            if factor is not None:
                alive &= factor.to(alive.device)
        parts.append(alive)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
