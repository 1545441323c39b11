"""LPAF building blocks (losparse/methods/lpaf/factorize.py): entry scores, unstructured masks, sparsity-aware SVD,
effective rank, mixed-rank schedule and nested truncation. Pure torch, small matrices, a few seconds."""

from __future__ import annotations

import pytest
import torch

from benchmarks.lpaf_experiment import fine_tune_and_prune, pruned_test_matrix
from losparse.methods.lpaf.factorize import (
    effective_rank,
    entropy_effective_rank,
    factorization_weights,
    first_order_scores,
    low_rank_product,
    magnitude_scores,
    mixed_rank_bound,
    sample_mixed_rank,
    sensitivity_scores,
    sparsity_aware_factorize,
    svd_factors,
    truncate_factors,
    unstructured_keep_mask,
    weighted_reconstruction_error,
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- scores

def test_first_order_scores_accumulate_minus_w_times_grad_in_place():
    g = _generator(0)
    w1, g1, w2, g2 = (torch.randn(3, 4, generator=g) for _ in range(4))
    q = first_order_scores(w1, g1)
    torch.testing.assert_close(q, -w1 * g1)
    same = first_order_scores(w2, g2, q)
    assert same is q
    torch.testing.assert_close(q, -w1 * g1 - w2 * g2)
    before = q.clone()
    first_order_scores(w2, torch.full_like(g2, float("inf")), q)  # an overflow step is skipped
    torch.testing.assert_close(q, before)
    with pytest.raises(ValueError):
        first_order_scores(w1, torch.zeros(4, 3))


def test_magnitude_and_sensitivity_scores():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    grad = torch.tensor([[3.0, 1.0], [-4.0, 9.0]])
    torch.testing.assert_close(magnitude_scores(w), w.abs())
    torch.testing.assert_close(sensitivity_scores(w, grad), torch.tensor([[3.0, 2.0], [2.0, 0.0]]))


# ------------------------------------------------------------------------------------- unstructured mask

def test_keep_mask_keeps_the_top_entries_of_one_matrix():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, float("nan"), 0.3]])
    mask = unstructured_keep_mask(scores, 0.5)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == scores.shape
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert not unstructured_keep_mask(scores, 0.0).any()
    assert unstructured_keep_mask(scores, 1.0).all()


def test_keep_mask_is_global_over_matrices_and_counts_parameters():
    g = _generator(1)
    small = torch.rand(4, 8, generator=g)           # 32 entries, scores in [0, 1)
    big = torch.rand(16, 24, generator=g) + 1.0     # 384 entries, all higher
    masks = unstructured_keep_mask([small, big], 0.5)
    total = small.numel() + big.numel()
    assert sum(int(m.sum()) for m in masks) == round(0.5 * total)
    assert not masks[0].any()  # global: the better matrix takes the whole budget
    assert masks[1].sum() == round(0.5 * total)
    per_matrix = [unstructured_keep_mask(t, 0.3) for t in (small, big)]
    assert [int(m.sum()) for m in per_matrix] == [round(0.3 * 32), round(0.3 * 384)]


def test_keep_mask_breaks_ties_deterministically():
    scores = [torch.ones(2, 3), torch.ones(3)]
    masks = unstructured_keep_mask(scores, 4 / 9)
    assert masks[0].reshape(-1).tolist() == [True, True, True, True, False, False]
    assert not masks[1].any()


# ----------------------------------------------------------------------------------- sparsity-aware SVD

@pytest.mark.parametrize("method", ["em", "als"])
def test_sparsity_aware_svd_beats_plain_svd_on_the_kept_entries(method):
    pruned, mask = pruned_test_matrix()
    weights = mask.float()
    rank = 4
    plain_u, plain_v = svd_factors(pruned, rank)
    plain = weighted_reconstruction_error(pruned, weights, plain_u, plain_v)
    u, v, history = sparsity_aware_factorize(pruned, mask, rank, iterations=30, method=method,
                                             return_history=True)
    assert u.shape == (40, rank) and v.shape == (rank, 30) and u.dtype == pruned.dtype
    final = weighted_reconstruction_error(pruned, weights, u, v)
    assert history[0] == pytest.approx(plain, rel=1e-5)  # the init is the plain SVD
    assert final <= history[0]
    assert final == pytest.approx(min(history), rel=1e-4)
    assert final < 0.7 * plain, (final, plain)


