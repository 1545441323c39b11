#!/usr/bin/env python
"""Compare a dense fine-tuned model with its LoSparse-compressed version: accuracy, size and CPU latency.

    python scripts/quickstart_report.py --dense outputs/quickstart/dense \
        --compressed outputs/quickstart/losparse-20 --validation_file .../validation.csv

Accuracy comes from each run's all_results.json (the compressed one is measured on the compact model
that was saved); latency is measured here, on the same sentences, for both models in one process.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losparse  # noqa: E402
from losparse.benchmark import median_latency_ms, parameter_count, weights_size_mb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="output_dir of the dense (--method finetune) run")
    parser.add_argument("--compressed", required=True, help="output_dir of the LoSparse run")
    parser.add_argument("--validation_file", required=True, help="CSV with a 'sentence' column")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the comparison here")
    args = parser.parse_args()
    for path in (args.dense, args.compressed):
        if not os.path.isfile(os.path.join(path, "all_results.json")):
            parser.error(f"{path} holds no all_results.json: run the training step first")

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with open(args.validation_file) as f:
        sentences = [row["sentence"] for row in csv.DictReader(f)]
    tokenizer = AutoTokenizer.from_pretrained(args.compressed)
    dense = AutoModelForSequenceClassification.from_pretrained(args.dense).eval()
    compact = losparse.load(args.compressed)

    def batch(size: int):
        return tokenizer(sentences[:size], padding=True, truncation=True, max_length=args.max_seq_length,
                         return_tensors="pt")

    rows = {}
    for name, model, path in (("dense", dense, args.dense), ("LoSparse", compact, args.compressed)):
        with open(os.path.join(path, "all_results.json")) as f:
            results = json.load(f)
        big, one = batch(args.batch_size), batch(1)
        rows[name] = {
            "eval_accuracy": results["eval_accuracy"],
            "params": parameter_count(model),
            "encoder_matrix_params": results["compression"].get("target_params",
                                                                results["compression"].get("model_params")),
            "weights_mb": weights_size_mb(path),
            f"latency_ms_batch{args.batch_size}": median_latency_ms(lambda: model(**big), repeats=args.repeats),
            "latency_ms_batch1": median_latency_ms(lambda: model(**one), repeats=args.repeats * 2),
        }
    dense_report = rows["dense"]
    compressed_results = json.load(open(os.path.join(args.compressed, "all_results.json")))
    rows["dense"]["encoder_matrix_params"] = compressed_results["compression"]["target_dense_params"]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    key_big = f"latency_ms_batch{args.batch_size}"
    print(f"\nQuickstart result ({date.today()}, CPU: {machine})\n")
    print(f"| model | accuracy | params (all) | encoder matrices | weights on disk | latency b={args.batch_size} | latency b=1 |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['eval_accuracy']:.4f} | {row['params'] / 1e6:.2f}M | "
              f"{row['encoder_matrix_params'] / 1e6:.2f}M | {row['weights_mb']:.1f} MB | {row[key_big]:.1f} ms | "
              f"{row['latency_ms_batch1']:.1f} ms |")
    compressed = rows["LoSparse"]
    print(f"\nremaining ratio {compressed_results['compression']['remaining_ratio']:.4f} of the encoder matrices; "
          f"speed-up {dense_report[key_big] / compressed[key_big]:.2f}x at batch {args.batch_size}, "
          f"{dense_report['latency_ms_batch1'] / compressed['latency_ms_batch1']:.2f}x at batch 1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(date.today()), "machine": machine, "models": rows,
                       "remaining_ratio": compressed_results["compression"]["remaining_ratio"]}, f, indent=2)


if __name__ == "__main__":
    main()
