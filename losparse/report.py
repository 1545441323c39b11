"""Gather finished runs, compare them with the paper's tables, and draw the paper's figures.

    python -m losparse.report outputs/ [more dirs...] [--table 1|2|3|4|5|claim|all]
                              [--plots OUT_DIR] [--markdown OUT.md]

Every run script writes `<output_dir>/all_results.json`; `collect_results` finds them all (recursively)
and turns each into one flat record. Records are matched to the paper by the JSON fields only
(model_name_or_path, task_name, method, losparse_config.remaining_ratio, seed), never by directory
names; the path is kept as a label.

Metrics are put on the paper's scale, percent: GLUE-style fractions (accuracy, F1 of MRPC/QQP,
Matthews correlation, Pearson/Spearman) are multiplied by 100; SQuAD exact_match/f1 and ROUGE are
already percents and are kept. Several seeds of one (model, task, method, ratio) are shown as
mean ± sample standard deviation.

Runs whose all_results.json marks knowledge distillation ("distillation"/"distill" true, or a
"teacher_model_name_or_path") count for Table 5 only; the full-model rows (method finetune) count for
every table.

Plots (matplotlib, written through the Agg canvas, PNG): metric vs remaining ratio per method
(Figure 5 style), the cubic kept-fraction schedule p_t with its mask-update steps (§3.2), neuron
importance histograms of two settings (Figures 1 and 4 style) and normalised singular-value spectra
of weight matrices (Figure 3 style).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import warnings
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from . import paper_results
from .paper_results import METHOD_LABELS, TABLES, as_tuple, canonical_model

RESULTS_FILE = "all_results.json"

#: Quality metrics that runs report as fractions in [0, 1] (GLUE, losparse/metrics.py) -> x100.
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
METHOD_ORDER = ("finetune", "lead3", "losparse", "itp", "movement", "lowrank", "lowrank_prune_all")
TABLE_CHOICES = ("1", "2", "3", "4", "5", "claim", "all")
NO_RUN = "—"
MINUS = "−"


# ==================================================================================================
# Collecting
# ==================================================================================================
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


# ==================================================================================================
# Aggregating and formatting
# ==================================================================================================
def _ratio_key(ratio: Optional[float]) -> Optional[float]:
    return None if ratio is None else round(float(ratio), 6)


def summarize(values: Sequence[float]) -> tuple[float, Optional[float], int]:
    """(mean, sample std or None for one value, n)."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std, len(values)


