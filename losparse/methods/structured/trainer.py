"""The trainer mixin of `--method structured`: the shared pruning lifecycle with the `StructuredPruner`."""


from __future__ import annotations

import logging
from typing import Any, Optional

from transformers import Trainer

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.methods.structured.blocks import encoder_blocks, target_params
from losparse.methods.structured.pruner import StructuredPruner, check_structured_config
from losparse.training.trainer import (
    LoSparseCallback,
    PruningTrainerMixin,
    check_training_backend,
    declare_loss_kwargs,
    refuse_positional,
)

logger = logging.getLogger(__name__)


class StructuredCallback(LoSparseCallback):
    """`LoSparseCallback` (config check and pruner state on resume, one step per optimizer step) with the
    `StructuredPruner`."""

    pruner_name = "structured"
    default_pruner_class = StructuredPruner

    def log_plan(self) -> None:
        s = self.pruner.schedule
        logger.info("structured: %d layers, %d groups, pruning heads and FFN neurons from step %d to %d "
                    "down to %.4f of the targeted weights", len(self.pruner.blocks),
                    self.pruner.sizes.numel(), s.warmup_steps, s.decay_end, self.config.remaining_ratio)


class StructuredTrainerMixin(PruningTrainerMixin):
    """Adds structured head/FFN pruning to a `Trainer` subclass (keyword arguments only).

    Extra ones: `structured_config` (a `LoSparseConfig` with method 'structured'; the model itself is left
    undecomposed) and `allow_resume_config_change`. The pruner state goes into each checkpoint.
    """

    kept_fraction_log_key = "structured_kept_fraction"

    def __init__(self, *positional: Any, model: Any = None, args: Any = None,
                 structured_config: Optional[LoSparseConfig] = None, allow_resume_config_change: bool = False,
                 **kwargs: Any) -> None:
        refuse_positional(type(self), positional)
        if model is None or structured_config is None:
            raise LoSparseUsageError(f"{type(self).__name__} needs model= and structured_config=")
        check_structured_config(structured_config)
        encoder_blocks(model)
        check_training_backend(args)
        declare_loss_kwargs(model)
        super().__init__(model=model, args=args, **kwargs)
        self._add_pruning_callback(StructuredCallback(model, structured_config, allow_resume_config_change))
        self.dense_target_params = target_params(encoder_blocks(model))
        self.dense_model_params = sum(p.numel() for p in model.parameters())

    @property
    def structured_callback(self) -> StructuredCallback:
        return self.pruning_callback


_COMPOSED: dict[type, type] = {}


def structured_trainer(base: type) -> type:
    """`base` (a `transformers.Trainer` subclass) with structured pruning: `Structured<Base>`, cached."""
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise LoSparseUsageError(f"structured_trainer needs a transformers.Trainer subclass, not {base!r}")
    if base not in _COMPOSED:
        _COMPOSED[base] = type(f"Structured{base.__name__}", (StructuredTrainerMixin, base), {"__module__": __name__})
    return _COMPOSED[base]
