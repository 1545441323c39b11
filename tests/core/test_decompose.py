import math

import pytest
import torch
from torch import nn

from losparse import LoSparseConfig, LoSparseLinear, LoSparseUsageError, apply, find_target_modules, rank_for_ratio
from losparse.core.decompose import decompose_linear, randomized_top_svd, svd_split, use_randomized_svd


def _bert():
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(tiny_bert_config())


def _deberta():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    return DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
        max_relative_positions=16))


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                               num_heads=2))


@pytest.mark.parametrize("out_features,in_features,ratio", [(768, 768, 0.05), (3072, 768, 0.02), (7, 5, 0.3)])
def test_rank_follows_the_formula(out_features, in_features, ratio):
    expected = math.ceil(ratio * out_features * in_features / (out_features + in_features))
    assert rank_for_ratio(out_features, in_features, ratio) == expected


def test_svd_split_puts_sqrt_sigma_on_both_sides():
    torch.manual_seed(0)
    weight = torch.randn(12, 8, dtype=torch.float64)
    u, v = svd_split(weight, 3)
    sigma = torch.linalg.svdvals(weight)[:3]
    assert torch.allclose(u.norm(dim=0), sigma.sqrt(), atol=1e-10)
    assert torch.allclose(v.norm(dim=1), sigma.sqrt(), atol=1e-10)


def _trained_like_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Noise plus a low-rank part with a decaying spectrum, the shape of a trained weight's spectrum."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    decay = torch.logspace(0, -1.5, 48)
    structure = (torch.randn(out_features, 48, generator=generator) * decay) @ torch.randn(48, in_features, generator=generator)
    return noise + structure / 8


def test_randomized_svd_matches_the_exact_svd():
    weight = _trained_like_weight(300, 520)
    rank = 20
    left, sigma, right_t = randomized_top_svd(weight, rank)
    exact = torch.linalg.svdvals(weight)
    assert left.shape == (300, rank) and sigma.shape == (rank,) and right_t.shape == (rank, 520)
    torch.testing.assert_close(sigma, exact[:rank], rtol=2e-3, atol=0)
    approximation = (left * sigma).double() @ right_t.double()
    optimal_residual = torch.linalg.svdvals(weight.double())[rank:].pow(2).sum().sqrt()
    assert (weight.double() - approximation).norm() <= optimal_residual * 1.001
    torch.testing.assert_close(left.T @ left, torch.eye(rank), atol=1e-4, rtol=0)


def test_randomized_svd_is_reproducible():
    weight = _trained_like_weight(64, 96)
    first, second = randomized_top_svd(weight, 8), randomized_top_svd(weight, 8)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_svd_split_solvers_agree_and_keep_the_layer_exact(solver):
    linear = nn.Linear(96, 64)
    with torch.no_grad():
        linear.weight.copy_(_trained_like_weight(64, 96))
    layer = decompose_linear(linear, low_rank_ratio=0.2, svd_solver=solver)
    torch.testing.assert_close(layer.effective_weight(), linear.weight, atol=1e-5, rtol=1e-5)
    u_exact, v_exact = svd_split(linear.weight, layer.rank, "exact")
    torch.testing.assert_close(layer.low_rank_u @ layer.low_rank_v, u_exact @ v_exact, atol=1e-3, rtol=0)


def test_auto_solver_goes_randomized_only_for_big_matrices():
    assert not use_randomized_svd((768, 3072), 31, "auto")
    assert use_randomized_svd((4096, 11008), 150, "auto")
    assert not use_randomized_svd((4096, 11008), 2000, "auto")
    assert use_randomized_svd((8, 8), 2, "randomized") and not use_randomized_svd((4096, 4096), 8, "exact")


def test_auto_svd_device_is_this_process_gpu(monkeypatch):
    from losparse.core.decompose import resolve_svd_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_svd_device("auto", torch.device("cpu")) == torch.device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "6")  # one visible GPU per process: fall back to the current one
    assert resolve_svd_device("auto", torch.device("cpu")) == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_svd_device("auto", torch.device("cpu")) == torch.device("cuda", 0)
    assert resolve_svd_device("cpu", torch.device("cpu")) == torch.device("cpu")


