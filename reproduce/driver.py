#!/usr/bin/env python
"""Run (or print) every training run behind one of the paper's tables or figures (scripts/reproduce.py).

    python scripts/reproduce.py table1 --dry_run                 # print the 80 commands of Table 1
    python scripts/reproduce.py table1 --num_gpus 4              # run them, 4 GPUs per run
    python scripts/reproduce.py table3 --only 'bert.*itp' --keep_going
    python scripts/reproduce.py claim --seeds 1 2 3 --mpnet_dir ~/models/mpnet

A *cell* is one run of an entry script (run_glue.py, run_squad.py, run_summarization.py) with one
model, task, method, remaining ratio and seed. Its output directory is

    <output_root>/<table>/<model>/<task>/<method>-r<ratio>[-lr<low_rank_ratio>][-s<seed>]

(`-s<seed>` only for seeds other than the default 42, so adding seeds later reuses the first run;
the fine-tuned dense cell is `finetune-r1.0`, Lead-3 is `lead3`, a distillation stage is
`<method>-kd-r<ratio>`). What a (re)run does with a cell depends on its output directory:

  * `all_results.json` there: the cell is done and skipped;
  * a complete `checkpoint-N` there (see `losparse.core.checkpoint.missing_files`) but no results: the run was
    interrupted; it is resumed from its newest complete checkpoint (`--resume_from_checkpoint true`,
    no `--overwrite_output_dir`);
  * anything else (no directory, an empty one, or one without results or complete checkpoints): the
    cell starts from zero with `--overwrite_output_dir`.

Each cell says which of these applies (dry run: a `# resume`/`# restart` comment above its command;
real run: its progress line). So an interrupted table resumes where it stopped, down to the last
checkpoint of the cell that was running. Cells that several tables share (Table 5 and
Figure 5 reuse Table 1/3/4 runs) are the same command with the same output directory, built by the
same code, so each is run once.

Hyperparameters come from the YAML tables in configs/ through `--config`; the driver reads a
config only to (a) check the task/ratio section exists, (b) divide `gradient_accumulation_steps`
by the number of GPUs and (c) inline a config as flags where it has no section for the requested
ratio (the entry scripts refuse a missing ratio; see `cell()` below). It reads them with the entry
scripts' own resolver, `losparse.cli.yaml_config`, which like this module imports no torch, so
`--dry_run` is instant.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping, Optional, Sequence

from losparse.cli.yaml_config import load_table, resolve_table, table_ratios, table_tasks, to_flags
from losparse.core.checkpoint import list_checkpoints, missing_files
from losparse.core.errors import LoSparseUsageError

#: The checkout whose configs/ and run scripts the cells use. By default the directory above the package
#: (a source tree or an editable install); scripts/reproduce.py passes its own checkout (`use_checkout`).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEED = 42
RESULTS_FILE = "all_results.json"

#: methods whose runs train with a pruner (the LoSparse one, or the structured one), so whose checkpoints
#: must hold its state (losparse/core/methods.py: `decomposes` or `prunes_structures`); finetune (and
#: distillation stages) do not.
PRUNER_METHODS = ("losparse", "itp", "movement", "lowrank", "lowrank_prune_all", "lpaf", "structured",
                  "structured_losparse", "cofi", "cofi_losparse")

GLUE_DEBERTA = "configs/glue/deberta-v3-base.yaml"
GLUE_BERT = "configs/glue/bert-base-uncased.yaml"
SQUAD_DEBERTA = "configs/squad/deberta-v3-base.yaml"
SQUAD_BERT = "configs/squad/bert-base-uncased.yaml"
SUM_XSUM = "configs/summarization/bart-large-xsum.yaml"
SUM_CNN = "configs/summarization/bart-large-cnn.yaml"
DISTILL_DEBERTA = "configs/distillation/deberta-v3-base.yaml"
DISTILL_BERT = "configs/distillation/bert-base-uncased.yaml"
QUICKSTART = "configs/quickstart/minilm-movie-sentiment.yaml"
LPAF_GLUE_BERT = "configs/lpaf/bert-base-uncased-glue.yaml"
LPAF_SQUAD_BERT = "configs/lpaf/bert-base-uncased-squad.yaml"
TABLE7_BERT = "configs/table7/bert-base-uncased.yaml"

RUN_GLUE, RUN_SQUAD, RUN_SUM = "run_glue.py", "run_squad.py", "run_summarization.py"

TABLE5_RATIO = 0.2                       # Table 5: "We compress the model to 20%"
TABLE6_RATIOS = (0.5, 0.25)              # Table 6: "to 25% and 50%"
TABLE7_RATIO = 0.1                       # Table 7: "The compression ratio is 10%" (0.2 CoFi x 0.5 LoSparse)
TABLE7_METHODS = ("cofi", "cofi_losparse")
FIGURE6_RATIOS = (0.2, 0.1)              # Figure 6: remaining ratios of the allocation sweep
FIGURE6_LOW_RANK_RATIOS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.15)
CLAIM_METHODS = ("itp", "movement", "losparse")  # plus one finetune cell per model and seed
CLAIM_RATIOS = (0.2, 0.15, 0.1)
LPAF_CHECK_METHODS = ("lpaf", "losparse", "lowrank")  # LPAF vs LoSparse vs Low-rank I (plain SVD factorisation)
LPAF_CHECK_RATIOS = (0.2, 0.1)
#: accuracy vs latency (benchmarks.frontier): the methods whose saved models differ in how they compute
FRONTIER_METHODS = ("losparse", "itp", "structured", "lowrank")  # plus one finetune cell per model and seed
FRONTIER_RATIOS = (0.2, 0.1)
#: the hybrids of the frontier, one cell per setting (its flags name the cell: -sr0.5 = --structured_ratio 0.5)
FRONTIER_VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {
    "structured_losparse": ({"structured_ratio": 0.5}, {"structured_ratio": 0.25}),
}
#: the frontier's methods trained with the seed's fine-tuned dense model as the teacher, with their flags. CoFi:
#: its distillation weights (alpha_ce 0.1, alpha_layer 0.9); its stages inside the claim's 1-epoch budget (the last
#: 30 % fine-tunes the fixed structure, the target warms up over the first half of the pruning stage); the gates'
#: learning rate the reference's 0.01. (10x that, 0.1, was tried first, 2026-12-07: the expected sparsity
#: overshot to 0.96 and oscillated, and every CoFi cell ended at chance accuracy; docs/cofi.md, frontier.)
#: CoFi + LoSparse: the same, with Appendix F's split ratio_LoSparse = 0.5 (so structured_ratio = 2 x the ratio:
#: 0.2 at 10 %, Table 7's setting). A flag given as a function of the cell's ratio is resolved per cell.
COFI_FRONTIER_FLAGS = {"alpha_output": 0.1, "alpha_layer": 0.9, "cofi_finetune_epochs": 0.3,
                       "lagrangian_warmup_epochs": 0.35, "reg_learning_rate": 0.01}
FRONTIER_DISTILLED: dict[str, dict[str, Any]] = {
    "cofi": COFI_FRONTIER_FLAGS,
    "cofi_losparse": {**COFI_FRONTIER_FLAGS, "structured_ratio": lambda ratio: round(2 * ratio, 6)},
}
#: short names of the variant flags in cell names
VARIANT_ABBREVIATIONS = {"structured_ratio": "sr"}
#: tables whose cells train --model_dirs on --train_file/--validation_file (default: the quickstart assets)
LOCAL_DATA_TABLES = ("claim", "lpaf_check", "frontier")

#: table -> (the `--table` id of `python -m reproduce.report` (1-5, claim or all), description for --help)
TABLES = {
    "table1": ("1", "DeBERTaV3-base on GLUE (Table 1): every task of configs/glue/deberta-v3-base.yaml x its "
                    "ratios x {movement, itp, losparse} + one finetune cell per task"),
    "table2": ("2", "BERT-base on GLUE (Table 2): configs/glue/bert-base-uncased.yaml, same methods"),
    "table3": ("3", "SQuAD v1.1 (Table 3): DeBERTaV3-base {itp, losparse} and BERT-base {movement, itp, losparse} "
                    "x ratios 0.05..0.5 + finetune"),
    "table4": ("4", "BART-large on XSum and CNN/DailyMail (Table 4): {itp, losparse} x 0.5/0.4/0.3 + finetune + "
                    "Lead-3"),
    "table5": ("5", "DeBERTaV3-base + distillation at 20% (Table 5): MNLI, SQuAD, SST-2, RTE; teacher = the "
                    "finetune cell, students = the itp/losparse 20% cells of Tables 1/3, then a distillation stage"),
    "table6": ("all", "BERT-base + distillation at 50% and 25% (Table 6): MNLI, RTE, QNLI, SST-2; losparse, then "
                    "a distillation stage from the finetune cell"),
    "table7": ("7", "CoFi and CoFi + LoSparse at 10% (Table 7): BERT-base on MNLI, MRPC, RTE, QNLI, SST-2, "
                    "distilled from a teacher per task (a finetune cell, or --teacher_dirs TASK=DIR)"),
    "figure5": ("all", "Low-rank I/II vs LoSparse (Figure 5): MNLI, SQuAD (DeBERTaV3-base), XSum at their "
                           "tables' ratios"),
    "figure6": ("all", "Low-rank/sparse allocation (Figure 6): MNLI and RTE, ratios 0.2 and 0.1, "
                           "low_rank_ratio in 0.01..0.15 (below the ratio)"),
    "lpaf": ("all", "LPAF beside LoSparse on the same cells: BERT-base GLUE (Table 2: MNLI, RTE, QNLI x 20/15/10%) "
                    "and SQuAD (Table 3's BERT rows), LPAF with configs/lpaf/*, LoSparse/finetune cells are Table 2/3's"),
    "lpaf_check": ("claim", "LPAF real-data check: --model_dirs (default the quickstart MiniLM) on local CSVs (default "
                            "the movie snippets): {lpaf, losparse, lowrank} x 0.2/0.1 + finetune, one seed each"),
    "claim": ("claim", "Real-weights check: --model_dirs (default the quickstart MiniLM) on local CSVs "
                       "(default the quickstart movie sentiment), {finetune, itp, movement, losparse} x 0.2/0.15/0.1"),
    "frontier": ("claim", "Accuracy vs latency: the claim's models, data, config and seed, {losparse, itp, "
                          "structured, lowrank, structured_losparse at structured_ratio 0.5/0.25, cofi and "
                          "cofi_losparse distilled from the finetune cell} x 0.2/0.1 + finetune; then python -m "
                          "benchmarks.frontier times the saved models"),
}


# --------------------------------------------------------------------------------------------------
# Reading the YAML tables: losparse.cli.yaml_config, the resolver of the entry scripts' --config
# --------------------------------------------------------------------------------------------------

def use_checkout(repo: str) -> None:
    """Take configs/ and the run scripts from the checkout at `repo`."""
    global REPO
    REPO = os.path.abspath(repo)


@lru_cache(maxsize=None)
def _load_table(full_path: str) -> dict:
    return load_table(full_path)


def load_config(path: str) -> dict:
    """The YAML table at `path` (relative paths: to the checkout), read once."""
    return _load_table(path if os.path.isabs(path) else os.path.join(REPO, path))


def config_tasks(path: str) -> list[str]:
    return table_tasks(load_config(path))


def config_ratios(path: str, task: Optional[str]) -> list[float]:
    """The remaining ratios that have a section under tasks.<task>.ratios, in file order."""
    return table_ratios(load_config(path), task)


def resolve(path: str, task: Optional[str], ratio_key: Optional[float]) -> dict[str, Any]:
    """Flatten top level + tasks.<task> + tasks.<task>.ratios.<ratio_key> into {flag: value}.

    As strictly as the entry script will (a missing task or ratio section is an error), except for the
    keys: they must be arguments of the cell's script, which only the script knows (it checks them when
    the cell runs; importing it here would import torch).
    """
    return resolve_table(load_config(path), task, ratio_key, allowed_keys=None, path=path)


#: flags written alone when true (run_summarization.py's --lead3 is a store_true switch)
BARE_FLAGS = {"lead3"}


def _flags(values: dict[str, Any]) -> list[str]:
    """{flag: value} -> argv, as losparse/cli/run.py turns a YAML table into flags."""
    return to_flags(values, bare_flags=BARE_FLAGS)


def fmt(value: Any) -> str:
    """Numbers as the YAML writes them: 0.2, 0.15, 1.0 (floats keep a dot), 42."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def model_label(name_or_path: str) -> str:
    return os.path.basename(os.path.normpath(name_or_path)) or name_or_path


