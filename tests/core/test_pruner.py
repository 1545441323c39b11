import pytest
import torch
from torch import nn

from losparse import LoSparseConfig, LoSparsePruner, LoSparseUsageError, apply


class TwoLayers(nn.Module):
    """A 16->16 and a 16->64 layer: rows of the second hold the same 16 params, columns differ."""

    def __init__(self):
        super().__init__()
        self.small = nn.Linear(16, 16)
        self.wide = nn.Linear(16, 64)


def _model(prune_dim="rows", **config):
    torch.manual_seed(0)
    model = TwoLayers()
    values = dict(remaining_ratio=0.5, low_rank_ratio=0.1, target_modules=["small", "wide"], prune_dim=prune_dim)
    values.update(config)
    return apply(model, LoSparseConfig(**values))


def test_final_kept_fraction_completes_the_remaining_ratio():
    model = _model()
    pruner = LoSparsePruner(model, total_steps=100)
    low_rank = sum(m.rank * (m.in_features + m.out_features) for m in pruner.layers) / (16 * 16 + 16 * 64)
    assert pruner.final_kept_fraction == pytest.approx(0.5 - low_rank)


@pytest.mark.parametrize("prune_dim", ["rows", "columns"])
def test_global_threshold_counts_parameters_and_zeroes_whole_neurons(prune_dim):
    model = _model(prune_dim)
    pruner = LoSparsePruner(model, total_steps=100)
    for layer in pruner.layers:
        layer.sparse.grad = torch.rand_like(layer.sparse)
    pruner.importance.update()
    pruner.update_masks(0.3)
    kept = pruner.achieved_kept_fraction()
    biggest_neuron = max(layer.neuron_size for layer in pruner.layers) / pruner.total_sparse_params
    assert 0.3 - biggest_neuron <= kept <= 0.3 + 1e-9
    for layer in pruner.layers:
        pruned = ~layer.sparse_mask
        zero = layer.sparse[pruned] if prune_dim == "rows" else layer.sparse[:, pruned].T
        assert torch.count_nonzero(zero) == 0
    scores = pruner.importance.scores()
    masks = torch.cat([layer.sparse_mask for layer in pruner.layers])
    assert scores[masks].min() >= scores[~masks].max()


def test_steps_follow_the_schedule_and_end_at_p_T():
    model = _model()
    pruner = LoSparsePruner(model, total_steps=40)
    for step in range(1, 41):
        for layer in pruner.layers:
            layer.sparse.grad = torch.rand_like(layer.sparse)
        pruner.step(step)
        if step < pruner.schedule.warmup_steps:
            assert all(layer.sparse_mask.all() for layer in pruner.layers)
    biggest_neuron = 16 / pruner.total_sparse_params
    assert pruner.achieved_kept_fraction() == pytest.approx(pruner.final_kept_fraction, abs=biggest_neuron)


def test_rounded_up_ranks_that_eat_the_budget_are_reported():
    model = _model(remaining_ratio=0.2, low_rank_ratio=0.19)
    with pytest.raises(LoSparseUsageError, match="leaves nothing for the sparse part"):
        LoSparsePruner(model, total_steps=10)


def _five_neurons(variant):
    """Rows of 2, 2, 2 (layer a) and 4, 4 (layer b) parameters: 14 entries of S, no low-rank part."""
    from losparse.core.layers import LoSparseLinear

    model = nn.Module()
    model.a, model.b = LoSparseLinear(2, 3, rank=0), LoSparseLinear(4, 2, rank=0)
    with torch.no_grad():
        model.a.sparse.fill_(1.0)
        model.b.sparse.fill_(1.0)
    config = LoSparseConfig(method="itp", remaining_ratio=0.5, pruning_warmup_steps=1, pruning_final_steps=1,
                            pruning_variant=variant)
    return LoSparsePruner(model, total_steps=10, config=config)


def _kept(pruner, scores, fraction):
    pruner.importance.neuron_ema.copy_(torch.tensor(scores))
    pruner.update_masks(fraction)
    return torch.cat([layer.sparse_mask for layer in pruner.layers]).tolist()


def test_reference_keep_rule_is_score_at_least_the_kth_smallest_entry():
    pruner = _five_neurons("reference")
    # p = 0.5: k = int(14 · 0.5) = 7. Entry scores ascending: 1 1 2 2 3 3 4 4 4 4 5 5 5 5 -> 7th = 4.
    assert _kept(pruner, [1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == [False, False, False, True, True]
    assert pruner.achieved_kept_fraction() == 8 / 14  # >= p
    # ties at the threshold are all kept: 1 1 4 4 4 4 4 4 4 4 5 5 5 5 -> 7th = 4, keeps 12 of 14
    assert _kept(pruner, [1.0, 4.0, 4.0, 4.0, 5.0], 0.5) == [False, True, True, True, True]
    # p = 0.95: k = int(14 · 0.05) = 0 -> everything kept; p = 0: everything pruned
    assert all(_kept(pruner, [1.0, 2.0, 3.0, 4.0, 5.0], 0.95))
    assert not any(_kept(pruner, [1.0, 2.0, 3.0, 4.0, 5.0], 0.0))
    assert torch.count_nonzero(pruner.layers[0].sparse) == 0


def test_paper_keep_rule_on_the_same_scores():
    pruner = _five_neurons("paper")
    # best first: b1 (4 params, total 4 <= 7.5), then b0 would make 8 > 7.5: the prefix stops there
    assert _kept(pruner, [1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == [False, False, False, False, True]
    # ties are taken in neuron order: b1 (4), a1 (6), then a2 would make 8 > 7.5
    assert _kept(pruner, [1.0, 4.0, 4.0, 4.0, 5.0], 0.5) == [False, True, False, False, True]
