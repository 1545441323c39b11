#!/usr/bin/env python
"""Compare a dense fine-tuned model with its LoSparse-compressed version: accuracy, size and CPU latency.

    python scripts/quickstart_report.py --dense outputs/quickstart/dense \
        --compressed outputs/quickstart/losparse-20 --validation_file .../validation.csv

Accuracy comes from each run's all_results.json (the compressed one is measured on the compact model
that was saved); latency is measured here, on the same sentences, for both models in one process,
interleaved (dense, compressed, dense, ...) so a change in machine load hits both alike. Each speed-up
is printed with the verdict of `benchmarks.common.judge_timing`: on a loaded machine (load average
above the cores) or with scattered repeats it says UNRELIABLE and why, next to the figure, and the
JSON records timing_reliable / timing_warning.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
from datetime import date

import torch

import losparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/, reproduce/ (not part of the installed package)
from benchmarks.common import (
    combine_verdicts,
    interleaved_latency_ms,
    judge_timing,
    load_average,
    parameter_count,
    timing_line,
    weights_size_mb,
)

NAMES = ("dense", "LoSparse")


def time_pair(models: dict, inputs: dict, repeats: int, warmup: int = 3):
    """Median latency (ms) of each model on `inputs`, interleaved, and the verdict on those timings."""
    before = load_average()
    stats = interleaved_latency_ms({name: (lambda m=model: m(**inputs)) for name, model in models.items()},
                                   warmup=warmup, repeats=repeats)
    verdict = judge_timing({name: s["times_ms"] for name, s in stats.items()}, before, load_average())
    return {name: s["median_ms"] for name, s in stats.items()}, verdict


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="output_dir of the dense (--method finetune) run")
    parser.add_argument("--compressed", required=True, help="output_dir of the LoSparse run")
    parser.add_argument("--validation_file", required=True, help="CSV with a 'sentence' column")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    for path in (args.dense, args.compressed):
        if not os.path.isfile(os.path.join(path, "all_results.json")):
            parser.error(f"{path} holds no all_results.json: run the training step first")
    return args


def size_rows(args: argparse.Namespace, dense, compact) -> dict:
    """Accuracy (from each run's all_results.json), parameters and weight size of both models."""
    rows = {}
    for name, model, path in (("dense", dense, args.dense), ("LoSparse", compact, args.compressed)):
        with open(os.path.join(path, "all_results.json")) as f:
            results = json.load(f)
        rows[name] = {
            "eval_accuracy": results["eval_accuracy"],
            "params": parameter_count(model),
            "encoder_matrix_params": results["compression"].get("target_params",
                                                                results["compression"].get("model_params")),
            "weights_mb": weights_size_mb(path),
        }
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with open(args.validation_file) as f:
        sentences = [row["sentence"] for row in csv.DictReader(f)]
    tokenizer = AutoTokenizer.from_pretrained(args.compressed)
    dense = AutoModelForSequenceClassification.from_pretrained(args.dense).eval()
    compact = losparse.load(args.compressed)

    def batch(size: int):
        return tokenizer(sentences[:size], padding=True, truncation=True, max_length=args.max_seq_length,
                         return_tensors="pt")

    rows = size_rows(args, dense, compact)
    models = {"dense": dense, "LoSparse": compact}
    key_big = f"latency_ms_batch{args.batch_size}"
    verdicts = {}
    speedups = {}
    sizes = {args.batch_size: args.repeats, 1: args.repeats * 2}  # batch 1: quicker calls, more of them
    for size, repeats in sizes.items():
        latency, verdicts[f"batch{size}"] = time_pair(models, batch(size), repeats)
        for name in NAMES:
            rows[name][f"latency_ms_batch{size}"] = latency[name]
        speedups[f"batch{size}"] = latency["dense"] / latency["LoSparse"]
    compressed_results = json.load(open(os.path.join(args.compressed, "all_results.json")))
    rows["dense"]["encoder_matrix_params"] = compressed_results["compression"]["target_dense_params"]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"\nQuickstart result ({date.today()}, CPU: {machine})\n")
    print(f"| model | accuracy | params (all) | encoder matrices | weights on disk | latency b={args.batch_size} | latency b=1 |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['eval_accuracy']:.4f} | {row['params'] / 1e6:.2f}M | "
              f"{row['encoder_matrix_params'] / 1e6:.2f}M | {row['weights_mb']:.1f} MB | {row[key_big]:.1f} ms | "
              f"{row['latency_ms_batch1']:.1f} ms |")
    ratio = compressed_results["compression"]["remaining_ratio"]
    print(f"\nremaining ratio {ratio:.4f} of the encoder matrices")
    for size in sizes:
        figure = f"{speedups[f'batch{size}']:.2f}x"
        print(f"speed-up at batch {size}: {verdicts[f'batch{size}'].annotate(figure)}")
    overall = combine_verdicts(verdicts)
    print(timing_line(overall))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(date.today()), "machine": machine, "models": rows, "remaining_ratio": ratio,
                       "speedup": speedups, **overall.fields(),
                       "timing": {k: v.fields() for k, v in verdicts.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
