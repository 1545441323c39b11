#!/usr/bin/env bash
# The GPU checks of issues 13-15 in one short script, sized for ~10 minutes of one GPU (H100/H200 class):
#   1. the Triton kernels compiled (not interpreted) against the compact layer's forward, fp32 and bf16, on CUDA
#   2. inference: dense vs compact vs the structured and low-rank peers, contiguous FFN neurons and per-layer
#      forms (compact / dense / triton) chosen by measurement, on BERT-base (batch 8 x 128) and on Llama-7B-shaped
#      layers (prefill + decode)
#   3. peak training memory (max_memory_allocated) of dense vs LoSparse fine-tuning on a Llama-7B-shaped model
# Every result lands in $OUT (default gpu-results/) as JSON + logs. DRY_RUN=1 prints the commands.
# Needs torch with CUDA, transformers, triton, and this package (pip install -e . --no-deps is enough).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-results}
run() {
  echo "+ $*"
  case "${DRY_RUN:-0}" in 0|""|false|no|off) "$@" ;; *) ;; esac
}
mkdir -p "$OUT"
KERNEL_CHECK='
import json, sys, torch
from losparse.deploy.kernels import fused_compact_forward, triton_available
from losparse.core.layers import CompactLoSparseLinear
assert torch.cuda.is_available() and triton_available(), "needs CUDA + triton"
rows = []
for prune_dim in ("rows", "columns"):
    for (inp, out, rank, kept, tokens) in ((768, 768, 40, 150, 1024), (768, 3072, 60, 600, 1024), (4096, 11008, 256, 2000, 512)):
        torch.manual_seed(0)
        layer = CompactLoSparseLinear(inp, out, rank, kept, prune_dim=prune_dim, device="cuda")
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.02)
            neurons = out if prune_dim == "rows" else inp
            layer.kept_index.copy_(torch.randperm(neurons, device="cuda")[:kept].sort().values)
        for dtype in (torch.float32, torch.bfloat16):
            layer = layer.to(dtype)
            x = torch.randn(tokens, inp, device="cuda", dtype=dtype)
            with torch.no_grad():
                ref, got = layer(x).float(), fused_compact_forward(layer, x).float()
            rel = float((ref - got).abs().max() / ref.abs().max())
            rows.append({"prune_dim": prune_dim, "shape": [tokens, inp, out, rank, kept], "dtype": str(dtype), "rel_err": rel})
            print(rows[-1])
json.dump(rows, open(sys.argv[1], "w"), indent=1)
bad = [r for r in rows if r["rel_err"] > (1e-4 if "float32" in r["dtype"] else 3e-2)]
sys.exit(1 if bad else 0)
'
run env TRITON_INTERPRET=0 "$PY" -c "$KERNEL_CHECK" "$OUT/kernels.json"
for ratio in 0.2 0.1; do
  run "$PY" scripts/benchmark_inference.py --arch bert-base --device cuda --remaining_ratio "$ratio" \
      --low_rank_ratio 0.05 --batch_size 8 --seq_len 128 --peers --contiguous --optimize --sweep \
      --json "$OUT/bert-base-$ratio.json" --plot "$OUT/bert-base-$ratio.png"
done
run "$PY" scripts/benchmark_inference.py --arch llama-7b-layer --device cuda --remaining_ratio 0.5 \
    --low_rank_ratio 0.2 --contiguous --optimize --json "$OUT/llama-7b-layer-0.5.json"
run "$PY" scripts/benchmark_memory.py --preset llama-7b-shape --device cuda --batch_size 1 --seq_len 2048 \
    --json "$OUT/memory-llama-7b.json"
