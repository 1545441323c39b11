#!/usr/bin/env python
"""Peak memory of one training step: dense fine-tuning vs LoSparse fine-tuning vs one-shot compression.

    python scripts/benchmark_memory.py --preset tiny --json memory.json
    python scripts/benchmark_memory.py --preset smollm2-135m-shape --batch_size 1 --seq_len 128
    python scripts/benchmark_memory.py --help

The benchmark is `benchmarks.memory` (what is measured and how: its docstring).
"""

import sys
import time

_STARTED = time.perf_counter()  # the wall time in the JSON includes the imports

import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/, reproduce/ (not part of the installed package)
from benchmarks import memory as memory_benchmark  # noqa: E402


def main(argv=None):
    return memory_benchmark.main(argv, wall_started=_STARTED if argv is None else None)


if __name__ == "__main__":
    sys.exit(main())
