"""Training step time: `LoSparseTrainer` (decomposed model, pruning every step) vs plain `Trainer` (dense).

    python scripts/benchmark_training.py --arch bert-base --device cpu --batch_size 2 --seq_len 64 \
        --steps 8 --json train.json

(scripts/benchmark_training.py is this module's `main`.)

Both trainers train the same architecture on the same random token ids (random weights from a
built-in config, nothing downloaded; or --model_name_or_path): the plain `Trainer` the dense model, the
`LoSparseTrainer` a `losparse.apply` copy of it, with pruning in force from the first step
(pruning_warmup_steps=0, pruning_final_steps=0, masks recomputed every --pruning_interval steps, 1 by
default: the worst case). A callback records the wall time of every optimizer step (on_step_begin to
on_step_end, CUDA-synchronised); the first --warmup_steps steps of every run are dropped. The runs are
interleaved (dense, LoSparse, then LoSparse, dense, ...) for --rounds rounds so machine load hits both
alike. Reported: median step time of each, their ratio (goal: LoSparse <= 1.3× dense), the time of the
pruner's own update per step, parameters, and peak GPU memory on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import losparse
from benchmarks.common import (
    ARCHS,
    TimingVerdict,
    build_model,
    cpu_name,
    environment_at_start,
    environment_record,
    fill_device_defaults,
    judge_timing,
    latency_stats,
    load_average,
    load_model,
    machine_line,
    parameter_count,
    threads_flag_error,
    timing_line,
    write_json,
)

GOAL_RATIO = 1.3


class RandomTokens(torch.utils.data.Dataset):
    """`size` examples of random token ids with labels that fit the model kind."""

    def __init__(self, size: int, kind: str, vocab_size: int, seq_len: int, tgt_len: int, num_labels: int,
                 seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        low = min(5, vocab_size - 1)
        self.input_ids = torch.randint(low, vocab_size, (size, seq_len), generator=generator)
        if kind == "classification":
            self.labels = torch.randint(0, num_labels, (size,), generator=generator)
        elif kind == "seq2seq":
            self.labels = torch.randint(low, vocab_size, (size, tgt_len), generator=generator)
        else:
            self.labels = self.input_ids.clone()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": torch.ones_like(self.input_ids[index]),
                "labels": self.labels[index]}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (and of the LoSparse pruner's update inside it)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.step_ms: list[float] = []
        self.pruner_ms: list[float] = []
        self.trainer: Any = None
        self._started = 0.0
        self._wrapped = False

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _wrap_pruner(self) -> None:
        pruner = getattr(self.trainer, "pruner", None) if self.trainer is not None else None
        if pruner is None or self._wrapped:
            return
        original = pruner.step

        def timed_step(step: int) -> None:
            self._sync()
            started = time.perf_counter()
            original(step)
            self._sync()
            self.pruner_ms.append((time.perf_counter() - started) * 1e3)

        pruner.step = timed_step
        self._wrapped = True

    def on_step_begin(self, args, state, control, **kwargs):
        self._wrap_pruner()  # the pruner exists from on_train_begin on
        self._sync()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.step_ms.append((time.perf_counter() - self._started) * 1e3)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--arch", choices=sorted(ARCHS), default=None,
                        help="built-in architecture with random weights (default: bert-base)")
    source.add_argument("--model_name_or_path", default=None, help="a dense transformers model (local dir or hub id)")
    parser.add_argument("--num_layers", type=int, default=None, help="override the layer count of a built-in arch")
    parser.add_argument("--remaining_ratio", type=float, default=0.2)
    parser.add_argument("--low_rank_ratio", type=float, default=0.05)
    parser.add_argument("--pruning_interval", type=int, default=1,
                        help="masks recomputed every this many steps (1 = every step, the most expensive)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="fp32, or bf16/fp16 mixed precision (TrainingArguments bf16/fp16); default bf16 on "
                             "cuda, fp32 on cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--tgt_len", type=int, default=32, help="label length for seq2seq models")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps per run")
    parser.add_argument("--warmup_steps", type=int, default=2, help="optimizer steps dropped at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="dense/LoSparse runs, interleaved")
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--svd_solver", choices=("randomized", "exact", "auto"), default="randomized",
                        help="top-k SVD used by losparse.apply (values do not affect timing; exact is slow on cpu)")
    parser.add_argument("--threads", default=None,
                        help="torch CPU threads: a number, 'auto' or 'default' (default: auto on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    fill_device_defaults(parser, args)
    if threads_flag_error(args.threads):
        parser.error(threads_flag_error(args.threads))
    for name in ("batch_size", "seq_len", "tgt_len", "steps", "rounds", "pruning_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup_steps must be >= 0")
    if not 0.0 < args.low_rank_ratio < args.remaining_ratio <= 1.0:
        parser.error("need 0 < --low_rank_ratio < --remaining_ratio <= 1")
    return args


def run_once(args: argparse.Namespace, name: str, model: Any, dataset: RandomTokens, output_dir: str) -> dict[str, Any]:
    cuda = args.device == "cuda"
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=args.learning_rate,
        optim=args.optim,
        report_to="none",
        use_cpu=not cuda,
        disable_tqdm=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        bf16=args.dtype == "bf16",
        fp16=args.dtype == "fp16",
        dataloader_num_workers=0,
        seed=args.seed,
    )
    timer = StepTimer(cuda)
    trainer_class = losparse.LoSparseTrainer if name == "losparse" else Trainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
    timer.trainer = trainer
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    run: dict[str, Any] = {
        "step_ms": timer.step_ms[args.warmup_steps:],
        "pruner_ms": timer.pruner_ms[args.warmup_steps:],
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    if name == "losparse":
        run["kept_fraction"] = trainer.pruner.kept_fraction
        run["achieved_kept_fraction"] = trainer.pruner.achieved_kept_fraction()
    trainer.accelerator.free_memory()
    return run


def format_table(result: dict[str, Any]) -> str:
    dense, lo = result["dense"], result["losparse"]
    lines = [
        f"### training step, {result['arch'] or result['model']} — {result['device']} {result['dtype']}, batch "
        f"{result['batch_size']} × seq {result['seq_len']}, ratio {result['remaining_ratio']} "
        f"(low-rank {result['low_rank_ratio']}), pruning every {result['pruning_interval']} step(s)",
        "",
        "| trainer | model | params (trained) | median step ms | min | p90 | steps | pruner ms/step | peak GPU MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in (("Trainer", dense), ("LoSparseTrainer", lo)):
        pruner = f"{row['pruner_median_ms']:.1f}" if row.get("pruner_median_ms") is not None else "—"
        peak = f"{row['peak_mem_mb']:.0f}" if row.get("peak_mem_mb") is not None else "n/a"
        lines.append(
            f"| {label} | {row['model']} | {row['params'] / 1e6:.2f}M | {row['median_ms']:.1f} | {row['min_ms']:.1f} | "
            f"{row['p90_ms']:.1f} | {row['n']} | {pruner} | {peak} |"
        )
    verdict = "within" if result["ratio"] <= GOAL_RATIO else "above"
    timing = TimingVerdict.from_fields(result)
    ratio = timing.annotate(f"{result['ratio']:.3f}×")
    lines += [
        "",
        f"LoSparseTrainer / Trainer step time: {ratio} "
        f"({verdict} the {GOAL_RATIO}× goal); "
        f"S kept at the end: {result['losparse']['achieved_kept_fraction']:.4f} (target "
        f"{result['final_kept_fraction']:.4f})",
        timing_line(timing),
        machine_line(result),
    ]
    return "\n".join(lines)


class BenchmarkInputError(ValueError):
    """A model that cannot be benchmarked as asked (exit code 2)."""


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], str, str, Any]:
    """({"dense": model, "losparse": its `losparse.apply` copy}, kind, model label, LoSparseConfig), in train mode."""
    if args.model_name_or_path:
        dense, kind, is_compact = load_model(args.model_name_or_path, device=device)
        if is_compact:
            raise BenchmarkInputError("--model_name_or_path is a LoSparse compact checkpoint; give the dense model")
        model_label = args.model_name_or_path
    else:
        dense = build_model(args.arch, args.num_layers, device=device, seed=args.seed)
        kind, model_label = ARCHS[args.arch].kind, ARCHS[args.arch].description
    dense.train()
    config = losparse.LoSparseConfig(
        remaining_ratio=args.remaining_ratio, low_rank_ratio=args.low_rank_ratio, pruning_warmup_steps=0,
        pruning_final_steps=0, pruning_interval=args.pruning_interval, svd_solver=args.svd_solver,
    )
    decomposed = copy.deepcopy(dense)
    torch.manual_seed(args.seed)
    try:
        losparse.apply(decomposed, config)
    except losparse.LoSparseUsageError as exc:
        raise BenchmarkInputError(str(exc)) from None
    decomposed.train()
    return {"dense": dense, "losparse": decomposed}, kind, model_label, config


def time_rounds(args: argparse.Namespace, models: dict[str, Any], kind: str) -> tuple[dict[str, list], Any, Any]:
    """--rounds interleaved runs of each trainer on the same random tokens: (runs, load before, load after)."""
    dense = models["dense"]
    dataset = RandomTokens(args.batch_size * (args.warmup_steps + args.steps), kind, dense.config.vocab_size,
                           args.seq_len, args.tgt_len, getattr(dense.config, "num_labels", 2), seed=args.seed)
    runs: dict[str, list[dict[str, Any]]] = {"dense": [], "losparse": []}
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="losparse-bench-") as output_dir:
        for round_index in range(args.rounds):
            order = ("dense", "losparse") if round_index % 2 == 0 else ("losparse", "dense")
            for name in order:
                print(f"round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr)
                runs[name].append(run_once(args, name, models[name], dataset, output_dir))
    return runs, load_before, load_average()


def trainer_entry(name: str, model: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One trainer's row: step-time statistics over all rounds, pruner time, peak memory, kept fraction."""
    step_ms = [t for run in runs for t in run["step_ms"]]
    pruner_ms = [t for run in runs for t in run["pruner_ms"]]
    peaks = [run["peak_mem_mb"] for run in runs if run["peak_mem_mb"] is not None]
    entry = {
        "model": "dense" if name == "dense" else "U·V + S (training form)",
        "params": parameter_count(model),
        **latency_stats(step_ms),
        "step_ms": [round(t, 3) for t in step_ms],
        "pruner_median_ms": latency_stats(pruner_ms)["median_ms"] if pruner_ms else None,
        "peak_mem_mb": max(peaks) if peaks else None,
    }
    if name == "losparse":
        entry["kept_fraction"] = runs[-1]["kept_fraction"]
        entry["achieved_kept_fraction"] = runs[-1]["achieved_kept_fraction"]
    return entry


