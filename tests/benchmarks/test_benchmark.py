"""The benchmark scripts end to end on tiny random models, and the measurement helpers they use.

No timing is asserted (timings are not unit-tested); the tests check that the scripts run, that the
JSON holds what the issue asks for, that dense and compact agree, and that the cost model counts the
compact layer's work as documented.
"""

import json
import os

import pytest
import torch
from conftest import load_script
from torch import nn

import losparse
from benchmarks import common as benchmark
from benchmarks import inference as inference_benchmark
from losparse.core.layers import CompactLoSparseLinear


def _script(name):
    return load_script(f"scripts/{name}.py")


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


# ------------------------------------------------------------------------------ timing reliability

TIGHT = [10.0, 10.1, 9.9, 10.05, 9.95]
QUIET = (0.3, 0.3, 0.2)
LOADED = (4.6, 4.5, 3.9)  # the quickstart run: load 4-5 on 2 cores


def _fake_machine(monkeypatch, load, cores=2):
    monkeypatch.setattr(os, "getloadavg", lambda: load)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)


def test_quiet_tight_timings_are_reliable():
    verdict = benchmark.judge_timing({"dense": TIGHT, "compact": [x / 2 for x in TIGHT]}, 0.3, 1.9, threads=2,
                                     cpu_count=2)
    assert verdict.reliable and verdict.warning is None and verdict.tag() == ""
    assert verdict.annotate("1.73x") == "1.73x"
    fields = verdict.fields()
    assert fields["timing_reliable"] is True and fields["timing_warning"] is None
    assert fields["timing_check"]["relative_spread_iqr"]["dense"] < 0.05
    assert benchmark.timing_line(verdict).startswith("timing: reliable")


def test_load_above_the_cores_makes_timings_unreliable():
    verdict = benchmark.judge_timing({"dense": TIGHT, "compact": TIGHT}, 4.6, 4.4, threads=2, cpu_count=2)
    assert not verdict.reliable
    assert verdict.annotate("0.73x") == ("0.73x  [UNRELIABLE: load average 4.6 on 2 cores during timing; "
                                         "rerun on a quiet machine]")
    assert verdict.fields()["timing_reliable"] is False
    # the load after the timing counts too; cores + 0.5 is still fine (our own threads are in the load)
    assert not benchmark.judge_timing({}, 0.1, 2.7, threads=2, cpu_count=2).reliable
    assert benchmark.judge_timing({}, 2.4, 2.4, threads=2, cpu_count=2).reliable


def test_scattered_repeats_make_timings_unreliable():
    verdict = benchmark.judge_timing({"dense": [10, 10.2, 14, 19, 9.8, 25], "compact": TIGHT}, 0.2, 0.3,
                                     threads=1, cpu_count=2)
    assert not verdict.reliable and "dense repeats spread" in verdict.warning and "compact" not in verdict.warning
    assert verdict.fields()["timing_check"]["relative_spread_iqr"]["dense"] > benchmark.SPREAD_LIMIT


def test_what_cannot_be_checked_is_noted_not_failed():
    verdict = benchmark.judge_timing({"dense": [10.0, 30.0]}, None, None, threads=1, cpu_count=2)
    assert verdict.reliable
    assert any("load not checked" in n for n in verdict.notes) and any("2 repeats" in n for n in verdict.notes)
    assert "not checked" in benchmark.timing_line(verdict)
    assert not benchmark.judge_timing({}, 0.1, 0.1, threads=8, cpu_count=2).reliable  # oversubscribed


def test_combined_verdict_names_the_parts_and_gives_the_load_once():
    loaded = benchmark.judge_timing({"dense": TIGHT}, 4.6, 4.2, threads=2, cpu_count=2)
    scattered = benchmark.judge_timing({"dense": [1, 1, 2, 3, 1, 5]}, 3.1, 3.0, threads=2, cpu_count=2)
    quiet = benchmark.judge_timing({"dense": TIGHT}, 0.1, 0.1, threads=2, cpu_count=2)
    combined = benchmark.combine_verdicts({"a": loaded, "b": scattered, "c": quiet})
    assert not combined.reliable
    assert combined.warning.startswith("load average 4.6 on 2 cores during timing; b: dense repeats spread")
    assert combined.warning.count("load average") == 1
    assert benchmark.combine_verdicts({"c": quiet}).reliable
    # a verdict survives its JSON record
    restored = benchmark.TimingVerdict.from_fields(json.loads(json.dumps(combined.fields())))
    assert restored.warning == combined.warning and restored.reliable is False


