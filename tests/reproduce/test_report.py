"""losparse.tools.{results,report,plots,paper_results}: collecting runs, paper tables, plots, CLI."""

from __future__ import annotations

import json
import os
import statistics

import numpy as np
import pytest
import torch

from benchmarks.plots import plot_importance_histograms, plot_kept_schedule, plot_metric_vs_ratio, plot_singular_values
from reproduce import paper_results
from reproduce.report import main, render_table
from reproduce.results import collect_results

MODEL = "microsoft/deberta-v3-base"


def write_run(root, name, method, ratio, seed, task, metrics, model=MODEL, achieved=None, **extra):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    results = {
        "method": method,
        "task_name": task,
        "model_name_or_path": model,
        "losparse_config": {"method": method, "remaining_ratio": ratio, "low_rank_ratio": 0.02},
        "compression": {"remaining_ratio": 1.0 if method == "finetune" else (achieved or ratio + 0.0004)},
        "eval_loss": 0.55,
        "eval_runtime": 3.2,
        **{f"eval_{k}": v for k, v in metrics.items()},
        **extra,
    }
    if seed is not None:
        results["seed"] = seed
    (run_dir / "all_results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "outputs"
    # Deliberately meaningless directory names: the aggregator must read the JSON fields.
    write_run(root, "a/x1", "losparse", 0.1, 1, "mnli", {"accuracy": 0.815, "mismatched_accuracy": 0.820})
    write_run(root, "a/x2", "losparse", 0.1, 2, "mnli", {"accuracy": 0.821, "mismatched_accuracy": 0.818})
    write_run(root, "b/y", "losparse", 0.2, 1, "mnli", {"accuracy": 0.841, "mismatched_accuracy": 0.839})
    write_run(root, "b/z", "itp", 0.2, 1, "mnli", {"accuracy": 0.830, "mismatched_accuracy": 0.826})
    write_run(root, "c/1", "finetune", 0.2, 1, "mnli", {"accuracy": 0.902, "mismatched_accuracy": 0.905})
    write_run(root, "c/2", "losparse", 0.2, 1, "rte", {"accuracy": 0.70})
    write_run(root, "c/3", "losparse", 0.2, 2, "rte", {"accuracy": 0.66})
    write_run(root, "c/4", "itp", 0.2, 1, "rte", {"accuracy": 0.60})
    write_run(root, "c/5", "lowrank", 0.2, 1, "rte", {"accuracy": 0.55})
    write_run(root, "c/6", "losparse", 0.15, 1, "rte", {"accuracy": 0.67})
    (root / "broken").mkdir()
    (root / "broken" / "all_results.json").write_text("{not json")
    return root


def test_paper_results_transcription():
    t1 = paper_results.TABLE_1["results"]
    assert t1[("losparse", 0.1)]["mnli"] == (81.7, 81.8)
    assert t1[("movement", 0.2)]["mnli"] is None
    assert t1[("itp", 0.2)]["rte"] is None
    assert t1[("finetune", 1.0)]["stsb"] == (91.6, 91.1)
    assert t1[("losparse", 0.2)]["cola"] == 50.0
    assert paper_results.TABLE_4["results"][("lead3", None)]["xsum"] == (16.30, 1.60, 11.95)
    assert paper_results.TABLE_4["results"][("losparse", 0.3)]["cnn_dailymail"] == (41.21, 18.84, 38.21)
    assert paper_results.TABLE_2["results"][("itp", 0.1)]["rte"] == 61.8
    assert paper_results.TABLE_3["results"][("movement", 0.05)][paper_results.BERT] is None
    assert paper_results.paper_value("3", "losparse", 0.5, paper_results.DEBERTA) == (82.3, 90.3)
    assert paper_results.TABLE_5["results"][("losparse", 0.2)]["mnli"] == (84.6, 84.7)
    with pytest.raises(KeyError):
        paper_results.paper_value("3", "movement", 0.05, paper_results.DEBERTA)  # not reported
    assert (0.1, 81.7) in paper_results.paper_points("deberta-v3-base", "mnli", "accuracy", "losparse")
    for table in paper_results.TABLES.values():  # every row has a cell for every column it names
        keys = {c["key"] for c in table["columns"]}
        for cells in table["results"].values():
            assert set(cells) <= keys


def test_collect_results_reads_fields_and_scales(runs):
    with pytest.warns(UserWarning, match="broken"):
        records = collect_results([str(runs)])
    assert len(records) == 10
    rec = next(r for r in records if r["method"] == "itp" and r["task"] == "mnli")
    assert rec["model"] == "deberta-v3-base" and rec["ratio"] == 0.2 and rec["seed"] == 1
    assert rec["achieved_ratio"] == pytest.approx(0.2004)
    assert rec["metrics"]["accuracy"] == pytest.approx(83.0)
    assert rec["metrics"]["mismatched_accuracy"] == pytest.approx(82.6)
    assert rec["metrics"]["loss"] == 0.55  # not a quality metric: unchanged
    fine = next(r for r in records if r["method"] == "finetune")
    assert fine["ratio"] == 1.0 and fine["achieved_ratio"] == 1.0
    assert rec["path"].endswith(os.path.join("b", "z"))


def test_collect_keeps_squad_and_rouge_percents(tmp_path):
    write_run(tmp_path, "q", "losparse", 0.1, None, "squad", {"exact_match": 72.9, "f1": 82.8},
              model="bert-base-uncased")
    write_run(tmp_path, "s", "losparse", 0.3, None, "xsum", {"rouge1": 37.4, "rouge2": 15.4, "rougeL": 30.0},
              model="facebook/bart-large")
    write_run(tmp_path, "m", "finetune", 1.0, None, "mrpc", {"accuracy": 0.895, "f1": 0.933})
    by_task = {r["task"]: r for r in collect_results(str(tmp_path))}
    assert by_task["squad"]["metrics"]["f1"] == 82.8 and by_task["squad"]["metrics"]["exact_match"] == 72.9
    assert by_task["xsum"]["metrics"]["rouge1"] == 37.4
    assert by_task["mrpc"]["metrics"]["f1"] == pytest.approx(93.3)
    table3 = render_table(list(by_task.values()), "3")
    assert "72.9 (paper 65.2, +7.7) / 82.8 (paper 76.8, +6.0)" in table3
    table4 = render_table(list(by_task.values()), "4")
    assert "37.40 (paper 37.41, −0.01) / 15.40 (paper 15.42, −0.02) / 30.00 (paper 30.02, −0.02)" in table4


def test_render_table_1(runs):
    with pytest.warns(UserWarning):
        records = collect_results(runs)
    text = render_table(records, "1")
    assert text.startswith("### Table 1")
    # Two seeds at 10%: mean and sample std, beside the paper's 81.7 / 81.8.
    m_mean = statistics.fmean([81.5, 82.1])
    m_std = statistics.stdev([81.5, 82.1])
    assert f"{m_mean:.1f} ± {m_std:.1f} (paper 81.7, +0.1)" in text
    assert f"81.9 ± {statistics.stdev([82.0, 81.8]):.1f} (paper 81.8, +0.1)" in text
    # One seed at 20%: plain number, differences with sign (unicode minus).
    assert "84.1 (paper 84.5, −0.4) / 83.9 (paper 83.8, +0.1)" in text
    assert "83.0 (paper 82.8, +0.2) / 82.6 (paper 82.5, +0.1)" in text
    assert "90.2 (paper 90.5, −0.3) / 90.5 (paper 90.6, −0.1)" in text
    # RTE: two seeds 70 and 66 -> 68.0 ± 2.8, exactly the paper's 68.0.
    assert f"68.0 ± {statistics.stdev([70.0, 66.0]):.1f} (paper 68.0, ±0.0)" in text
    # The paper's N.A. (ITP on RTE) stays N.A. beside our number; no run -> "—".
    assert "60.0 (paper N.A.)" in text
    assert "— (paper N.A.) / — (paper N.A.)" in text  # Movement MNLI, no run
    assert "— (paper 94.0)" in text  # full-model QNLI, no run
    # A run the paper does not list gets its own row.
    low_rank_row = next(line for line in text.splitlines() if "Low-rank I (not in paper)" in line)
    assert "55.0" in low_rank_row and low_rank_row.startswith("| 20% |")
    # Other tables: BERT runs only -> Table 2 has none of ours.
    assert "Runs matched: 0" in render_table(records, "2")
    # A distilled run counts for Table 5 only; the full-model row counts everywhere.
    write_run(runs, "kd", "losparse", 0.2, 1, "rte", {"accuracy": 0.712},
              teacher_model_name_or_path="teacher", alpha_layer=15.0)
    with pytest.warns(UserWarning):
        records = collect_results(runs)
    assert "71.2" not in render_table(records, "1")
    table5 = render_table(records, "5")
    assert "71.2 (paper 71.1, +0.1)" in table5 and "90.2 (paper 90.5, −0.3) / 90.5" in table5
    generic = render_table(records, "claim")
    assert "deberta-v3-base · rte" in generic and f"68.00 ± {statistics.stdev([70.0, 66.0]):.2f}" in generic


def test_generic_table_warns_when_runs_share_a_seed(tmp_path):
    root = tmp_path / "outputs"
    write_run(root, "one-epoch", "itp", 0.1, 42, "rte", {"accuracy": 0.70})
    write_run(root, "three-epochs", "itp", 0.1, 42, "rte", {"accuracy": 0.74})
    write_run(root, "other", "losparse", 0.1, 42, "rte", {"accuracy": 0.72})
    generic = render_table(collect_results(root), "claim")
    assert "Warning: ITP 10% average several runs with the same seed" in generic
    assert "LoSparse 10%" not in generic.split("Warning:")[1]
    assert "Warning" not in render_table(collect_results(root / "other"), "claim")


def test_cli_writes_markdown_and_plots(runs, tmp_path, capsys):
    md = tmp_path / "report" / "report.md"
    plots = tmp_path / "plots"
    with pytest.warns(UserWarning):
        assert main([str(runs), "--table", "all", "--markdown", str(md), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "### Table 1" in out and "### Table 2" not in out and "### All runs" in out
    text = md.read_text()
    assert "84.1 (paper 84.5, −0.4)" in text and "![mnli-accuracy.png]" in text
    for name in ("mnli-accuracy.png", "mnli-mismatched_accuracy.png", "rte-accuracy.png"):
        path = plots / name
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(plots)) == ["mnli-accuracy.png", "mnli-mismatched_accuracy.png", "rte-accuracy.png"]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        main([str(runs), "--table", "9"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1


def _png(path):
    return os.path.isfile(path) and os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"


def test_plots(tmp_path):
    path = plot_kept_schedule(200, 20, 60, 0.12, 10, str(tmp_path / "sched.png"))
    assert _png(path)
    rng = np.random.default_rng(0)
    before = {f"layer.{i}.ffn": rng.exponential(1.0, 64) for i in range(3)}
    after = {f"layer.{i}.ffn": torch.rand(64) for i in range(3)}
    assert _png(plot_importance_histograms(before, after, str(tmp_path / "hist.png")))
    linear = torch.nn.Linear(16, 8)
    state = {"enc.weight": linear.weight.detach(), "enc.bias": linear.bias.detach(), "dec.weight": torch.randn(4, 6)}
    assert _png(plot_singular_values(state, str(tmp_path / "svd.png")))
    assert _png(plot_singular_values(linear, str(tmp_path / "svd2.png"), layer_patterns=["weight"], top_k=3))
    with pytest.raises(ValueError):
        plot_singular_values(state, str(tmp_path / "none.png"), layer_patterns=["nothing"])
    assert _png(plot_metric_vs_ratio([], "mnli", "accuracy", str(tmp_path / "empty.png")))


def test_spectra_of_a_losparse_model(tmp_path):
    import losparse

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    losparse.apply(model, losparse.LoSparseConfig(remaining_ratio=0.5, low_rank_ratio=0.1,
                                                  target_module_types=["Linear"]))
    # A LoSparse layer contributes its effective weight U·V + S (the dense W at step 0).
    assert _png(plot_singular_values(model, str(tmp_path / "svd_model.png")))
    assert _png(plot_singular_values(dense, str(tmp_path / "svd_dense.png"), layer_patterns=[r"^0\."]))


def _pruning_run(root, name, method, seed=1):
    """A finished pruning run as the trainer leaves it: all_results.json and a checkpoint with the pruner state."""
    import losparse

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    config = losparse.LoSparseConfig(method=method, remaining_ratio=0.5, low_rank_ratio=0.1, pruning_interval=5,
                                     target_module_types=["Linear"])
    losparse.apply(model, config)
    pruner = losparse.LoSparsePruner(model, total_steps=40)
    model(torch.randn(4, 16)).sum().backward()
    pruner.step(1)
    low_rank_share = losparse.parameter_report(model)["low_rank_share"]
    run_dir = write_run(root, name, method, 0.5, seed, "rte", {"accuracy": 0.6},
                        compression={"remaining_ratio": 0.5, "low_rank_share": low_rank_share})
    checkpoint = run_dir / "checkpoint-30"
    pruner.save(str(checkpoint))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"max_steps": 40, "global_step": 30}))
    return low_rank_share


def test_cli_plots_draw_schedules_importances_and_spectra_from_saved_runs(tmp_path, capsys):
    from safetensors.torch import save_file

    root = tmp_path / "outputs"
    low_rank_share = _pruning_run(root, "lo", "losparse")
    _pruning_run(root, "itp", "itp")
    _pruning_run(root, "other-seed", "losparse", seed=2)  # no ITP run with seed 2: no importance plot
    dense_dir = write_run(root, "dense", "finetune", 1.0, 1, "rte", {"accuracy": 0.7})
    save_file({"encoder.weight": torch.randn(24, 16), "embeddings.weight": torch.randn(50, 16),
               "encoder.bias": torch.randn(24)}, str(dense_dir / "model.safetensors"))
    plots = tmp_path / "plots"
    assert main([str(root), "--table", "claim", "--plots", str(plots)]) == 0
    names = sorted(os.listdir(plots))
    assert all(_png(str(plots / n)) for n in names)
    schedules = [n for n in names if n.startswith("schedule-")]
    # t_i, t_f from the configs' ratios of T = 40; p_T = ratio - low-rank share (LoSparse), the ratio (ITP)
    assert sorted(schedules) == sorted([f"schedule-T40-ti4-tf12-p{0.5 - low_rank_share:.4f}-dT5-paper.png",
                                        "schedule-T40-ti4-tf12-p0.5000-dT5-paper.png"])
    assert [n for n in names if n.startswith("importance-")] == ["importance-deberta-v3-base-rte-r0.5-s1.png"]
    assert [n for n in names if n.startswith("spectrum-")] == ["spectrum-deberta-v3-base-rte-finetune-r1-s1.png"]
    assert "rte-accuracy.png" in names
    assert len(names) == 5


def test_table_7_cofi_rows_beside_the_paper(tmp_path, capsys):
    t7 = paper_results.TABLE_7["results"]
    assert t7[("finetune", 1.0)] == {"mnli": 84.41, "mrpc": (87.74, 91.35), "rte": 72.56, "qnli": 91.54, "sst2": 92.43}
    assert t7[("cofi", 0.1)] == {"mnli": 80.00, "mrpc": (84.07, 88.50), "rte": 67.51, "qnli": 86.67, "sst2": 90.60}
    assert t7[("cofi_losparse", 0.1)] == {"mnli": 82.56, "mrpc": (85.54, 89.45), "rte": 68.23, "qnli": 89.66,
                                          "sst2": 91.51}
    root = tmp_path / "outputs"
    bert, kd = "bert-base-uncased", {"teacher_model_name_or_path": "teacher", "alpha_layer": 0.9}
    write_run(root, "mnli/finetune-r1.0", "finetune", 1.0, 42, "mnli",
              {"accuracy": 0.8450, "mismatched_accuracy": 0.85}, model=bert)
    write_run(root, "mnli/cofi-r0.1", "cofi", 0.1, 42, "mnli", {"accuracy": 0.7950, "mismatched_accuracy": 0.80},
              model=bert, **kd)
    write_run(root, "mrpc/cofi_losparse-r0.1", "cofi_losparse", 0.1, 42, "mrpc", {"accuracy": 0.86, "f1": 0.9001},
              model=bert, **kd)
    write_run(root, "rte/losparse-kd-r0.5", "losparse", 0.5, 42, "rte", {"accuracy": 0.70}, model=bert, **kd)
    write_run(root, "rte/cofi-no-teacher", "cofi", 0.1, 42, "rte", {"accuracy": 0.61}, model=bert)
    assert main([str(root), "--table", "7"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("### Table 7") and "Runs matched: 3" in text
    header = next(line for line in text.splitlines() if line.startswith("| Ratio"))
    assert header == "| Ratio | Method | MNLI Acc | MRPC Acc / F1 | RTE Acc | QNLI Acc | SST-2 Acc |"
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| 10%") or
            line.startswith("| 100%")}
    assert list(rows) == ["BERT-base (teacher)", "CoFi", "CoFi + LoSparse"]  # only Table 7's methods, no extras
    assert "84.50 (paper 84.41, +0.09)" in rows["BERT-base (teacher)"]
    assert "79.50 (paper 80.00, −0.50)" in rows["CoFi"]
    assert "— (paper 67.51)" in rows["CoFi"]  # the undistilled RTE run is not matched
    assert "86.00 (paper 85.54, +0.46) / 90.01 (paper 89.45, +0.56)" in rows["CoFi + LoSparse"]
    assert "— (paper 91.51)" in rows["CoFi + LoSparse"]


def test_table_7_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--table", "7"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no readable all_results.json")
    with pytest.raises(SystemExit) as exc:
        main([str(empty), "--table", "6"])  # Table 6 has no paper table of its own here (see --table all)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "invalid choice: '6'" in last and "7" in last
