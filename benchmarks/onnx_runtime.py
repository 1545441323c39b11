"""Dense vs LoSparse compact vs structured-pruned encoders, exported to ONNX and timed in onnxruntime.

    python scripts/benchmark_onnx.py --arch bert-base --remaining_ratio 0.2 --low_rank_ratio 0.05 \
        --batch_size 8 --seq_len 128 --threads auto --json onnx.json

(scripts/benchmark_onnx.py is this module's `main`.)

One run builds three models of one built-in encoder architecture (random weights, nothing
downloaded) from the same dense weights: the dense model; the compact model (decomposed, pruned to
the exact ratio with random neuron scores, compacted: `compress_for_benchmark`); and the
structured-pruned peer (`losparse.methods.structured.build_structured_peer(dense, kept_fraction=
--remaining_ratio)`: whole neurons/heads removed, the usual baseline for deployment speed). Each is
exported (`losparse.deploy.onnx.export_onnx`, dynamic batch and sequence) from a 2 × 16 example into
a temporary directory (or --keep_dir), its onnxruntime outputs are checked against torch's on the
benchmark's batch × seq inputs (a shape the export never saw; the run fails with exit code 1 beyond
--tolerance, relative to the largest |logit|), and the sessions (CPU, intra_op_num_threads =
--threads) are timed interleaved (dense, compact, structured, dense, ...).

The table gives the median latency, the speed-up over ORT dense and, on the last line, the ratio
compact / structured (below 1: LoSparse's compact model is faster than the structured peer).
If `losparse.methods.structured` is not importable the structured model is left out (the JSON says why).
Exit codes: 0 ok, 1 outputs disagree, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import torch

from benchmarks.common import (
    ARCHS,
    build_model,
    compress_for_benchmark,
    environment_at_start,
    environment_record,
    interleaved_latency_ms,
    judge_timing,
    load_average,
    machine_line,
    parameter_count,
    random_inputs,
    threads_flag_error,
    timing_line,
    write_json,
)
from losparse.core.errors import LoSparseUsageError
from losparse.deploy.onnx import compare_with_onnxruntime, export_onnx, onnx_feed, onnxruntime_session
from losparse.methods.structured.removal import build_structured_peer

ENCODER_ARCHS = sorted(name for name, spec in ARCHS.items() if spec.kind == "classification")
EXPORT_BATCH, EXPORT_SEQ = 2, 16  # the export example; checks and timing use other shapes
DEFAULT_TOLERANCE = 1e-4  # max |torch − ORT| / max |torch| in fp32


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", choices=ENCODER_ARCHS, default="bert-base")
    parser.add_argument("--num_layers", type=int, default=None, help="override the architecture's layer count")
    parser.add_argument("--remaining_ratio", type=float, default=0.2,
                        help="LoSparse's kept fraction of the target matrices, and the structured peer's kept fraction")
    parser.add_argument("--low_rank_ratio", type=float, default=0.05)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--threads", default="auto",
                        help="onnxruntime intra_op_num_threads (and torch's): a number, 'auto' (the free cores) or "
                             "'default' (onnxruntime's own choice)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max_seconds", type=float, default=30.0, help="stop timing after this (>= 3 rounds)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: losparse.deploy.onnx's, 17)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="max |torch − onnxruntime| relative to max |torch output|")
    parser.add_argument("--no_structured", action="store_true", help="leave the structured-pruned peer out")
    parser.add_argument("--keep_dir", default=None, help="write the .onnx files here (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags; a bad value exits 2 (argparse) before any model is built."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if threads_flag_error(args.threads):
        parser.error(threads_flag_error(args.threads))
    for name in ("batch_size", "seq_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup} must be >= 0")
    if not 0.0 < args.low_rank_ratio < args.remaining_ratio <= 1.0:
        parser.error(f"need 0 < --low_rank_ratio ({args.low_rank_ratio}) < --remaining_ratio "
                     f"({args.remaining_ratio}) <= 1")
    if args.tolerance <= 0:
        parser.error(f"--tolerance {args.tolerance} must be > 0")
    return args


def structured_builder() -> tuple[Optional[Callable[..., Any]], Optional[str]]:
    """`losparse.methods.structured.build_structured_peer` and no reason it is missing (tests replace this)."""
    return build_structured_peer, None


def build_models(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """{"dense", "compact"[, "structured"]} from one set of random dense weights, and notes on what was built."""
    dense = build_model(args.arch, args.num_layers, seed=args.seed)
    notes: dict[str, Any] = {}
    models = {"dense": dense}
    started = time.perf_counter()
    models["compact"] = compress_for_benchmark(copy.deepcopy(dense), args.remaining_ratio, args.low_rank_ratio,
                                               seed=args.seed).eval()
    notes["compress_s"] = round(time.perf_counter() - started, 3)
    if args.no_structured:
        notes["structured"] = "left out (--no_structured)"
    else:
        builder, missing = structured_builder()
        if builder is None:
            notes["structured"] = f"left out: {missing}"
        else:
            try:
                models["structured"] = builder(copy.deepcopy(dense), args.remaining_ratio, seed=args.seed).eval()
                notes["structured"] = f"build_structured_peer(kept_fraction={args.remaining_ratio}, seed={args.seed})"
            except LoSparseUsageError as exc:  # an architecture structured pruning does not support
                notes["structured"] = f"left out: {exc}"
    return models, notes


def ort_threads(threads_flag: str) -> Optional[int]:
    """intra_op_num_threads for the sessions: torch's count as `environment_at_start` set it, or None for 'default'."""
    return None if threads_flag == "default" else torch.get_num_threads()