# --------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    table: str                 # the table whose directory holds the run (may differ from the one asked for)
    model: str
    task: str
    name: str                  # e.g. losparse-r0.2-s1
    method: str
    script: str                # entry script, relative to the repository root
    args: list[str]            # everything after the script except --output_dir/--seed/accumulation/--overwrite
    seed: Optional[int]
    accumulation: Optional[int] = None  # the config's gradient_accumulation_steps (None: not set -> 1)
    launchable: bool = True    # False: no model (Lead-3), always plain python
    deps: tuple[str, ...] = ()  # cell ids that must be done first
    notes: list[str] = field(default_factory=list)
    config: str = ""
    inline: bool = False       # config passed as flags: the accumulation flag is always written by command()

    @property
    def id(self) -> str:
        return f"{self.table}/{self.model}/{self.task}/{self.name}"


def cell_name(method: str, ratio: Optional[float], seed: Optional[int], low_rank_ratio: Optional[float] = None,
              suffix: str = "") -> str:
    name = method + suffix
    if ratio is not None:
        name += f"-r{fmt(float(ratio))}"
    if low_rank_ratio is not None:
        name += f"-lr{fmt(float(low_rank_ratio))}"
    if seed is not None and seed != DEFAULT_SEED:
        name += f"-s{seed}"
    return name


