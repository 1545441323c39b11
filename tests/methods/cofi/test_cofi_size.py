"""Expected size = counted size = the project's count of the removed model, when all P are 0 or 1."""

import pytest
import torch
from cofi_testing import batch, gated_pruner, single_thread, tiny  # noqa: F401 (an autouse fixture)

from losparse.methods.cofi.removal import remove_pruned_units
from losparse.methods.cofi.size import counted_size, expected_sparsity, kept_size
from losparse.methods.cofi.units import Shape, model_shape
from losparse.methods.structured.blocks import encoder_blocks, target_params


def test_dense_count_is_the_structured_count():
    model = tiny()
    shape = model_shape(model)
    assert shape == Shape(2, 4, 8, 48, 32)
    assert shape.dense_params == target_params(encoder_blocks(model)) == 2 * (4 * 32 * 32 + 2 * 32 * 48)
    assert float(expected_sparsity({}, shape)) == 0.0


def test_expected_size_with_zero_one_probabilities_is_the_count_of_the_removed_model():
    model = tiny()
    pruner = gated_pruner(model, seed=2)
    gates = pruner.deterministic_gates()
    indicators = {unit: (g != 0).float() for unit, g in gates.items()}
    expected = float(kept_size(indicators, pruner.shape))
    assert expected == counted_size(gates, pruner.shape)
    remove_pruned_units(pruner)
    assert target_params(encoder_blocks(model)) == expected
    assert model(**batch()).logits.shape == (3, 3)


def test_expected_size_is_the_product_of_the_probabilities():
    shape = Shape(layers=2, heads=2, head_size=4, neurons=3, hidden=8)
    probs = {"hidden": torch.full((1, 8), 0.5), "mha_layer": torch.tensor([[1.0], [0.5]]),
             "head": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "ffn_layer": torch.ones(2, 1),
             "neuron": torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]])}
    heads = 1.0 + 0.5 * 2
    neurons = 1.5
    assert float(kept_size(probs, shape)) == pytest.approx(4.0 * (4 * 4 * heads + 2 * neurons))
    assert float(kept_size({}, shape)) == shape.dense_params
