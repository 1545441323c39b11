#!/usr/bin/env python
"""LPAF at unit size: effective rank after first-order vs magnitude pruning, sparsity-aware vs plain SVD."""

from losparse.tools.lpaf_experiment import main

if __name__ == "__main__":
    main()