def test_em_iteration_never_increases_the_objective():
    pruned, mask = pruned_test_matrix(seed=2)
    importance = torch.rand(pruned.shape, generator=_generator(3))
    weights = factorization_weights(mask, importance)
    _, _, history = sparsity_aware_factorize(pruned, weights, 5, iterations=25, method="em", return_history=True)
    for before, after in zip(history, history[1:]):
        assert after <= before * (1 + 1e-5) + 1e-8


def test_sparsity_aware_factors_are_ordered_and_balanced():
    pruned, mask = pruned_test_matrix(seed=4)
    u, v = sparsity_aware_factorize(pruned, mask, 6, iterations=10, method="als")
    column_norms, row_norms = u.norm(dim=0), v.norm(dim=1)
    torch.testing.assert_close(column_norms, row_norms, rtol=1e-4, atol=1e-5)  # √σ on both sides
    assert torch.all(column_norms[:-1] >= column_norms[1:] - 1e-5)           # σ decreasing
    torch.testing.assert_close(u.T @ u, torch.diag(column_norms.square()), rtol=1e-3, atol=1e-3)


def test_factorization_weights():
    mask = torch.tensor([[True, False], [True, True]])
    torch.testing.assert_close(factorization_weights(mask), mask.float())
    importance = torch.tensor([[2.0, 5.0], [-1.0, 1.0]])
    weights = factorization_weights(mask, importance)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    with_pruned = factorization_weights(mask, pruned_weight=0.25, normalize=False)
    torch.testing.assert_close(with_pruned, torch.tensor([[1.0, 0.25], [1.0, 1.0]]))


def test_full_weights_reduce_to_the_plain_svd():
    pruned, _ = pruned_test_matrix(seed=5)
    u, v = sparsity_aware_factorize(pruned, torch.ones_like(pruned), 3, iterations=5)
    plain_u, plain_v = svd_factors(pruned, 3)
    torch.testing.assert_close(u @ v, plain_u @ plain_v, rtol=1e-4, atol=1e-4)


def test_sparsity_aware_svd_rejects_bad_input():
    pruned, mask = pruned_test_matrix()
    with pytest.raises(ValueError):
        sparsity_aware_factorize(pruned, mask, 0)
    with pytest.raises(ValueError):
        sparsity_aware_factorize(pruned, mask.T, 2)
    with pytest.raises(ValueError):
        sparsity_aware_factorize(pruned, -mask.float(), 2)
    with pytest.raises(ValueError):
        sparsity_aware_factorize(pruned, mask, 2, method="newton")


# -------------------------------------------------------------------------------------- effective rank

def test_effective_rank_by_energy():
    matrix = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))  # σ² = 9, 4, 1, 0 of 14
    assert effective_rank(matrix, 0.5) == 1
    assert effective_rank(matrix, 13 / 14) == 2
    assert effective_rank(matrix, 0.95) == 3
    assert effective_rank(matrix, 1.0) == 3
    assert effective_rank(torch.zeros(3, 3)) == 0
    with pytest.raises(ValueError):
        effective_rank(matrix, 0.0)


def test_entropy_effective_rank():
    assert entropy_effective_rank(torch.eye(5)) == pytest.approx(5.0)
    g = _generator(6)
    rank_one = torch.randn(6, 1, generator=g) @ torch.randn(1, 4, generator=g)
    assert entropy_effective_rank(rank_one) == pytest.approx(1.0, abs=1e-4)
    assert entropy_effective_rank(torch.zeros(2, 2)) == 0.0
    assert 1.0 < entropy_effective_rank(torch.diag(torch.tensor([2.0, 1.0]))) < 2.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_order_pruning_leaves_a_lower_effective_rank_than_magnitude_pruning(seed):
    first_order, magnitude, _ = fine_tune_and_prune(seed)
    assert int((first_order != 0).sum()) == int((magnitude != 0).sum())
    assert effective_rank(first_order, 0.9) < effective_rank(magnitude, 0.9)
    assert entropy_effective_rank(first_order) < 0.95 * entropy_effective_rank(magnitude)


