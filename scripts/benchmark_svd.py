#!/usr/bin/env python
"""How long the SVD initialisation takes, exact vs randomized, and how close the randomized one is.

    python scripts/benchmark_svd.py --device cpu --json svd.json
    python scripts/benchmark_svd.py --device cuda --arch bert-base --shapes 4096x11008,11008x4096

Part 1, per matrix shape (a "trained-like" random weight: noise plus a low-rank part with a decaying
spectrum): median time of the exact `torch.linalg.svd` and of `losparse.core.decompose.randomized_top_svd`
for the rank that --low_rank_ratio gives, and the randomized result's accuracy against the exact one:
the relative error of the top-k singular values, and its residual ‖W − U·V‖ over the optimal
(Eckart–Young) residual, which is 1 for a perfect top-k (both in float64: a float32 norm of a
45M-entry matrix is off by ~0.1%, more than the difference being measured).
Part 2: `losparse.apply` of a whole built-in model (--arch, random weights) with each --svd_solver,
timed end to end (decomposition included), on --device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

import torch

import losparse
from losparse.core.decompose import randomized_top_svd, rank_for_ratio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/, reproduce/ (not part of the installed package)
from benchmarks.common import (
    ARCHS,
    TimingVerdict,
    build_model,
    combine_verdicts,
    environment_at_start,
    environment_record,
    judge_timing,
    load_average,
    machine_line,
    threads_flag_error,
    timing_line,
)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", default="768x3072,4096x11008",
                        help="comma-separated OUTxIN matrix shapes for part 1 ('' to skip)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="bert-base",
                        help="built-in model for part 2")
    parser.add_argument("--no_model", action="store_true", help="skip part 2")
    parser.add_argument("--solvers", default="exact,randomized,auto", help="part 2: comma-separated --svd_solver values")
    parser.add_argument("--low_rank_ratio", type=float, default=0.05)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per matrix and solver (median)")
    parser.add_argument("--threads", default="auto", help="torch CPU threads: a number, 'auto' or 'default'")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be >= 1")
    if threads_flag_error(args.threads):
        parser.error(threads_flag_error(args.threads))
    if not 0.0 < args.low_rank_ratio < 1.0:
        parser.error(f"--low_rank_ratio {args.low_rank_ratio} must be in (0, 1)")
    try:
        args.shape_list = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--shapes {args.shapes!r}: give OUTxIN pairs like 768x3072,4096x11008")
    if any(len(shape) != 2 or min(shape) < 2 for shape in args.shape_list):
        parser.error(f"--shapes {args.shapes!r}: every shape is OUTxIN with both sides >= 2")
    args.solver_list = [s.strip() for s in args.solvers.split(",") if s.strip()]
    bad = [s for s in args.solver_list if s not in ("exact", "randomized", "auto")]
    if bad:
        parser.error(f"--solvers: {bad[0]!r} is not one of exact, randomized, auto")
    return args


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, Any, list[float]]:
    """(median seconds over `repeats` runs after one warm-up, last result, every run's seconds)."""
    result = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2], result, times


