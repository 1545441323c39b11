"""Every method runs end to end on the tiny GLUE setup and ends really smaller at its ratio."""

import json

import pytest
import torch
from conftest import load_script

import losparse
from losparse import CompactLoSparseLinear, LoSparseConfig
from losparse.core.methods import METHOD_SPECS

run_glue = load_script("run_glue.py")

COMPRESSING = [name for name, spec in METHOD_SPECS.items() if spec.decomposes]


def _tiny_bert():
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.mark.parametrize("method", COMPRESSING)
def test_decomposition_per_method_keeps_outputs_or_truncates(method):
    model = _tiny_bert()
    ids = torch.randint(0, 30, (2, 6))
    before = model(ids).logits
    losparse.apply(model, LoSparseConfig(method=method, remaining_ratio=0.4, low_rank_ratio=0.1))
    layer = model.bert.encoder.layer[0].output.dense
    spec = METHOD_SPECS[method]
    assert (layer.rank > 0) == (spec.rank_from is not None)
    assert (layer.sparse is not None) == spec.has_sparse
    if spec.has_sparse:
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)


def test_pruning_methods_need_no_low_rank_ratio_below_the_ratio():
    LoSparseConfig(method="itp", remaining_ratio=0.1, low_rank_ratio=0.2)
    with pytest.raises(losparse.LoSparseUsageError):
        LoSparseConfig(method="losparse", remaining_ratio=0.1, low_rank_ratio=0.2)


def test_movement_scores_accumulate_signed_movement():
    from losparse.core.importance import NeuronImportance

    layer = losparse.LoSparseLinear(3, 2, rank=0)
    with torch.no_grad():
        layer.sparse.copy_(torch.tensor([[1.0, 2.0, 0.0], [1.0, -1.0, 1.0]]))
    layer.sparse.grad = torch.tensor([[-1.0, -1.0, 5.0], [1.0, 1.0, 1.0]])
    tracker = NeuronImportance([layer], metric="movement")
    tracker.update()
    tracker.update()
    # -(w * g) row means: row 0: (1 + 2 + 0)/3 = 1, row 1: (-1 + 1 - 1)/3 = -1/3; accumulated twice.
    torch.testing.assert_close(tracker.scores(), torch.tensor([2.0, -2.0 / 3.0]))


@pytest.mark.parametrize("method", COMPRESSING)
def test_each_method_end_to_end(method, tiny_bert_dir, sentiment_files, tmp_path):
    from test_run_glue import _accuracy_of, _argv
    from transformers import AutoTokenizer

    output_dir = tmp_path / method
    results = run_glue.main(_argv(tiny_bert_dir, sentiment_files, output_dir, "--method", method,
                                  "--remaining_ratio", "0.3", "--low_rank_ratio", "0.1"))
    report = json.loads((output_dir / "all_results.json").read_text())["compression"]
    assert report["remaining_ratio"] == pytest.approx(0.3, abs=0.01), method
    assert report["model_params"] < report["model_params_dense"]
    model = losparse.load(str(output_dir))
    layers = [m for m in model.modules() if isinstance(m, CompactLoSparseLinear)]
    # the hybrids report their compact layers apart (CoFi + LoSparse may remove whole sub-layers with theirs)
    assert len(layers) == report.get("losparse_layers", report.get("losparse_stage", {})).get("num_layers", 12)
    assert len(layers) == 12 or method == "cofi_losparse"
    stored = sum(p.numel() for layer in layers for name, p in layer.named_parameters() if name != "bias")
    assert stored == report["target_params"], "a ratio reached by zeroing instead of removing is a bug"
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    assert _accuracy_of(model, tokenizer, sentiment_files[1]) == results["eval_accuracy"]
