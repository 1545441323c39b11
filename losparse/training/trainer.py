"""The pruning trainer mixins (`PruningTrainerMixin`, `LoSparseTrainerMixin`) and the callback that steps the pruner.

The pruning itself lives in `LoSparsePruner`; `LoSparseCallback` drives it from
`TrainerCallback.on_optimizer_step`, which the Trainer calls exactly once per optimizer step,
after `optimizer.step()` (so after gradient accumulation, unscaling, clipping and the DDP
all-reduce) and before the gradients are zeroed. `LoSparseTrainerMixin` adds that callback (and
checkpointing of the pruner's state) to a Trainer class.

Trainer classes are composed from these mixins by `losparse.training.compose.compose_trainer`; every pruning
mixin shares `PruningTrainerMixin` (resume, pruner state in checkpoints, the kept fraction in the logs).
The mixins take every argument by keyword (`model=`, `args=`, ...).

Who calls `apply`: the caller, once. Either call `losparse.apply(model, config)` and pass the decomposed
model, or pass `losparse_config=config` to a pruning trainer, whose constructor is then the one caller
of `apply` (a model that is already decomposed is refused, never silently kept). The run scripts do
the former through their method's `make_trainer` hook.

Checkpoints are complete-or-absent: the pruner state is written inside `save_model`, i.e. with the
model weights and before the Trainer writes `trainer_state.json` or rotates older checkpoints out
(`losparse.core.checkpoint` decides what is complete and what a resume may continue).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Optional

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from losparse.core.checkpoint import check_same_compression, resolve_resume_checkpoint
from losparse.core.config import LoSparseConfig
from losparse.core.decompose import apply, losparse_layers
from losparse.core.errors import LoSparseUsageError
from losparse.core.pruner import BasePruner, LoSparsePruner
from losparse.core.sharding import check_fsdp_config
from losparse.core.shrink import check_shrink_backend, narrow_to_checkpoint, shrink_pruned

logger = logging.getLogger(__name__)


def check_training_backend(args: Any, config: Optional[LoSparseConfig] = None) -> None:
    """Refuse the training backends the pruner cannot see whole gradients under; allow FSDP2 where it applies.

    DeepSpeed (ZeRO) partitions and frees gradients before any Trainer hook; FSDP1 flattens S into a
    FlatParameter, so no rank holds whole rows. FSDP2 (`fsdp_version: 2`, the default of transformers 5)
    shards S by rows and keeps each shard's gradient until the hook, which `losparse.core.sharding` handles for
    the LoSparse pruner (`config` given) with row or column masks and β2 = 0. On CPU accelerate applies no
    FSDP at all (only its GPU/accelerator distributed types do) and silently trains with DDP, so --fsdp is
    refused there rather than quietly ignored.
    """
    if getattr(args, "deepspeed", None):
        raise LoSparseUsageError(
            "--deepspeed is not supported: DeepSpeed frees gradients before the pruner's importance update; use "
            "FSDP2 (--fsdp full_shard with fsdp_config {\"fsdp_version\": 2}) on GPUs, or plain DDP "
            "(accelerate launch / torchrun)"
        )
    if not getattr(args, "fsdp", None):
        return
    plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
    fsdp_config = getattr(args, "fsdp_config", None) or {}
    version = int(plugin_args.get("fsdp_version", fsdp_config.get("version", fsdp_config.get("fsdp_version", 2))))
    if version != 2:
        raise LoSparseUsageError(
            f"--fsdp with fsdp_version {version} is not supported: FSDP1 flattens S into one FlatParameter, so no "
            "rank holds whole rows of it; use fsdp_config {\"fsdp_version\": 2} (FSDP2), or plain DDP"
        )
    if not fsdp_applies_on(args):
        raise LoSparseUsageError(
            "--fsdp is not supported on CPU: accelerate applies FSDP only on GPUs/accelerators and on CPU would "
            "silently train with DDP; drop --fsdp (torchrun ... --use_cpu true runs DDP) or run FSDP2 on GPUs"
        )
    if config is None:
        raise LoSparseUsageError(
            "--fsdp is not supported by this trainer: only LoSparse pruning (LoSparseTrainer) has a sharded "
            "importance; use plain DDP (accelerate launch / torchrun)"
        )

    check_fsdp_config(config)


def fsdp_applies_on(args: Any) -> bool:
    """Whether accelerate will really shard with FSDP for these arguments: only off the CPU (its FSDP
    distributed type exists for GPUs and other accelerators; `tests/fsdp_trainer_worker.py` lifts both
    limits together to run the Trainer's FSDP2 path on CPU with gloo)."""
    return not getattr(args, "use_cpu", False) and _has_accelerator(args)


def _has_accelerator(args: Any) -> bool:
    """Whether the run's device is not the CPU (`args.device`, else whether CUDA is visible)."""
    device = getattr(args, "device", None)
    if device is not None and hasattr(device, "type"):
        return device.type != "cpu"
    import torch

    return torch.cuda.is_available()


class LoSparseCallback(TrainerCallback):
    """Runs `LoSparsePruner.step` once per optimizer step; restores its state when a run resumes.

    Saving is not done here: `on_save` fires after the Trainer has finished (and rotated) a checkpoint,
    too late for a checkpoint to be complete-or-absent; `LoSparseTrainerMixin.save_model` writes it.
    """

    def __init__(self, model: Any, config: LoSparseConfig, allow_config_change: bool = False,
                 pruner_class: Optional[type] = None) -> None:
        self.model = model
        self.config = config
        self.allow_config_change = allow_config_change
        self.pruner_class = pruner_class or self.default_pruner_class
        self.pruner: Optional[BasePruner] = None
        self.resume_from: Optional[str] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume_from is not None:
            check_same_compression(self.resume_from, self.config, max_steps=state.max_steps,
                                   allow_change=self.allow_config_change)
        if self.pruner is None:
            self.pruner = self.make_pruner(state.max_steps)
            self.log_plan()
        if self.resume_from is not None:
            if not self.pruner.load(self.resume_from):
                raise LoSparseUsageError(f"checkpoint {self.resume_from} holds no {self.pruner_name} pruner state")
            logger.info("%s: resumed pruner state from %s (step %d)", self.pruner_name, self.resume_from,
                        self.pruner.last_step)
        if getattr(self.config, "shrink_sparse", False):  # neurons pruned before training are dropped at once
            shrink_pruned(self.pruner, kwargs.get("optimizer"), force=True)

    #: how logs and errors name the pruner
    pruner_name = "LoSparse"
    #: the pruner built when none is passed (`pruner_class=`: any `BasePruner` with the same constructor)
    default_pruner_class: type = LoSparsePruner

    def make_pruner(self, total_steps: int) -> BasePruner:
        """The pruner of the run: `pruner_class(model, total_steps, config)`."""
        return self.pruner_class(self.model, total_steps, self.config)

    def log_plan(self) -> None:
        schedule = self.pruner.schedule
        logger.info(
            "LoSparse: %d layers, %d optimizer steps, pruning from step %d to %d down to %.4f of S "
            "(low-rank share %.4f, remaining ratio %.4f)",
            len(self.pruner.layers), schedule.total_steps, schedule.warmup_steps, schedule.decay_end,
            self.pruner.final_kept_fraction, self.config.remaining_ratio - self.pruner.final_kept_fraction,
            self.config.remaining_ratio,
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.step(state.global_step + 1)
        if getattr(self.config, "shrink_sparse", False):  # after a mask update: narrow S, ∂S, optimizer state
            shrink_pruned(self.pruner, kwargs.get("optimizer"))


def loss_uses_num_items(model: Any) -> bool:
    """Whether `model.forward` normalises its loss by the Trainer's `num_items_in_batch`.

    The Trainer assumes it does for every model whose `forward` takes `**kwargs` — in transformers 5 that
    is nearly all of them, including BERT/DeBERTa/BART heads whose loss is a plain per-batch mean. For
    those it then skips the division by the gradient-accumulation steps and multiplies the loss by the
    number of processes, so DDP runs report (and train on) a loss N times too large. Only models whose
    forward hands its kwargs to `self.loss_function` (the causal-LM losses) really use the count.
    """
    forward = type(model).forward
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "self.loss_function(" in source and "**kwargs" in source


def declare_loss_kwargs(model: Any) -> None:
    """Tell the Trainer whether the model's loss uses `num_items_in_batch` (see `loss_uses_num_items`).

    Uses the Trainer's own switch, the `accepts_loss_kwargs` model attribute, and leaves a value the model
    (or the user) already set alone.
    """
    if "accepts_loss_kwargs" not in vars(type(model)) and "accepts_loss_kwargs" not in vars(model):
        model.accepts_loss_kwargs = loss_uses_num_items(model)
    declare_causal_loss_type(model)


def declare_causal_loss_type(model: Any) -> None:
    """Name the causal-LM loss on models whose class name does not (GPT2LMHeadModel: `loss_type` None).

    The Trainer counts `num_items_in_batch` over `labels[..., 1:]` only when `model.loss_type` maps to
    `ForCausalLMLoss`; with `loss_type` None it counts every label, so a GPT-2 block of B tokens is divided
    by B instead of its B - 1 predicted tokens and the training and eval losses come out (B - 1)/B too
    small. The loss function itself is `ForCausalLMLoss` either way; only its name is missing.
    """
    if getattr(model, "loss_type", "") is not None:
        return
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if LOSS_MAPPING.get("ForCausalLM") is ForCausalLMLoss and getattr(model, "loss_function", None) is ForCausalLMLoss:
        model.loss_type = "ForCausalLM"


def refuse_positional(trainer_class: type, positional: tuple) -> None:
    """The LoSparse mixins read `model` and `args` by name: refuse a call that passes anything positionally."""
    if positional:
        raise LoSparseUsageError(
            f"{trainer_class.__name__} takes its arguments by keyword only: pass model=..., args=..., ... "
            f"(got {len(positional)} positional argument{'s' if len(positional) > 1 else ''})"
        )


class PruningTrainerMixin:
    """What every pruning trainer shares: a pruner callback, resume from the newest complete checkpoint, the
    pruner state written into each checkpoint, and the kept fraction in the logs.

    Subclasses build their callback in `__init__` and pass it to `_add_pruning_callback`.
    """

    #: the key under which `log` reports the pruner's kept fraction
    kept_fraction_log_key = "sparse_kept_fraction"

    def _add_pruning_callback(self, callback: LoSparseCallback) -> None:
        self.pruning_callback = callback
        self.add_callback(callback)

    @property
    def pruner(self) -> Optional[BasePruner]:
        return self.pruning_callback.pruner

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.pruner is not None and "loss" in logs:
            logs[self.kept_fraction_log_key] = round(self.pruner.kept_fraction, 6)
        super().log(logs, *args, **kwargs)

    def prepare_resume(self, checkpoint: str) -> None:
        """Called before `Trainer.train` loads `checkpoint` (subclasses: reshape the model to it)."""

    def train(self, resume_from_checkpoint: Optional[str | bool] = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the newest *complete* checkpoint."""
        resume_from_checkpoint = resolve_resume_checkpoint(
            resume_from_checkpoint, self.args.output_dir, needs_pruner=True,
            needs_optimizer=not self.args.save_only_model)
        self.pruning_callback.resume_from = resume_from_checkpoint
        if resume_from_checkpoint is not None:
            self.prepare_resume(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save the model; inside a checkpoint also the pruner state, before the checkpoint counts as done."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if (_internal_call and output_dir and self.pruner is not None and self.args.should_save
                and os.path.basename(os.path.normpath(output_dir)).startswith(f"{PREFIX_CHECKPOINT_DIR}-")):
            self.pruner.save(output_dir)


class LoSparseTrainerMixin(PruningTrainerMixin):
    """Adds LoSparse pruning to a `Trainer` subclass; build the class with `compose_trainer(base, prune=True)`.

    Keyword arguments only. Extra ones:
      losparse_config: if given, this constructor calls `apply(model, losparse_config)` (so the model must
        not be decomposed yet); if not, the model must come from `apply`, whose config it records.
      allow_resume_config_change: resume a checkpoint written with other compression settings.
      pruner_class: the pruner to build (default `LoSparsePruner`; method lpaf passes `LpafPruner`).
    After `train()`, `self.pruner` holds the pruner (its masks are already in the model).
    """

    def __init__(self, *positional: Any, model: Any = None, args: Any = None,
                 losparse_config: Optional[LoSparseConfig] = None, allow_resume_config_change: bool = False,
                 pruner_class: Optional[type] = None, **kwargs: Any) -> None:
        refuse_positional(type(self), positional)
        if model is None:
            raise LoSparseUsageError(f"{type(self).__name__} needs a model")
        if losparse_config is not None:
            if losparse_layers(model):
                raise LoSparseUsageError(
                    "the model is already decomposed: drop losparse_config= (it asks this trainer to call "
                    "losparse.apply, which runs once per model)"
                )
            apply(model, losparse_config)
        config = getattr(model, "losparse_config", None)
        if config is None or not losparse_layers(model):
            raise LoSparseUsageError(
                "the model has no LoSparse layers: call losparse.apply(model, config) first, or pass "
                "losparse_config=..."
            )
        check_training_backend(args, config)
        if config.shrink_sparse:
            check_shrink_backend(args)
        declare_loss_kwargs(model)
        super().__init__(model=model, args=args, **kwargs)
        self._add_pruning_callback(LoSparseCallback(model, config, allow_config_change=allow_resume_config_change,
                                                    pruner_class=pruner_class))

    @property
    def losparse_callback(self) -> LoSparseCallback:
        return self.pruning_callback

    def prepare_resume(self, checkpoint: str) -> None:
        """Shrunk S: the weights and optimizer state were saved narrowed, so the model narrows first."""
        narrow_to_checkpoint(self.model, checkpoint, self.pruning_callback.config)
