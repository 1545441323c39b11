import torch

from losparse.core.importance import NeuronImportance
from losparse.core.layers import LoSparseLinear


def _layer(out_features, in_features, prune_dim="rows", seed=0):
    torch.manual_seed(seed)
    layer = LoSparseLinear(in_features, out_features, rank=2, prune_dim=prune_dim)
    with torch.no_grad():
        layer.sparse.normal_()
    layer.sparse.grad = torch.randn_like(layer.sparse)
    return layer


def test_sensitivity_is_the_ema_of_neuron_means_of_abs_s_times_grad():
    rows, cols = _layer(4, 6), _layer(5, 3, prune_dim="columns", seed=1)
    tracker = NeuronImportance([rows, cols], beta1=0.5)
    first = [(rows.sparse * rows.sparse.grad).abs().mean(1), (cols.sparse * cols.sparse.grad).abs().mean(0)]
    tracker.update()
    expected = torch.cat(first) * 0.5
    assert torch.allclose(tracker.scores(), expected)
    rows.sparse.grad = torch.randn_like(rows.sparse)
    second = torch.cat([(rows.sparse * rows.sparse.grad).abs().mean(1), first[1]])
    tracker.update()
    assert torch.allclose(tracker.scores(), 0.5 * expected + 0.5 * second)
    assert [t.numel() for t in tracker.per_layer_scores()] == [4, 3]


def test_non_finite_gradients_leave_the_scores_unchanged():
    layer = _layer(4, 6)
    tracker = NeuronImportance([layer], beta1=0.85)
    tracker.update()
    before = tracker.scores().clone()
    layer.sparse.grad[0, 0] = float("inf")
    tracker.update()
    assert torch.equal(tracker.scores(), before)


def test_magnitude_and_uncertainty_variants():
    layer = _layer(4, 6)
    magnitude = NeuronImportance([layer], metric="magnitude")
    magnitude.update()
    assert torch.allclose(magnitude.scores(), layer.sparse.abs().mean(1))
    platon = NeuronImportance([layer], beta1=0.85, beta2=0.5)
    platon.update()
    ipt = (layer.sparse * layer.sparse.grad).abs()
    ema = 0.15 * ipt
    unc = 0.5 * (ipt - ema).abs()
    assert torch.allclose(platon.scores(), (ema * unc).mean(1), atol=1e-6)
    state = platon.state_dict()
    fresh = NeuronImportance([layer], beta1=0.85, beta2=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.scores(), platon.scores())
