#!/usr/bin/env bash
# Accuracy vs latency on the real MiniLM: scripts/reproduce.py frontier (resumable; --help for options), then time the saved models. DRY_RUN=1 prints the commands.
set -euo pipefail
case "${DRY_RUN:-0}" in 0|""|false|no|off) ;; *) set -- --dry_run "$@" ;; esac
exec "${PYTHON:-python3}" "$(dirname "$0")/reproduce.py" frontier "$@"
