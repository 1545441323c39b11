"""One-shot compression of decoder LMs from calibration data (no training): see `algorithm`'s docstring.

The run scripts' side of `--oneshot` (its flags, reading the calibration text) is `losparse.cli.oneshot`.
"""

from losparse.methods.oneshot.algorithm import (
    ONESHOT_METHODS,
    InputStatistics,
    activation_aware_split,
    check_oneshot_method,
    collect_statistics,
    find_decoder_blocks,
    neuron_scores,
    oneshot_compress,
    plain_split,
    whitening_factor,
)
from losparse.methods.oneshot.oats import oats_compress
from losparse.methods.oneshot.reconstruction import best_split, compensated_target, solve_layers
