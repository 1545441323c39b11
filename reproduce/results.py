"""Finished runs as flat records: find every `all_results.json`, read it, group the runs.

Every run script writes `<output_dir>/all_results.json`; `collect_results` finds them all (recursively)
and turns each into one flat record. Records are matched to the paper by the JSON fields only
(model_name_or_path, task_name, method, losparse_config.remaining_ratio, seed), never by directory
names; the path is kept as a label.

Metrics are put on the paper's scale, percent: GLUE-style fractions (accuracy, F1 of MRPC/QQP,
Matthews correlation, Pearson/Spearman) are multiplied by 100; SQuAD exact_match/f1 and ROUGE are
already percents and are kept. Several seeds of one (model, task, method, ratio) are summarised as
mean ± sample standard deviation (`summarize`).

Runs whose all_results.json marks knowledge distillation ("distillation"/"distill" true, or a
"teacher_model_name_or_path") count for Table 5 only; the full-model rows (method finetune) count for
every table. Torch-free: `reproduce.report` (tables) and `benchmarks.plots` (figures) build on it.
"""

from __future__ import annotations

import json
import os
import statistics
import warnings
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from reproduce.paper_results import METHOD_LABELS

RESULTS_FILE = "all_results.json"

#: Quality metrics that runs report as fractions in [0, 1] (GLUE, losparse/cli/metrics.py) -> x100.
FRACTION_METRICS = frozenset({
    "accuracy", "mismatched_accuracy", "f1", "matthews_correlation", "pearson", "spearmanr",
    "combined_score", "mismatched_f1",
})
#: Quality metrics that runs already report in percent (SQuAD, ROUGE).
PERCENT_METRICS = frozenset({"exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum"})
#: Tasks whose f1 is SQuAD's token F1, already a percent.
QA_TASKS = frozenset({"squad", "squad_v2"})
QUALITY_METRICS = FRACTION_METRICS | PERCENT_METRICS
#: Order in which metrics are listed in generic tables and plots.
METRIC_ORDER = ("accuracy", "mismatched_accuracy", "exact_match", "f1", "matthews_correlation", "pearson",
                "spearmanr", "combined_score", "rouge1", "rouge2", "rougeL", "rougeLsum")
METHOD_ORDER = ("finetune", "lead3", "losparse", "lpaf", "itp", "movement", "structured", "lowrank",
                "lowrank_prune_all", "structured_losparse", "cofi", "cofi_losparse")


# --------------------------------------------------------------------------------------------- collecting
def find_result_files(paths: Iterable[str]) -> list[str]:
    """Every all_results.json under the given directories (or the files themselves), sorted, unique."""
    found: list[str] = []
    for path in paths:
        if os.path.isfile(path):
            found.append(os.path.abspath(path))
            continue
        for root, dirs, files in os.walk(path):
            dirs.sort()
            if RESULTS_FILE in files:
                found.append(os.path.abspath(os.path.join(root, RESULTS_FILE)))
    return sorted(dict.fromkeys(found))


def short_model_name(model_name_or_path: Optional[str]) -> Optional[str]:
    """'microsoft/deberta-v3-base' or '/models/deberta-v3-base/' -> 'deberta-v3-base'."""
    if not model_name_or_path:
        return None
    return os.path.basename(str(model_name_or_path).rstrip("/\\")) or str(model_name_or_path)


def _distills(section: Mapping[str, Any]) -> bool:
    """A teacher is named and (when the weights are given) one distillation loss weight is positive."""
    if "enabled" in section:
        return bool(section["enabled"])
    teacher = section.get("teacher_model_name_or_path") or section.get("teacher_name_or_path")
    alphas = [section[k] for k in ("alpha_output", "alpha_layer") if isinstance(section.get(k), (int, float))]
    return bool(teacher) and (not alphas or any(a > 0 for a in alphas))


def _is_distillation(data: Mapping[str, Any]) -> bool:
    """Whether a run used knowledge distillation: a truthy "distillation"/"distill" flag (or such a section
    naming a teacher), or a teacher_model_name_or_path at the top level or in losparse_config."""
    config = data.get("losparse_config") or {}
    for source in (data, config):
        if not isinstance(source, Mapping):
            continue
        for key in ("distillation", "distill"):
            value = source.get(key)
            if isinstance(value, Mapping):
                if _distills(value):
                    return True
            elif value:
                return True
        if _distills(source):
            return True
    return False


def to_percent(metrics: Mapping[str, Any], task: Optional[str]) -> dict[str, float]:
    """eval_* metrics without the prefix; GLUE-style fractions x100, SQuAD/ROUGE percents kept.

    Non-quality metrics (loss, runtime, samples per second, generation length) are kept as they are.
    A fraction metric already above 1 in magnitude is taken to be a percent already.
    """
    out: dict[str, float] = {}
    qa = (task in QA_TASKS) or any(k in ("eval_exact_match", "exact_match") for k in metrics)
    for key, value in metrics.items():
        if not key.startswith("eval_") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key[len("eval_"):]
        value = float(value)
        if name in FRACTION_METRICS and not (qa and name == "f1") and not abs(value) > 1.0:
            value *= 100.0
        out[name] = value
    return out


