"""`--method cofi_losparse`: the paper's Table 7 — CoFi's layer and head gates, LoSparse in place of its neuron gates.

The pre-trained matrices are decomposed first (W = U·V + S, `losparse.apply`); then CoFi trains its gates on
the MHA / FFN sub-layers and the heads (and, with `--cofi_units` naming it, the hidden dims) under its
Lagrangian to `--structured_ratio` of the targeted weights, while LoSparse's pruner removes S's neurons to
`remaining_ratio / structured_ratio` of those that survive the current gates (`survivors`), as Appendix F's
ratio = ratio_CoFi × ratio_LoSparse counts it. Removal folds the gates in and slices the decomposed matrices
(`losparse.core.slicing`); compaction then drops S's pruned neurons. See docs/cofi.md.
"""

from losparse.methods.cofi_losparse.method import CofiLoSparseMethod
from losparse.methods.cofi_losparse.pruner import CofiLoSparsePruner, SurvivorLoSparsePruner
from losparse.methods.cofi_losparse.survivors import alive_neurons, neuron_roles