def summary(args: argparse.Namespace, model_label: str, kind: str, device: torch.device, models: dict[str, Any],
            config: Any, runs: dict[str, list], loads: tuple[Any, Any]) -> dict[str, Any]:
    """The JSON record of the run (without the machine fields of `environment_record`)."""
    result: dict[str, Any] = {
        "arch": args.arch, "model": model_label, "kind": kind, "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if args.device == "cuda" else cpu_name(),
        "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
        "warmup_steps": args.warmup_steps, "rounds": args.rounds, "remaining_ratio": args.remaining_ratio,
        "low_rank_ratio": args.low_rank_ratio, "pruning_interval": args.pruning_interval,
    }
    for name in ("dense", "losparse"):
        result[name] = trainer_entry(name, models[name], runs[name])
    pruner = losparse.LoSparsePruner(models["losparse"], total_steps=args.warmup_steps + args.steps, config=config)
    result["final_kept_fraction"] = pruner.final_kept_fraction
    result["dense_step_ms"] = result["dense"]["median_ms"]
    result["losparse_step_ms"] = result["losparse"]["median_ms"]
    result["ratio"] = result["losparse_step_ms"] / result["dense_step_ms"]
    result["goal_ratio"] = GOAL_RATIO
    result["within_goal"] = result["ratio"] <= GOAL_RATIO
    timing = judge_timing({"Trainer": result["dense"]["step_ms"], "LoSparseTrainer": result["losparse"]["step_ms"]},
                          *loads)
    result.update(timing.fields())
    result["dense_params"] = result["dense"]["params"]
    result["losparse_params"] = result["losparse"]["params"]
    return result


def main(argv: Optional[list[str]] = None, wall_started: Optional[float] = None) -> int:
    """Exit codes: 0 ok, 2 bad arguments. `wall_started`: when the process started (the script passes it)."""
    args = parse_args(argv)
    wall_started = wall_started if wall_started is not None else time.perf_counter()
    environment = environment_at_start(args.threads)
    device = torch.device(args.device)
    try:
        models, kind, model_label, config = build_models(args, device)
    except BenchmarkInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs, load_before, load_after = time_rounds(args, models, kind)
    result = summary(args, model_label, kind, device, models, config, runs, (load_before, load_after))
    result.update(environment_record(environment, "scripts/benchmark_training.py", argv, wall_started))
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0
