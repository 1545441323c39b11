"""What the run scripts share: arguments, YAML tables, the run's start, model loading, the trainer, the finish.

The path every run takes is `run.py` (parse → `start_run` → `load_models` → `make_trainer` → train →
`finish_run`); `tasks/` reads each task's data; `oneshot` is the `--oneshot` side; `yaml_config` resolves
`--config` tables without torch. The names below were the flat layout's `losparse.cli` module; they resolve
lazily (as the package root's names do), so `losparse.cli.yaml_config` stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

_RUN_NAMES = ("RUN_ARTIFACTS", "ModelArguments", "RunArguments", "check_launch", "check_output_dir", "fail",
              "finish_run", "load_models", "make_trainer", "parse_arguments", "remove_stale_artifacts",
              "resolve_resume", "run_main", "setup_logging", "start_run", "write_json")


def __getattr__(name: str) -> Any:
    if name not in _RUN_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("losparse.cli.run"), name)
