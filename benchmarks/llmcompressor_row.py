"""External reference rows for `benchmarks.clm_oneshot_table`: llmcompressor's SparseGPT and Wanda one-shot pruning.

Standalone on purpose: this file imports only torch, transformers, llmcompressor and the standard library, never
losparse, because it runs in its own virtual environment. llmcompressor 0.14.0.1 requires torch>=2.10,<=2.14,
transformers>=5.15.0,<=5.17.0 and compressed-tensors==0.19.0, while LoSparse's main environment has transformers
5.25.0, which must not be downgraded. Install (CPU only, ~1 min, ~1.5 GB on disk):

    python3 -m venv /tmp/llmc-venv
    echo "torch==2.13.0" > /tmp/llmc-constraints.txt          # keep the CPU wheel: a looser torch spec pulls CUDA
    /tmp/llmc-venv/bin/pip install -c /tmp/llmc-constraints.txt torch==2.13.0
    echo "transformers<=5.17.0" >> /tmp/llmc-constraints.txt
    /tmp/llmc-venv/bin/pip install -c /tmp/llmc-constraints.txt llmcompressor transformers==5.17.0

(gives llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu, datasets 5.2.0,
auto-round 0.15.1). Here `torch==2.13.0` resolves to the local 2.13.0+cpu wheel (pip's find-links /opt/wheels);
elsewhere add `--index-url https://download.pytorch.org/whl/cpu` to the torch line. llmcompressor runs on CPU; no
GPU is needed (it logs "No accelerator available! Compressing model on CPU instead").

Usage: export the dense model (`save_pretrained`) and the token blocks of the table (LongTensors (n, seq_len),
`torch.save`) from the main environment, then

    /tmp/llmc-venv/bin/python benchmarks/llmcompressor_row.py --model_dir DENSE_DIR \\
        --calibration_ids calib.pt --heldout_ids heldout.pt --sparsity 0.5 0.4 --schemes sparsegpt wanda \\
        --output_json out/llmcompressor_rows.json

What it measures, for each scheme × sparsity, on a fresh fp32 copy of the model loaded from --model_dir:
`llmcompressor.oneshot` with `SparseGPTModifier` / `WandaPruningModifier(sparsity=s, mask_structure="0:0")`
(unstructured, library defaults otherwise: SparseGPT block_size 128, dampening_frac 0.01) on the targeted decoder
linears (default suffixes q/k/v/o/gate/up/down_proj; lm_head and embeddings untouched), calibrated on all
--calibration_ids rows, in order (passed in memory as a torch DataLoader of {"input_ids"} batches, which oneshot
uses as it is: no tokenization, sampling or shuffling), through llmcompressor's sequential layer-by-layer
pipeline; then the held-out perplexity = exp(mean over held-out blocks of model(input_ids=b, labels=b).loss), the
same definition as clm_oneshot_table's `heldout_loss`; the achieved sparsity = zeros / entries over the targeted
matrices; and the wall seconds of load + prune + evaluation. The achieved sparsity is not exactly s: SparseGPT
prunes one extra entry per 128-column block (its mask is `score <= sorted[int(n·s)]`), Wanda prunes
floor(in_features·s) per row.
Unstructured pruning keeps dense storage (the zeros are stored): `remaining_ratio` = 1 − achieved sparsity counts
non-zeros, not bytes, and the JSON says "storage": "dense". The dense model's held-out perplexity in this venv
(transformers 5.17) is reported too, as a check against the table's dense row (transformers 5.25).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

SCHEMES = ("sparsegpt", "wanda")
DEFAULT_TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UsageError(Exception):
    """A bad command line or input file; reported as one line."""


class _NoProcessor:
    """Stand-in processor. `oneshot` insists on a processor whenever a dataset is passed (it tries
    AutoProcessor on the model dir and fails without tokenizer files), but a ready DataLoader never uses it;
    post-processing only calls save_pretrained (and only with an output_dir, which is not given)."""

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="llmcompressor SparseGPT/Wanda one-shot rows (held-out perplexity).")
    p.add_argument("--model_dir", required=True, help="a dense Hugging Face causal-LM directory (save_pretrained)")
    p.add_argument("--calibration_ids", required=True, help="torch.save'd LongTensor (n, seq_len) of calibration ids")
    p.add_argument("--heldout_ids", required=True, help="torch.save'd LongTensor (n, seq_len) of held-out ids")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5], help="target sparsities in (0, 1)")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--batch_size", type=int, default=8, help="calibration and evaluation batch size")
    p.add_argument("--target_suffixes", nargs="+", default=list(DEFAULT_TARGET_SUFFIXES),
                   help="linear module name suffixes to prune (default: q/k/v/o/gate/up/down_proj)")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--output_json", required=True)
    p.add_argument("--verbose", action="store_true", help="keep llmcompressor's INFO/METRIC log on stdout")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    if not os.path.isdir(args.model_dir) or not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise UsageError(f"--model_dir {args.model_dir!r} is not a model directory (no config.json there)")
    for flag in ("calibration_ids", "heldout_ids"):
        path = getattr(args, flag)
        if not os.path.isfile(path):
            raise UsageError(f"--{flag} {path!r}: no such file")
    for s in args.sparsity:
        if not (0.0 < s < 1.0) or math.isnan(s):
            raise UsageError(f"--sparsity {s}: must lie strictly between 0 and 1 (fraction of weights set to zero)")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size}: must be >= 1")
    if args.num_threads is not None and args.num_threads < 1:
        raise UsageError(f"--num_threads {args.num_threads}: must be >= 1")
    out_dir = os.path.dirname(os.path.abspath(args.output_json))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--output_json {args.output_json!r}: {out_dir!r} is not a directory")


def load_ids(path: str, flag: str, vocab_size: int) -> Any:
    import torch

    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line for any unreadable file
        raise UsageError(f"--{flag} {path!r}: not a torch.save'd tensor ({type(e).__name__}: {e})") from None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        what = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise UsageError(f"--{flag} {path!r}: expected an integer tensor (n, seq_len), got {what}")
    if ids.numel() == 0:
        raise UsageError(f"--{flag} {path!r}: empty tensor {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise UsageError(f"--{flag} {path!r}: token ids span [{int(ids.min())}, {int(ids.max())}], outside the "
                         f"model's vocabulary of {vocab_size}")
    return ids.long()


def load_model(model_dir: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def heldout_loss(model: Any, input_ids: Any, batch_size: int) -> float:
    """Mean token loss over all held-out blocks (as clm_oneshot_table.heldout_loss: block-weighted batch means)."""
    import torch

    total, rows = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size]
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * batch.shape[0]
            rows += batch.shape[0]
    return total / rows


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def targeted_linears(model: Any, suffixes: Sequence[str]) -> dict[str, Any]:
    import torch

    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes}


def achieved_sparsity(modules: dict[str, Any]) -> float:
    zeros = sum(int((m.weight == 0).sum()) for m in modules.values())
    entries = sum(m.weight.numel() for m in modules.values())
    return zeros / entries


def prune(model: Any, scheme: str, sparsity: float, calibration: Any, batch_size: int,
          suffixes: Sequence[str]) -> dict[str, Any]:
    """llmcompressor one-shot pruning of `model` in place; returns the modifier's arguments."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader

    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[scheme]
    kwargs = {"sparsity": sparsity, "mask_structure": "0:0",
              "targets": ["re:.*\\.(" + "|".join(re.escape(s) for s in suffixes) + ")$"],
              "ignore": ["re:.*lm_head"]}
    modifier = cls(**kwargs)
    # a DataLoader is used as it is (no tokenization, sampling or shuffling by llmcompressor): every row, in order
    loader = DataLoader([{"input_ids": row} for row in calibration], batch_size=batch_size, shuffle=False)
    oneshot(model=model, processor=_NoProcessor(), dataset=loader, recipe=modifier)
    kwargs["modifier"] = cls.__name__
    if scheme == "sparsegpt":
        kwargs.update(block_size=modifier.block_size, dampening_frac=modifier.dampening_frac)
    return kwargs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    if not args.verbose:
        os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # read when llmcompressor is imported
    import llmcompressor
    import torch
    import transformers

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    dense = load_model(args.model_dir)
    vocab = dense.get_input_embeddings().num_embeddings
    calibration = load_ids(args.calibration_ids, "calibration_ids", vocab)
    heldout = load_ids(args.heldout_ids, "heldout_ids", vocab)
    if not targeted_linears(dense, args.target_suffixes):
        raise UsageError(f"no nn.Linear in {args.model_dir!r} is named *.{{{','.join(args.target_suffixes)}}}; "
                         "pass --target_suffixes for this model family")
    dense_loss = heldout_loss(dense, heldout, args.batch_size)
    del dense
    rows = []
    for scheme in args.schemes:
        for sparsity in args.sparsity:
            cell_started = time.perf_counter()
            model = load_model(args.model_dir)  # fresh copy: oneshot prunes in place
            modifier = prune(model, scheme, sparsity, calibration, args.batch_size, args.target_suffixes)
            achieved = achieved_sparsity(targeted_linears(model, args.target_suffixes))
            loss = heldout_loss(model, heldout, args.batch_size)
            rows.append({"row": f"llmcompressor_{scheme}", "scheme": scheme, "sparsity": sparsity,
                         "achieved_sparsity": achieved, "remaining_ratio": 1.0 - achieved,
                         "perplexity": perplexity(loss), "eval_loss": loss, "storage": "dense",
                         "modifier": modifier, "seconds": round(time.perf_counter() - cell_started, 2)})
            print(f"llmcompressor_{scheme} sparsity {sparsity:g}: perplexity {rows[-1]['perplexity']:.4f} "
                  f"(achieved sparsity {achieved:.5f}, {rows[-1]['seconds']} s)", file=sys.stderr)
            del model
    result = {
        "llmcompressor_version": llmcompressor.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "model_dir": args.model_dir,
        "calibration_ids": args.calibration_ids, "heldout_ids": args.heldout_ids,
        "calibration_tokens": int(calibration.numel()), "heldout_tokens": int(heldout.numel()),
        "seq_len": int(heldout.shape[1]), "batch_size": args.batch_size, "targets": list(args.target_suffixes),
        "storage": "dense",
        "storage_note": "unstructured pruning: zeros are stored in the dense matrices; remaining_ratio counts "
                        "non-zeros of the targeted matrices, not bytes",
        "dense": {"eval_loss": dense_loss, "perplexity": perplexity(dense_loss)},
        "rows": rows, "seconds": round(time.perf_counter() - started, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    try:
        out = main()
    except UsageError as e:
        sys.exit(f"llmcompressor_row: error: {e}")
    print(json.dumps(out, indent=2))