def cell(*, table: str, script: str, config: str, task: Optional[str], method: str, ratio: Optional[float],
         seed: Optional[int], model: Optional[str] = None, dataset_name: Optional[str] = None,
         overrides: Optional[dict[str, Any]] = None, name: Optional[str] = None,
         deps: Sequence[str] = (), launchable: bool = True, task_label: Optional[str] = None) -> Cell:
    """One run of `script` with `--config config`, or with the config inlined as flags if it must be.

    `ratio` None means a cell without a remaining ratio of its own (finetune, Lead-3). The entry
    scripts' config loader insists on a ratio section when the task has `ratios:`; then:
      * ratio None: pass the largest ratio that has a section (finetune/Lead-3 ignore β and r);
      * a ratio without a section (Table 6 at 50%/25%, whose GLUE tables stop at 20%): pass the
        config's values as explicit flags, taking β and r from the nearest ratio that has a section,
        plus --remaining_ratio itself. (movement/itp/lowrank ignore r; they simply reuse the section.)
    """
    overrides = dict(overrides or {})
    notes: list[str] = []
    ratios = config_ratios(config, task)
    if ratio is None:
        key = max(ratios) if ratios else None
        cli_ratio = key
        if key is not None:
            notes.append(f"{method} cells pass --remaining_ratio {fmt(key)} only so that {config} resolves "
                         f"(its tasks.<task>.ratios section is required); {method} ignores it")
    else:
        key = ratio if any(math.isclose(ratio, r, abs_tol=1e-9) for r in ratios) else None
        cli_ratio = ratio
    inline = ratio is not None and ratios and key is None
    if inline:
        key = min(ratios, key=lambda r: (abs(r - ratio), -r))
        notes.append(f"{config} has no tasks.{task}.ratios.{fmt(ratio)}: its values are passed as flags instead of "
                     f"--config, with beta1/low_rank_ratio of the nearest ratio {fmt(key)}")
    values = resolve(config, task, key)
    values.update(overrides)
    label = model or model_label(str(values.get("model_name_or_path", "model")))
    args: list[str] = []
    if inline:
        body = {k: v for k, v in values.items()
                if k not in ("task_name", "remaining_ratio", "method", "gradient_accumulation_steps")}
        args += _flags(body)
    else:
        args += ["--config", config]
    if task is not None:
        args += ["--task_name", task]
    if dataset_name is not None:
        args += ["--dataset_name", dataset_name]
    if cli_ratio is not None:
        args += ["--remaining_ratio", fmt(float(cli_ratio))]
    args += ["--method", method]
    if not inline:
        args += _flags(overrides)
    accumulation = values.get("gradient_accumulation_steps")
    return Cell(table=table, model=label, task=task_label or task or "data", name=name or cell_name(method, ratio, seed),
                method=method, script=script, args=args, seed=seed,
                accumulation=int(accumulation) if accumulation is not None else None,
                launchable=launchable, deps=tuple(deps), notes=notes, config=config, inline=bool(inline))


@dataclass
class Options:
    output_root: str
    seeds: list[int]
    num_gpus: int = 1
    accelerate: bool = True
    extra: list[str] = field(default_factory=list)
    python: str = "python"
    model_dirs: list[str] = field(default_factory=list)
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    teacher_dirs: dict[str, str] = field(default_factory=dict)  # table7: task -> given teacher (dir or hub id)


def out_dir(opts: Options, cell_id: str) -> str:
    return os.path.join(opts.output_root, *cell_id.split("/"))


# --------------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------------

def grid(opts: Options, *, table: str, script: str, config: str, methods: Sequence[str],
         tasks: Optional[Sequence[str]] = None, ratios: Optional[Sequence[float]] = None,
         finetune: bool = True, dataset: bool = False) -> list[Cell]:
    """Per task and seed: the finetune cell, then every ratio x method."""
    cells = []
    for task in tasks or config_tasks(config):
        dataset_name = task if dataset else None
        for seed in opts.seeds:
            if finetune:
                cells.append(finetune_cell(table, script, config, task, seed, dataset_name))
            for ratio in ratios or config_ratios(config, task):
                for method in methods:
                    cells.append(cell(table=table, script=script, config=config, task=task, method=method,
                                      ratio=ratio, seed=seed, dataset_name=dataset_name))
    return cells


def finetune_cell(table: str, script: str, config: str, task: str, seed: int, dataset_name: Optional[str] = None,
                  **kwargs: Any) -> Cell:
    return cell(table=table, script=script, config=config, task=task, method="finetune", ratio=None, seed=seed,
                dataset_name=dataset_name, name=cell_name("finetune", 1.0, seed), **kwargs)


def table1(opts: Options) -> list[Cell]:
    return grid(opts, table="table1", script=RUN_GLUE, config=GLUE_DEBERTA, methods=("movement", "itp", "losparse"))


def table2(opts: Options) -> list[Cell]:
    return grid(opts, table="table2", script=RUN_GLUE, config=GLUE_BERT, methods=("movement", "itp", "losparse"))


def table3(opts: Options) -> list[Cell]:
    # Movement pruning is reported for BERT-base only (Table 3).
    return (grid(opts, table="table3", script=RUN_SQUAD, config=SQUAD_DEBERTA, methods=("itp", "losparse"),
                 dataset=True)
            + grid(opts, table="table3", script=RUN_SQUAD, config=SQUAD_BERT,
                   methods=("movement", "itp", "losparse"), dataset=True))


def table4(opts: Options) -> list[Cell]:
    cells = []
    for config in (SUM_XSUM, SUM_CNN):
        for task in config_tasks(config):
            # Lead-3 (first three sentences) needs no model and no seed: one cell per dataset.
            cells.append(cell(table="table4", script=RUN_SUM, config=config, task=task, method="finetune",
                              ratio=None, seed=None, dataset_name=task, overrides={"lead3": True}, name="lead3",
                              launchable=False))
            cells += grid(opts, table="table4", script=RUN_SUM, config=config, methods=("itp", "losparse"),
                          tasks=[task], dataset=True)
    return cells