def test_svd_on_a_missing_gpu_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _bert()
    with pytest.raises(LoSparseUsageError, match="--svd_device 'cuda': no CUDA GPU is visible"):
        apply(model, LoSparseConfig(svd_device="cuda"))
    assert not any(isinstance(m, LoSparseLinear) for m in model.modules())


@pytest.mark.parametrize("bias", [True, False])
def test_decomposed_layer_reproduces_the_dense_layer(bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    layer = decompose_linear(linear, low_rank_ratio=0.1)
    assert layer.rank == rank_for_ratio(40, 24, 0.1)
    assert torch.allclose(layer.low_rank_u @ layer.low_rank_v + layer.sparse, linear.weight, atol=1e-6)
    x = torch.randn(3, 5, 24)
    assert torch.allclose(layer(x), linear(x), atol=1e-5)


EXPECTED = {
    "bert": (_bert, 12, {"bert.pooler.dense", "classifier"}),
    "deberta-v2": (_deberta, 16, {"pooler.dense", "classifier"}),
    "bart": (_bart, 16, {"lm_head"}),
    "t5": (_t5, 16, {"lm_head"}),
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_builtin_targets_decompose_the_backbone_only(model_type):
    build, n_targets, untouched = EXPECTED[model_type]
    torch.manual_seed(0)
    model = build().eval()
    dense_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply(model, LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1))
    replaced = {n: m for n, m in model.named_modules() if isinstance(m, LoSparseLinear)}
    assert len(replaced) == n_targets
    for name, layer in replaced.items():
        assert torch.allclose(layer.effective_weight(), dense_weights[name], atol=1e-5), name
        assert layer.rank == rank_for_ratio(layer.out_features, layer.in_features, 0.1)
    for name in untouched:
        assert type(model.get_submodule(name)) is nn.Linear
    assert all(isinstance(m, (nn.Embedding, nn.Module)) for m in model.modules())
    assert not any(isinstance(m, LoSparseLinear) for n, m in model.named_modules() if "embed" in n or "norm" in n.lower())
    if model_type == "bart":
        assert any(".encoder_attn." in n for n in replaced) and any("encoder.layers" in n for n in replaced)
    if model_type == "t5":
        assert all(layer.bias is None for layer in replaced.values())


def test_decomposed_model_gives_the_same_outputs():
    torch.manual_seed(0)
    model = _deberta().eval()
    ids = torch.randint(0, 64, (2, 9))
    before = model(ids).logits
    apply(model, LoSparseConfig(remaining_ratio=0.4, low_rank_ratio=0.1))
    assert torch.allclose(model(ids).logits, before, atol=1e-5)


def test_user_targets_by_pattern_type_and_exclusion():
    model = _bert()
    by_pattern = find_target_modules(model, LoSparseConfig(target_modules=[r".*\.intermediate\.dense"]))
    assert [n for n, _ in by_pattern] == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]
    # Full-match semantics: "dense" alone matches no name, no substring accidents.
    assert find_target_modules(model, LoSparseConfig(target_modules=["dense"])) == []
    by_type = find_target_modules(model, LoSparseConfig(target_module_types=["Linear"],
                                                        exclude_modules=[r"classifier", r".*pooler.*"]))
    assert len(by_type) == 12


def test_no_matching_target_is_a_usage_error():
    with pytest.raises(LoSparseUsageError, match="no module matches the targets"):
        apply(_bert(), LoSparseConfig(target_modules=[r"nothing\.here"]))
    with pytest.raises(LoSparseUsageError, match="not a valid regular expression"):
        apply(_bert(), LoSparseConfig(target_modules=["(unclosed"]))


def test_apply_twice_is_refused():
    model = apply(_bert(), LoSparseConfig())
    with pytest.raises(LoSparseUsageError, match="already has LoSparse layers"):
        apply(model, LoSparseConfig())


def test_allocated_ranks_spend_the_budget_without_exceeding_it():
    from losparse.core.decompose import allocate_ranks

    shapes = [(32, 32), (64, 32), (32, 64)] * 4
    ranks = allocate_ranks(shapes, 0.3)
    spent = sum(k * (o + i) for k, (o, i) in zip(ranks, shapes)) / sum(o * i for o, i in shapes)
    assert 0.3 - 96 / sum(o * i for o, i in shapes) < spent <= 0.3
