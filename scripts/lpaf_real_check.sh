#!/usr/bin/env bash
# LPAF real-data check on a CPU: the quickstart's MiniLM + movie snippets, {lpaf, losparse, lowrank} x 0.2/0.1 and the
# dense fine-tune, same recipe and seed, via scripts/reproduce.py lpaf_check (resumable), then the table.
# DRY_RUN=1 prints the commands. OUTPUT_ROOT (default outputs) is where the runs go.
set -euo pipefail
ROOT=${OUTPUT_ROOT:-outputs}
case "${DRY_RUN:-0}" in
  0|""|false|no|off) ;;
  *) exec "${PYTHON:-python3}" "$(dirname "$0")/reproduce.py" lpaf_check --dry_run --output_root "$ROOT" "$@" ;;
esac
"${PYTHON:-python3}" "$(dirname "$0")/reproduce.py" lpaf_check --output_root "$ROOT" "$@"
"${PYTHON:-python3}" -m reproduce.report "$ROOT/claim" --table claim