def distill_cell(opts: Options, *, table: str, script: str, config: str, task: str, ratio: float, seed: int,
                 student: Cell, teacher: Cell, dataset_name: Optional[str]) -> Cell:
    """Second stage: start from the compressed student, distil from the fine-tuned teacher."""
    return cell(table=table, script=script, config=config, task=task, method="finetune", ratio=ratio, seed=seed,
                model=student.model, dataset_name=dataset_name,
                name=cell_name(student.method, ratio, seed, suffix="-kd"),
                overrides={"model_name_or_path": out_dir(opts, student.id),
                           "teacher_model_name_or_path": out_dir(opts, teacher.id),
                           "distill_stage": "after"},
                deps=(student.id, teacher.id))


def table5(opts: Options) -> list[Cell]:
    """Per task: teacher (finetune) and 20% itp/losparse students -- the very cells of Table 1 (GLUE) or
    Table 3 (SQuAD), so existing runs are reused -- then one distillation stage per student."""
    cells = []
    for task in config_tasks(DISTILL_DEBERTA):
        if task == "squad":
            base = dict(table="table3", script=RUN_SQUAD, config=SQUAD_DEBERTA, dataset_name="squad")
        else:
            base = dict(table="table1", script=RUN_GLUE, config=GLUE_DEBERTA, dataset_name=None)
        for seed in opts.seeds:
            teacher = finetune_cell(base["table"], base["script"], base["config"], task, seed, base["dataset_name"])
            students = [cell(table=base["table"], script=base["script"], config=base["config"], task=task,
                             method=method, ratio=TABLE5_RATIO, seed=seed, dataset_name=base["dataset_name"])
                        for method in ("itp", "losparse")]
            cells += [teacher, *students]
            cells += [distill_cell(opts, table="table5", script=base["script"], config=DISTILL_DEBERTA, task=task,
                                   ratio=TABLE5_RATIO, seed=seed, student=s, teacher=teacher,
                                   dataset_name=base["dataset_name"]) for s in students]
    return cells


def table6(opts: Options) -> list[Cell]:
    """Per task: teacher = the finetune cell (Table 2's own for MNLI/RTE/QNLI), LoSparse at 50% and 25%
    (GLUE hyperparameters; Tables 9/10 stop at 20%, so the nearest ratio's β and r are inlined), then
    the distillation stage of configs/distillation/bert-base-uncased.yaml (Table 13).

    SST-2 has no BERT-base GLUE table (Table 10 covers MNLI, RTE, QNLI only): its cells use the sst2
    section of configs/glue/deberta-v3-base.yaml (Table 9) with --model_name_or_path bert-base-uncased.
    The paper's BERT teachers are textattack's hub checkpoints (Appendix E.1); we fine-tune our own
    with the same recipe as the 100% rows.
    """
    cells = []
    bert_tasks = config_tasks(GLUE_BERT)
    for task in config_tasks(DISTILL_BERT):
        if task in bert_tasks:
            base_table, config, overrides = "table2", GLUE_BERT, {}
        else:  # sst2: DeBERTa's GLUE section, BERT weights (see the docstring)
            base_table, config, overrides = "table6", GLUE_DEBERTA, {"model_name_or_path": "bert-base-uncased"}
        for seed in opts.seeds:
            teacher = finetune_cell(base_table, RUN_GLUE, config, task, seed, overrides=overrides)
            group = [teacher]
            for ratio in TABLE6_RATIOS:
                student = cell(table="table6", script=RUN_GLUE, config=config, task=task, method="losparse",
                               ratio=ratio, seed=seed, overrides=overrides)
                group += [student, distill_cell(opts, table="table6", script=RUN_GLUE, config=DISTILL_BERT,
                                                task=task, ratio=ratio, seed=seed, student=student,
                                                teacher=teacher, dataset_name=None)]
            if overrides:
                for c in group[:1] + group[1::2]:
                    c.notes.append(f"{task}: Table 10 has no BERT-base {task} column, so its teacher and students use "
                                   f"the {task} section of {GLUE_DEBERTA} with --model_name_or_path bert-base-uncased")
            cells += group
    return cells


def table7(opts: Options) -> list[Cell]:
    """Per task: the teacher, then CoFi and CoFi + LoSparse at 10% distilled from it (configs/table7/).

    The teacher is the task's finetune cell (ratios.1.0 of the config: Appendix F's MNLI recipe), unless
    `--teacher_dirs TASK=DIR` names one (the paper's textattack/bert-base-uncased-<TASK> for the tasks but
    MNLI): then that path is the teacher and the task has no finetune cell.
    """
    cells = []
    for task in config_tasks(TABLE7_BERT):
        given = opts.teacher_dirs.get(task)
        for seed in opts.seeds:
            if given:
                teacher_path, deps = given, ()
            else:
                teacher = finetune_cell("table7", RUN_GLUE, TABLE7_BERT, task, seed)
                cells.append(teacher)
                teacher_path, deps = out_dir(opts, teacher.id), (teacher.id,)
            for method in TABLE7_METHODS:
                student = cell(table="table7", script=RUN_GLUE, config=TABLE7_BERT, task=task, method=method,
                               ratio=TABLE7_RATIO, seed=seed, deps=deps,
                               overrides={"teacher_model_name_or_path": teacher_path})
                if given:
                    student.notes.append(f"{task}: the teacher is --teacher_dirs {task}={given} (no finetune cell)")
                cells.append(student)
    return cells


def figure5(opts: Options) -> list[Cell]:
    """Low-rank I (lowrank), Low-rank II (lowrank_prune_all) and LoSparse; the LoSparse points are the
    Table 1/3/4 cells themselves."""
    cells = []
    for base_table, script, config, task, dataset in (("table1", RUN_GLUE, GLUE_DEBERTA, "mnli", None),
                                                      ("table3", RUN_SQUAD, SQUAD_DEBERTA, "squad", "squad"),
                                                      ("table4", RUN_SUM, SUM_XSUM, "xsum", "xsum")):
        for seed in opts.seeds:
            for ratio in config_ratios(config, task):
                for method in ("lowrank", "lowrank_prune_all", "losparse"):
                    table = base_table if method == "losparse" else "figure5"
                    cells.append(cell(table=table, script=script, config=config, task=task, method=method,
                                      ratio=ratio, seed=seed, dataset_name=dataset))
    return cells


