"""`TwoStageTrainer`: two task trainers run one after the other as one `train()` over one step budget.

The run scripts see one trainer: before `train()` it is the first stage's, after it the second's (attribute
access is passed through), so `finish_run` evaluates and saves the model the second stage trained. The
first stage ends with `finish_first(trainer) -> model` (physical removal, and its result saved under
`STAGE_DIR` of the output directory); the second trainer is built on that model. Each stage has its own
optimizer and learning-rate schedule (warm-up and decay within its steps): the parameters change shape
between them.

Resuming: checkpoints are the second stage's (the output directory's own `checkpoint-*`); a resumed run
reloads the first stage's saved result instead of running it again. The first stage writes no checkpoints
and is not evaluated: a run interrupted in it starts over.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any, Callable, Optional

from transformers.trainer_utils import IntervalStrategy, SaveStrategy, TrainOutput

from losparse.core.errors import LoSparseUsageError

logger = logging.getLogger(__name__)

#: the first stage's output, below the run's output directory
STAGE_DIR = "structured_stage"


def optimizer_steps(trainer: Any) -> int:
    """The optimizer steps `trainer.train()` would take: `max_steps`, else epochs × updates per epoch."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(batches // args.gradient_accumulation_steps, 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def split_steps(total: int, fraction: float) -> tuple[int, int]:
    """(first, second) with first ≈ fraction · total, both ≥ 1 and summing to `total`."""
    if total < 2:
        raise LoSparseUsageError(f"a two-stage method needs at least 2 optimizer steps; this run has {total}")
    first = min(max(round(total * fraction), 1), total - 1)
    return first, total - first


def stage_arguments(args: Any, output_dir: str) -> Any:
    """A copy of the run's `TrainingArguments` for the first stage: its own directory, no checkpoints, no eval."""
    first = copy.copy(args)
    first.output_dir = output_dir
    first.save_strategy = SaveStrategy.NO
    first.eval_strategy = IntervalStrategy.NO
    first.load_best_model_at_end = False
    return first


class TwoStageTrainer:
    """`first` trains `first_fraction` of the steps; `build_second(model, steps)` makes the trainer of the rest.

    `finish_first(first trainer) -> model` ends the first stage, `load_first() -> model` reloads its saved
    result on a resume, `finish_second(second trainer)` runs once the second stage has trained.
    """

    def __init__(self, first: Any, finish_first: Callable[[Any], Any], load_first: Callable[[], Any],
                 build_second: Callable[[Any, int], Any], finish_second: Callable[[Any], None],
                 first_fraction: float) -> None:
        self.first, self.second = first, None
        self._finish_first, self._load_first, self._build_second = finish_first, load_first, build_second
        self._finish_second = finish_second
        self.first_fraction = first_fraction

    def __getattr__(self, name: str) -> Any:
        current = self.__dict__.get("second") or self.__dict__.get("first")
        if current is None:
            raise AttributeError(name)
        return getattr(current, name)

    def train(self, resume_from_checkpoint: Optional[str] = None, **kwargs: Any) -> TrainOutput:
        first_steps, second_steps = split_steps(optimizer_steps(self.first), self.first_fraction)
        first_output = None
        if resume_from_checkpoint:
            model = self._load_first()
            logger.info("two stages: resuming the second stage; the first stage's result is reloaded")
        else:
            self.first.args.max_steps = first_steps
            logger.info("two stages: %d + %d optimizer steps", first_steps, second_steps)
            first_output = self.first.train()
            model = self._finish_first(self.first)
        self.second = self._build_second(model, second_steps)
        output = self.second.train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._finish_second(self.second)
        return merge_outputs(first_output, output, first_steps)


def merge_outputs(first: Optional[TrainOutput], second: TrainOutput, first_steps: int) -> TrainOutput:
    """One `TrainOutput` for both stages: steps added, the loss step-weighted, runtimes summed."""
    metrics = dict(second.metrics)
    metrics["first_stage_steps"] = first_steps
    if first is None:
        return TrainOutput(second.global_step, second.training_loss, metrics)
    steps = first.global_step + second.global_step
    loss = (first.training_loss * first.global_step + second.training_loss * second.global_step) / max(steps, 1)
    metrics["train_runtime"] = first.metrics.get("train_runtime", 0.0) + second.metrics.get("train_runtime", 0.0)
    metrics["train_loss"] = loss
    return TrainOutput(steps, loss, metrics)


def first_stage_dir(args: Any) -> str:
    return os.path.join(args.output_dir, STAGE_DIR)
