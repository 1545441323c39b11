"""Kept size of the gated matrices: expected (from P(z ≠ 0)) or counted (from the final gates), one formula.

With keep values k (probabilities for the expectation, 0/1 indicators for the count) of shape
hidden (1, H), mha_layer (L, 1), head (L, heads), ffn_layer (L, 1), neuron (L, n):
    kept = Σ_i k_hidden[i] · ( 4·d · Σ_l,h k_mha[l]·k_head[l,h]  +  2 · Σ_l,j k_ffn[l]·k_neuron[l,j] )
since a head holds 4·H·d weights (rows of q, k, v, columns of the attention output) and a neuron 2·H
(a row of intermediate, a column of output), each scaled by the share of hidden dims kept. These are the
matrices `losparse.methods.structured.blocks` counts, so `kept / Shape.dense_params` is the project's
remaining ratio, and the expected sparsity of the Lagrangian is ŝ = 1 − E[kept] / dense.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from losparse.methods.cofi.units import COFI_UNITS, Shape


def full_keep(keep: Mapping[str, Optional[torch.Tensor]], shape: Shape) -> dict[str, torch.Tensor]:
    """`keep` with every unit present: an ungated unit keeps 1 everywhere."""
    like = next((v for v in keep.values() if v is not None), None)
    device = like.device if like is not None else None
    return {unit: keep[unit] if keep.get(unit) is not None else torch.ones(shape.unit_shape(unit), device=device)
            for unit in COFI_UNITS}


def kept_size(keep: Mapping[str, Optional[torch.Tensor]], shape: Shape) -> torch.Tensor:
    """() the kept weights of the gated matrices for keep values `keep` (differentiable; see the module docstring)."""
    k = {unit: v if v.is_floating_point() else v.double() for unit, v in full_keep(keep, shape).items()}
    heads = (k["mha_layer"] * k["head"]).sum()
    neurons = (k["ffn_layer"] * k["neuron"]).sum()
    return k["hidden"].sum() * (4 * shape.head_size * heads + 2 * neurons)


def counted_size(gates: Mapping[str, Optional[torch.Tensor]], shape: Shape) -> int:
    """Weights the removal keeps for final gate values (a unit is kept where its gate is not 0)."""
    indicators = {unit: (value != 0) for unit, value in gates.items() if value is not None}
    return round(float(kept_size(indicators, shape)))


def expected_sparsity(probabilities: Mapping[str, Optional[torch.Tensor]], shape: Shape) -> torch.Tensor:
    """() ŝ = 1 − E[kept] / dense, differentiable in the probabilities."""
    return 1 - kept_size(probabilities, shape) / shape.dense_params
