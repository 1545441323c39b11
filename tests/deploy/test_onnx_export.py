"""ONNX export of dense and compact models: onnxruntime computes what torch computes, at any batch and length."""

import json

import onnx
import pytest
import torch

import losparse
from losparse import CompactLoSparseLinear, LoSparseConfig, LoSparsePruner
from losparse.core.errors import LoSparseUsageError
from losparse.deploy.onnx import (
    OnnxCompactLinear,
    compare_with_onnxruntime,
    export_friendly_compact_layers,
    export_onnx,
    onnxruntime_session,
)

TOLERANCE = 1e-5  # fp32: only summation order differs


def _bert(compact_dim=None, seed=0):
    """A tiny BERT classifier with random weights; compacted (decomposed, pruned with random scores) if asked."""
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config()).eval()
    if compact_dim is not None:
        losparse.apply(model, LoSparseConfig(remaining_ratio=0.3, low_rank_ratio=0.1, prune_dim=compact_dim))
        pruner = LoSparsePruner(model, total_steps=10)
        pruner.importance.neuron_ema.copy_(torch.rand_like(pruner.importance.neuron_ema))
        pruner.update_masks(pruner.final_kept_fraction)
        losparse.compact(model)
    return model


def _inputs(batch, length, seed=0, padded=False):
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(5, 30, (batch, length), generator=generator),
              "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    if padded:
        inputs["attention_mask"][0, length // 2:] = 0
    return inputs


@pytest.mark.parametrize("compact_dim", [None, "rows", "columns"])
def test_onnxruntime_equals_torch_at_other_shapes(tmp_path, compact_dim):
    model = _bert(compact_dim)
    if compact_dim:
        assert any(isinstance(m, CompactLoSparseLinear) for m in model.modules())
    path = export_onnx(model, str(tmp_path / "model.onnx"), _inputs(2, 8))
    assert path == str(tmp_path / "model.onnx")
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input][:2] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    assert not any(node.op_type == "ScatterElements" for node in graph.node)  # the scatter became a gather
    session = onnxruntime_session(path, threads=1)
    for batch, length, padded in [(2, 8, False), (1, 3, False), (5, 21, True)]:  # batch and length never exported
        check = compare_with_onnxruntime(model, session, _inputs(batch, length, seed=batch, padded=padded))
        assert check["compared"] == "logits"
        assert check["output_scale"] > 0
        assert check["max_abs_diff"] <= TOLERANCE * max(1.0, check["output_scale"]), (batch, length, check)
    # the export left the model as it was: compact layers back in place, same outputs as before
    assert sum(isinstance(m, OnnxCompactLinear) for m in model.modules()) == 0


def test_fixed_shape_export_refuses_another_shape(tmp_path):
    model = _bert("rows")
    path = export_onnx(model, str(tmp_path / "fixed.onnx"), _inputs(2, 8), dynamic_batch_and_seq=False)
    session = onnxruntime_session(path)
    assert compare_with_onnxruntime(model, session, _inputs(2, 8))["max_abs_diff"] <= TOLERANCE
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        compare_with_onnxruntime(model, session, _inputs(3, 5))


def _compact_layer(in_features, out_features, rank, num_kept, prune_dim, bias=True):
    torch.manual_seed(0)
    layer = CompactLoSparseLinear(in_features, out_features, rank, num_kept, bias=bias, prune_dim=prune_dim)
    neurons = out_features if prune_dim == "rows" else in_features
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()
        layer.kept_index.copy_(torch.randperm(neurons)[:num_kept].sort().values)
    return layer


@pytest.mark.parametrize("prune_dim", ["rows", "columns"])
@pytest.mark.parametrize("rank,num_kept,bias", [(3, 4, True), (0, 4, True), (0, 4, False), (3, 0, True),
                                                (3, 9, False)])
def test_export_friendly_layer_computes_the_layer(prune_dim, rank, num_kept, bias):
    layer = _compact_layer(9, 11, rank, num_kept, prune_dim, bias)
    x = torch.randn(2, 5, 9)
    with torch.no_grad():
        torch.testing.assert_close(OnnxCompactLinear(layer)(x), layer(x), atol=1e-5, rtol=1e-5)


