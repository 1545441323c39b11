"""The trainer mixin of `--method cofi_losparse`: CoFi's trainer (loss, distillation, gate steps) with the
`CofiLoSparsePruner`, on a model whose matrices are already decomposed (`CofiLoSparseMethod.make_trainer`)."""

from __future__ import annotations

from typing import Any

from losparse.methods.cofi.trainer import CofiTrainerMixin, cofi_trainer
from losparse.methods.cofi_losparse.pruner import CofiLoSparsePruner


class CofiLoSparseTrainerMixin(CofiTrainerMixin):
    """`CofiTrainerMixin` whose pruner also prunes S (keyword arguments as `CofiTrainerMixin`'s)."""

    pruner_class = CofiLoSparsePruner
    kept_fraction_log_key = "cofi_structure_kept_fraction"

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        sparse = self.pruner.sparse_pruner if self.pruner is not None else None
        if "loss" in logs and sparse is not None:
            logs["sparse_kept_fraction"] = round(self.pruner.sparse_kept_fraction(), 4)
        super().log(logs, *args, **kwargs)


def cofi_losparse_trainer(base: type) -> type:
    """`base` (a `transformers.Trainer` subclass) with CoFi + LoSparse pruning: `CofiLoSparse<Base>`, cached."""
    return cofi_trainer(base, CofiLoSparseTrainerMixin)
