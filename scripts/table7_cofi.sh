#!/usr/bin/env bash
# Table 7 (CoFi, CoFi + LoSparse at 10%, BERT-base): every run via scripts/reproduce.py table7 (resumable; --help for options). DRY_RUN=1 prints the commands.
set -euo pipefail
case "${DRY_RUN:-0}" in 0|""|false|no|off) ;; *) set -- --dry_run "$@" ;; esac
exec "${PYTHON:-python3}" "$(dirname "$0")/reproduce.py" table7 "$@"
