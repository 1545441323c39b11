"""The hard-concrete gate: P(z != 0) against Monte Carlo, the deterministic rule, the clamp, the initialisation."""

import math

import pytest
import torch
from cofi_testing import config, single_thread, tiny  # noqa: F401 (an autouse fixture)

from losparse.methods.cofi.masks import LOG_ALPHA_MAX, LOG_ALPHA_MIN, HardConcreteMask
from losparse.methods.cofi.pruner import CofiPruner


def test_prob_nonzero_matches_monte_carlo_and_the_closed_form():
    mask = HardConcreteMask(1, 5, 0.0)
    with torch.no_grad():
        mask.log_alpha.copy_(torch.tensor([[-3.0, -1.0, 0.0, 1.0, 3.0]]))
    torch.manual_seed(0)
    samples = torch.stack([mask.sample() for _ in range(20000)])
    assert samples.min() >= 0 and samples.max() <= 1 and (samples == 0).any() and (samples == 1).any()
    monte_carlo = (samples != 0).float().mean(dim=0)
    torch.testing.assert_close(monte_carlo, mask.prob_nonzero().detach(), atol=0.012, rtol=0)
    closed = torch.sigmoid(mask.log_alpha - 2 / 3 * math.log(0.1 / 1.1))
    torch.testing.assert_close(mask.prob_nonzero(), closed)


def test_samples_are_differentiable_in_log_alpha():
    mask = HardConcreteMask(2, 3, 0.0)
    mask.sample().sum().backward()
    assert mask.log_alpha.grad is not None and mask.log_alpha.grad.abs().sum() > 0


def test_deterministic_zeroes_the_expected_number_of_smallest_units_per_row():
    mask = HardConcreteMask(2, 6, 0.0)
    with torch.no_grad():
        mask.log_alpha.copy_(torch.tensor([[4.0, -4.0, 3.0, -3.0, 2.0, 4.5], [4.0] * 6]))
    z = mask.deterministic()
    expected_zeros = round(6 - float(mask.prob_nonzero()[0].sum().detach()))
    assert expected_zeros == 2 and (z[0] == 0).sum() == 2 and z[0, 1] == 0 and z[0, 3] == 0
    soft = torch.sigmoid(mask.log_alpha / (2 / 3) * 0.8)
    kept = z[0] != 0
    torch.testing.assert_close(z[0, kept], soft[0, kept])
    assert (z[1] != 0).all()  # P close to 1 everywhere: nothing zeroed


def test_clamp_keeps_log_alpha_in_the_reference_range():
    mask = HardConcreteMask(1, 3, 0.0)
    with torch.no_grad():
        mask.log_alpha.copy_(torch.tensor([[-50.0, 0.5, 50.0]]))
    mask.clamp_()
    assert mask.log_alpha.tolist()[0] == pytest.approx([LOG_ALPHA_MIN, 0.5, LOG_ALPHA_MAX])


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    pruner = CofiPruner(tiny(), config())
    for unit in ("hidden", "mha_layer", "head", "ffn_layer"):
        assert abs(float(pruner.masks[unit].log_alpha.detach().mean()) - 10) < 0.05
    neurons = pruner.masks["neuron"].log_alpha.detach()
    assert abs(float(neurons.mean())) < 0.01 and float(neurons.std()) < 0.02
    assert pruner.masks["head"].log_alpha.shape == (2, 4) and pruner.masks["hidden"].log_alpha.shape == (1, 32)