def test_export_friendly_layer_with_neither_rank_nor_kept_neurons_gives_the_bias():
    layer = _compact_layer(6, 7, 0, 0, "rows")
    y = OnnxCompactLinear(layer)(torch.randn(3, 4, 6))
    torch.testing.assert_close(y, layer.bias.expand(3, 4, 7))


def test_swap_shares_parameters_and_restores_the_layers():
    model = _bert("rows")
    originals = [m for m in model.modules() if isinstance(m, CompactLoSparseLinear)]
    with export_friendly_compact_layers(model) as count:
        assert count == len(originals) > 0
        swapped = [m for m in model.modules() if isinstance(m, OnnxCompactLinear)]
        assert len(swapped) == count
        assert swapped[0].low_rank_u is originals[0].low_rank_u  # U and the bias are shared, not copied
    assert [m for m in model.modules() if isinstance(m, CompactLoSparseLinear)] == originals


def test_bad_arguments_are_usage_errors(tmp_path):
    model = _bert()
    with pytest.raises(LoSparseUsageError, match="opset 9; allowed: an integer from 14 to 20"):
        export_onnx(model, str(tmp_path / "m.onnx"), _inputs(1, 4), opset=9)
    with pytest.raises(LoSparseUsageError, match="non-empty dict"):
        export_onnx(model, str(tmp_path / "m.onnx"), {})
    with pytest.raises(LoSparseUsageError, match=r"example_inputs\['input_ids'\] is a list"):
        export_onnx(model, str(tmp_path / "m.onnx"), {"input_ids": [[1, 2]]})
    with pytest.raises(LoSparseUsageError, match="is a directory"):
        export_onnx(model, str(tmp_path), _inputs(1, 4))
    assert not (tmp_path / "m.onnx").exists()


def test_export_onnx_is_a_lazy_public_name():
    assert losparse.export_onnx is export_onnx


def test_benchmark_main_writes_its_json(tmp_path):
    from conftest import load_script

    out = tmp_path / "onnx.json"
    argv = ["--arch", "tiny-bert", "--num_layers", "1", "--batch_size", "2", "--seq_len", "12", "--warmup", "1",
            "--repeats", "3", "--threads", "1", "--json", str(out)]
    assert load_script("scripts/benchmark_onnx.py").main(argv) == 0
    result = json.loads(out.read_text())
    models = result["models"]
    assert {"dense", "compact"} <= set(models)
    for name, record in models.items():
        assert record["check"]["max_rel_diff"] <= result["tolerance"], name
        assert record["latency"]["n"] == 3 and record["latency"]["median_ms"] > 0
    assert models["compact"]["parameters"] < models["dense"]["parameters"]
    assert models["dense"]["speedup_vs_dense"] == 1.0
    assert result["ort_intra_op_threads"] == 1 and result["export_example_shape"] == [2, 16]
    assert "timing_reliable" in result and result["command"][0] == "scripts/benchmark_onnx.py"
    if "structured" in models:  # losparse.methods.structured exists: the ratio is reported
        assert result["compact_over_structured"] == pytest.approx(
            models["compact"]["latency"]["median_ms"] / models["structured"]["latency"]["median_ms"])
    else:
        assert result["notes"]["structured"].startswith("left out")


def test_benchmark_rejects_bad_flags():
    from benchmarks import onnx_runtime as onnx_benchmark

    with pytest.raises(SystemExit) as exit_info:
        onnx_benchmark.parse_args(["--arch", "tiny-bert", "--low_rank_ratio", "0.5", "--remaining_ratio", "0.2"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        onnx_benchmark.parse_args(["--arch", "tiny-bart"])  # encoders only


def test_a_model_returning_a_kv_cache_is_refused_with_a_message(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    with pytest.raises(LoSparseUsageError, match="KV cache"):
        export_onnx(model, str(tmp_path / "llama.onnx"), {"input_ids": torch.randint(0, 40, (1, 4))})
    assert not (tmp_path / "llama.onnx").exists()
