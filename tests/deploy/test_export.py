import os

import pytest
import torch
from torch import nn

import losparse
from losparse import CompactLoSparseLinear, LoSparseConfig, LoSparseLinear, LoSparsePruner


def _masked_bert(prune_dim="rows", dtype=torch.float32, remaining_ratio=0.3, low_rank_ratio=0.1, seed=0):
    """A tiny BERT, decomposed and pruned to `remaining_ratio` with random importance scores."""
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config()).eval()
    losparse.apply(model, LoSparseConfig(remaining_ratio=remaining_ratio, low_rank_ratio=low_rank_ratio,
                                         prune_dim=prune_dim))
    pruner = LoSparsePruner(model, total_steps=10)
    pruner.importance.neuron_ema.copy_(torch.rand_like(pruner.importance.neuron_ema))
    pruner.update_masks(pruner.final_kept_fraction)
    return model.to(dtype)


@pytest.mark.parametrize("prune_dim", ["rows", "columns"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_compact_matches_masked_for_any_batch_and_length(prune_dim, dtype, atol):
    model = _masked_bert(prune_dim, dtype)
    inputs = [torch.randint(0, 30, (batch, length)) for batch, length in [(1, 1), (2, 7), (5, 33), (3, 64)]]
    with torch.no_grad():
        masked = [model(ids).logits for ids in inputs]
        losparse.compact(model)
        assert not any(isinstance(m, LoSparseLinear) for m in model.modules())
        compact = [model(ids).logits for ids in inputs]
    for a, b in zip(masked, compact):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(b.float(), a.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_compact_layer_without_low_rank_part_matches_masked(bias):
    """Rank 0 (the ITP / movement baselines): the output starts from the bias, which must stay untouched."""
    torch.manual_seed(0)
    layer = LoSparseLinear(12, 10, rank=0, bias=bias)
    with torch.no_grad():
        layer.sparse.normal_()
        if bias:
            layer.bias.normal_()
    layer.set_sparse_mask(torch.rand(10) > 0.5)
    compact = CompactLoSparseLinear.from_losparse(layer)
    bias_before = None if layer.bias is None else compact.bias.detach().clone()
    with torch.no_grad():
        for x in (torch.randn(12), torch.randn(3, 12), torch.randn(2, 5, 12)):
            torch.testing.assert_close(compact(x), layer(x), atol=1e-6, rtol=0)
    if bias:
        assert torch.equal(compact.bias, bias_before)


def test_compact_stores_only_kept_neurons():
    model = _masked_bert()
    losparse.compact(model)
    for layer in (m for m in model.modules() if isinstance(m, CompactLoSparseLinear)):
        assert layer.fused_weight.shape == (layer.rank + layer.num_kept, layer.in_features)
        assert layer.kept_index.numel() == layer.num_kept
        assert {name for name, _ in layer.named_buffers()} == {"kept_index"}
    report = losparse.parameter_report(model)
    actual = sum(p.numel() for p in model.parameters())
    assert report["model_params"] == actual
    assert report["remaining_ratio"] == pytest.approx(0.3, abs=0.01)


def test_report_of_masked_and_compact_models_agree():
    model = _masked_bert()
    before = losparse.parameter_report(model)
    after = losparse.parameter_report(losparse.compact(model))
    for key in ("target_params", "target_dense_params", "model_params", "model_params_dense", "remaining_ratio"):
        assert before[key] == after[key], key


def test_save_load_round_trip_and_size_on_disk(tmp_path):
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    model = _masked_bert(remaining_ratio=0.4)
    ids = torch.randint(0, 30, (3, 11))
    with torch.no_grad():
        expected = model(ids).logits
    path = losparse.save(model, str(tmp_path / "compact"))
    assert any(isinstance(m, LoSparseLinear) for m in model.modules()), "save must not alter the caller's model"
    reloaded = losparse.load(path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, losparse.compact(model)(ids).logits)
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)
    dense_dir = tmp_path / "dense"
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(dense_dir)
    compact_size = os.path.getsize(os.path.join(path, losparse.deploy.validation.WEIGHTS_FILE))
    dense_size = os.path.getsize(dense_dir / "model.safetensors")
    assert compact_size < dense_size
    assert reloaded.losparse_config.remaining_ratio == 0.4


def test_bf16_checkpoint_reloads_in_bf16(tmp_path):
    model = losparse.compact(_masked_bert(dtype=torch.bfloat16))
    reloaded = losparse.load(losparse.save(model, str(tmp_path / "bf16")))
    ids = torch.randint(0, 30, (2, 5))
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_plain_from_pretrained_on_a_compact_checkpoint_fails_loudly(tmp_path):
    from transformers import AutoModelForSequenceClassification

    path = losparse.save(_masked_bert(), str(tmp_path / "compact"))
    with pytest.raises(OSError):
        AutoModelForSequenceClassification.from_pretrained(path)


def test_load_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(losparse.LoSparseUsageError, match="is not a LoSparse checkpoint"):
        losparse.load(str(tmp_path))


@pytest.mark.parametrize("compact_first", [False, True])
def test_merge_gives_a_plain_transformers_model(tmp_path, compact_first):
    from transformers import AutoModelForSequenceClassification

    model = _masked_bert()
    ids = torch.randint(0, 30, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    if compact_first:
        losparse.compact(model)
    merged = losparse.merge(model)
    assert not hasattr(merged, "losparse_config")
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("query", "key", "value", "dense")))
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=0)
