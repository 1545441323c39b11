#!/usr/bin/env bash
# Two LPAF variants at ratio 0.2 beside scripts/lpaf_real_check.sh (same MiniLM, movie snippets, recipe, seed):
#   magnitude       --lpaf_importance magnitude: is the first-order score what fails at a short budget?
#   finetune-first  --pruning_warmup_ratio 0.5 --pruning_final_ratio 0.2: dense fine-tuning for the first half of
#                   the pruning phase, so the model is pruned after it has been fine-tuned (LPAF's setting)
# Results: outputs/lpaf-diagnostics/<variant>-r0.2/all_results.json. Needs the quickstart assets
# (python scripts/prepare_quickstart_assets.py). DRY_RUN=1 prints the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=${QUICKSTART_DIR:-$HOME/.cache/losparse/quickstart}
PY=${PYTHON:-python3}
common=(--config configs/quickstart/minilm-movie-sentiment.yaml --remaining_ratio 0.2 --method lpaf
        --model_name_or_path "$Q/all-MiniLM-L6-v2" --train_file "$Q/movie-sentiment/train.csv"
        --validation_file "$Q/movie-sentiment/validation.csv" --seed 42 --overwrite_output_dir)
run() { echo "+ $*"; case "${DRY_RUN:-0}" in 0|""|false|no|off) "$@" ;; *) ;; esac; }
run "$PY" run_glue.py "${common[@]}" --lpaf_importance magnitude --output_dir outputs/lpaf-diagnostics/magnitude-r0.2
run "$PY" run_glue.py "${common[@]}" --pruning_warmup_ratio 0.5 --pruning_final_ratio 0.2 \
    --output_dir outputs/lpaf-diagnostics/finetune-first-r0.2
