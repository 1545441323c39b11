"""The compression methods as variations of one recipe (decompose → prune S → compact).

Every method ends at `remaining_ratio` of the targeted parameters and goes through the same
layer, importance, schedule and pruner code; only these choices differ:

| method              | low-rank part U·V                 | sparse part S          | importance  | S pruned to            |
|---------------------|-----------------------------------|------------------------|-------------|------------------------|
| `losparse`          | rank from `low_rank_ratio`        | W − U·V                | sensitivity | ratio − low-rank share |
| `itp`               | none                              | W itself               | sensitivity | ratio                  |
| `movement`          | none                              | W itself               | movement    | ratio                  |
| `lowrank`           | rank from `remaining_ratio`       | none (discarded)       | —           | —                      |
| `lowrank_prune_all` | rank from `remaining_ratio`       | W − U·V                | sensitivity | 0 (all of S)           |
| `lpaf`              | factorised from the pruned S      | W, pruned per entry    | first-order | ratio, then factorised |
| `finetune`          | — (the model is not decomposed)   |                        |             |                        |
| `structured`        | none (not decomposed)             | W: heads, FFN neurons  | sensitivity | ratio (`structured.py`)|
| `cofi`              | none (not decomposed)             | W: hidden, layers, heads, neurons | L0 gates | ratio (Lagrangian) |
| `structured_losparse` | stage 2: as `losparse`          | stage 1: heads, FFN    | sensitivity | ratio / structured_ratio |
| `cofi_losparse` | as `losparse`                   | CoFi gates + W − U·V   | sensitivity | ratio / structured_ratio |

`lowrank` and `lowrank_prune_all` are the paper's "Low-rank I" and "Low-rank II" (§4.4).
`lpaf` (Low-Rank Prune-And-Factorize, Ren & Zhu 2023) runs in two phases inside one training run: S = W is
pruned entry by entry (unstructured) to `remaining_ratio` with first-order scores on the cubic schedule, then
factorised by a sparsity-aware SVD into U·V at a rank above the target and fine-tuned with mixed ranks
that end at the target rank (`losparse.methods.lpaf.pruner`); the saved model is pure U·V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class MethodSpec:
    name: str
    decomposes: bool
    rank_from: Optional[str]  # "low_rank_ratio", "remaining_ratio" or None (no U·V)
    has_sparse: bool
    importance: Optional[str]  # None: take the config's --importance
    prunes_to_zero: bool = False
    description: str = ""
    prunes_structures: bool = False  # heads and FFN neurons of the undecomposed model (losparse.methods.structured)
    #: LPAF: S is pruned per entry first, then factorised into U·V during training (see losparse.methods.lpaf.pruner)
    prune_then_factorize: bool = False
    #: keeps `structured_ratio` of the structures and lets LoSparse keep remaining / structured of the rest (hybrids)
    splits_ratio: bool = False

    @property
    def uses_low_rank_ratio(self) -> bool:
        return self.rank_from == "low_rank_ratio"


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("losparse", True, "low_rank_ratio", True, None,
                   description="low-rank U·V plus structurally pruned S (the paper's method)"),
        MethodSpec("finetune", False, None, False, None, description="plain full fine-tuning (the 100% rows)"),
        MethodSpec("itp", True, None, True, "sensitivity",
                   description="iterative structured pruning of W itself, same importance and schedule"),
        MethodSpec("movement", True, None, True, "movement",
                   description="movement pruning of neurons (accumulated -w·dL/dw), cubic schedule"),
        MethodSpec("lowrank", True, "remaining_ratio", False, None,
                   description="Low-rank I: keep only the SVD's U·V with the whole budget, fine-tune it"),
        MethodSpec("lowrank_prune_all", True, "remaining_ratio", True, None, prunes_to_zero=True,
                   description="Low-rank II: LoSparse initialisation, S pruned gradually to zero"),
        MethodSpec("structured", False, None, False, None, prunes_structures=True,
                   description="structured pruning baseline: whole attention heads and FFN neurons, same "
                               "importance, schedule and global parameter-weighted threshold (BERT family)"),
        MethodSpec("structured_losparse", True, "low_rank_ratio", True, None, splits_ratio=True,
                   description="teacher-free hybrid: whole heads and FFN neurons pruned to structured_ratio first, "
                               "then LoSparse on the survivors to remaining_ratio / structured_ratio (BERT family)"),
        MethodSpec("cofi_losparse", True, "low_rank_ratio", True, None, splits_ratio=True,
                   description="CoFi + LoSparse (paper Table 7): CoFi's sub-layer and head gates to structured_ratio, "
                               "LoSparse's S pruning of the survivors to remaining_ratio / structured_ratio"),
        MethodSpec("cofi", False, None, False, None, prunes_structures=True,
                   description="CoFi (Xia et al. 2022): L0 gates on hidden dims, MHA/FFN sub-layers, heads and FFN "
                               "neurons under a Lagrangian size constraint, optional distillation (BERT family)"),
        MethodSpec("lpaf", True, "remaining_ratio", True, None, prune_then_factorize=True,
                   description="LPAF: first-order unstructured pruning of W, then sparsity-aware SVD into U·V "
                               "and mixed-rank fine-tuning; saved as pure U·V"),
    )
}
METHODS = tuple(METHOD_SPECS)


def rank_ratio(spec: MethodSpec, remaining_ratio: float, low_rank_ratio: float) -> Optional[float]:
    """The parameter share given to U·V for this method (None: no low-rank part)."""
    if spec.rank_from == "low_rank_ratio":
        return low_rank_ratio
    if spec.rank_from == "remaining_ratio":
        return remaining_ratio
    return None


def final_kept_fraction(spec: MethodSpec, remaining_ratio: float, low_rank_share: float) -> float:
    """p_T: the fraction of S's parameters kept at the end of pruning.

    LPAF prunes S (= W) to the whole budget before factorising it, so p_T is `remaining_ratio` there.
    """
    if spec.prunes_to_zero:
        return 0.0
    if spec.prune_then_factorize:
        return remaining_ratio
    return remaining_ratio - low_rank_share
