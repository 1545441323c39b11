#!/usr/bin/env python
"""Training step time: `LoSparseTrainer` (decomposed model, pruning every step) vs plain `Trainer` (dense).

    python scripts/benchmark_training.py --arch bert-base --device cpu --batch_size 2 --seq_len 64 \
        --steps 8 --json train.json
    python scripts/benchmark_training.py --help

The benchmark is `benchmarks.training` (what is trained, timed and reported: its docstring).
"""

import sys
import time

_STARTED = time.perf_counter()  # the wall time in the JSON includes the imports

import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/, reproduce/ (not part of the installed package)
from benchmarks import training as training_benchmark  # noqa: E402


def main(argv=None):
    return training_benchmark.main(argv, wall_started=_STARTED if argv is None else None)


if __name__ == "__main__":
    sys.exit(main())