# ------------------------------------------------------------------------------------------ mixed rank

def test_mixed_rank_bound_anneals_from_max_to_target():
    r, big, total, final, warm = 4, 20, 100, 30, 10
    bounds = [mixed_rank_bound(t, r, big, total, final, warm) for t in range(1, total + 1)]
    assert bounds[0] == big and bounds[warm - 2] == big
    assert mixed_rank_bound(warm, r, big, total, final, warm) == big
    assert all(b == r for b in bounds[total - final - 1:])
    assert all(a >= b for a, b in zip(bounds, bounds[1:]))
    assert all(r <= b <= big for b in bounds)
    with pytest.raises(ValueError):
        mixed_rank_bound(1, 5, 4, total, final)
    with pytest.raises(ValueError):
        mixed_rank_bound(1, r, big, 10, 8, 5)


def test_sample_mixed_rank_is_in_range_deterministic_and_ends_at_target():
    r, big, total, final = 3, 16, 200, 50
    draws = {(t, layer): sample_mixed_rank(t, r, big, total, final, seed=7, layer=layer)
             for t in range(1, total + 1) for layer in range(4)}
    assert all(r <= k <= mixed_rank_bound(t, r, big, total, final) for (t, _), k in draws.items())
    assert all(k == r for (t, _), k in draws.items() if t >= total - final)
    again = {key: sample_mixed_rank(key[0], r, big, total, final, seed=7, layer=key[1]) for key in reversed(draws)}
    assert again == draws
    other_seed = [sample_mixed_rank(t, r, big, total, final, seed=8) for t in range(1, 100)]
    assert other_seed != [draws[(t, 0)] for t in range(1, 100)]
    early = [draws[(t, layer)] for t in range(1, 21) for layer in range(4)]
    late = [draws[(t, layer)] for t in range(120, 150) for layer in range(4)]
    assert len(set(early)) > 3 and sum(late) / len(late) < sum(early) / len(early)


def test_nested_truncation_is_the_rank_k_svd_product():
    g = _generator(9)
    matrix = torch.randn(12, 9, generator=g, dtype=torch.float64)
    u, v = svd_factors(matrix, 8)
    for k in (1, 3, 8):
        small_u, small_v = truncate_factors(u, v, k)
        assert small_u.shape == (12, k) and small_v.shape == (k, 9)
        direct_u, direct_v = svd_factors(matrix, k)
        torch.testing.assert_close(low_rank_product(u, v, k), direct_u @ direct_v)
        torch.testing.assert_close(small_u @ small_v, low_rank_product(u, v, k))
    torch.testing.assert_close(low_rank_product(u, v), u @ v)
    assert low_rank_product(u, v, 0).abs().max() == 0
    with pytest.raises(ValueError):
        truncate_factors(u, v, 9)


def test_truncated_sparsity_aware_factors_are_the_best_rank_k_of_their_product():
    pruned, mask = pruned_test_matrix(seed=10)
    u, v = sparsity_aware_factorize(pruned, mask, 6, iterations=10)
    full = (u @ v).double()
    best_u, best_v = svd_factors(full, 2)
    torch.testing.assert_close(low_rank_product(u, v, 2).double(), best_u @ best_v, rtol=1e-3, atol=1e-4)


def test_a_small_weight_on_pruned_entries_keeps_the_product_bounded_there():
    """Mask-only weights leave the pruned entries free: when k·(out+in) nears the kept count, ALS can put large
    values there. A small `pruned_weight` trades a little kept-entry error for a bounded off-mask product."""
    first_order, _, _ = fine_tune_and_prune(0)
    mask = first_order != 0
    off_mask = {}
    for pruned_weight in (0.0, 0.2):
        weights = factorization_weights(mask, pruned_weight=pruned_weight)
        u, v = sparsity_aware_factorize(first_order, weights, 8, iterations=30, method="als")
        off_mask[pruned_weight] = float(((u @ v) * ~mask).norm() / first_order.norm())
    assert off_mask[0.2] < 0.5 * off_mask[0.0]
