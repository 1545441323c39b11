"""At the end of pruning the ratio asked for is met, within one unit, by removing the least likely units."""

import logging

import torch
from cofi_testing import gated_pruner, single_thread, tiny  # noqa: F401 (an autouse fixture)

from losparse.methods.cofi.budget import meet_budget
from losparse.methods.cofi.size import counted_size
from losparse.methods.cofi.units import COFI_UNITS, Shape


def test_budget_is_met_within_one_unit_removing_the_least_likely_first():
    shape = Shape(layers=2, heads=4, head_size=8, neurons=48, hidden=32)
    generator = torch.Generator().manual_seed(0)
    probs = {unit: torch.rand(shape.unit_shape(unit), generator=generator) for unit in COFI_UNITS}
    gates = {unit: torch.ones(shape.unit_shape(unit)) for unit in COFI_UNITS}
    new, removed = meet_budget(gates, probs, shape, 0.4, COFI_UNITS)
    kept = counted_size(new, shape)
    biggest_unit = 4 * 32 * 8
    assert 0.4 * shape.dense_params - biggest_unit < kept <= 0.4 * shape.dense_params
    assert sum(removed.values()) > 0 and all((new[u] == 0).sum() == removed[u] for u in removed)
    head_score = probs["head"] * probs["mha_layer"]
    assert head_score[new["head"] == 0].max() <= head_score[new["head"] != 0].min()
    assert (new["mha_layer"] != 0).all() and (new["ffn_layer"] != 0).all()  # whole sub-layers are never forced
    same, none = meet_budget(gates, probs, shape, 1.0, COFI_UNITS)
    assert sum(none.values()) == 0 and all(torch.equal(same[u], gates[u]) for u in COFI_UNITS)


def test_finalize_forces_the_budget_and_says_so(caplog):
    pruner = gated_pruner(tiny(), seed=3, remaining_ratio=0.05)
    assert pruner.achieved_kept_fraction() > 0.05
    with caplog.at_level(logging.WARNING, logger="losparse.methods.cofi.pruner"):
        pruner.finalize()
    assert "had not reached the target" in caplog.text
    assert 0.05 - 4 * 32 * 8 / pruner.shape.dense_params < pruner.achieved_kept_fraction() <= 0.05
    assert pruner.stage() == "finetune" and pruner.gates_for(True) is pruner.final_gates


def test_without_neuron_gates_whole_ffn_sublayers_are_the_last_resort():
    shape = Shape(layers=2, heads=4, head_size=8, neurons=48, hidden=32)
    units = ("mha_layer", "head", "ffn_layer")  # CoFi + LoSparse's gates: no FFN neuron gate
    probs = {unit: torch.full(shape.unit_shape(unit), 0.9) for unit in units}
    probs["ffn_layer"][1, 0] = 0.2
    gates = {unit: torch.ones(shape.unit_shape(unit)) for unit in units}
    new, removed = meet_budget(gates, probs, shape, 0.2, units)
    assert counted_size(new, shape) <= 0.2 * shape.dense_params
    assert removed["head"] == 8 and removed["ffn_layer"] >= 1 and new["ffn_layer"][1, 0] == 0  # least likely first