def figure6(opts: Options) -> list[Cell]:
    cells = []
    for task in ("mnli", "rte"):
        for seed in opts.seeds:
            for ratio in FIGURE6_RATIOS:
                for low_rank in FIGURE6_LOW_RANK_RATIOS:
                    if low_rank >= ratio:  # the sparse part needs what is left: r < ratio
                        continue
                    cells.append(cell(table="figure6", script=RUN_GLUE, config=GLUE_DEBERTA, task=task,
                                      method="losparse", ratio=ratio, seed=seed,
                                      overrides={"low_rank_ratio": low_rank},
                                      name=cell_name("losparse", ratio, seed, low_rank_ratio=low_rank)))
    return cells


def lpaf_table(opts: Options) -> list[Cell]:
    """LPAF on every LoSparse cell of Table 2 and of Table 3's BERT rows; those tables' own cells are reused."""
    cells = []
    for base_table, script, losparse_config, lpaf_config, dataset in (
            ("table2", RUN_GLUE, GLUE_BERT, LPAF_GLUE_BERT, False),
            ("table3", RUN_SQUAD, SQUAD_BERT, LPAF_SQUAD_BERT, True)):
        for task in config_tasks(lpaf_config):
            dataset_name = task if dataset else None
            for seed in opts.seeds:
                cells.append(finetune_cell(base_table, script, losparse_config, task, seed, dataset_name))
                for ratio in config_ratios(lpaf_config, task):
                    cells.append(cell(table=base_table, script=script, config=losparse_config, task=task,
                                      method="losparse", ratio=ratio, seed=seed, dataset_name=dataset_name))
                    cells.append(cell(table="lpaf", script=script, config=lpaf_config, task=task, method="lpaf",
                                      ratio=ratio, seed=seed, dataset_name=dataset_name))
    return cells


def variant_suffix(flags: Mapping[str, Any]) -> str:
    """The cell-name suffix of a variant's flags, e.g. {"structured_ratio": 0.5} -> "-sr0.5"."""
    return "".join(f"-{VARIANT_ABBREVIATIONS.get(k, k)}{fmt(float(v)) if isinstance(v, (int, float)) else v}"
                   for k, v in flags.items())


def claim(opts: Options, methods: Sequence[str] = CLAIM_METHODS, ratios: Sequence[float] = CLAIM_RATIOS,
          table: str = "claim", variants: Mapping[str, Sequence[Mapping[str, Any]]] = {},
          distilled: Mapping[str, Mapping[str, Any]] = {}) -> list[Cell]:
    """Real pretrained weights on real local data: does LoSparse beat ITP and movement?

    `table` names the directory the cells go to; a cell's command is the same in every table but for it.
    `variants`: more methods, one cell per flag setting (named by `variant_suffix`), after `methods`.
    `distilled`: methods (with their flags) trained with the seed's finetune cell as the teacher.
    """
    labels = [model_label(d) for d in opts.model_dirs]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"error: --model_dirs need distinct directory names (they name the output dirs): {labels}")
    task = model_label(os.path.dirname(os.path.abspath(opts.train_file)))
    data = {"train_file": opts.train_file, "validation_file": opts.validation_file}
    cells = []
    for model_dir, label in zip(opts.model_dirs, labels):
        common = dict(table=table, script=RUN_GLUE, config=QUICKSTART, task=None, task_label=task, model=label,
                      overrides={"model_name_or_path": model_dir, **data})
        for seed in opts.seeds:
            teacher = cell(method="finetune", ratio=None, seed=seed, name=cell_name("finetune", 1.0, seed), **common)
            cells.append(teacher)
            cells += [cell(method=m, ratio=r, seed=seed, **common) for r in ratios for m in methods]
            cells += [_with_flags(common, m, r, seed, flags, variant_suffix(flags))
                      for r in ratios for m, settings in variants.items() for flags in settings]
            teacher_flags = {"teacher_model_name_or_path": out_dir(opts, teacher.id)}
            cells += [_with_flags(common, m, r, seed, {**flags, **teacher_flags}, deps=(teacher.id,))
                      for r in ratios for m, flags in distilled.items()]
    return cells


def _with_flags(common: Mapping[str, Any], method: str, ratio: float, seed: int, flags: Mapping[str, Any],
                suffix: str = "", deps: Sequence[str] = ()) -> Cell:
    """A claim-style cell of `method` with `flags` added to the common overrides (a callable flag: of `ratio`)."""
    values = {k: v(ratio) if callable(v) else v for k, v in flags.items()}
    return cell(method=method, ratio=ratio, seed=seed, name=cell_name(method, ratio, seed, suffix=suffix), deps=deps,
                **{**common, "overrides": {**common["overrides"], **values}})


def lpaf_check(opts: Options) -> list[Cell]:
    """LPAF vs LoSparse vs Low-rank I on the claim's real model and data (the LoSparse cells are the claim's own)."""
    return claim(opts, methods=LPAF_CHECK_METHODS, ratios=LPAF_CHECK_RATIOS)


def frontier(opts: Options) -> list[Cell]:
    """The claim's cells (same arguments) for LoSparse, ITP, structured and low-rank pruning and the hybrids of
    `FRONTIER_VARIANTS`, in frontier/: their saved models are what `python -m benchmarks.frontier` times for the
    accuracy-vs-latency plot. Every cell gets the same optimizer steps (a hybrid splits them between stages)."""
    return claim(opts, methods=FRONTIER_METHODS, ratios=FRONTIER_RATIOS, table="frontier", variants=FRONTIER_VARIANTS,
                 distilled=FRONTIER_DISTILLED)


BUILDERS: dict[str, Callable[[Options], list[Cell]]] = {
    "table1": table1, "table2": table2, "table3": table3, "table4": table4, "table5": table5, "table6": table6,
    "table7": table7, "figure5": figure5, "figure6": figure6, "claim": claim, "lpaf": lpaf_table,
    "lpaf_check": lpaf_check, "frontier": frontier,
}


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------

def _here(path: str) -> str:
    """A repository file as the user's shell can reach it: relative when run from the root."""
    try:
        if os.path.samefile(os.getcwd(), REPO):
            return path
    except OSError:
        pass
    return os.path.join(REPO, path)


def python_executable() -> str:
    return "python" if shutil.which("python") else sys.executable


class Warnings:
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self.seen:
            self.seen.add(message)
            print(f"warning: {message}", file=sys.stderr)


