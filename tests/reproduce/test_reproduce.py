"""scripts/reproduce.py and the per-table wrappers: which cells, which commands, resume, failures.

Everything runs the real driver in a subprocess in --dry_run mode (no model, no torch), except the
run-loop test, which points the cells at a fake interpreter that writes all_results.json.
Expected cell counts are computed from the YAML tables, so editing a table keeps the tests honest.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT as REPO_ROOT

REPO = Path(REPO_ROOT)
DRIVER = REPO / "scripts" / "reproduce.py"
COUNT_LINE = re.compile(r"^(\d+) cells: (\d+) done, (\d+) to run$", re.M)

GLUE_DEBERTA = "configs/glue/deberta-v3-base.yaml"
GLUE_BERT = "configs/glue/bert-base-uncased.yaml"
SQUAD_DEBERTA = "configs/squad/deberta-v3-base.yaml"
SQUAD_BERT = "configs/squad/bert-base-uncased.yaml"
XSUM = "configs/summarization/bart-large-xsum.yaml"
CNN = "configs/summarization/bart-large-cnn.yaml"
DISTILL_DEBERTA = "configs/distillation/deberta-v3-base.yaml"
DISTILL_BERT = "configs/distillation/bert-base-uncased.yaml"
TABLE7 = "configs/table7/bert-base-uncased.yaml"
FIGURE6_LOW_RANK = (0.01, 0.02, 0.03, 0.05, 0.1, 0.15)  # the brief's sweep (Figure 6's x-axis)
FAKE_CLAIM = ["--model_dirs", "/fake/minilm", "/fake/mpnet", "--train_file", "/fake/movies/train.csv",
              "--validation_file", "/fake/movies/validation.csv"]


def tasks(config: str) -> dict:
    return yaml.safe_load((REPO / config).read_text())["tasks"]


def n_ratios(config: str, task: str) -> int:
    return len(tasks(config)[task].get("ratios") or {})


def ratios(config: str, task: str) -> list[float]:
    return [float(r) for r in tasks(config)[task]["ratios"]]


def expected_counts() -> dict[str, int]:
    per_task = lambda config, n_methods, extra=1: sum(n_ratios(config, t) * n_methods + extra for t in tasks(config))
    return {
        # every task x ratio x {movement, itp, losparse} + 1 finetune
        "table1_deberta_glue": per_task(GLUE_DEBERTA, 3),
        "table2_bert_glue": per_task(GLUE_BERT, 3),
        # DeBERTa {itp, losparse}, BERT {movement, itp, losparse}, + finetune each
        "table3_squad": per_task(SQUAD_DEBERTA, 2) + per_task(SQUAD_BERT, 3),
        # {itp, losparse} x ratios + finetune + lead3 per dataset
        "table4_bart_summarization": per_task(XSUM, 2, 2) + per_task(CNN, 2, 2),
        # teacher + {itp, losparse} students + 2 distillation stages per task
        "table5_distill_deberta": len(tasks(DISTILL_DEBERTA)) * (1 + 2 + 2),
        # teacher + 2 ratios x (losparse + distillation stage) per task
        "table6_distill_bert": len(tasks(DISTILL_BERT)) * (1 + 2 * 2),
        # teacher (finetune) + cofi + cofi_losparse at 10% per task
        "table7_cofi": len(tasks(TABLE7)) * (1 + 2),
        # {lowrank, lowrank_prune_all, losparse} at the ratios of Tables 1, 3, 4
        "figure5_lowrank_variants": 3 * (n_ratios(GLUE_DEBERTA, "mnli") + n_ratios(SQUAD_DEBERTA, "squad")
                                         + n_ratios(XSUM, "xsum")),
        # MNLI and RTE x ratios 0.2, 0.1 x the low-rank ratios below the ratio
        "figure6_allocation": 2 * sum(sum(r < ratio for r in FIGURE6_LOW_RANK) for ratio in (0.2, 0.1)),
        # 2 models x 1 seed x (finetune + 3 methods x 3 ratios)
        "claim_real_weights": 2 * (1 + 3 * 3),
    }


def run(args: list[str], env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "MODEL_DIRS", "NUM_GPUS", "TEACHER_DIRS")}
    full_env.update(env or {})
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60)


def dry(table: str, root: Path, *extra: str) -> tuple[list[list[str]], list[str], tuple[int, int, int]]:
    """(commands to run, skipped lines, (cells, done, to run)) of a dry run of the driver."""
    proc = run([sys.executable, str(DRIVER), table, "--dry_run", "--output_root", str(root), *extra])
    assert proc.returncode == 0, proc.stderr
    return parse(proc.stdout)


def parse(stdout: str):
    match = COUNT_LINE.search(stdout)
    assert match, stdout[-2000:]
    lines = [line for line in stdout.splitlines() if line and not COUNT_LINE.match(line)]
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    skipped = [line for line in lines if line.startswith("# skip (done)")]
    return commands, skipped, tuple(int(g) for g in match.groups())


def flag(argv: list[str], name: str) -> str | None:
    """The last value of --name (argparse keeps the last)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


