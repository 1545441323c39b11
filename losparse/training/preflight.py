"""Checks that need the model's config and the data's size but not its weights, run before loading them.

The entry scripts read and validate their data, tokenize it, and then call these before
`load_models`, so that a run that cannot work stops with one line in seconds instead of after the
weights were loaded, the SVD computed and training started:

- `check_max_length`: a token length above the model's position limit (read from `AutoConfig`);
- `check_training_length`: `--num_train_epochs 0` or `--max_steps 0`;
- `check_compression_plan`: the cubic schedule against the run's optimizer steps (computed from the
  data size the way the Trainer computes `max_steps`) and the low-rank share of the target matrices
  (shapes from a meta-device skeleton, ranks from `rank_for_ratio`): the same conditions that
  `CubicSchedule` and `LoSparsePruner` would raise on at the first training step.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import AutoConfig

from losparse.core.decompose import plan_ranks, require_targets
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import dense_features
from losparse.core.methods import final_kept_fraction
from losparse.core.schedule import resolve_steps
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE

logger = logging.getLogger("losparse")

#: Model types whose learned positions start after the padding index (usable length = size - pad - 1).
PADDING_OFFSET_MODEL_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "roberta-prelayernorm",
    "data2vec-text", "mpnet", "ibert",
})
#: Model types with relative positions only: no length limit from the config.
RELATIVE_POSITION_MODEL_TYPES = frozenset({"t5", "mt5", "umt5", "longt5"})
POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions")


def load_model_config(model_name_or_path: str, cache_dir: Optional[str] = None, **config_kwargs: Any) -> Any:
    """`AutoConfig` of the model (no weights); an unloadable one is a one-line usage error."""
    try:
        return AutoConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir, **config_kwargs)
    except (OSError, ValueError) as exc:
        raise LoSparseUsageError(
            f"--model_name_or_path {model_name_or_path!r} could not be loaded: {str(exc).splitlines()[0]}"
        ) from None


def position_limit(model_config: Any) -> Optional[tuple[int, str]]:
    """(longest input in tokens, how that follows from the config), or None when the config sets no limit."""
    model_type = getattr(model_config, "model_type", "")
    if model_type in RELATIVE_POSITION_MODEL_TYPES or getattr(model_config, "position_biased_input", True) is False:
        return None
    for attribute in POSITION_ATTRIBUTES:
        size = getattr(model_config, attribute, None)
        if isinstance(size, int) and size > 0:
            if model_type in PADDING_OFFSET_MODEL_TYPES:
                offset = (getattr(model_config, "pad_token_id", None) or 0) + 1
                return size - offset, f"{attribute} {size} minus the padding offset {offset}"
            return size, f"{attribute} {size}"
    return None


def check_max_length(flag: str, value: Optional[int], model_config: Any, model_name_or_path: str) -> None:
    """Refuse a token length the model's position embeddings cannot hold (it would crash mid-run)."""
    limit = position_limit(model_config)
    if value is None or limit is None or value <= limit[0]:
        return
    raise LoSparseUsageError(
        f"--{flag} {value} is more than the {limit[0]} positions of --model_name_or_path {model_name_or_path!r} "
        f"({limit[1]}); pass --{flag} {limit[0]} or less"
    )


def check_training_length(training_args: Any) -> None:
    """A run must have at least one optimizer step (the Trainer would train for none, or fail)."""
    if training_args.max_steps == 0:
        raise LoSparseUsageError("--max_steps 0 trains for no optimizer step; pass a positive --max_steps, or "
                                 "leave it at -1 to train for --num_train_epochs")
    if training_args.max_steps < 0 and training_args.num_train_epochs <= 0:
        raise LoSparseUsageError(f"--num_train_epochs {training_args.num_train_epochs:g} trains for no optimizer "
                                 "step; pass a positive --num_train_epochs or --max_steps")


@dataclass(frozen=True)
class TrainingPlan:
    """The optimizer steps a run will take, and how they follow from the data and the flags."""

    total_steps: int
    explanation: str


def optimizer_steps(num_examples: int, training_args: Any, unit: str = "training examples") -> TrainingPlan:
    """The Trainer's `max_steps` for `num_examples` (mirrors `Trainer.set_initial_training_values`).

    Batches per process: the dataloader's batches (per-device batch x DataParallel GPUs; the last one
    dropped with --dataloader_drop_last) sharded over the processes as accelerate does (rounded up, or
    down with drop_last); optimizer steps per epoch: batches / gradient accumulation, rounded up, at
    least 1; the run: ceil(epochs x steps per epoch), unless --max_steps is positive.
    """
    check_training_length(training_args)
    if training_args.max_steps > 0:
        return TrainingPlan(training_args.max_steps, f"--max_steps {training_args.max_steps}")
    drop_last = bool(training_args.dataloader_drop_last)
    batch = training_args.per_device_train_batch_size * max(1, training_args.n_gpu)
    world = max(1, training_args.world_size)
    batches = num_examples // batch if drop_last else math.ceil(num_examples / batch)
    if world > 1:
        batches = batches // world if drop_last else math.ceil(batches / world)
    if batches == 0:
        raise LoSparseUsageError(f"{num_examples} {unit} make no full batch of {batch} per device"
                                 f"{f' x {world} processes' if world > 1 else ''} with --dataloader_drop_last; "
                                 "lower --per_device_train_batch_size or add data")
    accumulation = training_args.gradient_accumulation_steps
    per_epoch = max(math.ceil(batches / accumulation), 1)
    total = math.ceil(training_args.num_train_epochs * per_epoch)
    epochs = training_args.num_train_epochs
    how = (f"{epochs:g} epoch{'' if epochs == 1 else 's'} x {per_epoch} optimizer steps per epoch: {num_examples} "
           f"{unit} in batches of {batch}" + (f" on each of {world} processes" if world > 1 else "")
           + (f", {accumulation} batches per optimizer step" if accumulation > 1 else ""))
    return TrainingPlan(total, how)


