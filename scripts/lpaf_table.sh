#!/usr/bin/env bash
# LPAF beside LoSparse on the same cells (BERT-base GLUE of Table 2, SQuAD of Table 3's BERT rows): every run via
# scripts/reproduce.py lpaf (resumable; --help for options). DRY_RUN=1 prints the commands.
set -euo pipefail
case "${DRY_RUN:-0}" in 0|""|false|no|off) ;; *) set -- --dry_run "$@" ;; esac
exec "${PYTHON:-python3}" "$(dirname "$0")/reproduce.py" lpaf "$@"
