"""Which training checkpoints can be resumed, and whether a resume continues the same compression.

A checkpoint directory (`output_dir/checkpoint-N`) is written in several steps by the Trainer: the
model (with the LoSparse pruner state beside it, see `LoSparseTrainerMixin.save_model`), then the
optimizer, scheduler and RNG states, then `trainer_state.json`, and only then are older checkpoints
rotated out. A process killed in between leaves a directory that looks like a checkpoint but would
resume a different run (a fresh optimizer, a pruner that starts over). So a checkpoint counts as
*complete* only when every file a resume reads is there; `last_complete_checkpoint` walks back from
the newest one and says which it skipped.

Resuming with other compression settings (another ratio, schedule, method, total steps) would splice
two schedules into one run; `check_same_compression` compares the run's config with the one the
checkpoint recorded and names every difference.

Torch-free (standard library only), so the reproduction driver's dry run uses the same rule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Optional

from losparse.core.errors import LoSparseUsageError

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
PRUNER_STATE_FILE = "losparse_pruner.safetensors"
PRUNER_META_FILE = "losparse_pruner.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

#: Config fields that only shape the initial decomposition, which a resume reads back from the checkpoint.
INIT_ONLY_FIELDS = ("svd_solver", "svd_device")


def missing_files(checkpoint: str, needs_pruner: bool, needs_optimizer: bool = True) -> list[str]:
    """The files a resume of `checkpoint` would read that are not there (empty list: complete)."""
    missing = []
    if not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_FILE)):
        missing.append(TRAINER_STATE_FILE)
    if not any(os.path.isfile(os.path.join(checkpoint, name)) for name in WEIGHT_FILES):
        missing.append("model weights (model.safetensors)")
    if needs_optimizer:
        missing += [name for name in OPTIMIZER_FILES if not os.path.isfile(os.path.join(checkpoint, name))]
    if needs_pruner:
        missing += [name for name in (PRUNER_STATE_FILE, PRUNER_META_FILE)
                    if not os.path.isfile(os.path.join(checkpoint, name))]
    return missing


def list_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-N` subdirectories of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str, needs_pruner: bool, needs_optimizer: bool = True) -> Optional[str]:
    """The newest complete checkpoint in `output_dir` (None if there is none); logs each one skipped."""
    for checkpoint in list_checkpoints(output_dir):
        missing = missing_files(checkpoint, needs_pruner, needs_optimizer)
        if not missing:
            return checkpoint
        logger.warning("Skipping incomplete checkpoint %s (missing %s; a save was interrupted)", checkpoint,
                       ", ".join(missing))
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: Any, output_dir: str, needs_pruner: bool,
                              needs_optimizer: bool = True) -> Optional[str]:
    """Turn `--resume_from_checkpoint` (a path, `true`/`True`, or nothing) into a complete checkpoint path.

    `true` means the newest complete checkpoint in `output_dir`. An explicit path must be a complete
    checkpoint: a model directory (the final output of a run) or a half-written checkpoint is refused
    with the files it lacks.
    """
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "true", "True"):
        checkpoint = last_complete_checkpoint(output_dir, needs_pruner, needs_optimizer)
        if checkpoint is None:
            raise LoSparseUsageError(
                f"--resume_from_checkpoint true: no complete checkpoint in {output_dir!r} "
                f"({len(list_checkpoints(output_dir))} checkpoint-N directories found); start without it"
            )
        return checkpoint
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise LoSparseUsageError(f"--resume_from_checkpoint {path!r} is not a directory")
    missing = missing_files(path, needs_pruner, needs_optimizer)
    if missing:
        hint = ("it looks like a model directory, not a training checkpoint (pass an output_dir/checkpoint-N "
                "directory, or `true` for the newest one)" if TRAINER_STATE_FILE in missing
                else "the save that wrote it was interrupted; pass an older checkpoint or `true`")
        raise LoSparseUsageError(f"--resume_from_checkpoint {path!r} lacks {', '.join(missing)}: {hint}")
    return path


def recorded_config(checkpoint: str) -> Optional[dict[str, Any]]:
    """The LoSparse config a checkpoint's pruner state was written with (None: not a LoSparse checkpoint)."""
    path = os.path.join(checkpoint, PRUNER_META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return dict(json.load(f)["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoSparseUsageError(f"{path}: unreadable pruner state ({exc})") from None


def recorded_max_steps(checkpoint: str) -> Optional[int]:
    """Total optimizer steps of the run that wrote `checkpoint` (from its trainer_state.json)."""
    path = os.path.join(checkpoint, TRAINER_STATE_FILE)
    try:
        with open(path) as f:
            value = json.load(f).get("max_steps")
    except (OSError, ValueError):
        return None
    return int(value) if value else None


def compression_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: checkpoint X, this run Y' for every compression setting that differs."""
    differences = []
    for name in sorted(set(recorded) | set(current)):
        if name in INIT_ONLY_FIELDS:
            continue
        before, now = recorded.get(name), current.get(name)
        if isinstance(before, (int, float)) and isinstance(now, (int, float)) and not isinstance(before, bool):
            if abs(float(before) - float(now)) <= 1e-12 * max(1.0, abs(float(before))):
                continue
        elif before == now:
            continue
        differences.append(f"--{name}: checkpoint {before!r}, this run {now!r}")
    return differences


def check_same_compression(checkpoint: str, config: Any, max_steps: Optional[int] = None,
                           allow_change: bool = False) -> None:
    """Refuse to resume `checkpoint` with other compression settings than it was written with.

    `config` is the run's `LoSparseConfig`; `max_steps` the run's total optimizer steps (the schedule
    is a function of it). `allow_change=True` (`--allow_resume_config_change`) only logs the differences.
    """
    differences = []
    recorded = recorded_config(checkpoint)
    if recorded is not None:
        # A field the checkpoint does not name was added later; the run that wrote it had its default.
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
        # A checkpoint from before --align existed was never aligned (config.LEGACY_ALIGN, "1").
        differences += compression_differences({**defaults, "align": "1", **recorded}, config.to_dict())
    if max_steps is not None:
        before = recorded_max_steps(checkpoint)
        if before is not None and before != max_steps:
            differences.append(f"total optimizer steps (max_steps): checkpoint {before}, this run {max_steps}")
    if not differences:
        return
    if allow_change:
        logger.warning("Resuming %s with changed compression settings (--allow_resume_config_change): %s",
                       checkpoint, "; ".join(differences))
        return
    raise LoSparseUsageError(
        f"--resume_from_checkpoint {checkpoint} was written with other compression settings: "
        f"{'; '.join(differences)}. Resume with the checkpoint's values, or pass --allow_resume_config_change "
        "to splice the two schedules deliberately"
    )
