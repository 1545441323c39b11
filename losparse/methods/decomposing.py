"""`DecomposingMethod`: the hooks shared by every method that decomposes W = U·V + S and prunes S.

The table rows it serves (`losparse.core.methods.METHOD_SPECS`) differ only in data — where the rank comes
from, whether S is kept, which importance — so one class serves them all (`methods/losparse/`;
`methods/lpaf/` changes only the pruner): `apply` decomposes, the pruning trainer (`LoSparseTrainerMixin`
with `pruner_class`) prunes S on the cubic schedule, `compact` drops the pruned neurons and `save` writes
the compact checkpoint `losparse.load` reads.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from losparse.core.config import LoSparseConfig
from losparse.core.decompose import apply, losparse_layers, resolve_svd_device
from losparse.core.layers import LoSparseLinear
from losparse.core.pruner import LoSparsePruner
from losparse.deploy.compact import compact, format_report, parameter_report
from losparse.deploy.serialization import load, save
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE
from losparse.methods.base import CompressionMethod
from losparse.training.compose import compose_trainer
from losparse.training.optim import lean_optimizer_cls_and_kwargs
from losparse.training.preflight import check_targets_before_loading
from losparse.training.trainer import declare_loss_kwargs


class DecomposingMethod(CompressionMethod):
    """Decompose, prune S during training, compact. Subclasses change the pruner (`pruner_class`)."""

    pruner_class: type = LoSparsePruner
    saved_markers = (LOSPARSE_CONFIG_FILE,)

    def check(self, config: LoSparseConfig, model_name_or_path: str, auto_class: Any,
              cache_dir: Optional[str] = None, oneshot: bool = False) -> None:
        resolve_svd_device(config.svd_device, torch.device("cpu"))
        check_targets_before_loading(model_name_or_path, auto_class, config, cache_dir=cache_dir)

    def make_trainer(self, trainer_class: type, config: LoSparseConfig, *, teacher_model: Any = None,
                     distill_args: Any = None, allow_resume_config_change: bool = False,
                     lean_optimizer: bool = False, **trainer_kwargs: Any) -> Any:
        """Prune when the model is not compact yet: `apply` here unless it is already in training form.

        A model already decomposed in training form (a calibrated start, `calibrated_init(prune=False)`) is
        pruned without `apply`; a compact checkpoint (distillation "after" stage) trains as it is.
        """
        model = trainer_kwargs["model"]
        declare_loss_kwargs(model)
        layers = losparse_layers(model)
        prune = all(isinstance(layer, LoSparseLinear) for _, layer in layers)
        if prune:
            if not layers:
                apply(model, config)
            trainer_kwargs.update(allow_resume_config_change=allow_resume_config_change, pruner_class=self.pruner_class)
            if lean_optimizer:
                trainer_kwargs["optimizer_cls_and_kwargs"] = lean_optimizer_cls_and_kwargs(model, trainer_kwargs["args"])
        distill = teacher_model is not None
        if distill:
            trainer_kwargs.update(teacher_model=teacher_model, distill_args=distill_args)
        return compose_trainer(trainer_class, prune=prune, distill=distill)(**trainer_kwargs)

    def compact(self, trainer: Any) -> dict[str, Any]:
        compact(trainer.model)
        return {}

    def save(self, trainer: Any, output_dir: str, tokenizer: Any, base_model: Optional[str],
             facts: dict[str, Any]) -> dict[str, Any]:
        save(trainer.model, output_dir, tokenizer=tokenizer, base_model=base_model)
        return parameter_report(trainer.model)

    def format_report(self, report: dict[str, Any]) -> Optional[str]:
        return format_report(report)

    def load(self, path: str, device: Any = None, **kwargs: Any) -> Any:
        return load(path, device=device, **kwargs)
