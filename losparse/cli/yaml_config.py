"""The one resolver of `--config` YAML tables: a table, a task and a ratio -> {argument name: value}.

Torch-free (it imports only yaml, json, math, os, re and `losparse.core.errors`), so both the entry
scripts (`losparse.cli.run.parse_arguments`) and the reproduction driver (`reproduce.driver`,
whose `--dry_run` must stay instant) use this very code: a config resolves to the same values in both.

Layout (configs/ holds the paper's tables in it):
    key: value                 # applies to every task
    tasks:
      mnli:
        key: value             # applies to --task_name mnli
        ratios:
          0.2: {key: value}    # applies to --remaining_ratio 0.2

Resolution order: top level, then `tasks.<task>`, then `tasks.<task>.ratios.<ratio>`; later wins.
It is strict: a table with per-task sections needs a task that is in it, a task with per-ratio
sections needs a ratio that is in them, and every key must be in `allowed_keys` (the argument
names of the script). Any failure is one `LoSparseUsageError` naming the file and the section.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Container, Iterable, Optional

from losparse.core.errors import LoSparseUsageError

#: what YAML 1.1 leaves a string although it is a number (`1e-4`: no dot, so not a float to PyYAML)
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def coerce_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string: turn number-looking strings into numbers."""
    if isinstance(value, str) and NUMBER.match(value.strip()):
        text = value.strip()
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    return value


def load_table(path: str) -> dict[str, Any]:
    """The YAML mapping in `path`; a missing file, bad YAML or a non-mapping is a usage error."""
    import yaml

    if not os.path.isfile(path):
        raise LoSparseUsageError(f"--config {path!r} does not exist")
    try:
        with open(path) as f:
            table = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise LoSparseUsageError(f"--config {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(table, dict):
        raise LoSparseUsageError(f"--config {path!r} must hold a mapping of argument names to values")
    return table


def table_tasks(table: dict[str, Any]) -> list[str]:
    """The task names of a table's `tasks:` section, in file order."""
    return list((table.get("tasks") or {}).keys())


def table_ratios(table: dict[str, Any], task: Optional[str]) -> list[float]:
    """The remaining ratios that have a section under `tasks.<task>.ratios`, in file order."""
    section = ((table.get("tasks") or {}).get(task) or {}) if task else {}
    return [float(coerce_number(k)) for k in (section.get("ratios") or {})]


def select_ratio(ratios: dict[Any, Any], ratio: float, where: str) -> dict[str, Any]:
    """The section of `ratios` whose key equals `ratio` (to 1e-9); a usage error listing the keys if none does."""
    for key, values in ratios.items():
        if math.isclose(float(coerce_number(key)), ratio, rel_tol=0, abs_tol=1e-9):
            return values or {}
    available = ", ".join(str(coerce_number(k)) for k in ratios)
    raise LoSparseUsageError(f"--remaining_ratio {ratio} has no entry under {where}.ratios; available: {available}")


def resolve_table(table: dict[str, Any], task_name: Optional[str], remaining_ratio: Optional[float],
                  allowed_keys: Optional[Container[str]], path: str) -> dict[str, Any]:
    """Flatten a loaded table for one task and ratio into {argument name: value} (numbers coerced).

    `allowed_keys`: the argument names a key must be one of; None accepts every key (for a caller
    that cannot know the script's arguments without importing it; the script checks them when it runs).
    `path` only names the table in error messages.
    """
    top_level = {k: v for k, v in table.items() if k != "tasks"}
    values: dict[str, Any] = dict(top_level)
    sections = [("top level", top_level)]
    tasks = table.get("tasks") or {}
    if tasks:
        task_name = task_name or table.get("task_name")
        if task_name is None:
            raise LoSparseUsageError(f"--config {path!r} has per-task sections ({', '.join(tasks)}); pass --task_name")
        if task_name not in tasks:
            raise LoSparseUsageError(
                f"--task_name {task_name!r} is not in --config {path!r}; available: {', '.join(tasks)}"
            )
        task_section = dict(tasks[task_name] or {})
        ratios = task_section.pop("ratios", None)
        sections.append((f"tasks.{task_name}", task_section))
        values.update(task_section)
        if ratios:
            ratio = remaining_ratio if remaining_ratio is not None else values.get("remaining_ratio")
            if ratio is None:
                raise LoSparseUsageError(
                    f"--config {path!r} has per-ratio values for {task_name}; pass --remaining_ratio"
                )
            ratio_section = select_ratio(ratios, float(coerce_number(ratio)), f"tasks.{task_name}")
            sections.append((f"tasks.{task_name}.ratios", ratio_section))
            values.update(ratio_section)
    if allowed_keys is not None:
        _check_keys(sections, allowed_keys, path)
    return {k: coerce_number(v) for k, v in values.items()}


def _check_keys(sections: Iterable[tuple[str, dict[str, Any]]], allowed_keys: Container[str], path: str) -> None:
    for where, section in sections:
        for key in section:
            if key not in allowed_keys:
                raise LoSparseUsageError(
                    f"unknown key {key!r} in --config {path!r} ({where}); keys must be argument names of this "
                    "script (see --help)"
                )


def resolve_yaml_config(path: str, task_name: Optional[str], remaining_ratio: Optional[float],
                        allowed_keys: Optional[Container[str]]) -> dict[str, Any]:
    """Read the YAML table at `path` and flatten it for one task and ratio (see `resolve_table`)."""
    return resolve_table(load_table(path), task_name, remaining_ratio, allowed_keys, path)


def to_flags(values: dict[str, Any], bare_flags: Container[str] = ()) -> list[str]:
    """{argument name: value} -> command-line flags, the way argparse and HfArgumentParser read them.

    None values are left out; booleans are written `--key true|false` (`--key` alone for the names in
    `bare_flags`, when true); lists as several values; mappings as JSON; numbers as Python prints them.
    """
    flags: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if value is True and key in bare_flags:
            flags.append(f"--{key}")
        elif isinstance(value, bool):
            flags += [f"--{key}", str(value).lower()]
        elif isinstance(value, (list, tuple)):
            flags += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            flags += [f"--{key}", json.dumps(value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags
