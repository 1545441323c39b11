"""L_c = λ₁(ŝ − t) + λ₂(ŝ − t)²: λ ascends, log α descends, the target warms up linearly."""

import pytest
import torch
from cofi_testing import config, single_thread, tiny  # noqa: F401 (an autouse fixture)

from losparse.methods.cofi.lagrangian import Lagrangian
from losparse.methods.cofi.pruner import CofiPruner


def test_target_warms_up_linearly_then_stays():
    lagrangian = Lagrangian(0.8, warmup_steps=10)
    assert [lagrangian.target(s) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.4, 0.8, 0.8])
    assert Lagrangian(0.8, warmup_steps=0).target(0) == 0.8


def test_lambda_moves_in_the_ascent_direction_and_the_gates_toward_the_target():
    torch.manual_seed(0)
    pruner = CofiPruner(tiny(), config(remaining_ratio=0.1, reg_learning_rate=0.1, lagrangian_warmup_steps=0))
    pruner.plan(total_steps=100, num_train_epochs=1)
    before = {unit: float(p.detach().mean()) for unit, p in pruner.probabilities().items()}
    for step in range(1, 4):
        pruner.lagrangian_loss().backward()
        pruner.step(step)
    gap = pruner.last_terms["cofi_expected_sparsity"] - pruner.last_terms["cofi_target_sparsity"]
    assert gap < 0  # below the target: ascent makes λ₁ negative, λ₂ positive
    assert pruner.last_terms["cofi_lambda_1"] < 0 < pruner.last_terms["cofi_lambda_2"]
    after = {unit: float(p.detach().mean()) for unit, p in pruner.probabilities().items()}
    assert after["neuron"] < before["neuron"]  # with λ₁ < 0, L_c rewards sparsity
    assert pruner.optimizer.param_groups[1]["maximize"] and not pruner.optimizer.param_groups[0]["maximize"]
    assert all(g["weight_decay"] == 0.0 and g["lr"] == 0.1 for g in pruner.optimizer.param_groups)