def trained_like_weight(out_features: int, in_features: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    structure_rank = min(64, out_features, in_features)
    decay = torch.logspace(0, -1.5, structure_rank)
    structure = (torch.randn(out_features, structure_rank, generator=generator) * decay) @ torch.randn(
        structure_rank, in_features, generator=generator)
    return (noise + structure / 8).to(device)


def matrix_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for out_features, in_features in args.shape_list:
        weight = trained_like_weight(out_features, in_features, args.device)
        rank = rank_for_ratio(out_features, in_features, args.low_rank_ratio)
        load_before = load_average()
        exact_s, (_, sigma, _), exact_times = timed(lambda: torch.linalg.svd(weight, full_matrices=False),
                                                    args.device, args.repeats)
        randomized_s, (left, top_sigma, right_t), randomized_times = timed(
            lambda: randomized_top_svd(weight, rank), args.device, args.repeats)
        verdict = judge_timing({"exact": exact_times, "randomized": randomized_times}, load_before, load_average())
        residual = float((weight.double() - (left * top_sigma).double() @ right_t.double()).norm())
        optimal = float(sigma[rank:].double().pow(2).sum().sqrt())
        rows.append({
            "shape": f"{out_features}x{in_features}", "rank": rank, "exact_s": exact_s, "randomized_s": randomized_s,
            "speedup": exact_s / randomized_s,
            "sigma_max_rel_err": float(((top_sigma - sigma[:rank]).abs() / sigma[:rank]).max()),
            "residual_over_optimal": residual / optimal if optimal > 0 else float("nan"),
            "exact_times_s": exact_times, "randomized_times_s": randomized_times, **verdict.fields(),
        })
    return rows


def model_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], TimingVerdict]:
    """One timed `losparse.apply` per solver, and the verdict on them (one run each: the load only)."""
    rows = []
    load_before = load_average()
    for solver in args.solver_list:
        model = build_model(args.arch, device=args.device)
        config = losparse.LoSparseConfig(remaining_ratio=min(1.0, args.low_rank_ratio + 0.15),
                                          low_rank_ratio=args.low_rank_ratio, svd_solver=solver,
                                          svd_device=args.device)
        synchronize(args.device)
        started = time.perf_counter()
        losparse.apply(model, config)
        synchronize(args.device)
        layers = sum(1 for _ in losparse.core.decompose.losparse_layers(model))
        rows.append({"arch": args.arch, "svd_solver": solver, "layers": layers,
                     "apply_s": time.perf_counter() - started})
        del model
    return rows, judge_timing({}, load_before, load_average())


def main(argv: Optional[list[str]] = None) -> int:
    wall_started = time.perf_counter()
    args = parse_args(argv)
    environment = environment_at_start(args.threads)
    results: dict[str, Any] = {"device": args.device, "low_rank_ratio": args.low_rank_ratio}
    if args.device == "cuda":
        results["device_name"] = torch.cuda.get_device_name()
    if args.shape_list:
        results["matrices"] = matrix_rows(args)
        print(f"\n### top-k SVD of one matrix (fp32, rank from r = {args.low_rank_ratio}, median of {args.repeats})\n")
        print("| shape | rank | exact | randomized | speed-up | max rel. error of σ_1..k | residual / optimal |")
        print("|---|---|---|---|---|---|---|")
        for row in results["matrices"]:
            speedup = TimingVerdict.from_fields(row).annotate(f"{row['speedup']:.1f}×")
            print(f"| {row['shape']} | {row['rank']} | {row['exact_s'] * 1e3:.1f} ms | {row['randomized_s'] * 1e3:.1f} ms"
                  f" | {speedup} | {row['sigma_max_rel_err']:.2e} | {row['residual_over_optimal']:.5f} |")
    if not args.no_model:
        results["models"], models_verdict = model_rows(args)
        results["models_timing"] = models_verdict.fields()
        print(f"\n### losparse.apply of a whole {args.arch} (random weights, fp32, r = {args.low_rank_ratio})\n")
        print("| svd_solver | layers | time |")
        print("|---|---|---|")
        for row in results["models"]:
            apply_time = models_verdict.annotate(f"{row['apply_s']:.2f} s")
            print(f"| {row['svd_solver']} | {row['layers']} | {apply_time} |")
    verdicts = {row["shape"]: TimingVerdict.from_fields(row) for row in results.get("matrices", [])}
    if "models_timing" in results:
        verdicts[f"apply {args.arch}"] = TimingVerdict.from_fields(results["models_timing"])
    results.update(combine_verdicts(verdicts).fields())
    results.update(environment_record(environment, "scripts/benchmark_svd.py", argv, wall_started))
    print("\n" + timing_line(TimingVerdict.from_fields(results)))
    print(machine_line(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
