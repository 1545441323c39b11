"""`LoSparseMethod`: the paper's method and its ablations, all rows of one recipe (`DecomposingMethod`).

losparse (U·V + pruned S), itp (S = W pruned), movement (movement scores), lowrank (U·V only) and
lowrank_prune_all (S pruned to zero) differ only in the data of their table rows (`losparse.core.methods`).
"""

from losparse.methods.base import register
from losparse.methods.decomposing import DecomposingMethod


@register("losparse", "itp", "movement", "lowrank", "lowrank_prune_all")
class LoSparseMethod(DecomposingMethod):
    """Decompose, prune S's neurons with `LoSparsePruner` while training, compact."""