@pytest.mark.parametrize("wrapper", sorted(expected_counts()))
def test_wrapper_dry_run_prints_every_cell(wrapper: str, tmp_path: Path) -> None:
    script = REPO / "scripts" / f"{wrapper}.sh"
    assert len(script.read_text().splitlines()) <= 6
    extra = FAKE_CLAIM if wrapper.startswith("claim") else []
    proc = run(["bash", str(script), "--output_root", str(tmp_path), *extra], env={"DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    commands, skipped, (cells, done, todo) = parse(proc.stdout)
    expected = expected_counts()[wrapper]
    assert (cells, done, todo) == (expected, 0, expected)
    assert len(commands) == expected and not skipped
    dirs = [flag(c, "--output_dir") for c in commands]
    assert len(set(dirs)) == len(dirs), "two cells share an output dir"
    assert all(d.startswith(str(tmp_path)) for d in dirs)
    assert not list(tmp_path.iterdir()), "a dry run must not create anything"


def test_table1_cells_and_layout(tmp_path: Path) -> None:
    commands, _, _ = dry("table1", tmp_path)
    by_dir = {os.path.relpath(flag(c, "--output_dir"), tmp_path): c for c in commands}
    for task in tasks(GLUE_DEBERTA):
        assert f"table1/deberta-v3-base/{task}/finetune-r1.0" in by_dir
        for ratio in ratios(GLUE_DEBERTA, task):
            for method in ("movement", "itp", "losparse"):
                argv = by_dir[f"table1/deberta-v3-base/{task}/{method}-r{ratio}"]
                assert argv[:2] == ["python", "run_glue.py"] or argv[1] == "run_glue.py"
                assert flag(argv, "--config") == GLUE_DEBERTA and flag(argv, "--task_name") == task
                assert float(flag(argv, "--remaining_ratio")) == ratio and flag(argv, "--method") == method
                assert flag(argv, "--seed") == "42" and argv[-1] == "--overwrite_output_dir"
                assert "--gradient_accumulation_steps" not in argv  # one GPU: the config's value stands


def test_done_cell_is_skipped(tmp_path: Path) -> None:
    cell = tmp_path / "table2" / "bert-base-uncased" / "rte" / "losparse-r0.2"
    cell.mkdir(parents=True)
    (cell / "all_results.json").write_text("{}")
    commands, skipped, (cells, done, todo) = dry("table2", tmp_path)
    assert (done, todo) == (1, cells - 1) and len(commands) == cells - 1
    assert len(skipped) == 1 and str(cell) in skipped[0]
    assert all(flag(c, "--output_dir") != str(cell) for c in commands)


def test_num_gpus_divides_accumulation_and_uses_accelerate(tmp_path: Path) -> None:
    commands, _, (cells, _, _) = dry("table1", tmp_path, "--num_gpus", "4", "--only", "mnli")
    accumulation = tasks(GLUE_DEBERTA)["mnli"]["gradient_accumulation_steps"]  # 8 (batch 256 = 32 x 8)
    assert commands and len(commands) == cells
    for argv in commands:
        assert argv[:4] == ["accelerate", "launch", "--num_processes", "4"]
        assert flag(argv, "--gradient_accumulation_steps") == str(accumulation // 4)
    # not divisible (STS-B accumulates 1): kept, with a warning
    proc = run([sys.executable, str(DRIVER), "table1", "--dry_run", "--num_gpus", "4", "--only", "stsb"])
    assert proc.returncode == 0 and "not divisible" in proc.stderr
    assert all(flag(shlex.split(l), "--gradient_accumulation_steps") is None
               for l in proc.stdout.splitlines() if l.startswith("accelerate"))
    # --no_accelerate: plain python, accumulation still divided
    commands, _, _ = dry("table1", tmp_path, "--num_gpus", "4", "--only", "mnli", "--no_accelerate")
    assert all(c[0] != "accelerate" and flag(c, "--gradient_accumulation_steps") == "2" for c in commands)


def test_only_filters(tmp_path: Path) -> None:
    commands, _, (cells, _, _) = dry("table1", tmp_path, "--only", "mnli")
    assert cells == n_ratios(GLUE_DEBERTA, "mnli") * 3 + 1 == len(commands)
    assert all(flag(c, "--task_name") == "mnli" for c in commands)
    commands, _, (cells, _, _) = dry("table3", tmp_path, "--only", "bert-base-uncased/.*/movement")
    assert cells == n_ratios(SQUAD_BERT, "squad")
    assert all(c[1] == "run_squad.py" and flag(c, "--dataset_name") == "squad" for c in commands)


def test_seeds_multiply_cells_and_name_dirs(tmp_path: Path) -> None:
    commands, _, (cells, _, _) = dry("table2", tmp_path, "--only", "rte", "--seeds", "42", "7")
    assert cells == 2 * (n_ratios(GLUE_BERT, "rte") * 3 + 1)
    dirs = {flag(c, "--output_dir"): flag(c, "--seed") for c in commands}
    assert dirs[str(tmp_path / "table2/bert-base-uncased/rte/itp-r0.2")] == "42"
    assert dirs[str(tmp_path / "table2/bert-base-uncased/rte/itp-r0.2-s7")] == "7"


def test_stage_one_cells_are_the_cells_of_tables_1_and_3(tmp_path: Path) -> None:
    proc = run([sys.executable, str(DRIVER), "table5", "--dry_run", "--output_root", str(tmp_path)])
    table5 = parse(proc.stdout)[0]
    assert f"# then: python -m reproduce.report {tmp_path}/table5 {tmp_path}/table1 {tmp_path}/table3 --table 5" \
        in proc.stdout
    others = {shlex.join(c) for t in ("table1", "table3", "table4") for c in dry(t, tmp_path)[0]}
    stage1 = [c for c in table5 if "/table5/" not in flag(c, "--output_dir")]
    assert len(stage1) == 3 * len(tasks(DISTILL_DEBERTA))  # teacher + itp + losparse, reused verbatim
    assert all(shlex.join(c) in others for c in stage1)
    stage2 = [c for c in table5 if "/table5/" in flag(c, "--output_dir")]
    for argv in stage2:
        assert flag(argv, "--config") == DISTILL_DEBERTA and flag(argv, "--distill_stage") == "after"
        assert flag(argv, "--method") == "finetune" and flag(argv, "--remaining_ratio") == "0.2"
        student, teacher = flag(argv, "--model_name_or_path"), flag(argv, "--teacher_model_name_or_path")
        assert teacher.endswith("/finetune-r1.0") and re.search(r"/(itp|losparse)-r0\.2$", student)
        assert flag(argv, "--output_dir").endswith(os.path.basename(student).replace("-r", "-kd-r"))
    # Figure 5's LoSparse points are Tables 1/3/4 cells too.
    figure5, _, _ = dry("figure5", tmp_path)
    losparse = [c for c in figure5 if flag(c, "--method") == "losparse"]
    assert losparse and all(shlex.join(c) in others for c in losparse)


def test_table6_inlines_a_missing_ratio_and_bert_sst2(tmp_path: Path) -> None:
    commands, _, _ = dry("table6", tmp_path)
    students = [c for c in commands if flag(c, "--method") == "losparse"]
    assert {flag(c, "--remaining_ratio") for c in students} == {"0.5", "0.25"}
    for argv in students:
        assert "--config" not in argv  # Tables 9/10 stop at 20%: values passed as flags
        task = flag(argv, "--task_name")
        source = GLUE_BERT if task in tasks(GLUE_BERT) else GLUE_DEBERTA
        nearest = tasks(source)[task]["ratios"][0.2]
        assert float(flag(argv, "--beta1")) == nearest["beta1"]
        assert float(flag(argv, "--low_rank_ratio")) == nearest["low_rank_ratio"]
        assert flag(argv, "--learning_rate") is not None and flag(argv, "--num_train_epochs") is not None
        assert flag(argv, "--model_name_or_path") == "bert-base-uncased"
    sst2 = [c for c in commands if flag(c, "--task_name") == "sst2" and "--distill_stage" not in c]
    assert sst2 and all(flag(c, "--model_name_or_path") == "bert-base-uncased" for c in sst2)
    assert any(flag(c, "--config") == GLUE_DEBERTA for c in sst2)  # the teacher uses the DeBERTa sst2 section


#: Table 7's LoSparse part, (beta, r) of the 10% rows: Table 10 (BERT-base) for MNLI, RTE, QNLI, Table 9 (DeBERTaV3,
#: the only table with MRPC and SST-2) for MRPC and SST-2; CoFi's schedule (pruning + fine-tune epochs, pre-finetune
#: epochs, Lagrangian warm-up epochs) from its repository: large tasks 20 + 20, 1, 2; small tasks 100 + 20, 4, 20.
TABLE7_LOSPARSE = {"mnli": (0.85, 0.05), "mrpc": (0.85, 0.03), "rte": (0.5, 0.02), "qnli": (0.85, 0.03),
                   "sst2": (0.85, 0.01)}
TABLE7_SCHEDULE = {"mnli": (40, 1, 2), "qnli": (40, 1, 2), "sst2": (40, 1, 2),
                   "mrpc": (120, 4, 20), "rte": (120, 4, 20)}


def _resolved(argv: list[str]) -> dict:
    """The values the entry script gets for this command: its --config resolved, then its own flags."""
    from losparse.cli.yaml_config import resolve_yaml_config

    values = resolve_yaml_config(str(REPO / flag(argv, "--config")), flag(argv, "--task_name"),
                                 float(flag(argv, "--remaining_ratio")), None)
    for name in ("method", "teacher_model_name_or_path"):
        if flag(argv, f"--{name}") is not None:
            values[name] = flag(argv, f"--{name}")
    return values


def test_table7_cells_teachers_and_flags(tmp_path: Path) -> None:
    proc = run([sys.executable, str(DRIVER), "table7", "--dry_run", "--output_root", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    commands, _, (cells, done, todo) = parse(proc.stdout)
    assert set(tasks(TABLE7)) == set(TABLE7_LOSPARSE) and (cells, done, todo) == (15, 0, 15)
    assert f"# then: python -m reproduce.report {tmp_path}/table7 --table 7" in proc.stdout
    by_dir = {os.path.relpath(flag(c, "--output_dir"), tmp_path): c for c in commands}
    for task, (beta, low_rank) in TABLE7_LOSPARSE.items():
        base = f"table7/bert-base-uncased/{task}"
        teacher = by_dir[f"{base}/finetune-r1.0"]
        assert flag(teacher, "--method") == "finetune" and flag(teacher, "--teacher_model_name_or_path") is None
        values = _resolved(teacher)
        assert (values["learning_rate"], values["num_train_epochs"], values["per_device_train_batch_size"]) == (
            3e-5, 3, 32)  # Appendix F's MNLI teacher recipe (the others: ASSUMPTION, the same)
        assert values["alpha_output"] == values["alpha_layer"] == 0.0
        epochs, prefinetune, warmup = TABLE7_SCHEDULE[task]
        for method in ("cofi", "cofi_losparse"):
            argv = by_dir[f"{base}/{method}-r0.1"]
            assert argv[1] == "run_glue.py" and flag(argv, "--config") == TABLE7 and flag(argv, "--task_name") == task
            assert flag(argv, "--method") == method and flag(argv, "--remaining_ratio") == "0.1"
            assert flag(argv, "--teacher_model_name_or_path") == str(tmp_path / base / "finetune-r1.0")
            assert commands.index(argv) > commands.index(teacher)  # the teacher runs first
            values = _resolved(argv)
            assert (values["beta1"], values["low_rank_ratio"], values["structured_ratio"]) == (beta, low_rank, 0.2)
            assert (values["num_train_epochs"], values["cofi_prefinetune_epochs"], values["lagrangian_warmup_epochs"],
                    values["cofi_finetune_epochs"]) == (epochs, prefinetune, warmup, 20)
            assert (values["learning_rate"], values["per_device_train_batch_size"], values["max_seq_length"],
                    values["reg_learning_rate"]) == (2e-5, 32, 128, 0.01)
            assert (values["alpha_output"], values["alpha_layer"], values["distill_temperature"]) == (0.1, 0.9, 2.0)
            assert values.get("gradient_accumulation_steps", 1) == 1 and "max_grad_norm" not in values


def test_table7_given_teachers_replace_the_finetune_cells(tmp_path: Path) -> None:
    commands, _, (cells, _, _) = dry("table7", tmp_path, "--teacher_dirs", "rte=/m/textattack-RTE", "sst2=/m/ta-sst2")
    assert cells == 15 - 2
    for task, teacher in (("rte", "/m/textattack-RTE"), ("sst2", "/m/ta-sst2")):
        mine = [c for c in commands if flag(c, "--task_name") == task]
        assert [flag(c, "--method") for c in mine] == ["cofi", "cofi_losparse"]
        assert all(flag(c, "--teacher_model_name_or_path") == teacher for c in mine)
    assert sum(flag(c, "--method") == "finetune" for c in commands) == 3
    proc = run([sys.executable, str(DRIVER), "table7", "--dry_run", "--output_root", str(tmp_path)],
               env={"TEACHER_DIRS": "mrpc=/m/ta-mrpc"})
    assert parse(proc.stdout)[2][0] == 14 and "--teacher_model_name_or_path /m/ta-mrpc" in proc.stdout
    assert "# note: mrpc: the teacher is --teacher_dirs mrpc=/m/ta-mrpc (no finetune cell)" in proc.stdout
    for bad, message in ((["--teacher_dirs", "rte"], "write TASK=DIR"),
                         (["--teacher_dirs", "cola=/x"], "'cola' is not a task of configs/table7"),
                         (["--teacher_dirs", "rte=/a", "rte=/b"], "names rte twice")):
        proc = run([sys.executable, str(DRIVER), "table7", "--dry_run", *bad])
        assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1] and not proc.stdout
    proc = run([sys.executable, str(DRIVER), "table6", "--dry_run", "--teacher_dirs", "rte=/x"])
    assert proc.returncode == 2 and "applies to table7 only" in proc.stderr


def test_table7_resumes_cofi_cells_only_with_their_pruner_state(tmp_path: Path) -> None:
    mnli = tmp_path / "table7" / "bert-base-uncased" / "mnli"
    fake_checkpoint(mnli / "cofi-r0.1", 500, COMPLETE)                   # the gates' state was never written
    fake_checkpoint(mnli / "cofi_losparse-r0.1", 500, COMPLETE + PRUNER)
    fake_checkpoint(mnli / "finetune-r1.0", 300, COMPLETE)
    commands, _, _ = dry("table7", tmp_path, "--only", "mnli")
    by_name = {os.path.basename(flag(c, "--output_dir")): c for c in commands}
    assert by_name["cofi-r0.1"][-1] == "--overwrite_output_dir"
    for name in ("cofi_losparse-r0.1", "finetune-r1.0"):
        assert flag(by_name[name], "--resume_from_checkpoint") == "true"


def test_table7_students_wait_for_their_teacher(tmp_path: Path) -> None:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    base = [sys.executable, str(DRIVER), "table7", "--output_root", str(tmp_path / "out"), "--python", str(fake)]
    proc = run(base + ["--only", "rte/cofi"], env={"DRY_RUN": "0"})
    assert proc.returncode == 1 and "blocked table7/bert-base-uncased/rte/cofi-r0.1: needs " in proc.stdout
    proc = run(base + ["--only", "/rte/"], env={"DRY_RUN": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("finetune-r1.0", "cofi-r0.1", "cofi_losparse-r0.1"):
        assert (tmp_path / "out/table7/bert-base-uncased/rte" / name / "all_results.json").is_file()


def test_figure6_sweeps_low_rank_below_the_ratio(tmp_path: Path) -> None:
    commands, _, _ = dry("figure6", tmp_path)
    pairs = {(flag(c, "--task_name"), float(flag(c, "--remaining_ratio")), float(flag(c, "--low_rank_ratio")))
             for c in commands}
    assert ("mnli", 0.2, 0.15) in pairs and ("rte", 0.1, 0.05) in pairs and ("rte", 0.1, 0.1) not in pairs
    assert all(lr < ratio for _, ratio, lr in pairs)


def _load_cli_resolver():
    """The entry scripts' YAML resolution (losparse.cli.run.parse_arguments calls losparse.cli.yaml_config's)."""
    from losparse.cli.run import resolve_yaml_config

    return resolve_yaml_config


class _AnyKey:
    def __contains__(self, key: object) -> bool:
        return True


def test_every_config_command_resolves_with_the_entry_scripts_loader(tmp_path: Path) -> None:
    resolve = _load_cli_resolver()
    lookups = set()
    for table in ("table1", "table2", "table3", "table4", "table5", "table6", "table7", "figure5", "figure6"):
        for argv in dry(table, tmp_path)[0]:
            if flag(argv, "--config") is not None:
                lookups.add((flag(argv, "--config"), flag(argv, "--task_name"), flag(argv, "--remaining_ratio")))
    assert len(lookups) > 50
    for config, task, ratio in sorted(lookups, key=str):  # raises LoSparseUsageError on a missing section
        assert resolve(str(REPO / config), task, float(ratio) if ratio else None, _AnyKey()), (config, task, ratio)


def test_claim_uses_local_models_and_files(tmp_path: Path) -> None:
    commands, _, (cells, _, _) = dry("claim", tmp_path, *FAKE_CLAIM, "--seeds", "1", "2")
    assert cells == 2 * 2 * (1 + 3 * 3)
    for argv in commands:
        assert flag(argv, "--config") == "configs/quickstart/minilm-movie-sentiment.yaml"
        assert flag(argv, "--model_name_or_path") in ("/fake/minilm", "/fake/mpnet")
        assert flag(argv, "--train_file") == "/fake/movies/train.csv" and flag(argv, "--task_name") is None
        assert re.search(r"/claim/(minilm|mpnet)/movies/(finetune|itp|movement|losparse)-r[\d.]+-s[12]$",
                         flag(argv, "--output_dir"))
    proc = run([sys.executable, str(DRIVER), "claim", "--dry_run", "--output_root", str(tmp_path),
                "--train_file", "/x/train.csv", "--validation_file", "/x/val.csv"],
               env={"MODEL_DIRS": "/m/one /m/two /m/three"})
    assert parse(proc.stdout)[2][0] == 3 * (1 + 3 * 3)


FAKE_PYTHON = """\
#!{python}
import json, os, re, sys
out = sys.argv[sys.argv.index("--output_dir") + 1]
print("fake run", " ".join(sys.argv[1:]))
if re.search(os.environ.get("FAKE_FAIL", "^$"), out):
    print("boom", file=sys.stderr)
    sys.exit(3)
os.makedirs(out, exist_ok=True)
json.dump({{"eval_accuracy": 0.5}}, open(os.path.join(out, "all_results.json"), "w"))
"""


def test_run_loop_logs_stops_resumes_and_keeps_going(tmp_path: Path) -> None:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    root = tmp_path / "out"
    base = [sys.executable, str(DRIVER), "claim", "--output_root", str(root), "--python", str(fake),
            "--model_dirs", "/fake/minilm", "--train_file", "/fake/movies/train.csv",
            "--validation_file", "/fake/movies/validation.csv"]
    cell_dir = root / "claim" / "minilm" / "movies"

    proc = run(base, env={"FAKE_FAIL": r"itp-r0\.15$", "DRY_RUN": "0"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "FAILED claim/minilm/movies/itp-r0.15: exit code 3" in proc.stderr and "boom" in proc.stderr
    assert "command: " in proc.stderr and "--keep_going" in proc.stderr
    assert (cell_dir / "itp-r0.2" / "all_results.json").is_file()
    assert "fake run" in (cell_dir / "itp-r0.2.log").read_text()
    assert not (cell_dir / "losparse-r0.1").exists()  # stopped at the first failure

    proc = run(base + ["--keep_going"], env={"FAKE_FAIL": r"itp-r0\.15$", "DRY_RUN": "0"})
    assert proc.returncode == 1
    assert proc.stdout.count("skip (done)") == 4  # finetune + 3 cells of 0.2 finished before
    assert (cell_dir / "losparse-r0.1" / "all_results.json").is_file()

    proc = run(base, env={"DRY_RUN": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skip (done)") == 9 and "ok claim/minilm/movies/itp-r0.15" in proc.stdout
    assert f"python -m reproduce.report {root / 'claim'} --table claim" in proc.stdout

    # DRY_RUN=1 through the wrapper on a finished table: everything done, nothing run.
    proc = run(["bash", str(REPO / "scripts" / "claim_real_weights.sh"), *base[3:]], env={"DRY_RUN": "1"})
    assert parse(proc.stdout)[2] == (10, 10, 0)


def test_distillation_stage_waits_for_its_student_and_teacher(tmp_path: Path) -> None:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    base = [sys.executable, str(DRIVER), "table5", "--output_root", str(tmp_path / "out"), "--python", str(fake)]
    proc = run(base + ["--only", "table5/.*/rte/"], env={"DRY_RUN": "0"})
    assert proc.returncode == 1 and "blocked table5/deberta-v3-base/rte/itp-kd-r0.2" in proc.stdout
    proc = run(base + ["--only", "/rte/"], env={"DRY_RUN": "0"})  # teacher, students, then the two stages
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out/table5/deberta-v3-base/rte/losparse-kd-r0.2/all_results.json").is_file()
    assert (tmp_path / "out/table1/deberta-v3-base/rte/finetune-r1.0/all_results.json").is_file()


def test_help_lists_every_table() -> None:
    proc = run([sys.executable, str(DRIVER), "--help"])
    assert proc.returncode == 0
    for table in ("table1", "table2", "table3", "table4", "table5", "table6", "table7", "figure5", "figure6", "claim"):
        assert re.search(rf"^  {table}\s", proc.stdout, re.M)


# ------------------------------------------------------------------------------- resuming a cell

COMPLETE = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")
PRUNER = ("losparse_pruner.safetensors", "losparse_pruner.json")


def fake_checkpoint(cell: Path, step: int, files: tuple[str, ...]) -> Path:
    directory = cell / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    for name in files:
        (directory / name).write_text("{}")
    return directory


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_interrupted_cells_resume_from_their_newest_complete_checkpoint(tmp_path: Path) -> None:
    rte = tmp_path / "table2" / "bert-base-uncased" / "rte"
    fake_checkpoint(rte / "losparse-r0.2", 100, COMPLETE + PRUNER)
    fake_checkpoint(rte / "losparse-r0.2", 200, COMPLETE[1:] + PRUNER)  # killed before trainer_state.json
    fake_checkpoint(rte / "itp-r0.2", 50, COMPLETE)                        # the pruner state was never written
    fake_checkpoint(rte / "finetune-r1.0", 30, COMPLETE)                   # no pruner in a finetune run
    (rte / "movement-r0.2").mkdir()
    (rte / "movement-r0.2" / "train.log").write_text("started")          # no results, no checkpoint
    (rte / "itp-r0.15").mkdir()                                            # empty: a fresh start
    fake_checkpoint(rte / "losparse-r0.15", 10, COMPLETE + PRUNER)
    (rte / "losparse-r0.15" / "all_results.json").write_text("{}")       # done wins over checkpoints
    before = tree(tmp_path)

    proc = run([sys.executable, str(DRIVER), "table2", "--dry_run", "--output_root", str(tmp_path),
                "--only", "rte"])
    assert proc.returncode == 0, proc.stderr
    commands, skipped, (cells, done, todo) = parse(proc.stdout)
    assert (done, todo) == (1, cells - 1) and len(skipped) == 1 and "losparse-r0.15" in skipped[0]
    by_dir = {os.path.relpath(flag(c, "--output_dir"), rte): c for c in commands}

    for name in ("losparse-r0.2", "finetune-r1.0"):  # resumed: no overwrite
        argv = by_dir[name]
        assert flag(argv, "--resume_from_checkpoint") == "true" and "--overwrite_output_dir" not in argv
    for name in ("itp-r0.2", "movement-r0.2", "itp-r0.15", "losparse-r0.1"):  # started from zero
        argv = by_dir[name]
        assert argv[-1] == "--overwrite_output_dir" and "--resume_from_checkpoint" not in argv

    comments = [line for line in proc.stdout.splitlines() if re.match(r"# (resume|restart) ", line)]
    assert len(comments) == 4
    line = next(c for c in comments if "/losparse-r0.2:" in c)
    assert line.startswith("# resume table2/bert-base-uncased/rte/losparse-r0.2: ")
    assert "newest complete checkpoint checkpoint-100" in line and "checkpoint-200 (missing trainer_state.json)" in line
    itp = next(c for c in comments if "/itp-r0.2:" in c)
    assert itp.startswith("# restart ") and "losparse_pruner.safetensors" in itp
    movement = next(c for c in comments if "/movement-r0.2:" in c)
    assert movement.startswith("# restart ") and "neither all_results.json nor a checkpoint" in movement
    assert not any("/itp-r0.15:" in c for c in comments)  # an empty dir is just a fresh start
    assert "# of the cells to run: 2 resume from a checkpoint, 2 restart from zero" in proc.stdout
    assert tree(tmp_path) == before, "a dry run must not touch the output dirs"

    # The comment line sits right above the command it explains.
    lines = proc.stdout.splitlines()
    index = lines.index(line)
    assert flag(shlex.split(lines[index + 1]), "--output_dir") == str(rte / "losparse-r0.2")


def test_save_only_model_checkpoints_resume_without_optimizer_state(tmp_path: Path) -> None:
    cell = tmp_path / "table2" / "bert-base-uncased" / "rte" / "finetune-r1.0"
    fake_checkpoint(cell, 40, ("trainer_state.json", "model.safetensors"))
    restart, _, _ = dry("table2", tmp_path, "--only", "rte/finetune")
    assert restart[0][-1] == "--overwrite_output_dir"
    resumed, _, _ = dry("table2", tmp_path, "--only", "rte/finetune", "--extra", "--save_only_model true")
    assert flag(resumed[0], "--resume_from_checkpoint") == "true"


RECORDING_PYTHON = FAKE_PYTHON.replace('print("fake run", " ".join(sys.argv[1:]))',
                                       'print("fake run", " ".join(sys.argv[1:]))\n'
                                       'open(out + ".argv", "w").write(" ".join(sys.argv[1:]))')


def test_run_loop_resumes_an_interrupted_cell_and_says_so(tmp_path: Path) -> None:
    fake = tmp_path / "fake_python"
    fake.write_text(RECORDING_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    root = tmp_path / "out"
    cells = root / "claim" / "minilm" / "movies"
    fake_checkpoint(cells / "losparse-r0.2", 60, COMPLETE + PRUNER)
    fake_checkpoint(cells / "itp-r0.2", 60, COMPLETE)  # incomplete for itp: no pruner state
    base = [sys.executable, str(DRIVER), "claim", "--output_root", str(root), "--python", str(fake),
            "--model_dirs", "/fake/minilm", "--train_file", "/fake/movies/train.csv",
            "--validation_file", "/fake/movies/validation.csv", "--only", r"(losparse|itp|movement)-r0\.2$"]
    proc = run(base, env={"DRY_RUN": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 cells: 0 done, 3 to run (1 resume from a checkpoint, 1 restart from zero)" in proc.stdout
    assert re.search(r"\] resume from checkpoint-60 claim/minilm/movies/losparse-r0\.2: no all_results\.json; "
                     r"newest complete checkpoint checkpoint-60", proc.stdout)
    assert re.search(r"\] restart claim/minilm/movies/itp-r0\.2: no all_results\.json and no complete checkpoint",
                     proc.stdout)
    assert re.search(r"\] run claim/minilm/movies/movement-r0\.2  \(log: ", proc.stdout)
    resumed = (cells / "losparse-r0.2.argv").read_text().split()
    assert flag(resumed, "--resume_from_checkpoint") == "true" and "--overwrite_output_dir" not in resumed
    for name in ("itp-r0.2", "movement-r0.2"):
        argv = (cells / f"{name}.argv").read_text().split()
        assert argv[-1] == "--overwrite_output_dir" and "--resume_from_checkpoint" not in argv
    assert "--resume_from_checkpoint true" in (cells / "losparse-r0.2.log").read_text()


def _load_driver():
    """The driver behind scripts/reproduce.py."""
    from reproduce import driver as reproduce

    return reproduce


def test_dry_run_imports_no_torch(tmp_path: Path) -> None:
    code = ("import runpy, sys\n"
            "sys.argv = [sys.argv[1], 'table1', '--dry_run', '--output_root', sys.argv[2]]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'the dry run imported torch'\n")
    proc = run([sys.executable, "-c", code, str(DRIVER), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert COUNT_LINE.search(proc.stdout)


def test_the_driver_uses_the_trainers_completeness_rule() -> None:
    """One rule decides what a resume may use: the driver calls losparse.core.checkpoint, which stays torch-free."""
    from losparse.core.methods import METHOD_SPECS

    driver = _load_driver()
    assert driver.missing_files is __import__("losparse.core.checkpoint", fromlist=["missing_files"]).missing_files
    # cofi_losparse (Table 7) is listed before losparse.core.methods registers it; once registered it must prune
    pending = {"cofi_losparse"} - set(METHOD_SPECS)
    assert set(driver.PRUNER_METHODS) - pending == {name for name, spec in METHOD_SPECS.items()
                                                    if spec.decomposes or spec.prunes_structures}
    done = subprocess.run([sys.executable, "-c", "import sys, losparse.core.checkpoint; assert 'torch' not in sys.modules"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
