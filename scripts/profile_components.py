#!/usr/bin/env python
"""Where a forward's time goes, per component (GEMMs, attention, activation, scatter, ...), for dense / compact /
structured / low-rank models built as by `benchmark_inference.py --peers`.

    python scripts/profile_components.py --arch bert-base --remaining_ratio 0.2 --contiguous --optimize \
        --batch_size 8 --seq_len 128 --json profile.json --plot profile.png
    python scripts/profile_components.py --help

The profiler is `benchmarks.component_profile` (what is built, profiled and attributed: its docstring).
Exit codes: 0 ok, 1 the models' output checks failed, 2 bad arguments.
"""

import sys
import time

_STARTED = time.perf_counter()  # the wall time in the JSON includes the imports

import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/, reproduce/ (not part of the installed package)
from benchmarks import component_profile  # noqa: E402


def main(argv=None):
    return component_profile.main(argv, wall_started=_STARTED if argv is None else None)


if __name__ == "__main__":
    sys.exit(main())
