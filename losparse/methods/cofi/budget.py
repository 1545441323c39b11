"""The ratio the user asked for, met: more units removed when the Lagrangian has not reached its target.

At the end of pruning the deterministic gates are counted (`size.counted_size`). If they keep more than
remaining_ratio of the gated matrices, the least likely units still kept — heads, FFN neurons and hidden
dims, by P(z ≠ 0) times that of their sub-layer gate — are removed one at a time until the count fits. The
count falls short of the budget by less than the last unit removed (a head, a neuron, or one hidden dim's
share). Only if that cannot reach the budget (the finer units are not gated, as CoFi + LoSparse's FFN
neurons are not) are whole sub-layers removed, least likely first. A count within budget is left as it is.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from losparse.methods.cofi.size import full_keep
from losparse.methods.cofi.units import Shape


def _candidates(gates: dict[str, torch.Tensor], probs: dict[str, torch.Tensor],
                gated: tuple[str, ...]) -> list[tuple[float, int, str, tuple[int, ...]]]:
    """(score, kind order, unit, index) of every kept unit that may still be removed."""
    found = []
    for order, (unit, layer_unit) in enumerate((("head", "mha_layer"), ("neuron", "ffn_layer"), ("hidden", None))):
        if unit not in gated:
            continue
        score = probs[unit] * (probs[layer_unit] if layer_unit else 1.0)
        alive = gates[unit] != 0
        if layer_unit:
            alive = alive & (gates[layer_unit] != 0)
        for index in torch.nonzero(alive).tolist():
            found.append((float(score[tuple(index)]), order, unit, tuple(index)))
    return sorted(found)


def meet_budget(gates: Mapping[str, Optional[torch.Tensor]], probs: Mapping[str, Optional[torch.Tensor]],
                shape: Shape, remaining_ratio: float, gated: tuple[str, ...]) -> tuple[dict, dict[str, int]]:
    """Gates (a copy) whose counted size is ≤ remaining_ratio · dense, and how many units of each kind it removed."""
    g = {unit: value.detach().clone().cpu() for unit, value in full_keep(gates, shape).items()}
    p = {unit: value.detach().float().cpu() for unit, value in full_keep(probs, shape).items()}
    budget = remaining_ratio * shape.dense_params
    hidden = int((g["hidden"] != 0).sum())
    heads = int(((g["mha_layer"] != 0) & (g["head"] != 0)).sum())
    neurons = int(((g["ffn_layer"] != 0) & (g["neuron"] != 0)).sum())
    removed = {"head": 0, "neuron": 0, "hidden": 0}

    def size() -> int:
        return hidden * (4 * shape.head_size * heads + 2 * neurons)

    if size() > budget:
        for _, _, unit, index in _candidates(g, p, gated):
            if size() <= budget:
                break
            g[unit][index] = 0
            removed[unit] += 1
            hidden -= unit == "hidden"
            heads -= unit == "head"
            neurons -= unit == "neuron"
    if size() > budget:
        _remove_sublayers(g, p, shape, budget, gated, removed)
    result = {unit: (g[unit].to(gates[unit].device) if gates.get(unit) is not None else None) for unit in g}
    return result, removed


def _remove_sublayers(g: dict[str, torch.Tensor], p: dict[str, torch.Tensor], shape: Shape, budget: float,
                      gated: tuple[str, ...], removed: dict[str, int]) -> None:
    """The last resort when the finer units cannot meet the budget (e.g. CoFi + LoSparse gates no FFN neuron):
    whole MHA / FFN sub-layers, least likely first, until the count fits (in place; counted in `removed`)."""
    def size() -> int:
        hidden = int((g["hidden"] != 0).sum())
        heads = int(((g["mha_layer"] != 0) & (g["head"] != 0)).sum())
        neurons = int(((g["ffn_layer"] != 0) & (g["neuron"] != 0)).sum())
        return hidden * (4 * shape.head_size * heads + 2 * neurons)

    candidates = sorted((float(p[unit][layer, 0]), unit, layer) for unit in ("mha_layer", "ffn_layer")
                        if unit in gated for layer in range(shape.layers) if g[unit][layer, 0] != 0)
    for _, unit, layer in candidates:
        if size() <= budget:
            return
        g[unit][layer, 0] = 0
        removed[unit] = removed.get(unit, 0) + 1
