"""`LoSparseMethod`: the paper's method and its ablations, all rows of one recipe (`DecomposingMethod`).

losparse (U·V + pruned S), itp (S = W pruned), movement (movement scores), lowrank (U·V only) and
lowrank_prune_all (S pruned to zero) differ only in the data of their table rows (`losparse.core.methods`).
losparse, lowrank and itp also have a one-shot form (`losparse.methods.oneshot`, `--oneshot`).
"""

from __future__ import annotations

from typing import Any

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.methods.base import register
from losparse.methods.decomposing import DecomposingMethod
from losparse.methods.oneshot.algorithm import ONESHOT_METHODS, oneshot_compress


@register("losparse", "itp", "movement", "lowrank", "lowrank_prune_all")
class LoSparseMethod(DecomposingMethod):
    """Decompose, prune S's neurons with `LoSparsePruner` while training, compact."""

    oneshot_names = ONESHOT_METHODS

    def check_oneshot(self, config: LoSparseConfig, model_config: Any, options: Any, fine_tune: bool) -> None:
        """`fine_tune` (the calibrated decomposition starts LoSparse fine-tuning) needs method losparse: the others
        have no calibrated start to give (itp: S = W) or nothing left to prune (lowrank)."""
        if config.method not in ONESHOT_METHODS:
            super().check_oneshot(config, model_config, options, fine_tune)
        if fine_tune and config.method != "losparse":
            raise LoSparseUsageError(f"--oneshot --do_train starts LoSparse fine-tuning from the calibrated "
                                     f"decomposition and needs --method losparse (got {config.method}); drop "
                                     f"--do_train for a one-shot {config.method} model")
        if not fine_tune and options.oneshot_solver == "reconstruct" and config.prune_dim != "rows":
            raise LoSparseUsageError(f"--oneshot_solver reconstruct keeps whole rows of S, but --prune_dim is "
                                     f"{config.prune_dim!r}; use --prune_dim rows or --oneshot_solver select")

    def oneshot(self, model: Any, config: LoSparseConfig, calibration_input_ids: Any, options: Any,
                prune: bool = True) -> Any:
        return oneshot_compress(model, config, calibration_input_ids, lowrank=options.oneshot_lowrank,
                                scores=options.oneshot_scores, prune_scope=options.oneshot_prune_scope,
                                batch_size=options.oneshot_batch_size, prune=prune, solver=options.oneshot_solver,
                                iterations=options.oneshot_iters, compensate=options.oneshot_compensate,
                                split=options.oneshot_split)