def command(c: Cell, opts: Options, warn: Callable[[str], None], state: Optional["CellState"] = None) -> list[str]:
    """The cell's command line; `state` (default: a fresh start) decides how it starts (`start_flags`)."""
    n = opts.num_gpus
    if n > 1 and opts.accelerate and c.launchable:
        launcher = ["accelerate", "launch", "--num_processes", str(n), "--multi_gpu"]
    else:
        launcher = [opts.python]
    argv = launcher + [_here(c.script)] + [_here(a) if a.startswith("configs/") else a for a in c.args]
    argv += ["--output_dir", out_dir(opts, c.id)]
    if c.seed is not None:
        argv += ["--seed", str(c.seed)]
    acc = c.accumulation or 1
    if n > 1 and c.launchable:
        if acc % n == 0:
            argv += ["--gradient_accumulation_steps", str(acc // n)]
        else:
            if c.inline and c.accumulation is not None:
                argv += ["--gradient_accumulation_steps", str(acc)]
            warn(f"{c.config} ({c.task}): gradient_accumulation_steps {acc} is not divisible by {n} GPUs; kept "
                 f"at {acc}, so the effective batch is {n}x the table's")
    elif c.inline and c.accumulation is not None:
        argv += ["--gradient_accumulation_steps", str(acc)]
    argv += start_flags(state)
    return argv + opts.extra


def is_done(opts: Options, cell_id: str) -> bool:
    return os.path.isfile(os.path.join(out_dir(opts, cell_id), RESULTS_FILE))


# --------------------------------------------------------------------------------------------------
# Resuming an interrupted cell
# --------------------------------------------------------------------------------------------------

def _flag_is_true(argv: Sequence[str], name: str) -> bool:
    """Whether the last `--name` in argv is set to true (`--name` alone, or followed by true/1/yes)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            value = nxt.lower() in ("true", "1", "yes") or nxt.startswith("--") or nxt == ""
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1].lower() in ("true", "1", "yes")
    return bool(value)


@dataclass
class CellState:
    """What a (re)run does with a cell: done (skip), resume (from `checkpoint`), restart or fresh."""

    kind: str                       # "done", "resume", "restart" or "fresh"
    detail: str = ""                # why, in words for the log
    checkpoint: Optional[str] = None

    @property
    def label(self) -> str:
        if self.kind == "resume":
            return f"resume from {os.path.basename(self.checkpoint or '')}"
        return self.kind


def cell_state(opts: Options, c: Cell) -> CellState:
    """Decide from the cell's output directory whether it is done, to resume, to restart or new."""
    directory = out_dir(opts, c.id)
    if os.path.isfile(os.path.join(directory, RESULTS_FILE)):
        return CellState("done", f"{RESULTS_FILE} is there")
    found = list_checkpoints(directory)
    needs_pruner = c.method in PRUNER_METHODS
    needs_optimizer = not _flag_is_true(list(c.args) + list(opts.extra), "--save_only_model")
    incomplete = []
    for checkpoint in found:
        missing = missing_files(checkpoint, needs_pruner, needs_optimizer)
        if not missing:
            skipped = f" (skipping incomplete {', '.join(incomplete)})" if incomplete else ""
            return CellState("resume", f"no {RESULTS_FILE}; newest complete checkpoint {os.path.basename(checkpoint)}"
                                       f"{skipped}", checkpoint)
        incomplete.append(f"{os.path.basename(checkpoint)} (missing {', '.join(missing)})")
    try:
        contents = os.listdir(directory)
    except OSError:
        contents = None
    if not contents:
        return CellState("fresh", "no output directory yet" if contents is None else "empty output directory")
    if incomplete:
        return CellState("restart", f"no {RESULTS_FILE} and no complete checkpoint: {'; '.join(incomplete)}")
    return CellState("restart", f"the output directory holds neither {RESULTS_FILE} nor a checkpoint")


def start_flags(state: Optional[CellState]) -> list[str]:
    """How the entry script starts: resume the newest complete checkpoint, or write over the directory."""
    if state is not None and state.kind == "resume":
        return ["--resume_from_checkpoint", "true"]
    return ["--overwrite_output_dir"]


# --------------------------------------------------------------------------------------------------
# Claim defaults: the quickstart assets
# --------------------------------------------------------------------------------------------------

def quickstart_paths(prepare: bool) -> tuple[str, str]:
    """(model dir, data dir) of scripts/prepare_quickstart_assets.py; prepares them if asked and missing."""
    cache = os.path.expanduser(os.environ.get("LOSPARSE_CACHE") or os.path.join("~", ".cache", "losparse"))
    model_dir = os.path.join(cache, "quickstart", "all-MiniLM-L6-v2")
    data_dir = os.path.join(cache, "quickstart", "movie-sentiment")
    if prepare and not os.path.isfile(os.path.join(cache, "quickstart", ".complete.json")):
        print("preparing the quickstart assets: python scripts/prepare_quickstart_assets.py", flush=True)
        proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "prepare_quickstart_assets.py")],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: scripts/prepare_quickstart_assets.py failed (exit {proc.returncode})")
        match = re.search(r"MODEL_DIR=(\S+) DATA_DIR=(\S+)", proc.stdout)
        if match:
            model_dir, data_dir = match.group(1), match.group(2)
    return model_dir, data_dir


