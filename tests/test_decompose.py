import math

import pytest
import torch
from torch import nn

from losparse import LoSparseConfig, LoSparseLinear, LoSparseUsageError, apply, find_target_modules, rank_for_ratio
from losparse.decompose import decompose_linear, svd_split


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
    from losparse.decompose import allocate_ranks

    shapes = [(32, 32), (64, 32), (32, 64)] * 4
    ranks = allocate_ranks(shapes, 0.3)
    spent = sum(k * (o + i) for k, (o, i) in zip(ranks, shapes)) / sum(o * i for o, i in shapes)
    assert 0.3 - 96 / sum(o * i for o, i in shapes) < spent <= 0.3