def format_number(value: float, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    text = f"{value:.{decimals}f}"
    return text.replace("-", MINUS) if text.startswith("-") else text


def format_diff(diff: float, decimals: int) -> str:
    rounded = round(diff, decimals)
    if math.isnan(diff):
        return "nan"
    if rounded == 0:
        return "±" + f"{0:.{decimals}f}"
    return ("+" if rounded > 0 else MINUS) + f"{abs(rounded):.{decimals}f}"


def format_ours(values: Sequence[float], decimals: int) -> str:
    """'84.1' for one run, '84.1 ± 0.2' for several (sample std), '—' for none."""
    if not values:
        return NO_RUN
    mean, std, _ = summarize(values)
    text = format_number(mean, decimals)
    if std is not None:
        text += f" ± {format_number(std, decimals)}"
    return text


_MISSING = object()  # the paper prints nothing for this metric (different from N.A.)


def format_cell(values: Sequence[float], paper: Any, decimals: int) -> str:
    """One metric: ours beside the paper's number and ours − paper, e.g. '84.1 (paper 84.5, −0.4)'."""
    ours = format_ours(values, decimals)
    if paper is _MISSING:
        return ours if values else ""
    if paper is None:
        return f"{ours} (paper N.A.)"
    paper_text = f"{float(paper):.{decimals}f}"
    if not values:
        return f"{ours} (paper {paper_text})"
    mean = summarize(values)[0]
    return f"{ours} (paper {paper_text}, {format_diff(mean - float(paper), decimals)})"


def format_ratio(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{ratio * 100:g}%"


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _method_sort_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


# ==================================================================================================
# Tables
# ==================================================================================================
def _matches_column(record: Mapping[str, Any], column: Mapping[str, Any], table: Mapping[str, Any]) -> bool:
    if record["task"] != column["task"]:
        return False
    if record["method"] != "lead3" and canonical_model(record["model"]) != column["model"]:
        return False
    if record["method"] in ("finetune", "lead3"):
        return True
    return record["distillation"] == bool(table.get("distillation"))


def _paper_metric(cell: Any, index: int) -> Any:
    values = as_tuple(cell)
    if values is None:
        return None
    return values[index] if index < len(values) else _MISSING


def render_paper_table(records: Sequence[Mapping[str, Any]], table_id: str) -> str:
    """Markdown for one of the paper's Tables 1–5 with our runs beside the printed numbers."""
    table = TABLES[str(table_id)]
    decimals = table["decimals"]
    columns = table["columns"]
    # (method, ratio) -> column key -> list of per-run metric dicts
    ours: dict[tuple, dict[str, list[dict[str, float]]]] = {}
    for record in records:
        for column in columns:
            if _matches_column(record, column, table):
                key = (record["method"], _ratio_key(record["ratio"]) if record["method"] != "lead3" else None)
                ours.setdefault(key, {}).setdefault(column["key"], []).append(record["metrics"])

    paper_rows = OrderedDict(((m, _ratio_key(r)), cells) for (m, r), cells in table["results"].items())
    extra = sorted((k for k in ours if k not in paper_rows),
                   key=lambda k: (-(k[1] if k[1] is not None else 2.0), _method_sort_key(k[0])))
    header = ["Ratio", "Method"] + [c["header"] for c in columns]
    rows = []
    for key in list(paper_rows) + extra:
        method, ratio = key
        label = table.get("row_labels", {}).get(key, method_label(method))
        if key not in paper_rows:
            label += " (not in paper)"
        cells = [format_ratio(ratio), label]
        for column in columns:
            runs = ours.get(key, {}).get(column["key"], [])
            printed = paper_rows.get(key, {}).get(column["key"], _MISSING)
            parts = []
            for index, metric in enumerate(column["metrics"]):
                values = [m[metric] for m in runs if metric in m]
                paper = _MISSING if printed is _MISSING else _paper_metric(printed, index)
                parts.append(format_cell(values, paper, decimals))
            cells.append(" / ".join(parts) if any(parts) else "")
        rows.append(cells)
    n_runs = sum(len(v) for cols in ours.values() for v in cols.values())
    lines = [
        f"### Table {table['id']}: {table['title']}",
        "",
        f"Paper: {table['source']}",
        f"Cells: ours (mean ± sample std over seeds when several) with the paper's number and ours − paper; "
        f"{NO_RUN} = no run of ours; N.A. = the paper's run did not converge. Runs matched: {n_runs}.",
        "",
        _markdown_table(header, rows),
    ]
    return "\n".join(lines)


def _quality_metrics(records: Sequence[Mapping[str, Any]]) -> list[str]:
    present = {m for r in records for m in r["metrics"]}
    names = [m for m in METRIC_ORDER if m in present]
    names += sorted(m for m in present if m in QUALITY_METRICS and m not in names)
    return names


def group_runs(records: Sequence[Mapping[str, Any]]) -> "OrderedDict[tuple, list[Mapping[str, Any]]]":
    """Records grouped by (model, task, method, ratio, distillation), in a stable display order."""
    groups: dict[tuple, list] = {}
    for record in records:
        key = (record["model"], record["task"], record["method"], _ratio_key(record["ratio"]),
               record["distillation"])
        groups.setdefault(key, []).append(record)

    def order(key: tuple) -> tuple:
        model, task, method, ratio, distill = key
        return (model or "", task or "", distill, _method_sort_key(method), -(ratio if ratio is not None else 2.0))

    return OrderedDict((k, groups[k]) for k in sorted(groups, key=order))


def render_generic_table(records: Sequence[Mapping[str, Any]], decimals: int = 2,
                         title: str = "All runs") -> str:
    """Task × method × ratio with mean ± std over seeds, one Markdown table per (model, task)."""
    if not records:
        return f"### {title}\n\nNo runs found."
    by_task: dict[tuple, list] = {}
    for record in records:
        by_task.setdefault((record["model"], record["task"]), []).append(record)
    parts = [f"### {title}", "",
             "Mean ± sample std over seeds (metrics in percent); ratio = requested remaining ratio, "
             "achieved = counted from the saved tensors."]
    repeated_seeds = []
    for (model, task), task_records in sorted(by_task.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or "")):
        metrics = _quality_metrics(task_records)
        header = ["Method", "Ratio", "Achieved", "Runs", "Seeds"] + metrics
        rows = []
        for (_, _, method, ratio, distill), runs in group_runs(task_records).items():
            achieved = [r["achieved_ratio"] for r in runs if r["achieved_ratio"] is not None]
            seeds = sorted({str(r["seed"]) for r in runs if r["seed"] is not None})
            label = method_label(method) + (" + distillation" if distill else "")
            if len(runs) > len(seeds):
                repeated_seeds.append(f"{label} {format_ratio(ratio)}")
            row = [label, format_ratio(ratio),
                   f"{statistics.fmean(achieved):.4f}" if achieved else "",
                   str(len(runs)), ", ".join(seeds)]
            for metric in metrics:
                row.append(format_ours([r["metrics"][metric] for r in runs if metric in r["metrics"]], decimals))
            rows.append(row)
        parts += ["", f"**{model or 'unknown model'} · {task or 'local data'}**", "", _markdown_table(header, rows)]
    if repeated_seeds:
        parts += ["", f"Warning: {', '.join(repeated_seeds)} average several runs with the same seed, i.e. runs with "
                      "other settings (epochs, learning rate, ...); report their directories separately."]
    return "\n".join(parts)


def _covered_by_paper_table(record: Mapping[str, Any], table_id: str) -> bool:
    table = TABLES[table_id]
    return any(_matches_column(record, column, table) for column in table["columns"])


def render_table(records: Sequence[Mapping[str, Any]], table_id: str) -> str:
    """Markdown for `table_id`: '1'–'5' (a paper table, ours beside the paper's numbers), 'claim'
    (the generic task × method × ratio table of every run) or 'all' (the paper tables that have at
    least one of our runs, then the generic table)."""
    table_id = str(table_id)
    if table_id in TABLES:
        return render_paper_table(records, table_id)
    if table_id == "claim":
        return render_generic_table(records)
    if table_id == "all":
        parts = [render_paper_table(records, t) for t in TABLES
                 if any(_covered_by_paper_table(r, t) for r in records)]
        parts.append(render_generic_table(records))
        return "\n\n".join(parts)
    raise ValueError(f"unknown table {table_id!r}; choose one of {', '.join(TABLE_CHOICES)}")


# ==================================================================================================
# Plots
# ==================================================================================================
def _figure(figsize: tuple[float, float] = (6.0, 4.0), nrows: int = 1, ncols: int = 1, **kwargs: Any):
    """A matplotlib Figure drawn on the Agg canvas (no pyplot, no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _save(fig: Any, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


def plot_metric_vs_ratio(records: Sequence[Mapping[str, Any]], task: Optional[str], metric: str, path: str,
                         model: Optional[str] = None, show_paper: bool = True) -> str:
    """Metric vs remaining ratio, one line per method (Figure 5 style), error bars = std over seeds.

    Full-model (finetune) and Lead-3 runs have no ratio to vary and are drawn as horizontal lines. With
    `show_paper`, the paper's numbers for the same model / task / metric / method are drawn as hollow
    markers in the method's colour. Runs of several models are told apart in the legend.
    """
    selected = [r for r in records if r["task"] == task and metric in r["metrics"]
                and (model is None or r["model"] == model)]
    fig, axes = _figure()
    ax = axes[0][0]
    colors = {}
    models = sorted({r["model"] or "" for r in selected})
    groups = group_runs(selected)
    lines: dict[tuple, list] = {}
    for (model_name, _, method, ratio, distill), runs in groups.items():
        lines.setdefault((model_name, method, distill), []).append((ratio, [r["metrics"][metric] for r in runs]))
    for index, ((model_name, method, distill), points) in enumerate(sorted(
            lines.items(), key=lambda kv: (kv[0][0] or "", _method_sort_key(kv[0][1]), kv[0][2]))):
        label = method_label(method) + (" + distillation" if distill else "")
        if len(models) > 1:
            label = f"{model_name} · {label}"
        color = f"C{index % 10}"
        colors[(model_name, method, distill)] = color
        if method in ("finetune", "lead3") or all(r is None for r, _ in points):
            mean, std, _ = summarize([v for _, vs in points for v in vs])
            ax.axhline(mean, color=color, linestyle="--", linewidth=1.2, label=f"{label}")
            if std:
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
            continue
        points = sorted((r, vs) for r, vs in points if r is not None)
        xs = [r for r, _ in points]
        stats = [summarize(vs) for _, vs in points]
        ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], color=color, marker="o",
                    markersize=4, capsize=3, label=label)
    if show_paper:
        for (model_name, method, distill), color in colors.items():
            if method in ("finetune", "lead3"):
                continue
            paper = [(r, v) for r, v in paper_results.paper_points(model_name, task, metric, method, distill)
                     if r is not None and v is not None]
            if paper:
                paper.sort()
                ax.plot([r for r, _ in paper], [v for _, v in paper], linestyle=":", marker="s", color=color,
                        markerfacecolor="none", label=f"{method_label(method)} (paper)")
    ax.set_xlabel("remaining ratio")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{task or 'local data'}: {metric} vs remaining ratio" + (f" ({model})" if model else ""))
    ax.grid(True, alpha=0.3)
    if selected:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_kept_schedule(total_steps: int, warmup_steps: int, final_steps: int, final_fraction: float,
                       interval: int, path: str) -> str:
    """The cubic kept fraction p_t of S over optimizer steps (§3.2), mask-update steps marked.

    Uses `losparse.schedule.CubicSchedule`, i.e. exactly what the pruner does: p_t = 1 before t_i,
    cubic decay to p_T until T − t_f, masks recomputed every `interval` steps during the decay and
    every step after it.
    """
    from .schedule import CubicSchedule

    schedule = CubicSchedule(total_steps=total_steps, warmup_steps=warmup_steps, final_steps=final_steps,
                             final_fraction=final_fraction, interval=interval)
    steps = list(range(1, total_steps + 1))
    kept = [schedule.kept_fraction(t) for t in steps]
    updates = [t for t in steps if schedule.is_mask_update_step(t)]
    fig, axes = _figure((7.0, 4.0))
    ax = axes[0][0]
    ax.axvspan(0, warmup_steps, color="0.85", alpha=0.6, label=f"warm-up t_i = {warmup_steps}")
    ax.axvspan(schedule.decay_end, total_steps, color="C2", alpha=0.12, label=f"final phase t_f = {final_steps}")
    ax.plot(steps, kept, color="C0", linewidth=1.5, label="p_t (kept fraction of S)")
    ax.plot(updates, [schedule.kept_fraction(t) for t in updates], linestyle="none", marker="|", color="C3",
            markersize=7, label=f"mask update ({len(updates)} steps, ΔT = {interval})")
    ax.axhline(final_fraction, color="0.4", linestyle=":", linewidth=1, label=f"p_T = {final_fraction:.4g}")
    ax.set_xlim(0, total_steps)
    ax.set_ylim(min(0.0, final_fraction) - 0.02, 1.05)
    ax.set_xlabel("optimizer step t")
    ax.set_ylabel("p_t")
    ax.set_title(f"Cubic pruning schedule (T = {total_steps})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_importance_histograms(before: Mapping[str, Any], after: Mapping[str, Any], path: str,
                               labels: tuple[str, str] = ("ITP", "LoSparse"), bins: int = 40,
                               ncols: int = 4, log_y: bool = False) -> str:
    """Neuron-importance histograms per layer for two settings (Figures 1 and 4 style).

    `before` and `after` map a layer name to that layer's neuron scores (array-like, any shape; they
    are flattened). Layers present in either mapping get a panel, in the order first seen; the two
    settings share the bins of a panel. `labels` names the two settings in the legend.
    """
    import numpy as np

    names = list(dict.fromkeys(list(before) + list(after)))
    if not names:
        raise ValueError("plot_importance_histograms: no layers given")
    ncols = max(1, min(ncols, len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure((3.2 * ncols, 2.4 * nrows), nrows, ncols)
    for index, name in enumerate(names):
        ax = axes[index // ncols][index % ncols]
        data = []
        for source in (before, after):
            values = source.get(name)
            data.append(None if values is None else _to_numpy(values).astype(np.float64).ravel())
        finite = [d[np.isfinite(d)] for d in data if d is not None]
        finite = [d for d in finite if d.size]
        if finite:
            low = min(float(d.min()) for d in finite)
            high = max(float(d.max()) for d in finite)
            edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
            for values, label, color in zip(data, labels, ("C0", "C1")):
                if values is not None and values.size:
                    ax.hist(values[np.isfinite(values)], bins=edges, alpha=0.55, color=color, label=label)
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
        if log_y:
            ax.set_yscale("log")
        if index == 0:
            ax.legend(fontsize=7)
    for index in range(len(names), nrows * ncols):
        axes[index // ncols][index % ncols].set_visible(False)
    fig.suptitle(f"Neuron importance: {labels[0]} vs {labels[1]}")
    fig.supxlabel("importance score", fontsize=8)
    fig.supylabel("neurons", fontsize=8)
    return _save(fig, path)


def _to_numpy(values: Any):
    import numpy as np

    if hasattr(values, "detach"):
        return values.detach().float().cpu().numpy()
    return np.asarray(values)


def _weight_matrices(model_or_state_dict: Any) -> "OrderedDict[str, Any]":
    """Name -> 2-D weight tensor. For a model, LoSparse layers contribute their effective W = U·V + S."""
    import torch

    matrices: "OrderedDict[str, Any]" = OrderedDict()
    if isinstance(model_or_state_dict, torch.nn.Module):
        from .layers import CompactLoSparseLinear, LoSparseLinear

        covered = set()
        for name, module in model_or_state_dict.named_modules():
            if isinstance(module, LoSparseLinear):
                matrices[f"{name}.weight"] = module.effective_weight()
                covered.add(name)
            elif isinstance(module, CompactLoSparseLinear):
                matrices[f"{name}.weight"] = module.dense_weight()
                covered.add(name)
        for name, tensor in model_or_state_dict.state_dict().items():
            owner = name.rsplit(".", 1)[0]
            if owner in covered or any(owner.startswith(c + ".") for c in covered):
                continue
            if tensor.ndim == 2 and name.endswith("weight"):
                matrices[name] = tensor
        return matrices
    for name, tensor in model_or_state_dict.items():
        tensor = torch.as_tensor(tensor)
        if tensor.ndim == 2 and tensor.is_floating_point():
            matrices[name] = tensor
    return matrices


def plot_singular_values(model_or_state_dict: Any, path: str, layer_patterns: Optional[Sequence[str]] = None,
                         top_k: Optional[int] = None, max_matrices: int = 12) -> str:
    """Singular-value spectra of selected 2-D weight matrices, each divided by its largest (Figure 3).

    `model_or_state_dict`: an nn.Module (LoSparse layers give their effective weight) or a mapping of
    names to tensors. `layer_patterns`: regular expressions searched in the names (any match selects);
    by default every 2-D weight except embeddings, at most `max_matrices` of them. `top_k`: plot only
    the k largest singular values. Computed with torch.linalg.svdvals in float32 on the CPU.
    """
    import torch

    matrices = _weight_matrices(model_or_state_dict)
    if layer_patterns:
        compiled = [re.compile(p) for p in layer_patterns]
        selected = [(n, w) for n, w in matrices.items() if any(c.search(n) for c in compiled)]
    else:
        selected = [(n, w) for n, w in matrices.items() if not re.search(r"embed|shared", n)][:max_matrices]
    if not selected:
        raise ValueError("plot_singular_values: no 2-D weight matrix matches "
                         f"{list(layer_patterns) if layer_patterns else 'the default selection'}")
    fig, axes = _figure((6.5, 4.0))
    ax = axes[0][0]
    for name, weight in selected:
        with torch.no_grad():
            values = torch.linalg.svdvals(weight.detach().to(device="cpu", dtype=torch.float32))
        if top_k is not None:
            values = values[:top_k]
        largest = float(values[0]) if values.numel() and float(values[0]) > 0 else 1.0
        ax.plot(range(1, values.numel() + 1), (values / largest).numpy(), linewidth=1.1, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("index of singular value")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title("Singular values of weight matrices (normalised by the largest)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=6)
    return _save(fig, path)


def importance_by_layer(pruner: Any, model: Any) -> dict[str, Any]:
    """A LoSparsePruner's current neuron scores (EMA of eq. 4) per layer name, as numpy arrays —
    the input `plot_importance_histograms` expects."""
    names = {id(module): name for name, module in model.named_modules()}
    scores = pruner.importance.per_layer_scores()
    return {names.get(id(layer), f"layer{i}"): _to_numpy(s) for i, (layer, s) in enumerate(zip(pruner.layers, scores))}


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def write_metric_plots(records: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
    """One metric-vs-ratio PNG per (task, quality metric) present in `records`; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    tasks = sorted({r["task"] for r in records}, key=lambda t: t or "")
    for task in tasks:
        task_records = [r for r in records if r["task"] == task]
        for metric in _quality_metrics(task_records):
            name = f"{_slug(task or 'local')}-{_slug(metric)}.png"
            paths.append(plot_metric_vs_ratio(task_records, task, metric, os.path.join(out_dir, name)))
    return paths


