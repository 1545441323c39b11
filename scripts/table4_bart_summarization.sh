#!/usr/bin/env bash
# Table 4 (BART-large on XSum and CNN/DailyMail): every run via scripts/reproduce.py table4 (resumable; --help for options). DRY_RUN=1 prints the commands.
set -euo pipefail
case "${DRY_RUN:-0}" in 0|""|false|no|off) ;; *) set -- --dry_run "$@" ;; esac
exec "${PYTHON:-python3}" "$(dirname "$0")/reproduce.py" table4 "$@"
