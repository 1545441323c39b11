"""`--method structured_losparse`: whole heads and FFN neurons first, then LoSparse on what survives.

A teacher-free route to structured pruning's latency with LoSparse's accuracy per parameter: the
structured stage (`losparse.methods.structured`) prunes to `structured_ratio` of the targeted weights and
physically removes the pruned groups; the LoSparse stage decomposes the smaller matrices (W = U·V + S) and
prunes S to `remaining_ratio / structured_ratio` of them. Both stages run inside one `train()` and share
the run's optimizer steps (`structured_steps_fraction` to the first).
"""

from losparse.methods.structured_losparse.method import StructuredLoSparseMethod
from losparse.methods.structured_losparse.stages import STAGE_DIR, TwoStageTrainer, optimizer_steps, split_steps
from losparse.methods.structured_losparse.widths import ZeroWidthLinear, dense_target_params, protect_empty_layers