def claim_inputs(args: argparse.Namespace, dry_run: bool) -> None:
    env_dirs = [d for d in re.split(r"[\s" + re.escape(os.pathsep) + r"]+", os.environ.get("MODEL_DIRS", "")) if d]
    model_dirs = list(args.model_dirs or env_dirs)
    needs_quickstart = not model_dirs or not args.train_file or not args.validation_file
    model_dir = data_dir = None
    if needs_quickstart:
        model_dir, data_dir = quickstart_paths(prepare=not dry_run)
        if dry_run and not os.path.isdir(model_dir):
            print("# note: the quickstart assets are not prepared yet (a real run first calls "
                  "python scripts/prepare_quickstart_assets.py); their default paths are shown")
    if not model_dirs:
        model_dirs = [model_dir]
    if args.mpnet_dir:
        model_dirs.append(args.mpnet_dir)
    args.model_dirs = model_dirs
    args.train_file = args.train_file or os.path.join(data_dir, "train.csv")
    args.validation_file = args.validation_file or os.path.join(data_dir, "validation.csv")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    tables = "\n".join(f"  {name:<8} {desc}" for name, (_, desc) in TABLES.items())
    parser = argparse.ArgumentParser(
        prog="scripts/reproduce.py",
        description="Run every cell (one training run) behind a table or figure of the LoSparse paper, "
                    "resuming where a previous invocation stopped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"tables:\n{tables}\n\n"
               "Output: <output_root>/<table>/<model>/<task>/<method>-r<ratio>[-lr<r>][-s<seed>]/ with all_results.json "
               "(a cell that has it is skipped; one with only checkpoint-N dirs resumes from the newest complete "
               "one) and the run's log in <that dir>.log.\n"
               "Environment: DRY_RUN=1 is --dry_run; MODEL_DIRS='a b' is --model_dirs a b "
               "(claim, lpaf_check, frontier); TEACHER_DIRS='rte=A sst2=B' is --teacher_dirs rte=A sst2=B (table7).\n"
               "Example: python scripts/reproduce.py table2 --dry_run --only rte --num_gpus 4",
    )
    parser.add_argument("table", choices=list(TABLES), help="which table or figure to reproduce (see below)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print every command (one per line, shell-quoted) and a count line; run nothing")
    parser.add_argument("--output_root", default="outputs", help="root of all output dirs (default: outputs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[DEFAULT_SEED],
                        help=f"seeds; every cell runs once per seed (default: {DEFAULT_SEED}; other seeds add -s<seed> "
                             "to the dir name)")
    parser.add_argument("--only", metavar="REGEX",
                        help="keep only cells whose id <table>/<model>/<task>/<name> matches (re.search), "
                             "e.g. 'mnli' or 'bert.*/itp'")
    parser.add_argument("--num_gpus", type=int, default=int(os.environ.get("NUM_GPUS", "1")),
                        help="GPUs per run: >1 launches with accelerate and divides the config's "
                             "gradient_accumulation_steps by it, so the effective batch stays the paper's (default 1)")
    parser.add_argument("--no_accelerate", action="store_true",
                        help="launch with plain python even when --num_gpus > 1 (e.g. inside your own launcher)")
    parser.add_argument("--extra", action="append", default=[], metavar='"FLAGS"',
                        help="more flags appended to every command (they win), e.g. --extra \"--bf16 true\"; repeatable")
    parser.add_argument("--python", default=None,
                        help="interpreter that runs single-process cells (default: python, else this interpreter)")
    parser.add_argument("--keep_going", action="store_true",
                        help="after a failing cell, go on with the others (default: stop at the first failure)")
    claim_group = parser.add_argument_group("claim, lpaf_check, frontier (real weights, local data)")
    claim_group.add_argument("--model_dirs", nargs="+", metavar="DIR",
                             help="local model dirs (env MODEL_DIRS); default: the quickstart all-MiniLM-L6-v2 from "
                                  "scripts/prepare_quickstart_assets.py")
    claim_group.add_argument("--mpnet_dir", metavar="DIR", help="an MPNet model dir, added to the models")
    claim_group.add_argument("--train_file", help="training CSV/JSON (default: the quickstart movie-sentiment train.csv)")
    claim_group.add_argument("--validation_file", help="validation CSV/JSON (default: the quickstart validation.csv)")
    table7_group = parser.add_argument_group("table7 (CoFi, CoFi + LoSparse)")
    table7_group.add_argument("--teacher_dirs", nargs="+", metavar="TASK=DIR",
                              help="given teachers, e.g. rte=~/models/textattack-bert-base-uncased-RTE (a dir or a hub "
                                   "id; env TEACHER_DIRS): that task gets no finetune cell and distils from DIR")
    args = parser.parse_args(argv)
    args.teacher_dirs = teacher_dirs(parser, args)
    if os.environ.get("DRY_RUN", "0").strip().lower() not in ("0", "", "false", "no", "off"):
        args.dry_run = True
    if args.num_gpus < 1:
        parser.error("--num_gpus must be >= 1")
    if args.only:
        try:
            re.compile(args.only)
        except re.error as exc:
            parser.error(f"--only {args.only!r} is not a regular expression: {exc}")
    return args


def teacher_dirs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """{task: teacher} from --teacher_dirs TASK=DIR ... (else env TEACHER_DIRS); table7 only, tasks of its config."""
    items = args.teacher_dirs
    if items and args.table != "table7":
        parser.error(f"--teacher_dirs applies to table7 only, not {args.table}")
    if items is None:
        if args.table != "table7":
            return {}
        items = os.environ.get("TEACHER_DIRS", "").split()
    tasks = config_tasks(TABLE7_BERT)
    found: dict[str, str] = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            parser.error(f"--teacher_dirs {item!r}: write TASK=DIR, e.g. rte=~/models/bert-base-uncased-RTE")
        if task not in tasks:
            parser.error(f"--teacher_dirs {item!r}: {task!r} is not a task of {TABLE7_BERT}; choose from "
                         f"{', '.join(tasks)}")
        if task in found:
            parser.error(f"--teacher_dirs names {task} twice")
        found[task] = os.path.expanduser(path)
    return found


def majority_share(path: str) -> Optional[float]:
    """The most frequent `label`'s share of a CSV or JSON-lines file: a constant predictor's accuracy.

    None when the file cannot be read or has no label column (regression, another column name)."""
    try:
        with open(path, newline="") as f:
            if path.endswith(".csv"):
                labels = [row.get("label") for row in csv.DictReader(f)]
            else:
                labels = [json.loads(line).get("label") for line in f if line.strip()]
    except (OSError, ValueError, AttributeError):
        return None
    labels = [label for label in labels if label not in (None, "")]
    if not labels:
        return None
    return max(labels.count(label) for label in set(labels)) / len(labels)


def report_command(table: str, cells: Sequence[Cell], opts: Options) -> str:
    """The reproduce.report call for this table: its own dir plus the dirs of the tables whose cells it reuses."""
    tables = [table] + sorted({c.table for c in cells} - {table})
    argv = ["python", "-m", "reproduce.report", *(os.path.join(opts.output_root, t) for t in tables),
            "--table", TABLES[table][0]]
    if table.startswith("figure") or table == "frontier":
        argv += ["--plots", os.path.join(opts.output_root, table, "plots")]
    if table == "frontier":  # time the saved models first: the report draws the frontier from their latency.json
        root = os.path.join(opts.output_root, table)
        timing = ["python", "-m", "benchmarks.frontier", root, "--markdown", os.path.join(root, "frontier.md"),
                  "--json", os.path.join(root, "frontier.json"), "--plot", os.path.join(root, "frontier.png")]
        chance = majority_share(opts.validation_file) if opts.validation_file else None
        timing += ["--chance_accuracy", f"{100 * chance:.2f}"] if chance is not None else []
        return f"{shlex.join(timing)} && {shlex.join(argv)}"
    return shlex.join(argv)


