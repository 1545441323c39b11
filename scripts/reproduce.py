#!/usr/bin/env python
"""Run (or print) every training run behind one of the paper's tables or figures.

    python scripts/reproduce.py table1 --dry_run                 # print the 80 commands of Table 1
    python scripts/reproduce.py table1 --num_gpus 4              # run them, 4 GPUs per run
    python scripts/reproduce.py table3 --only 'bert.*itp' --keep_going
    python scripts/reproduce.py claim --seeds 1 2 3 --mpnet_dir ~/models/mpnet

The driver is `reproduce.driver` (cells, output layout, resume rules: see its docstring); this
script runs it on this checkout's configs/ and run scripts. `--dry_run` imports no torch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/, reproduce/ (not part of the installed package)
from reproduce.driver import run_command_line

if __name__ == "__main__":
    sys.exit(run_command_line(repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
