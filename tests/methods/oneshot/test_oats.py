"""OATS, the low-rank + unstructured-sparse peer (losparse.methods.oneshot.oats)."""

import copy

import pytest
import torch
from test_oneshot import _config, _ids, _tiny_model

from losparse.methods.oneshot import algorithm as oneshot
from losparse.methods.oneshot.oats import oats_budget, oats_compress, oats_split


@pytest.mark.parametrize("shape, ratio", [((64, 32), 0.5), ((32, 96), 0.8), ((48, 48), 0.3)])
def test_the_budget_is_the_ratio_within_one_entry_per_row(shape, ratio):
    out_features, in_features = shape
    rank, per_row = oats_budget(out_features, in_features, ratio, 0.3)
    used = rank * (out_features + in_features) + per_row * out_features
    assert ratio * out_features * in_features - out_features <= used <= ratio * out_features * in_features
    assert rank > 0 and per_row > 0


def test_the_alternation_never_raises_the_scaled_error_and_keeps_per_row_sparsity():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 30, generator=generator) + 3.0 * (torch.rand(40, 30, generator=generator) > 0.97)
    rms = torch.exp(torch.randn(30, generator=generator))
    low_rank, sparse, history = oats_split(weight, rms, rank=4, per_row=5, iterations=6)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:])) and history[-1] < history[0]
    singular = torch.linalg.svdvals(low_rank)
    assert singular[4:].max() < 1e-4 * singular[0]  # rank 4 (to the float32 SVD's rounding)
    assert ((sparse != 0).sum(dim=1) <= 5).all()
    # the decomposition beats the plain rank-4 truncation of the scaled weight at the same rank
    scaled = weight.double() * rms.double()
    u, s, vt = torch.linalg.svd(scaled, full_matrices=False)
    assert history[-1] < float(s[4:].square().sum())


def test_oats_compresses_a_tiny_llama_to_the_ratio_in_dense_storage():
    dense = _tiny_model("llama")
    model = copy.deepcopy(dense)
    calibration = _ids(8, 24, seed=3)
    stats = oneshot.collect_statistics(dense, _config(), calibration, show_progress=False)
    targets, _, _ = oneshot._plan(model, _config(method="lowrank"))
    report = oats_compress(model, dict(targets), {n: stats[n].channel_rms() for n, _ in targets}, 0.5)
    assert report["remaining_ratio"] == pytest.approx(0.5, abs=0.03)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dense.parameters())
    ids = _ids(2, 12, seed=4)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, dense(input_ids=ids).logits)
        assert torch.isfinite(model(input_ids=ids).logits).all()