def run_cell(c: Cell, argv: list[str], opts: Options) -> int:
    directory = out_dir(opts, c.id)
    log_path = directory.rstrip("/") + ".log"
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n===== {_dt.datetime.now().isoformat(timespec='seconds')} {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def options(args: argparse.Namespace) -> Options:
    return Options(output_root=args.output_root, seeds=list(dict.fromkeys(args.seeds)), num_gpus=args.num_gpus,
                   accelerate=not args.no_accelerate, extra=[f for e in args.extra for f in shlex.split(e)],
                   python=args.python or python_executable(),
                   model_dirs=args.model_dirs or [], train_file=args.train_file,
                   validation_file=args.validation_file, teacher_dirs=dict(getattr(args, "teacher_dirs", None) or {}))


def select_cells(table: str, opts: Options, only: Optional[str] = None) -> list[Cell]:
    """The table's cells, each once (tables share cells), those whose id matches `only` if given."""
    cells: list[Cell] = []
    seen: set[str] = set()
    for c in BUILDERS[table](opts):
        if c.id not in seen and (not only or re.search(only, c.id)):
            seen.add(c.id)
            cells.append(c)
    return cells


@dataclass
class Plan:
    """What an invocation does: the cells, the state each is in now, and its command for that state."""

    table: str
    cells: list[Cell]
    states: list[CellState]
    commands: list[list[str]]
    report_hint: str

    @property
    def done(self) -> list[bool]:
        return [state.kind == "done" for state in self.states]

    @property
    def count_line(self) -> str:
        n_done = sum(self.done)
        return f"{len(self.cells)} cells: {n_done} done, {len(self.cells) - n_done} to run"

    @property
    def starts(self) -> str:
        """'1 resume from a checkpoint, 2 restart from zero' (the kinds that occur), or ''."""
        kinds = [state.kind for state in self.states]
        return ", ".join(f"{kinds.count(k)} {word}" for k, word in (("resume", "resume from a checkpoint"),
                                                                     ("restart", "restart from zero"))
                         if kinds.count(k))

    @property
    def notes(self) -> list[str]:
        return list(dict.fromkeys(n for c in self.cells for n in c.notes))


def make_plan(table: str, cells: list[Cell], opts: Options, warn: Callable[[str], None]) -> Plan:
    states = [cell_state(opts, c) for c in cells]
    commands = [command(c, opts, warn, state) for c, state in zip(cells, states)]
    return Plan(table, cells, states, commands, report_command(table, cells, opts))


def print_dry_run(plan: Plan) -> int:
    """Every command (skipped ones as comments, a resume/restart comment above the others), then counts."""
    for note in plan.notes:
        print(f"# note: {note}")
    for c, argv, state in zip(plan.cells, plan.commands, plan.states):
        if state.kind == "done":
            print(f"# skip (done): {shlex.join(argv)}")
            continue
        if state.kind in ("resume", "restart"):
            print(f"# {state.kind} {c.id}: {state.detail}")
        print(shlex.join(argv))
    print(f"# then: {plan.report_hint}")
    if plan.starts:
        print(f"# of the cells to run: {plan.starts}")
    print(plan.count_line)
    return 0


def run_one(c: Cell, argv: list[str], state: CellState, progress: str, opts: Options) -> Optional[int]:
    """Run one cell and say how it went; None when it succeeded, else the exit code to stop with."""
    log_path = out_dir(opts, c.id).rstrip("/") + ".log"
    how = {"fresh": "run", "restart": "restart", "resume": state.label}[state.kind]
    why = f": {state.detail}" if state.kind != "fresh" else ""
    print(f"{progress} {how} {c.id}{why}  (log: {log_path})", flush=True)
    start = time.time()
    code = run_cell(c, argv, opts)
    minutes = (time.time() - start) / 60
    if code == 0 and is_done(opts, c.id):
        print(f"{progress} ok {c.id} ({minutes:.1f} min)", flush=True)
        return None
    reason = f"exit code {code}" if code != 0 else f"exit code 0 but no {RESULTS_FILE}"
    print(f"{progress} FAILED {c.id}: {reason} after {minutes:.1f} min\n  command: {shlex.join(argv)}\n"
          f"  log: {log_path}\n{tail(log_path)}", file=sys.stderr, flush=True)
    return code or 1


def run_plan(plan: Plan, opts: Options, warn: Callable[[str], None], keep_going: bool) -> int:
    """Run the cells not done yet, in order; stop at the first failure unless `keep_going`."""
    if not plan.cells:
        print(plan.count_line)
        return 0
    if opts.num_gpus > 1 and opts.accelerate and not shutil.which("accelerate"):
        print("error: 'accelerate' is not on PATH; pip install accelerate, or pass --no_accelerate", file=sys.stderr)
        return 2
    print(f"{plan.table}: {plan.count_line}{f' ({plan.starts})' if plan.starts else ''} "
          f"(output root {opts.output_root})", flush=True)
    for note in plan.notes:
        print(f"note: {note}")
    failed: list[str] = []
    todo = len(plan.cells) - sum(plan.done)
    k = 0
    for c, was_done in zip(plan.cells, plan.done):
        state = cell_state(opts, c)  # read again now: the directory may have changed since the driver started
        if was_done or state.kind == "done":
            print(f"skip (done) {c.id}", flush=True)
            continue
        k += 1
        missing = [d for d in c.deps if not is_done(opts, d)]
        if missing:
            print(f"[{k}/{todo}] blocked {c.id}: needs {', '.join(missing)} (not done)", flush=True)
            code: Optional[int] = 1
            stop = "stopped: run the cells it depends on first (they are in this table unless --only left them out)"
        else:
            code = run_one(c, command(c, opts, warn, state), state, f"[{k}/{todo}]", opts)
            stop = ("stopped at the first failure (pass --keep_going to continue past failures); rerun the same "
                    "command to resume")
        if code is None:
            continue
        failed.append(c.id)
        if not keep_going:
            print(stop, file=sys.stderr)
            return code
    ok = len(plan.cells) - len(failed)
    print(f"{plan.table}: {ok}/{len(plan.cells)} cells done" + (f", {len(failed)} failed: {', '.join(failed)}"
                                                                  if failed else ""))
    print(f"summarize with: {plan.report_hint}")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None, repo: Optional[str] = None) -> int:
    """The driver: print (--dry_run) or run the cells of one table. `repo`: the checkout (see `use_checkout`)."""
    if repo is not None:
        use_checkout(repo)
    args = parse_args(argv)
    if args.table in LOCAL_DATA_TABLES:
        claim_inputs(args, args.dry_run)
    opts = options(args)
    warn = Warnings()
    plan = make_plan(args.table, select_cells(args.table, opts, args.only), opts, warn)
    if args.dry_run:
        return print_dry_run(plan)
    return run_plan(plan, opts, warn, args.keep_going)


def run_command_line(repo: Optional[str] = None) -> int:
    """`main` for a shell: a usage error is one line (exit 2), a closed pipe is quiet, Ctrl-C says how to resume."""
    try:
        return main(repo=repo)
    except LoSparseUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... --dry_run | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume (finished cells are skipped, the interrupted one "
              "resumes from its last complete checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run_command_line())
