"""`LoSparseTrainer`: a `transformers.Trainer` that prunes S while it trains.

The pruning itself lives in `LoSparsePruner`; `LoSparseCallback` drives it from
`TrainerCallback.on_optimizer_step`, which the Trainer calls exactly once per optimizer step,
after `optimizer.step()` (so after gradient accumulation, unscaling, clipping and the DDP
all-reduce) and before the gradients are zeroed. `LoSparseTrainerMixin` adds that callback (and
checkpointing of the pruner's state) to any Trainer subclass, so the question-answering and
seq2seq trainers compose with it rather than copying it:

    class MyQATrainer(LoSparseTrainerMixin, QuestionAnsweringTrainer): ...
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from transformers import Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .config import LoSparseConfig
from .decompose import apply, losparse_layers
from .errors import LoSparseUsageError
from .pruner import LoSparsePruner

logger = logging.getLogger(__name__)


def check_training_backend(args: Any) -> None:
    """Refuse DeepSpeed and FSDP: both free or shard gradients before any Trainer hook sees them."""
    if getattr(args, "deepspeed", None):
        raise LoSparseUsageError(
            "--deepspeed is not supported yet: DeepSpeed frees gradients before the pruner's importance update; "
            "use plain DDP (accelerate launch / torchrun)"
        )
    if getattr(args, "fsdp", None):
        raise LoSparseUsageError(
            "--fsdp is not supported yet: FSDP shards gradients before the pruner's importance update; "
            "use plain DDP (accelerate launch / torchrun)"
        )


class LoSparseCallback(TrainerCallback):
    """Runs `LoSparsePruner.step` once per optimizer step; saves/restores its state with checkpoints."""

    def __init__(self, model: Any, config: LoSparseConfig) -> None:
        self.model = model
        self.config = config
        self.pruner: Optional[LoSparsePruner] = None
        self.resume_from: Optional[str] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.pruner is None:
            self.pruner = LoSparsePruner(self.model, total_steps=state.max_steps, config=self.config)
            schedule = self.pruner.schedule
            logger.info(
                "LoSparse: %d layers, %d optimizer steps, pruning from step %d to %d down to %.4f of S "
                "(low-rank share %.4f, remaining ratio %.4f)",
                len(self.pruner.layers), schedule.total_steps, schedule.warmup_steps, schedule.decay_end,
                self.pruner.final_kept_fraction, self.config.remaining_ratio - self.pruner.final_kept_fraction,
                self.config.remaining_ratio,
            )
        if self.resume_from is not None:
            if not self.pruner.load(self.resume_from):
                raise LoSparseUsageError(
                    f"checkpoint {self.resume_from} holds no LoSparse pruner state; it was not written by a LoSparse run"
                )
            logger.info("LoSparse: resumed pruner state from %s (step %d)", self.resume_from, self.pruner.last_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.step(state.global_step + 1)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.pruner is not None:
            self.pruner.save(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


class LoSparseTrainerMixin:
    """Adds LoSparse pruning to a `Trainer` subclass.

    Extra keyword argument:
      losparse_config: if given and the model is not decomposed yet, `apply(model, losparse_config)`
        runs first; otherwise the config recorded on the model by `apply` is used.
    After `train()`, `self.pruner` holds the pruner (its masks are already in the model).
    """

    def __init__(self, *args: Any, losparse_config: Optional[LoSparseConfig] = None, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise LoSparseUsageError("LoSparseTrainer needs a model")
        if losparse_config is not None and not losparse_layers(model):
            apply(model, losparse_config)
        config = getattr(model, "losparse_config", None)
        if config is None:
            raise LoSparseUsageError(
                "the model has no LoSparse layers: pass losparse_config=... or call losparse.apply(model, config) first"
            )
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        check_training_backend(training_args)
        super().__init__(*args, **kwargs)
        self.losparse_callback = LoSparseCallback(model, config)
        self.add_callback(self.losparse_callback)

    @property
    def pruner(self) -> Optional[LoSparsePruner]:
        return self.losparse_callback.pruner

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        pruner = self.losparse_callback.pruner
        if pruner is not None and "loss" in logs:
            logs["sparse_kept_fraction"] = round(pruner.kept_fraction, 6)
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: Optional[str | bool] = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise LoSparseUsageError(f"--resume_from_checkpoint: no checkpoint found in {self.args.output_dir}")
        self.losparse_callback.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)


class LoSparseTrainer(LoSparseTrainerMixin, Trainer):
    """`transformers.Trainer` + LoSparse pruning (see `LoSparseTrainerMixin`)."""


class LoSparseSeq2SeqTrainer(LoSparseTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` + LoSparse pruning (see `LoSparseTrainerMixin`)."""
