"""The benchmark scripts end to end on tiny random models, and the measurement helpers they use.

No timing is asserted (timings are not unit-tested); the tests check that the scripts run, that the
JSON holds what the issue asks for, that dense and compact agree, and that the cost model counts the
compact layer's work as documented.
"""

import importlib.util
import json
import os

import pytest
import torch
from torch import nn

import losparse
from losparse import benchmark
from losparse.layers import CompactLoSparseLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inference_script():
    return _script("benchmark_inference")


@pytest.fixture(scope="module")
def training_script():
    return _script("benchmark_training")


INFERENCE_KEYS = {"dense_ms", "compact_ms", "speedup", "dense_params", "compact_params", "dense_peak_mem_mb",
                  "compact_peak_mem_mb", "dense_floor_ms", "compact_floor_ms", "outputs_agree", "max_rel_diff",
                  "results", "achieved_remaining_ratio", "load_at_start", "torch_threads"}


def test_inference_tiny_bert_writes_required_json(inference_script, tmp_path):
    out = tmp_path / "out.json"
    rc = inference_script.main(["--arch", "tiny-bert", "--device", "cpu", "--repeats", "3", "--batch_size", "2",
                                "--seq_len", "16", "--remaining_ratio", "0.1", "--low_rank_ratio", "0.03",
                                "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert INFERENCE_KEYS <= set(result)
    assert result["compact_params"] < result["dense_params"]
    assert result["compact_weight_mb"] < result["dense_weight_mb"]
    assert result["outputs_agree"] is True and result["fp32_check"]["max_rel_diff"] < 1e-3
    assert result["achieved_remaining_ratio"] == pytest.approx(0.1, abs=0.01)
    assert result["dense_floor_ms"] is None  # CPU without --peak_tflops/--peak_gbps: n/a
    (record,) = result["results"]
    assert record["mode"] == "eager" and record["workload"] == "forward"
    assert record["dense_stats"]["n"] == 3 and record["compact_stats"]["n"] == 3
    assert record["compact_linear_gflops"] < record["dense_linear_gflops"]


@pytest.mark.parametrize("arch,workloads", [
    ("tiny-bart", ["forward", "generate_beam1", "generate_beam2"]),
    ("tiny-llama", ["prefill", "generate_new1", "generate_new3", "decode"]),
])
def test_inference_generation_workloads_and_floor(inference_script, tmp_path, arch, workloads):
    out = tmp_path / "out.json"
    rc = inference_script.main(["--arch", arch, "--device", "cpu", "--repeats", "2", "--warmup", "1",
                                "--batch_size", "2", "--seq_len", "8", "--max_new_tokens", "3", "--num_beams", "1,2",
                                "--peak_tflops", "1", "--peak_gbps", "10", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["workload"] for r in result["results"]] == workloads
    for record in result["results"]:
        assert record["compact_floor_ms"] is not None and record["compact_floor_ms"] > 0
        assert record["compact_floor_ms"] < record["dense_floor_ms"]
    assert result["compact_params"] < result["dense_params"]


def test_inference_fails_loudly_when_outputs_disagree(inference_script, monkeypatch, capsys):
    real_merge = losparse.merge

    def broken_merge(model):
        model = real_merge(model)
        with torch.no_grad():
            weight = model.bert.encoder.layer[0].output.dense.weight
            weight.add_(torch.randn_like(weight))  # (a constant shift would vanish in the LayerNorm)
        return model

    monkeypatch.setattr(losparse, "merge", broken_merge)
    rc = inference_script.main(["--arch", "tiny-bert", "--device", "cpu", "--repeats", "1", "--seq_len", "8"])
    assert rc == 1
    assert "disagree" in capsys.readouterr().err


def test_inference_bad_arguments_exit_2(inference_script):
    with pytest.raises(SystemExit) as exc:
        inference_script.main(["--arch", "tiny-bert", "--device", "cpu", "--mode", "cudagraphs"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        inference_script.main(["--arch", "tiny-bert", "--remaining_ratio", "0.1", "--low_rank_ratio", "0.2"])
    assert exc.value.code == 2


def test_training_tiny_bert_writes_required_json(training_script, tmp_path):
    out = tmp_path / "train.json"
    rc = training_script.main(["--arch", "tiny-bert", "--device", "cpu", "--batch_size", "2", "--seq_len", "16",
                               "--steps", "3", "--warmup_steps", "1", "--rounds", "2", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert {"dense_step_ms", "losparse_step_ms", "ratio", "dense", "losparse", "load_at_start"} <= set(result)
    assert result["dense"]["n"] == 6 and result["losparse"]["n"] == 6  # 3 measured steps × 2 rounds each
    assert len(result["losparse"]["step_ms"]) == 6
    assert result["losparse"]["pruner_median_ms"] is not None and result["dense"]["pruner_median_ms"] is None
    # pruning was in force during the measured steps and reached the target at the last step
    assert result["losparse"]["achieved_kept_fraction"] == pytest.approx(result["final_kept_fraction"], abs=0.02)


def test_svd_benchmark_reports_accuracy_and_model_times(tmp_path):
    out = tmp_path / "svd.json"
    rc = _script("benchmark_svd").main(["--shapes", "60x90,90x60", "--arch", "tiny-bert", "--low_rank_ratio", "0.1",
                                        "--device", "cpu", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [row["shape"] for row in result["matrices"]] == ["60x90", "90x60"]
    for row in result["matrices"]:
        assert row["rank"] == 4 and row["exact_s"] > 0 and row["randomized_s"] > 0
        assert row["residual_over_optimal"] == pytest.approx(1.0, abs=1e-3)
    assert [row["svd_solver"] for row in result["models"]] == ["exact", "randomized", "auto"]
    assert all(row["layers"] == 12 for row in result["models"])


@pytest.mark.parametrize("argv", [["--shapes", "60by90"], ["--repeats", "0"], ["--threads", "many"],
                                  ["--solvers", "exact,qr"]])
def test_svd_benchmark_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _script("benchmark_svd").main(argv)
    assert exc.value.code == 2
    assert f"{argv[0]}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- helpers


def test_compact_layer_cost_matches_formula():
    layer = CompactLoSparseLinear(in_features=48, out_features=32, rank=4, num_kept=5, bias=True)
    flops, nbytes = benchmark.linear_cost(layer, tokens=10, element_size=4)
    assert flops == 2 * 10 * (4 * (48 + 32) + 5 * 48)
    weights = (4 + 5) * 48 + 32 * 4 + 32
    assert nbytes == 10 * (48 + 32) * 4 + weights * 4 + 5 * 8  # x, y, weights, int64 kept_index
    dense_flops, _ = benchmark.linear_cost(nn.Linear(48, 32), tokens=10, element_size=4)
    assert dense_flops == 2 * 10 * 48 * 32


def test_linear_cost_counter_counts_calls():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with benchmark.LinearCostCounter(model) as cost:
        model(torch.randn(3, 5, 8))
    assert cost.calls == 2
    assert cost.flops == 2 * 15 * (8 * 16 + 16 * 4)
    model(torch.randn(1, 8))  # hooks are gone after the context
    assert cost.calls == 2


def test_floor_is_the_larger_bound():
    assert benchmark.floor_ms(2e12, 1e9, peak_tflops=1, peak_gbps=1000) == pytest.approx(2000.0)
    assert benchmark.floor_ms(1e9, 3e9, peak_tflops=1, peak_gbps=1) == pytest.approx(3000.0)
    assert benchmark.floor_ms(1e9, 1e9, None, None) is None


def test_measure_peaks_returns_positive_rates():
    tflops, gbps = benchmark.measure_peaks("cpu", size=64, copy_mb=1, repeats=1)
    assert tflops > 0 and gbps > 0


def test_interleaved_latency_counts_rounds():
    calls = []
    stats = benchmark.interleaved_latency_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                             warmup=1, repeats=4)
    assert calls == ["a", "b"] * 5
    assert stats["a"]["n"] == 4 and stats["b"]["median_ms"] >= 0


def test_prune_with_random_scores_hits_ratio():
    model = benchmark.build_model("tiny-bert")
    benchmark.compress_for_benchmark(model, remaining_ratio=0.15, low_rank_ratio=0.05)
    report = losparse.parameter_report(model)
    assert report["remaining_ratio"] == pytest.approx(0.15, abs=0.005)
    kept = [layer["sparse_kept_neurons"] for layer in report["layers"]]
    assert 0 < min(kept) and max(kept) < min(layer["sparse_neurons"] for layer in report["layers"])
