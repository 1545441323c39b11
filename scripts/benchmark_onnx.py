#!/usr/bin/env python
"""Dense vs LoSparse compact vs structured-pruned encoders in ONNX Runtime: latency and speed-ups.

    python scripts/benchmark_onnx.py --arch bert-base --remaining_ratio 0.2 --low_rank_ratio 0.05 \
        --batch_size 8 --seq_len 128 --threads auto --json onnx.json
    python scripts/benchmark_onnx.py --help

Needs the `onnx` extra (`pip install -e .[onnx]`). The benchmark is `benchmarks.onnx_runtime`
(what is built, exported, checked and timed: its docstring).
Exit codes: 0 ok, 1 onnxruntime disagrees with torch, 2 bad arguments.
"""

import sys
import time

_STARTED = time.perf_counter()  # the wall time in the JSON includes the imports

import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/, reproduce/ (not part of the installed package)
from benchmarks import onnx_runtime as onnx_benchmark  # noqa: E402


def main(argv=None):
    return onnx_benchmark.main(argv, wall_started=_STARTED if argv is None else None)


if __name__ == "__main__":
    sys.exit(main())