def test_inference_flags_a_loaded_machine_next_to_the_speedup(inference_script, tmp_path, monkeypatch, capsys):
    _fake_machine(monkeypatch, LOADED)
    out = tmp_path / "out.json"
    rc = inference_script.main(["--arch", "tiny-bert", "--device", "cpu", "--repeats", "3", "--batch_size", "2",
                                "--seq_len", "8", "--threads", "1", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| eager | forward"))
    assert "×  [UNRELIABLE: load average 4.6 on 2 cores during timing; " in row  # (+ a spread, maybe)
    assert "rerun on a quiet machine]" in row
    assert "timing: UNRELIABLE: load average 4.6" in printed
    result = json.loads(out.read_text())
    assert result["timing_reliable"] is False and "load average 4.6 on 2 cores" in result["timing_warning"]
    assert result["results"][0]["timing_reliable"] is False
    assert result["results"][0]["timing_check"]["load_avg_1min_before"] == 4.6


def _tight_timer(real):
    """interleaved_latency_ms, with every candidate's repeats replaced by tight fake ones."""
    def fake(fns, *args, **kwargs):
        stats = real(fns, *args, **kwargs)
        for s in stats.values():
            s["times_ms"] = [s["median_ms"] * f for f in (1.0, 1.01, 0.99, 1.0, 1.005)]
        return stats
    return fake


def test_inference_quiet_tight_run_prints_no_warning(inference_script, tmp_path, monkeypatch, capsys):
    _fake_machine(monkeypatch, QUIET)
    monkeypatch.setattr(inference_benchmark, "interleaved_latency_ms", _tight_timer(benchmark.interleaved_latency_ms))
    out = tmp_path / "out.json"
    rc = inference_script.main(["--arch", "tiny-llama", "--device", "cpu", "--repeats", "2", "--warmup", "1",
                                "--batch_size", "1", "--seq_len", "8", "--max_new_tokens", "3", "--threads", "1",
                                "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "UNRELIABLE" not in printed and "timing: reliable" in printed
    result = json.loads(out.read_text())
    assert result["timing_reliable"] is True and result["timing_warning"] is None
    assert [r["timing_reliable"] for r in result["results"]] == [True] * 4  # decode included


def test_training_and_svd_flag_a_loaded_machine(training_script, tmp_path, monkeypatch, capsys):
    _fake_machine(monkeypatch, LOADED)
    out = tmp_path / "train.json"
    rc = training_script.main(["--arch", "tiny-bert", "--device", "cpu", "--batch_size", "2", "--seq_len", "8",
                               "--steps", "3", "--warmup_steps", "1", "--rounds", "1", "--threads", "1",
                               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("LoSparseTrainer / Trainer step time"))
    assert "×  [UNRELIABLE: load average 4.6 on 2 cores during timing" in line
    result = json.loads(out.read_text())
    assert result["timing_reliable"] is False and "4.6" in result["timing_warning"]

    out = tmp_path / "svd.json"
    rc = _script("benchmark_svd").main(["--shapes", "40x60", "--no_model", "--device", "cpu", "--repeats", "3",
                                        "--threads", "1", "--json", str(out)])
    assert rc == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 40x60"))
    assert "×  [UNRELIABLE: load average 4.6 on 2 cores during timing" in row
    result = json.loads(out.read_text())
    assert result["timing_reliable"] is False and result["matrices"][0]["timing_reliable"] is False


def test_every_benchmark_architecture_is_of_a_registered_family():
    """The benchmarks build models of their own (`ARCHS`); each must be a family `losparse.apply` targets."""
    from benchmarks.common import ARCHS
    from losparse.core.families import FAMILIES

    for arch, spec in ARCHS.items():
        assert spec.config().model_type in FAMILIES, arch

