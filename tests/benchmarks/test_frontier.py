"""Accuracy vs latency (benchmarks.frontier), its plot in the report, and the `frontier` reproduce table.

The fake output roots hold real tiny cells: the frontier table's own run_glue.py arguments (quickstart config)
on a tiny random BERT and a toy CSV, cut to 3 optimizer steps, run in this process. Two roots, as when the
claim's finished cells are copied beside the new ones.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_script, make_tiny_bert_dir, write_sentiment_csv

from benchmarks import frontier
from benchmarks.frontier import Point, frontier_lines, group_points
from reproduce import driver as reproduce
from reproduce.results import LATENCY_FILE

SHORT_RUN = ["--max_steps", "3", "--warmup_steps", "0", "--use_cpu", "true", "--max_seq_length", "16",
             "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32", "--disable_tqdm", "true",
             "--logging_steps", "100"]
#: which root each timed cell goes to (first: the claim's methods, second: the frontier's new ones)
ROOT_OF = {"finetune": "a", "losparse": "a", "itp": "a", "structured": "b", "lowrank": "b"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cell_argv(c: reproduce.Cell, opts: reproduce.Options) -> list[str]:
    argv = reproduce.command(c, opts, reproduce.Warnings())[2:]  # drop the interpreter and run_glue.py
    return [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in argv] + SHORT_RUN


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """Root a: finetune, losparse, itp at 20 %; root b: structured, lowrank at 20 % (frontier table arguments)."""
    base = tmp_path_factory.mktemp("frontier")
    data = base / "data" / "movies"
    data.mkdir(parents=True)
    train = write_sentiment_csv(str(data / "train.csv"), 48, seed=1)
    validation = write_sentiment_csv(str(data / "validation.csv"), 32, seed=2)
    model_dir = make_tiny_bert_dir(str(base / "tiny"))
    run_glue = load_script("run_glue.py")
    found = {name: base / name for name in ("a", "b")}
    for name, root in found.items():
        opts = reproduce.Options(output_root=str(root), seeds=[42], model_dirs=[model_dir], train_file=train,
                                 validation_file=validation)
        for c in reproduce.select_cells("frontier", opts):
            if ROOT_OF.get(c.method) == name and (c.method == "finetune" or "-r0.2" in c.name):
                run_glue.main(_cell_argv(c, opts))
    return found


@pytest.fixture(scope="module")
def timed(roots, tmp_path_factory) -> dict:
    """One frontier run over both roots; its stdout, outputs and the cell dirs by method."""
    out = tmp_path_factory.mktemp("frontier-out")
    argv = [str(roots["a"]), str(roots["b"]), "--batch_size", "4", "--seq_len", "16", "--repeats", "4",
            "--warmup", "1", "--json", str(out / "f.json"), "--markdown", str(out / "f.md"),
            "--plot", str(out / "frontier.png")]
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = frontier.main(argv)
    cells = {p.name.split("-r")[0]: p for root in roots.values() for p in root.glob("frontier/tiny/movies/*")
             if p.is_dir()}
    return {"code": code, "stdout": stdout.getvalue(), "out": out, "cells": cells}


def test_every_cell_gets_a_latency_record_of_the_shared_interleaved_timing(timed):
    assert timed["code"] == 0
    assert set(timed["cells"]) == set(ROOT_OF)
    bodies = {m: json.loads((d / LATENCY_FILE).read_text()) for m, d in timed["cells"].items()}
    dense_ms = bodies["finetune"]["latency_ms"]
    labels_by_method = {m: f"{ROOT_OF[m]}/frontier/tiny/movies/{d.name}" for m, d in timed["cells"].items()}
    labels = set(labels_by_method.values())
    for method, body in bodies.items():
        assert body["method"] == method and body["batch_size"] == 4 and body["seq_len"] == 16
        assert body["threads"] == 1 and body["torch"] == torch.__version__ and body["machine"]["cpu_model"]
        assert dt.datetime.fromisoformat(body["date"]).year >= 2024
        assert len(body["times_ms"]) == body["repeats"] == 4  # every model timed in every round
        assert body["min_ms"] <= body["latency_ms"] <= max(body["times_ms"])
        assert body["dense_latency_ms"] == dense_ms
        assert body["speedup_vs_dense"] == pytest.approx(dense_ms / body["latency_ms"], rel=1e-3)
        assert sorted(body["interleaved_with"]) == sorted(labels - {labels_by_method[method]})
        results = json.loads((timed["cells"][method] / "all_results.json").read_text())
        assert body["metric"] == "accuracy" and body["metric_value"] == pytest.approx(100 * results["eval_accuracy"])
        assert body["achieved_ratio"] == pytest.approx(results["compression"]["remaining_ratio"])
    assert bodies["finetune"]["speedup_vs_dense"] == 1.0
    assert bodies["finetune"]["loaded_with"] == "BertForSequenceClassification.from_pretrained (dense)"
    assert bodies["structured"]["loaded_with"].startswith("load_structured")
    # ITP is saved as compact layers of rank 0 (kept rows of S only); Low-rank I as U·V with no kept neuron.
    itp, lowrank, losparse_layers = (bodies[m]["layers"] for m in ("itp", "lowrank", "losparse"))
    assert itp["rank_zero"] == itp["compact_layers"] == 12 and itp["total_rank"] == 0 and itp["total_kept_neurons"]
    assert lowrank["no_kept_neurons"] == lowrank["compact_layers"] and lowrank["total_rank"] > 0
    assert losparse_layers["total_rank"] > 0 and losparse_layers["total_kept_neurons"] > 0
    assert bodies["losparse"]["loaded_with"].startswith("losparse.load(optimize=False)")
    assert bodies["finetune"]["layers"] is None
    # Parameters: those of the model as loaded, fewer than dense for every compressed cell.
    from losparse.methods.structured.serialization import load_structured

    structured = load_structured(str(timed["cells"]["structured"]))
    assert bodies["structured"]["parameters"] == sum(p.numel() for p in structured.parameters())
    assert all(bodies[m]["parameters"] < bodies["finetune"]["parameters"] for m in bodies if m != "finetune")


def test_table_json_and_plot(timed):
    stdout = timed["stdout"]
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert len(rows) == 5
    labels = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert labels == ["Fine-tune (full model)", "LoSparse", "ITP", "Structured (heads, FFN)", "Low-rank I"]
    bodies = {m: json.loads((d / LATENCY_FILE).read_text()) for m, d in timed["cells"].items()}
    itp_row = rows[labels.index("ITP")].split(" | ")
    assert itp_row[1] == f"20% / {bodies['itp']['achieved_ratio']:.4f}"
    assert itp_row[3] == f"{bodies['itp']['latency_ms']:.2f}"
    assert itp_row[4] == f"{bodies['itp']['speedup_vs_dense']:.2f}×"
    assert itp_row[5] == f"{bodies['itp']['parameters']:,}"
    assert rows[0].split(" | ")[4] == "1.00×"
    assert "Pareto frontier" in stdout and re.search(r"^LoSparse 20%: (on the frontier|dominated by )", stdout, re.M)
    assert "timing: " in stdout and "machine: " in stdout
    everything = json.loads((timed["out"] / "f.json").read_text())
    assert len(everything["cells"]) == 5 and everything["batch_size"] == 4
    assert (timed["out"] / "f.md").read_text().startswith("### Accuracy vs latency: tiny")
    assert "![frontier.png](frontier.png)" in (timed["out"] / "f.md").read_text()
    assert (timed["out"] / "frontier.png").read_bytes()[:8] == PNG_MAGIC


def test_report_plots_the_frontier_from_latency_json_without_timing(timed, roots, tmp_path, monkeypatch):
    from reproduce import report

    def refuse(*args, **kwargs):
        raise AssertionError("the report must not load or time models")

    monkeypatch.setattr(frontier, "load_all", refuse)
    monkeypatch.setattr(frontier, "time_all", refuse)
    out = tmp_path / "plots"
    assert report.main([str(roots["a"]), str(roots["b"]), "--table", "claim", "--plots", str(out)]) == 0
    drawn = sorted(p.name for p in out.glob("frontier-*.png"))
    assert drawn == ["frontier-tiny-local-b4-s16-t1.png"]
    assert (out / drawn[0]).read_bytes()[:8] == PNG_MAGIC
    # Runs without latency.json get no frontier plot (the other plots are still drawn).
    bare = tmp_path / "bare" / "run"
    bare.mkdir(parents=True)
    (bare / "all_results.json").write_text(json.dumps({"method": "finetune", "eval_accuracy": 0.5}))
    assert report.main([str(bare.parent), "--table", "claim", "--plots", str(tmp_path / "bare-plots")]) == 0
    assert not list((tmp_path / "bare-plots").glob("frontier-*.png"))


def test_chance_accuracy_reaches_the_markdown(timed, roots, capsys):
    """Every tiny model is at or below 100 %: all are named at chance and none is left for a frontier."""
    argv = [str(roots["a"]), "--batch_size", "2", "--seq_len", "8", "--repeats", "1", "--warmup", "0",
            "--chance_accuracy", "100"]
    assert frontier.main(argv) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^At chance \(accuracy <= 100\.00, .*Fine-tune \(dense\)", stdout, re.M)
    assert "Pareto frontier" not in stdout


def test_frontier_lines_name_the_pareto_set_and_the_margins():
    points = group_points([
        {"method": "finetune", "ratio": 1.0, "value": 90.0, "latency_ms": 10.0},
        {"method": "losparse", "ratio": 0.2, "value": 88.0, "latency_ms": 7.0},
        {"method": "losparse", "ratio": 0.1, "value": 84.0, "latency_ms": 6.0},
        {"method": "structured", "ratio": 0.1, "value": 85.0, "latency_ms": 4.0},
        {"method": "itp", "ratio": 0.2, "value": 86.0, "latency_ms": 8.0, "seed": 1},
        {"method": "itp", "ratio": 0.2, "value": 88.0, "latency_ms": 9.0, "seed": 2},  # seeds averaged: 87, 8.5
    ])
    itp = next(p for p in points if p.method == "itp")
    assert (itp.value, itp.latency_ms, itp.runs) == (87.0, 8.5, 2)
    lines = frontier_lines(points, "accuracy", eval_examples=1000)
    assert lines[0] == ("Pareto frontier (no other point is at least as accurate and as fast): Structured (heads, FFN) "
                        "10% (85.00, 4.00 ms), LoSparse 20% (88.00, 7.00 ms), Fine-tune (dense) (90.00, 10.00 ms).")
    assert lines[1] == "LoSparse 20%: on the frontier; it dominates ITP 20%."
    assert lines[2] == "LoSparse 10%: dominated by Structured (heads, FFN) 10% (+1.00 points, −2.00 ms)."
    # binomial standard error at the dense accuracy: sqrt(0.9 * 0.1 / 1000) = 0.95 points
    assert "about 0.9 points" in lines[3] and "under ~2.7 points" in lines[3]
    # within the noise: structured's +1.00 point at 10% is less than one standard error of the difference (1.34)
    assert lines[4] == "LoSparse 20% (1 run): no point is both faster and more accurate beyond one standard error."
    assert lines[5] == "LoSparse 10% (1 run): no point is both faster and more accurate beyond one standard error."
    clear = frontier_lines(points + [Point("structured", 0.1, 87.0, 3.0)], "accuracy", eval_examples=1000)
    assert ("LoSparse 10% (1 run): beaten beyond one standard error by Structured (heads, FFN) 10% (+3.00 points, "
            "−3.00 ms).") in clear
    assert Point("a", 0.2, 1.0, 1.0).dominates(Point("b", 0.2, 1.0, 1.0)) is False  # a tie dominates nothing


def test_points_at_chance_are_named_and_left_out_of_the_frontier():
    points = group_points([
        {"method": "finetune", "ratio": 1.0, "value": 82.0, "latency_ms": 270.0},
        {"method": "structured", "ratio": 0.1, "value": 77.0, "latency_ms": 34.0},
        {"method": "cofi_losparse", "ratio": 0.1, "value": 50.4, "latency_ms": 28.0},  # fastest, but at chance
        {"method": "losparse", "ratio": 0.1, "value": 51.5, "latency_ms": 76.0},  # within 1 s.e. (1.21) of 50.4
    ])
    without = frontier_lines(points, "accuracy", eval_examples=1000)
    assert "CoFi" in without[0] and any(line.startswith("CoFi + LoSparse 10% (1 run): no point") for line in without)
    lines = frontier_lines(points, "accuracy", eval_examples=1000, chance=50.4)
    assert lines[0].startswith("Pareto frontier") and "CoFi" not in lines[0] and "LoSparse 10%" not in lines[0]
    at_chance = [line for line in lines if line.startswith("At chance")]
    assert at_chance == ["At chance (accuracy <= 50.40, a constant predictor's, + one standard error; left out of the "
                         "frontier and the verdicts): CoFi + LoSparse 10% (50.40), LoSparse 10% (51.50)."]
    assert not any(line.startswith(("CoFi + LoSparse 10%", "LoSparse 10%")) for line in lines)
    only_chance = frontier_lines(points[2:], "accuracy", chance=60.0)
    assert len(only_chance) == 1 and only_chance[0].startswith("At chance")


def test_majority_share_is_a_constant_predictors_accuracy(tmp_path):
    (tmp_path / "v.csv").write_text("sentence,label\na,1\nb,0\nc,1\nd,1\n")
    (tmp_path / "v.json").write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in
                                               (("a", "pos"), ("b", "neg"), ("c", "neg"))) + "\n")
    (tmp_path / "r.csv").write_text("sentence,score\na,0.5\n")
    assert reproduce.majority_share(str(tmp_path / "v.csv")) == 0.75
    assert reproduce.majority_share(str(tmp_path / "v.json")) == pytest.approx(2 / 3)
    assert reproduce.majority_share(str(tmp_path / "r.csv")) is None
    assert reproduce.majority_share(str(tmp_path / "missing.csv")) is None
    opts = reproduce.Options(output_root=str(tmp_path), seeds=[42], validation_file=str(tmp_path / "v.csv"))
    assert "--chance_accuracy 75.00 &&" in reproduce.report_command("frontier", [], opts)
    no_file = reproduce.Options(output_root=str(tmp_path), seeds=[42])
    assert "--chance_accuracy" not in reproduce.report_command("frontier", [], no_file)


def test_plot_accuracy_vs_latency_draws_synthetic_points(tmp_path):
    from benchmarks.plots import plot_accuracy_vs_latency

    points = [{"method": m, "ratio": r, "value": v, "latency_ms": t} for m, r, v, t in (
        ("finetune", 1.0, 90.0, 10.0), ("losparse", 0.2, 88.0, 7.0), ("losparse", 0.1, 85.0, 6.0),
        ("itp", 0.2, 87.0, 8.0), ("structured", 0.2, 86.0, 5.0), ("lowrank", 0.2, 80.0, 6.5))]
    path = plot_accuracy_vs_latency(points, str(tmp_path / "p.png"), subtitle="batch 8 × 128")
    assert Path(path).read_bytes()[:8] == PNG_MAGIC
    with_chance = plot_accuracy_vs_latency(points, str(tmp_path / "c.png"), subtitle="batch 8 × 128", chance=50.4)
    assert Path(with_chance).read_bytes() != Path(path).read_bytes()  # the chance line is drawn
    empty = plot_accuracy_vs_latency([], str(tmp_path / "empty.png"))
    assert Path(empty).stat().st_size > 0


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the bad input should have been rejected before loading any model")

    monkeypatch.setattr(frontier, "load_all", refuse)


@pytest.mark.parametrize("extra, fragment", [
    (["--seq_len", "65"], "--seq_len 65 is longer than"),
    (["--repeats", "0"], "--repeats 0: must be >= 1"),
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--device", "tpu"], "--device 'tpu': use cpu or cuda[:N]"),
    (["--only", "("], "--only '(' is not a regular expression"),
    (["--only", "no-such-cell"], "no run with all_results.json and a saved model"),
    (["--chance_accuracy", "150"], "--chance_accuracy 150: must be a percentage in [0, 100]"),
])
def test_usage_errors_are_one_line_before_loading(roots, capsys, no_loading, extra, fragment):
    assert frontier.main([str(roots["a"]), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and fragment in err[-1]
    if extra[0] == "--seq_len":
        assert "max_position_embeddings: 64 tokens" in err[-1]


def test_missing_root_is_an_error(tmp_path, capsys):
    assert frontier.main([str(tmp_path / "nowhere")]) == 2
    assert "no such output root" in capsys.readouterr().err


# --------------------------------------------------------------------------- the reproduce table

FAKE = ["--model_dirs", "/fake/minilm", "--train_file", "/fake/movies/train.csv",
        "--validation_file", "/fake/movies/validation.csv"]


def _dry(argv: list[str], tmp_path: Path) -> tuple[list[list[str]], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "MODEL_DIRS", "NUM_GPUS")}
    proc = subprocess.run(argv + ["--output_root", str(tmp_path), *FAKE], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**env, "DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line and not line.startswith("#")
            and not re.match(r"^\d+ cells", line)], proc.stdout


def _flag(argv: list[str], name: str):
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


def test_frontier_table_dry_run_lists_the_cells_with_the_claim_arguments(tmp_path):
    commands, stdout = _dry(["bash", str(Path(ROOT) / "scripts" / "frontier_minilm.sh")], tmp_path)
    assert len((Path(ROOT) / "scripts" / "frontier_minilm.sh").read_text().splitlines()) <= 6
    assert "17 cells: 0 done, 17 to run" in stdout
    by_name = {os.path.relpath(_flag(c, "--output_dir"), tmp_path): c for c in commands}
    hybrids = {f"frontier/minilm/movies/structured_losparse-sr{s}-r{r}": s for s in ("0.5", "0.25") for r in (0.2, 0.1)}
    distilled = {f"frontier/minilm/movies/{m}-r{r}" for m in ("cofi", "cofi_losparse") for r in (0.2, 0.1)}
    expected = {"frontier/minilm/movies/finetune-r1.0"} | {
        f"frontier/minilm/movies/{m}-r{r}" for m in ("losparse", "itp", "structured", "lowrank") for r in (0.2, 0.1)}
    assert set(by_name) == expected | set(hybrids) | distilled
    teacher = _flag(by_name["frontier/minilm/movies/finetune-r1.0"], "--output_dir")
    for name in distilled:  # distilled from the fine-tuned dense cell, with CoFi's weights
        argv = by_name.pop(name)
        assert _flag(argv, "--teacher_model_name_or_path") == teacher
        assert (_flag(argv, "--alpha_output"), _flag(argv, "--alpha_layer")) == ("0.1", "0.9")
        ratio = float(name.rsplit("-r", 1)[1])
        if "cofi_losparse" in name:  # Appendix F's split: LoSparse keeps half of what CoFi keeps
            assert float(_flag(argv, "--structured_ratio")) == pytest.approx(2 * ratio)
    claim, _ = _dry([sys.executable, str(Path(ROOT) / "scripts" / "reproduce.py"), "claim"], tmp_path)
    claim_by_name = {os.path.relpath(_flag(c, "--output_dir"), tmp_path): c for c in claim}
    for name, share in hybrids.items():  # the claim's losparse cell + --structured_ratio, another method and dir
        argv = by_name.pop(name)
        reference = claim_by_name[f"claim/minilm/movies/losparse-r{name.rsplit('-r', 1)[1]}"]
        assert _flag(argv, "--method") == "structured_losparse" and _flag(argv, "--structured_ratio") == share
        without = [a for i, a in enumerate(argv) if "--structured_ratio" not in argv[max(i - 1, 0):i + 1]]
        assert {b for a, b in zip(without, reference) if a != b} == {"losparse", _flag(reference, "--output_dir")}
    for name, argv in by_name.items():
        method, ratio = re.match(r".*/(\w+)-r([\d.]+)$", name).groups()
        assert _flag(argv, "--method") == method and _flag(argv, "--seed") == "42"
        assert _flag(argv, "--config") == "configs/quickstart/minilm-movie-sentiment.yaml"
        assert _flag(argv, "--remaining_ratio") == (None if method == "finetune" else ratio)
    # finetune/itp/losparse: exactly the claim's commands but for the directory; structured/lowrank differ
    # from the claim's losparse cell of the same ratio only in --method.
    for name, argv in by_name.items():
        twin = name.replace("frontier/", "claim/", 1)
        if twin in claim_by_name:
            claim_dir = _flag(claim_by_name[twin], "--output_dir")
            assert [claim_dir if a == _flag(argv, "--output_dir") else a for a in argv] == claim_by_name[twin]
        else:
            ratio = name.rsplit("-r", 1)[1]
            reference = claim_by_name[f"claim/minilm/movies/losparse-r{ratio}"]
            differing = [(a, b) for a, b in zip(argv, reference) if a != b]
            assert len(argv) == len(reference)
            assert {b for _, b in differing} == {"losparse", _flag(reference, "--output_dir")}
    assert "python -m benchmarks.frontier" in stdout and "--table claim --plots" in stdout
    assert not list(tmp_path.iterdir()), "a dry run must not create anything"
