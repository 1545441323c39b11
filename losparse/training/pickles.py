"""Pickle files a run would read, tried with torch's safe loader before anything else reads them.

A `.bin`/`.pt`/`.pth` file is a pickle. Everything here reads pickles only with
`torch.load(..., weights_only=True)`, which refuses (rather than runs) anything but tensors and plain
containers; so does the Trainer. A crafted or foreign pickle is thus never executed, but the refusal
used to surface deep in `from_pretrained` or the Trainer's resume as a long traceback. These checks try
the same safe load up front and turn a refusal into one `LoSparseUsageError` naming the file:

- `check_model_weights`: the `pytorch_model*.bin` weights of a local model directory without
  safetensors weights (what `from_pretrained` would read), before the model is built;
- `check_checkpoint_pickles`: the pickles of a training checkpoint (`optimizer.pt`, `scheduler.pt`,
  `scaler.pt`, `rng_state*.pth`, weights, any other `*.pt`/`*.pth`/`*.bin`), in the resume preflight.

Nothing is ever unpickled with `weights_only=False`: the way out is converting the file to safetensors.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
import zipfile
from typing import Optional

import torch
from transformers.trainer_pt_utils import safe_globals

from losparse.core.errors import LoSparseUsageError
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
#: The Trainer's pickled TrainingArguments: written into every checkpoint, never read back on resume
#: (and never loadable with weights_only=True), so not checked.
TRAINING_ARGS_FILE = "training_args.bin"
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ADVICE = ("convert it to safetensors with a tool you trust (or replace it with a trusted copy); this project never "
          "unpickles with weights_only=False")


def _refusal_reason(exc: Exception) -> str:
    """The short part of torch's weights-only message ('Unsupported operand 149', 'Unsupported global: ...')."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    return reason.split(" was not an allowed global")[0].split(". ")[0].rstrip(".")


def _is_refusal(exc: Exception) -> bool:
    """torch's safe loader said no: `pickle.UnpicklingError`, or (older torch) a RuntimeError saying so."""
    return isinstance(exc, pickle.UnpicklingError) or (
        isinstance(exc, RuntimeError) and "Weights only load failed" in str(exc))


def check_safe_pickle(path: str, context: str, allow_numpy: bool = False) -> None:
    """Refuse `path` with one line if `torch.load(path, weights_only=True)` refuses it.

    `context` starts the message (e.g. "--resume_from_checkpoint 'out/checkpoint-6'"). `allow_numpy`
    allowlists the numpy globals the Trainer allows for its RNG state files (and only for those).
    Zip-format files are memory-mapped, so a large legitimate file costs little to check. Only a refusal
    is reported here: a file that fails to load otherwise (truncated, not a torch file) fails as before,
    when and if it is read.
    """
    try:
        with warnings.catch_warnings(), (safe_globals() if allow_numpy else contextlib.nullcontext()):
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch.load may fail on a damaged file with any error type
        if not _is_refusal(exc):
            return  # damaged or not a torch file: left to whatever reads it (a resume may never read it)
        raise LoSparseUsageError(
            f"{context}: {path} is a pickle that cannot be loaded safely (torch.load(weights_only=True) refuses "
            f"it: {_refusal_reason(exc)}); {ADVICE}"
        ) from None


def pickle_weight_files(directory: str) -> list[str]:
    """The pickled weights `from_pretrained` would read from local `directory` (none when it has safetensors)."""
    if not os.path.isdir(directory):
        return []
    names = sorted(os.listdir(directory))
    if any(name in SAFETENSORS_WEIGHTS or name == LOSPARSE_CONFIG_FILE for name in names):
        return []  # safetensors weights, or a compact checkpoint (`losparse.load` reads only its safetensors)
    return [os.path.join(directory, name) for name in names
            if name.startswith("pytorch_model") and name.endswith(".bin")
            and os.path.isfile(os.path.join(directory, name))]


def check_model_weights(model_name_or_path: Optional[str], flag: str) -> None:
    """Try the pickled weights of a local model directory safely before `from_pretrained` reads them.

    A hub name (not a local directory) is left to `from_pretrained` (see `unsafe_pickle_error`).
    """
    if not model_name_or_path:
        return
    for path in pickle_weight_files(model_name_or_path):
        check_safe_pickle(path, f"{flag} {model_name_or_path!r}")


def checkpoint_pickle_files(checkpoint: str) -> list[str]:
    """Every pickle at the top of `checkpoint` a resume may read (all `*.pt`/`*.pth`/`*.bin` but training_args.bin)."""
    return [os.path.join(checkpoint, name) for name in sorted(os.listdir(checkpoint))
            if name.endswith(PICKLE_SUFFIXES) and name != TRAINING_ARGS_FILE
            and os.path.isfile(os.path.join(checkpoint, name))]


def check_checkpoint_pickles(checkpoint: str, flag: str = "--resume_from_checkpoint") -> None:
    """Try every pickle of training checkpoint `checkpoint` safely; the first refused one is a usage error."""
    for path in checkpoint_pickle_files(checkpoint):
        check_safe_pickle(path, f"{flag} {checkpoint!r}",
                          allow_numpy=os.path.basename(path).startswith("rng_state"))


def unsafe_pickle_error(exc: Exception, flag: str, model_name_or_path: str) -> Optional[LoSparseUsageError]:
    """The usage error for a refusal that `from_pretrained` raised itself (a hub model: no file to name
    beforehand), or None when `exc` is not one."""
    if not _is_refusal(exc):
        return None
    return LoSparseUsageError(
        f"{flag} {model_name_or_path!r}: its weights are a pickle that cannot be loaded safely "
        f"(torch.load(weights_only=True) refuses it: {_refusal_reason(exc)}); {ADVICE}"
    )