def export_and_check(args: argparse.Namespace, models: dict[str, Any], directory: str,
                     inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Export every model, open its session and compare it with torch on `inputs`: {name: record}."""
    example = random_inputs(models["dense"], "classification", EXPORT_BATCH, EXPORT_SEQ, seed=args.seed + 1)
    threads = ort_threads(args.threads)
    records: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        path = os.path.join(directory, f"{name}.onnx")
        started = time.perf_counter()
        export_onnx(model, path, example, opset=args.opset)
        export_s = time.perf_counter() - started
        session = onnxruntime_session(path, threads)
        records[name] = {
            "session": session,
            "parameters": parameter_count(model),
            "onnx_mb": os.path.getsize(path) / 2**20,
            "export_s": round(export_s, 3),
            "check": compare_with_onnxruntime(model, session, inputs),
        }
    return records


def time_sessions(args: argparse.Namespace, records: dict[str, dict[str, Any]],
                  inputs: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, Any]], Any]:
    """Interleaved onnxruntime latency of every session, and the timing verdict."""

    def runner(session: Any) -> Callable[[], Any]:
        feed = onnx_feed(session, inputs)
        return lambda: session.run(None, feed)

    fns = {name: runner(record["session"]) for name, record in records.items()}
    load_before = load_average()
    stats = interleaved_latency_ms(fns, warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_seconds,
                                   cuda=False)
    verdict = judge_timing({name: s["times_ms"] for name, s in stats.items()}, load_before, load_average(),
                           threads=ort_threads(args.threads) or torch.get_num_threads())
    return stats, verdict


def format_table(result: dict[str, Any]) -> str:
    """The table of models (parameters, file size, check, latency, speed-up) and the compact/structured line."""
    lines = [f"ONNX Runtime (CPU), {result['arch']}: batch {result['batch_size']} × seq {result['seq_len']}, "
             f"intra_op_num_threads {result['ort_intra_op_threads'] or 'default'}",
             f"{'model':<11} {'params (M)':>10} {'onnx MB':>8} {'max rel diff':>12} {'median ms':>10} "
             f"{'p90 ms':>8} {'vs dense':>9}"]
    for name, model in result["models"].items():
        latency = model["latency"]
        lines.append(f"{name:<11} {model['parameters'] / 1e6:>10.2f} {model['onnx_mb']:>8.1f} "
                     f"{model['check']['max_rel_diff']:>12.1e} {latency['median_ms']:>10.2f} {latency['p90_ms']:>8.2f} "
                     f"{model['speedup_vs_dense']:>8.2f}x")
    ratio = result.get("compact_over_structured")
    if ratio is not None:
        lines.append(f"compact / structured latency: {ratio:.2f} (below 1: compact is faster)")
    else:
        lines.append(f"structured peer: {result['notes']['structured']}")
    lines.append(result["timing_line"])
    lines.append(machine_line(result))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None, wall_started: Optional[float] = None) -> int:
    """Exit codes: 0 ok, 1 onnxruntime disagrees with torch, 2 bad arguments."""
    args = parse_args(argv)
    wall_started = wall_started if wall_started is not None else time.perf_counter()
    environment = environment_at_start(args.threads)
    try:
        models, notes = build_models(args)
        inputs = random_inputs(models["dense"], "classification", args.batch_size, args.seq_len, seed=args.seed)
        with tempfile.TemporaryDirectory() as temporary:
            directory = args.keep_dir or temporary
            records = export_and_check(args, models, directory, inputs)
            disagree = {name: r["check"]["max_rel_diff"] for name, r in records.items()
                        if not r["check"]["max_rel_diff"] <= args.tolerance}
            if disagree:
                worst = ", ".join(f"{name} {value:.2e}" for name, value in disagree.items())
                print(f"error: onnxruntime disagrees with torch beyond --tolerance {args.tolerance:g} "
                      f"(max relative difference: {worst})", file=sys.stderr)
                return 1
            stats, verdict = time_sessions(args, records, inputs)
    except LoSparseUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dense_ms = stats["dense"]["median_ms"]
    result: dict[str, Any] = {
        "arch": args.arch, "num_layers": args.num_layers, "remaining_ratio": args.remaining_ratio,
        "low_rank_ratio": args.low_rank_ratio, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "export_example_shape": [EXPORT_BATCH, EXPORT_SEQ], "opset": args.opset, "tolerance": args.tolerance,
        "ort_intra_op_threads": ort_threads(args.threads), "warmup": args.warmup, "repeats": args.repeats,
        "notes": notes,
        "models": {name: {"parameters": r["parameters"], "onnx_mb": round(r["onnx_mb"], 3), "export_s": r["export_s"],
                          "check": r["check"], "latency": stats[name],
                          "speedup_vs_dense": dense_ms / stats[name]["median_ms"]}
                   for name, r in records.items()},
    }
    if "structured" in stats:
        result["compact_over_structured"] = stats["compact"]["median_ms"] / stats["structured"]["median_ms"]
    result.update(verdict.fields())
    result["timing_line"] = timing_line(verdict)
    result.update(environment_record(environment, "scripts/benchmark_onnx.py", argv, wall_started))
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0
