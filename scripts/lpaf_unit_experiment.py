#!/usr/bin/env python
"""LPAF at unit size: effective rank after first-order vs magnitude pruning, sparsity-aware vs plain SVD."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: benchmarks/, reproduce/ (not part of the installed package)
from benchmarks.lpaf_experiment import main

if __name__ == "__main__":
    main()
