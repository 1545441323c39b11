"""The trainer mixin of `--method cofi`: the shared pruning lifecycle with the `CofiPruner`.

Per training micro-batch the loss is the task loss (or, with a teacher, CoFi's distillation objective,
`losparse.methods.cofi.distill`) plus, while pruning, the Lagrangian L_c. After each main optimizer step the
callback steps log α and λ (`CofiPruner.step`). The main optimizer leaves the embeddings out (the
reference's `freeze_keywords = ["embeddings"]`: they still get gradients, which count in the clipping norm,
but are never updated); the distillation projection is added to it. The loss is a per-micro-batch mean
(`loss_is_scaled_for_ga = False`), so the Trainer divides it by the accumulation steps.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.methods.cofi.distill import LayerProjection, layer_loss
from losparse.methods.cofi.pruner import CofiPruner
from losparse.methods.cofi.units import check_cofi_config, model_shape
from losparse.training.distill import DistillationArguments, freeze, logits_of, output_distillation_loss
from losparse.training.trainer import (
    LoSparseCallback,
    PruningTrainerMixin,
    check_training_backend,
    declare_loss_kwargs,
    refuse_positional,
)

logger = logging.getLogger(__name__)


class CofiCallback(LoSparseCallback):
    """Plans the stages once the total steps are known, then the shared resume / one-step-per-optimizer-step."""

    pruner_name = "cofi"

    def __init__(self, model: Any, config: LoSparseConfig, allow_config_change: bool, pruner: CofiPruner) -> None:
        super().__init__(model, config, allow_config_change)
        self.pruner = pruner

    def on_train_begin(self, args, state, control, **kwargs):
        self.pruner.plan(state.max_steps, args.num_train_epochs)
        self.log_plan()
        return super().on_train_begin(args, state, control, **kwargs)

    def log_plan(self) -> None:
        p = self.pruner
        logger.info("cofi: gating %s over %d layers; %d steps: pre-fine-tune to %d, pruning to %d (target sparsity "
                    "%.4f warmed up over %d steps), fine-tune to %d", ",".join(p.units), p.shape.layers,
                    p.total_steps, p.prefinetune_steps, p.prune_end, p.lagrangian.final_sparsity,
                    p.lagrangian.warmup_steps, p.total_steps)


def _check_distillation(teacher_model: Any, distill_args: Optional[DistillationArguments]) -> None:
    if teacher_model is None:
        return
    if distill_args is None or not distill_args.enabled:
        raise LoSparseUsageError("a teacher_model needs distill_args with --alpha_output and/or --alpha_layer > 0")
    if distill_args.distill_stage != "during":
        raise LoSparseUsageError("--method cofi distils while it prunes; --distill_stage after is not available")
    if distill_args.layer_map is not None:
        raise LoSparseUsageError("--method cofi aligns layers dynamically (CoFi's rule); drop --layer_map")


class CofiTrainerMixin(PruningTrainerMixin):
    """Adds CoFi pruning (and its distillation) to a `Trainer` subclass (keyword arguments only).

    Extra ones: `cofi_config` (a `LoSparseConfig` with method 'cofi'), `teacher_model` and `distill_args`
    (optional: CoFi's distillation, no hard-label term), `allow_resume_config_change`. The gates' log α, λ,
    their optimizer state, the final gates and the projection go into each checkpoint (the pruner state).
    """

    kept_fraction_log_key = "cofi_kept_fraction"
    loss_is_scaled_for_ga = False
    #: the pruner of the run (a subclass of `CofiPruner` with its constructor: the CoFi + LoSparse one)
    pruner_class: type = CofiPruner

    def __init__(self, *positional: Any, model: Any = None, args: Any = None,
                 cofi_config: Optional[LoSparseConfig] = None, teacher_model: Optional[nn.Module] = None,
                 distill_args: Optional[DistillationArguments] = None, allow_resume_config_change: bool = False,
                 **kwargs: Any) -> None:
        refuse_positional(type(self), positional)
        if model is None or cofi_config is None:
            raise LoSparseUsageError(f"{type(self).__name__} needs model= and cofi_config=")
        check_cofi_config(cofi_config)
        model_shape(model, decomposed_ok=self.pruner_class.decomposed_ok)
        check_training_backend(args)
        if getattr(args, "fp16", False):
            raise LoSparseUsageError("--fp16 is not supported by --method cofi (its gate optimizer steps outside the "
                                     "loss scaler); use --bf16 or full precision")
        stages = cofi_config.cofi_prefinetune_epochs + cofi_config.cofi_finetune_epochs
        if args is not None and stages >= args.num_train_epochs:
            raise LoSparseUsageError(
                f"--cofi_prefinetune_epochs + --cofi_finetune_epochs ({stages:g}) must be below --num_train_epochs "
                f"{args.num_train_epochs:g}: the pruning stage is the rest of the run")
        _check_distillation(teacher_model, distill_args)
        declare_loss_kwargs(model)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model = freeze(teacher_model) if teacher_model is not None else None
        self.distill_args = distill_args
        self.projection = None
        if self.teacher_model is not None and distill_args.alpha_layer > 0:
            self.projection = LayerProjection(model.config.hidden_size, self.teacher_model.config.hidden_size,
                                              next(model.parameters()))
        pruner = self.pruner_class(model, cofi_config, (self.args.adam_beta1, self.args.adam_beta2, self.args.adam_epsilon),
                            extra_modules={"projection": self.projection} if self.projection is not None else None)
        self._add_pruning_callback(CofiCallback(model, cofi_config, allow_resume_config_change, pruner))
        self.dense_target_params = pruner.shape.dense_params
        self.dense_model_params = sum(p.numel() for p in model.parameters())
        self._distill_logs: dict[str, torch.Tensor] = {}

    def create_optimizer(self, model: Any = None):
        """The Trainer's optimizer without the embeddings (the reference's choice), plus the projection."""
        if self.optimizer is None:
            frozen = [p for n, p in self.model.named_parameters() if "embeddings" in n and p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
            try:
                super().create_optimizer(model)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            if self.projection is not None:
                self.optimizer.add_param_group({"params": [self.projection.weight],
                                                "weight_decay": self.args.weight_decay})
                self.optimizer.add_param_group({"params": [self.projection.bias], "weight_decay": 0.0})
        return self.optimizer

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        if self.teacher_model is not None:
            loss, outputs = self._distillation_loss(model, inputs)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if self.pruner.stage() == "prune":
            loss = loss + self.pruner.lagrangian_loss().to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _distillation_loss(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """α_ce·KL(T ‖ S)·τ² + α_layer·layer loss (`losparse.methods.cofi.distill`); no hard-label term."""
        args = self.distill_args
        extra = {"output_hidden_states": True} if self.projection is not None else {}
        outputs = model(**inputs, **extra)
        teacher = self.teacher_model
        if next(teacher.parameters()).device != next(model.parameters()).device:
            teacher.to(next(model.parameters()).device)
        with torch.no_grad():
            teacher_outputs = teacher(**inputs, **extra)
        loss = outputs.logits.new_zeros((), dtype=torch.float32)
        if args.alpha_output > 0:
            kd = output_distillation_loss(logits_of(outputs), logits_of(teacher_outputs), args.distill_temperature,
                                          labels=inputs.get("labels"), attention_mask=inputs.get("attention_mask"))
            loss = loss + args.alpha_output * kd
            self._distill_logs["distill_output_loss"] = kd.detach()
        if self.projection is not None:
            state = self.pruner.state
            existing = [not s for s in state.skip["mha"]] if state.active else None
            layers, _ = layer_loss(outputs.hidden_states, teacher_outputs.hidden_states, self.projection, existing)
            loss = loss + args.alpha_layer * layers
            self._distill_logs["distill_layer_loss"] = layers.detach()
        return loss, outputs

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            if self.pruner.stage() == "prune":
                logs.update({k: round(v, 6) for k, v in self.pruner.last_terms.items()})
            logs.update({k: round(float(v), 6) for k, v in self._distill_logs.items()})
        super().log(logs, *args, **kwargs)


_COMPOSED: dict[tuple[type, type], type] = {}


def cofi_trainer(base: type, mixin: type = CofiTrainerMixin) -> type:
    """`base` (a `transformers.Trainer` subclass) with CoFi pruning (`mixin`, a `CofiTrainerMixin`): `Cofi<Base>`,
    cached; the CoFi + LoSparse mixin gives `CofiLoSparse<Base>`."""
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise LoSparseUsageError(f"cofi_trainer needs a transformers.Trainer subclass, not {base!r}")
    if (base, mixin) not in _COMPOSED:
        prefix = mixin.__name__.replace("TrainerMixin", "")
        _COMPOSED[base, mixin] = type(f"{prefix}{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
    return _COMPOSED[base, mixin]
