"""Small helpers every task module needs (tasks never import each other; they share this)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from ..errors import LoSparseUsageError


def file_extension(path: str) -> str:
    """Lower-case extension without the dot ('' if none)."""
    name = os.path.basename(path)
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def check_local_files(args: Any, extensions: Sequence[str], flags: Sequence[str] = ("train_file", "validation_file")) -> None:
    """Every given data file exists and has an allowed extension, else a one-line usage error."""
    for flag in flags:
        path = getattr(args, flag, None)
        if path is None:
            continue
        if not os.path.isfile(path):
            raise LoSparseUsageError(f"--{flag} {path!r} does not exist")
        if file_extension(path) not in extensions:
            raise LoSparseUsageError(f"--{flag} {path!r} must end in one of: .{', .'.join(extensions)}")
