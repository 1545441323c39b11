"""scripts/quickstart_report.py on a tiny dense model and its compressed copy: the speed-ups it prints
carry the timing verdict (fake load averages and repeats; no timing is asserted)."""

import json
import os

import pytest
from conftest import load_script, make_tiny_bert_dir, write_sentiment_csv

import losparse
from benchmarks import common as benchmark


@pytest.fixture(scope="module")
def report_script():
    return load_script("scripts/quickstart_report.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(dense dir, compressed dir, validation csv) laid out as the quickstart's two training runs leave them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("quickstart")
    dense_dir = make_tiny_bert_dir(str(root / "dense"))
    model = AutoModelForSequenceClassification.from_pretrained(dense_dir)
    benchmark.compress_for_benchmark(model, remaining_ratio=0.2, low_rank_ratio=0.05)
    compressed_dir = str(root / "losparse-20")
    losparse.save(model, compressed_dir, tokenizer=AutoTokenizer.from_pretrained(dense_dir))
    report = losparse.parameter_report(model)
    compression = {k: report[k] for k in ("target_dense_params", "target_params", "remaining_ratio")}
    for directory, accuracy in ((dense_dir, 0.8), (compressed_dir, 0.75)):
        with open(os.path.join(directory, "all_results.json"), "w") as f:
            json.dump({"eval_accuracy": accuracy, "compression": compression}, f)
    return dense_dir, compressed_dir, write_sentiment_csv(str(root / "validation.csv"), 8)


def _main(script, runs, json_path):
    dense_dir, compressed_dir, validation = runs
    script.main(["--dense", dense_dir, "--compressed", compressed_dir, "--validation_file", validation,
                 "--batch_size", "4", "--max_seq_length", "16", "--repeats", "3", "--json", str(json_path)])
    return json.loads(json_path.read_text())


def test_loaded_machine_marks_every_speedup_unreliable(report_script, runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (4.6, 4.5, 3.9))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    summary = _main(report_script, runs, tmp_path / "summary.json")
    lines = capsys.readouterr().out.splitlines()
    for batch in (4, 1):  # (the tiny model's sub-millisecond repeats may add a spread reason)
        line = next(line for line in lines if line.startswith(f"speed-up at batch {batch}: "))
        assert "x  [UNRELIABLE: load average 4.6 on 2 cores during timing; " in line, line
        assert line.endswith("; rerun on a quiet machine]"), line
    assert summary["timing_reliable"] is False and "load average 4.6 on 2 cores" in summary["timing_warning"]
    assert summary["timing"]["batch4"]["timing_reliable"] is False
    assert set(summary["speedup"]) == {"batch4", "batch1"}
    assert summary["models"]["dense"]["latency_ms_batch4"] > 0


def test_quiet_tight_run_prints_plain_figures(report_script, runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.1))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    real = report_script.interleaved_latency_ms

    def tight(fns, *args, **kwargs):
        stats = real(fns, *args, **kwargs)
        for s in stats.values():
            s["times_ms"] = [s["median_ms"] * f for f in (1.0, 1.01, 0.99)]
        return stats

    monkeypatch.setattr(report_script, "interleaved_latency_ms", tight)
    summary = _main(report_script, runs, tmp_path / "summary.json")
    printed = capsys.readouterr().out
    assert "UNRELIABLE" not in printed and "timing: reliable" in printed
    assert any(line.startswith("speed-up at batch 4: ") and line.endswith("x") for line in printed.splitlines())
    assert summary["timing_reliable"] is True and summary["timing_warning"] is None
