#!/usr/bin/env python
"""Dense vs LoSparse compact inference: latency, throughput, parameters, memory and the roofline floor.

    python scripts/benchmark_inference.py --arch bert-base --remaining_ratio 0.1 --low_rank_ratio 0.03 \
        --device cpu --batch_size 4 --seq_len 128 --json out.json
    python scripts/benchmark_inference.py --help

The benchmark is `benchmarks.inference` (what is built, timed and checked: its docstring).
Exit codes: 0 ok, 1 outputs disagree, 2 bad arguments, 3 a workload failed.
"""

import sys
import time

_STARTED = time.perf_counter()  # the wall time in the JSON includes the imports

import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/, reproduce/ (not part of the installed package)
from benchmarks import inference as inference_benchmark  # noqa: E402


def main(argv=None):
    return inference_benchmark.main(argv, wall_started=_STARTED if argv is None else None)


if __name__ == "__main__":
    sys.exit(main())