# ==================================================================================================
# Command line
# ==================================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m losparse.report",
        description="Collect the all_results.json of finished runs, compare them with the LoSparse paper's "
                    "Tables 1-5 (ours beside the paper's numbers, with the difference), and draw metric vs "
                    "remaining-ratio plots. Runs are matched by their JSON fields, not by directory names.",
    )
    parser.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR",
                        help="Directories searched recursively for all_results.json (or such files themselves).")
    parser.add_argument("--table", choices=TABLE_CHOICES, default="all",
                        help="Paper table 1-5 (1: DeBERTaV3 GLUE, 2: BERT GLUE, 3: SQuAD, 4: BART summarization, "
                             "5: distillation), 'claim' for the generic task x method x ratio table of every run, "
                             "or 'all' (default): the paper tables with at least one run, then the generic table.")
    parser.add_argument("--plots", metavar="OUT_DIR",
                        help="Write one metric-vs-remaining-ratio PNG per (task, metric) found into OUT_DIR.")
    parser.add_argument("--markdown", metavar="OUT.md",
                        help="Also write the report (tables, and links to the plots) to this Markdown file.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [p for p in args.results_dirs if not os.path.exists(p)]
    if missing:
        parser.error(f"no such file or directory: {', '.join(missing)}")
    records = collect_results(args.results_dirs)
    if not records:
        print(f"error: no readable {RESULTS_FILE} under {', '.join(args.results_dirs)}", file=sys.stderr)
        return 1
    text = render_table(records, args.table)
    plots: list[str] = []
    if args.plots:
        plots = write_metric_plots(records, args.plots)
    print(text)
    for plot in plots:
        print(f"wrote {plot}", file=sys.stderr)
    if args.markdown:
        document = f"# LoSparse reproduction report\n\n{len(records)} runs from {', '.join(args.results_dirs)}.\n\n"
        document += text + "\n"
        if plots:
            base = os.path.dirname(os.path.abspath(args.markdown))
            document += "\n### Plots\n\n" + "\n".join(
                f"![{os.path.basename(p)}]({os.path.relpath(os.path.abspath(p), base)})" for p in plots) + "\n"
        directory = os.path.dirname(os.path.abspath(args.markdown))
        os.makedirs(directory, exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(document)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
