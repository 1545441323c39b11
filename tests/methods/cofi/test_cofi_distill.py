"""CoFi's layer distillation: the teacher layers, the backward alignment over present layers, the projection."""

import torch

from losparse.methods.cofi.distill import LayerProjection, layer_alignment, layer_loss, teacher_layers


def test_teacher_layers_generalise_the_reference():
    assert teacher_layers(12) == [2, 5, 8, 11]
    assert teacher_layers(6) == [2, 5] and teacher_layers(24)[-1] == 23 and len(teacher_layers(24)) == 8
    assert teacher_layers(2) == [1] and teacher_layers(1) == [0]


def test_alignment_goes_backwards_below_the_previous_match_over_present_layers():
    losses = torch.tensor([[0.1, 0.5, 0.9, 0.2],
                           [0.9, 0.8, 0.1, 0.05]])
    assert layer_alignment(losses, None) == [(0, 0), (1, 3)]
    assert layer_alignment(losses, [True, True, True, False]) == [(0, 0), (1, 2)]
    assert layer_alignment(losses, [False, True, True, False]) == [(0, 1), (1, 2)]
    assert layer_alignment(losses, [False, False, True, False]) == [(1, 2)]  # nothing left below layer 2


def test_layer_loss_of_identical_states_is_zero_and_the_projection_starts_as_identity():
    projection = LayerProjection(4, 4, torch.zeros(1))
    x = torch.randn(2, 3, 4)
    assert torch.equal(projection(x), x)
    hidden = [torch.randn(2, 3, 4) for _ in range(5)]
    loss, pairs = layer_loss(hidden, hidden, projection)
    assert float(loss.detach()) == 0.0 and pairs == [(3, 3)]
    loss.backward()
    assert projection.weight.grad is not None
