#!/usr/bin/env bash
# Install LoSparse's dependencies into the current Python environment.
# torch goes first, pinned to the CPU build that lies on this workplace's disk (a looser spec would pull
# a multi-GB CUDA build); on a GPU machine install your CUDA torch first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -r requirements.txt "$@"
