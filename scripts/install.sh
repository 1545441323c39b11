#!/usr/bin/env bash
# Install LoSparse (the `losparse` package, editable, with its dependencies) into the current Python
# environment; extra arguments are more packages, e.g. `bash scripts/install.sh pytest` for the tests.
# LOSPARSE_EXTRAS=onnx,triton adds the package's optional extras (pyproject.toml), as `-e .[onnx,triton]`.
# torch goes first, pinned to the CPU build that lies on this workplace's disk (a looser spec would pull
# a multi-GB CUDA build); on a GPU machine install your CUDA torch first and this keeps it (the package
# asks for torch>=2.4 only, which the installed build satisfies).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".${LOSPARSE_EXTRAS:+[$LOSPARSE_EXTRAS]}" "$@"