def record_from_results(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """One flat record from the content of an all_results.json."""
    method = data.get("method") or "unknown"
    config = data.get("losparse_config") or {}
    compression = data.get("compression") or {}
    achieved = compression.get("remaining_ratio")
    achieved = float(achieved) if isinstance(achieved, (int, float)) else (1.0 if method == "finetune" else None)
    if method == "finetune":
        ratio: Optional[float] = 1.0
    elif isinstance(config.get("remaining_ratio"), (int, float)):
        ratio = float(config["remaining_ratio"])
    else:
        ratio = achieved
    task = data.get("task_name")
    seed = data.get("seed")
    return {
        "model": short_model_name(data.get("model_name_or_path")),
        "task": task.lower() if isinstance(task, str) else None,
        "method": method,
        "variant": method_variant(method, config),
        "ratio": ratio,
        "low_rank_ratio": config.get("low_rank_ratio"),
        "achieved_ratio": achieved,
        "seed": seed,
        "distillation": _is_distillation(data),
        "metrics": to_percent(data, task.lower() if isinstance(task, str) else None),
        "path": os.path.dirname(path),
    }


def collect_results(paths: Union[str, Sequence[str]]) -> list[dict[str, Any]]:
    """All runs under `paths` (directories searched recursively for all_results.json) as flat records.

    Each record: model (basename of model_name_or_path), task, method, ratio (the requested
    remaining_ratio; 1.0 for finetune), low_rank_ratio, achieved_ratio (counted from the tensors),
    seed, distillation, metrics (eval_* without the prefix, in percent), path (the run directory).
    Unreadable or malformed files are skipped with a warning.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records = []
    for path in find_result_files([os.fspath(p) for p in paths]):
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            records.append(record_from_results(data, path))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            warnings.warn(f"skipping {path}: {exc}", stacklevel=2)
    return records


# --------------------------------------------------------------------------------------------- grouping
def ratio_key(ratio: Optional[float]) -> Optional[float]:
    return None if ratio is None else round(float(ratio), 6)


def summarize(values: Sequence[float]) -> tuple[float, Optional[float], int]:
    """(mean, sample std or None for one value, n)."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std, len(values)


#: settings that tell two runs of one method apart (a hybrid's split), as (config field, abbreviation, words)
VARIANT_FIELDS = {"structured_losparse": (("structured_ratio", "sr", "structured share"),)}


def method_variant(method: str, config: Mapping[str, Any]) -> str:
    """The method with the settings of `VARIANT_FIELDS`, e.g. "structured_losparse-sr0.5"; else the method."""
    parts = [f"{short}{config[name]:g}" for name, short, _ in VARIANT_FIELDS.get(method, ())
             if isinstance(config.get(name), (int, float))]
    return "-".join([method, *parts])


def method_label(method: str) -> str:
    """The display name of a method, or of a `method_variant` ("Structured → LoSparse (structured share 0.5)")."""
    base, *settings = method.split("-")
    label = METHOD_LABELS.get(base, base)
    words = {short: text for _, short, text in VARIANT_FIELDS.get(base, ())}
    shown = [f"{words[s.rstrip('0123456789.')]} {s[len(s.rstrip('0123456789.')):]}" for s in settings
             if s.rstrip("0123456789.") in words]
    return f"{label} ({', '.join(shown)})" if shown else label


def method_sort_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def quality_metrics(records: Sequence[Mapping[str, Any]]) -> list[str]:
    present = {m for r in records for m in r["metrics"]}
    names = [m for m in METRIC_ORDER if m in present]
    names += sorted(m for m in present if m in QUALITY_METRICS and m not in names)
    return names


def group_runs(records: Sequence[Mapping[str, Any]]) -> "OrderedDict[tuple, list[Mapping[str, Any]]]":
    """Records grouped by (model, task, method, ratio, distillation), in a stable display order."""
    groups: dict[tuple, list] = {}
    for record in records:
        key = (record["model"], record["task"], record["method"], ratio_key(record["ratio"]),
               record["distillation"])
        groups.setdefault(key, []).append(record)

    def order(key: tuple) -> tuple:
        model, task, method, ratio, distill = key
        return (model or "", task or "", distill, method_sort_key(method), -(ratio if ratio is not None else 2.0))

    return OrderedDict((k, groups[k]) for k in sorted(groups, key=order))


#: what `benchmarks.frontier` writes into each timed run directory
LATENCY_FILE = "latency.json"


def read_latency(directory: str) -> Optional[dict[str, Any]]:
    """The latency.json of a run directory, or None when there is none (a malformed one warns)."""
    path = os.path.join(directory, LATENCY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            body = json.load(f)
        latency = body["latency_ms"]
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not latency > 0:
            raise ValueError(f"latency_ms {latency!r} is not a positive number")
        return body
    except (OSError, ValueError, TypeError, KeyError) as exc:
        warnings.warn(f"ignoring {path}: {type(exc).__name__}: {exc}", stacklevel=2)
        return None