def is_compact_checkpoint(model_name_or_path: str) -> bool:
    """A LoSparse output_dir: it is trained as it is (no decomposition, no pruner, no schedule)."""
    return os.path.isfile(os.path.join(model_name_or_path, LOSPARSE_CONFIG_FILE))


def _steps_source(steps: Optional[int], ratio: float, flag: str) -> str:
    return f"--pruning_{flag}_steps {steps}" if steps is not None else f"--pruning_{flag}_ratio {ratio:g} of the run"


def check_schedule(losparse_config: Any, plan: TrainingPlan) -> tuple[int, int]:
    """(t_i, t_f) for this run; the conditions `CubicSchedule` refuses are usage errors here."""
    cfg, total = losparse_config, plan.total_steps
    warmup = resolve_steps(cfg.pruning_warmup_steps, cfg.pruning_warmup_ratio, total)
    final = resolve_steps(cfg.pruning_final_steps, cfg.pruning_final_ratio, total)
    warmup_from = _steps_source(cfg.pruning_warmup_steps, cfg.pruning_warmup_ratio, "warmup")
    final_from = _steps_source(cfg.pruning_final_steps, cfg.pruning_final_ratio, "final")
    run = f"the run's {total} optimizer steps ({plan.explanation})"
    if warmup >= total:
        raise LoSparseUsageError(f"the pruning warm-up of {warmup} optimizer steps ({warmup_from}) is not shorter "
                                 f"than {run}; lower it or train longer")
    if warmup + final >= total:
        raise LoSparseUsageError(
            f"pruning warm-up ({warmup} steps, {warmup_from}) + final phase ({final} steps, {final_from}) must be "
            f"fewer than {run}; lower --pruning_warmup_steps/--pruning_final_steps (or their _ratio forms) or "
            "train longer"
        )
    return warmup, final


def target_shapes(auto_class: Any, model_config: Any, losparse_config: Any,
                  **config_overrides: Any) -> list[tuple[int, int]]:
    """(out_features, in_features) of every targeted matrix, from a meta-device skeleton (no weights)."""
    model_config = copy.deepcopy(model_config)
    for key, value in config_overrides.items():
        setattr(model_config, key, value)
    with torch.device("meta"):
        skeleton = auto_class.from_config(model_config)
    return [dense_features(linear) for _, linear in require_targets(skeleton, losparse_config)]


def low_rank_budget(shapes: list[tuple[int, int]], losparse_config: Any) -> tuple[float, float]:
    """(low-rank share, final kept fraction p_T of S) exactly as `decompose.apply` + the pruner get them."""
    spec = losparse_config.method_spec
    ranks = plan_ranks(shapes, losparse_config)
    dense = sum(o * i for o, i in shapes)
    low_rank_share = sum(k * (o + i) for k, (o, i) in zip(ranks, shapes)) / dense if dense else 0.0
    return low_rank_share, final_kept_fraction(spec, losparse_config.remaining_ratio, low_rank_share)


def check_low_rank_share(shapes: list[tuple[int, int]], losparse_config: Any, model_name_or_path: str) -> float:
    """p_T; a low-rank part that (ranks rounded up) takes the whole budget is a usage error, as in the pruner."""
    spec = losparse_config.method_spec
    share, kept = low_rank_budget(shapes, losparse_config)
    if kept <= 0.0 and spec.has_sparse and not spec.prunes_to_zero:
        raise LoSparseUsageError(
            f"--low_rank_ratio {losparse_config.low_rank_ratio} leaves nothing for the sparse part: with ranks rounded "
            f"up the low-rank share of the {len(shapes)} target matrices of --model_name_or_path "
            f"{model_name_or_path!r} is {share:.4f} >= --remaining_ratio {losparse_config.remaining_ratio}; lower "
            "--low_rank_ratio"
        )
    return kept


def check_compression_plan(losparse_config: Any, model_name_or_path: str, auto_class: Any, model_config: Any,
                           num_examples: int, training_args: Any, unit: str = "training examples",
                           **config_overrides: Any) -> TrainingPlan:
    """Everything the run's length and the model's shapes decide, before weights, tokens or SVD cost anything.

    `num_examples` is what the Trainer will iterate over (examples, or windows for question
    answering); `config_overrides` are set on a copy of `model_config` for the skeleton (e.g.
    num_labels). A LoSparse checkpoint (trained as it is) and methods that do not decompose only get
    the training-length check.
    """
    plan = optimizer_steps(num_examples, training_args, unit)
    if not losparse_config.method_spec.decomposes or is_compact_checkpoint(model_name_or_path):
        return plan
    warmup, final = check_schedule(losparse_config, plan)
    shapes = target_shapes(auto_class, model_config, losparse_config, **config_overrides)
    kept = check_low_rank_share(shapes, losparse_config, model_name_or_path)
    logger.info("Plan: %d optimizer steps (%s); pruning from step %d to %d; %d target matrices, S keeps %.4f of its "
                "parameters", plan.total_steps, plan.explanation, warmup, plan.total_steps - final, len(shapes), kept)
    return plan


def check_targets_before_loading(model_name_or_path: str, auto_class: Any, losparse_config: Any,
                                 cache_dir: Optional[str] = None, **config_kwargs: Any) -> None:
    """Build the model skeleton on the meta device (no weights) and check the targets match something."""
    model_config = load_model_config(model_name_or_path, cache_dir=cache_dir, **config_kwargs)
    with torch.device("meta"):
        skeleton = auto_class.from_config(model_config)
    require_targets(skeleton, losparse_config)
