"""The paper's figures, drawn with matplotlib on the Agg canvas (no pyplot, no display), as PNG files.

* `plot_metric_vs_ratio`: metric vs remaining ratio per method, paper points as hollow markers (Figure 5);
* `plot_kept_schedule`: the cubic kept fraction p_t of S with its mask-update steps (§3.2);
* `plot_importance_histograms`: neuron-importance histograms of two settings (Figures 1 and 4);
* `plot_singular_values`: normalised singular-value spectra of weight matrices (Figure 3);
* `plot_accuracy_vs_latency`: accuracy vs measured latency per method, the dense model as reference
  (the frontier of `benchmarks.frontier`, drawn from the runs' latency.json).

`python -m reproduce.report DIRS --plots OUT` calls them all through `write_plots`: one metric plot per
(task, metric) of the runs found, and, where the runs left the files they need, each distinct pruning
schedule (`trainer_state.json` of a checkpoint gives T), ITP vs LoSparse importances (the pruner state
of their newest checkpoints), the spectra of fine-tuned dense models (`model.safetensors`) and, for runs
timed by `python -m benchmarks.frontier`, accuracy vs latency (`latency.json`; nothing is timed here).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence

from losparse.core.checkpoint import list_checkpoints
from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear
from losparse.core.methods import METHOD_SPECS, final_kept_fraction
from losparse.core.pruner import PRUNER_META_FILE, PRUNER_STATE_FILE
from losparse.core.schedule import CubicSchedule, resolve_steps
from reproduce import paper_results
from reproduce.results import (
    RESULTS_FILE,
    group_runs,
    method_label,
    method_sort_key,
    quality_metrics,
    read_latency,
    summarize,
)


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
            lines.items(), key=lambda kv: (kv[0][0] or "", method_sort_key(kv[0][1]), kv[0][2]))):
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


#: marker per method on the accuracy-vs-latency plot (the dense fine-tuned model is a star)
FRONTIER_MARKERS = {"finetune": "*", "losparse": "o", "itp": "s", "structured": "^", "lowrank": "D", "movement": "v",
                    "lpaf": "P", "lowrank_prune_all": "X"}


def plot_accuracy_vs_latency(points: Sequence[Mapping[str, Any]], path: str, metric: str = "accuracy",
                             title: Optional[str] = None, subtitle: Optional[str] = None,
                             chance: Optional[float] = None) -> str:
    """Accuracy (y, %) vs forward latency (x, ms): one marker style per method, each point labelled by its ratio.

    `points`: dicts with method, ratio (requested remaining ratio), value (the metric in percent), latency_ms
    and optionally distillation. Points of one method and ratio (seeds) are averaged, error bars their sample
    std on both axes; a method's points are joined in ratio order. The dense fine-tuned model (method
    finetune) is a black star with dashed guides at its accuracy and latency: a point up and to the left of
    both guides beats it on both. The x axis starts at 0, so horizontal distances read as speed-ups.
    `chance` (a constant predictor's metric, %) is a dotted red line: points on it are collapsed models.
    """
    groups: dict[tuple, dict[Optional[float], list[Mapping[str, Any]]]] = {}
    for point in points:
        if point.get("value") is None or point.get("latency_ms") is None:
            continue
        key = (point["method"], bool(point.get("distillation")))
        ratio = None if point.get("ratio") is None else round(float(point["ratio"]), 6)
        groups.setdefault(key, {}).setdefault(ratio, []).append(point)
    fig, axes = _figure((6.5, 4.6))
    ax = axes[0][0]
    ordered = sorted(groups.items(), key=lambda kv: (method_sort_key(kv[0][0]), kv[0][1]))
    for index, ((method, distill), by_ratio) in enumerate(ordered):
        label = ("Fine-tune (dense)" if method == "finetune" else method_label(method)) + (
            " + distillation" if distill else "")
        rows = []
        for ratio, runs in sorted(by_ratio.items(), key=lambda kv: -(kv[0] if kv[0] is not None else 2.0)):
            x_mean, x_std, _ = summarize([r["latency_ms"] for r in runs])
            y_mean, y_std, _ = summarize([r["value"] for r in runs])
            rows.append((ratio, x_mean, x_std or 0.0, y_mean, y_std or 0.0))
        xs, ys = [r[1] for r in rows], [r[3] for r in rows]
        if method == "finetune" and not distill:
            ax.errorbar(xs, ys, xerr=[r[2] for r in rows], yerr=[r[4] for r in rows], color="black",
                        marker="*", markersize=13, linestyle="none", capsize=2, label=label, zorder=4)
            ax.axhline(ys[0], color="0.45", linestyle="--", linewidth=0.8)
            ax.axvline(xs[0], color="0.45", linestyle="--", linewidth=0.8)
            continue
        color = f"C{index % 10}"
        ax.errorbar(xs, ys, xerr=[r[2] for r in rows], yerr=[r[4] for r in rows], color=color,
                    marker=FRONTIER_MARKERS.get(method, "o"), markersize=7, linewidth=1.0, capsize=2, label=label,
                    zorder=3)
        for ratio, x, _, y, _ in rows:
            if ratio is not None:
                ax.annotate(f"{ratio * 100:g}%", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7,
                            color=color)
    if chance is not None:
        ax.axhline(chance, color="tab:red", linestyle=":", linewidth=1.0, label=f"chance ({chance:g} %)")
    ax.set_xlim(left=0)
    ax.set_xlabel("latency per forward (ms, median)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title((title or f"{metric} vs latency") + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    ax.grid(True, alpha=0.3)
    if groups:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no timed runs", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_kept_schedule(total_steps: int, warmup_steps: int, final_steps: int, final_fraction: float,
                       interval: int, path: str, variant: str = "paper") -> str:
    """The cubic kept fraction p_t of S over optimizer steps (§3.2), mask-update steps marked.

    Uses `losparse.core.schedule.CubicSchedule`, i.e. exactly what the pruner does: p_t = 1 before t_i,
    cubic decay to p_T until T − t_f, masks recomputed every `interval` steps during the decay and
    every step after it (`variant` "reference": the reference code's one-step-late schedule).
    """
    schedule = CubicSchedule(total_steps=total_steps, warmup_steps=warmup_steps, final_steps=final_steps,
                             final_fraction=final_fraction, interval=interval, variant=variant)
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
    ax.set_title(f"Cubic pruning schedule (T = {total_steps}"
                 + (", reference variant)" if variant == "reference" else ")"))
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


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def write_metric_plots(records: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
    """One metric-vs-ratio PNG per (task, quality metric) present in `records`; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    tasks = sorted({r["task"] for r in records}, key=lambda t: t or "")
    for task in tasks:
        task_records = [r for r in records if r["task"] == task]
        for metric in quality_metrics(task_records):
            name = f"{_slug(task or 'local')}-{_slug(metric)}.png"
            paths.append(plot_metric_vs_ratio(task_records, task, metric, os.path.join(out_dir, name)))
    return paths

# ------------------------------------------------------------------------------ figures from saved runs
# `python -m reproduce.report --plots` draws these for the runs whose directories hold the files they need.


def _read_results(run_dir: str) -> dict[str, Any]:

    with open(os.path.join(run_dir, RESULTS_FILE)) as f:
        return json.load(f)


def _newest_checkpoint_with(run_dir: str, filename: str) -> Optional[str]:
    """The newest `checkpoint-N` of a run directory that holds `filename` (None if none does)."""
    return next((c for c in list_checkpoints(run_dir) if os.path.isfile(os.path.join(c, filename))), None)


def run_schedule(run_dir: str) -> Optional[dict[str, Any]]:
    """The keyword arguments of `plot_kept_schedule` for the pruning run in `run_dir`, or None.

    From the newest checkpoint that holds the pruner state: T is `max_steps` of its trainer_state.json,
    t_i, t_f, ΔT and the variant come from the config the pruner recorded, p_T from the method and the
    run's achieved low-rank share (all_results.json's `compression`), as in `LoSparsePruner`. None for
    runs that did not prune or left no such checkpoint.
    """
    checkpoint = _newest_checkpoint_with(run_dir, PRUNER_META_FILE)
    if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        return None
    with open(os.path.join(checkpoint, PRUNER_META_FILE)) as f:
        config = json.load(f)["config"]
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        total = int(json.load(f)["max_steps"])
    spec = METHOD_SPECS[config["method"]]
    low_rank_share = (_read_results(run_dir).get("compression") or {}).get("low_rank_share") or 0.0
    return {
        "total_steps": total,
        "warmup_steps": resolve_steps(config.get("pruning_warmup_steps"), config["pruning_warmup_ratio"], total),
        "final_steps": resolve_steps(config.get("pruning_final_steps"), config["pruning_final_ratio"], total),
        "final_fraction": final_kept_fraction(spec, float(config["remaining_ratio"]), float(low_rank_share)),
        "interval": int(config["pruning_interval"]),
        "variant": config.get("pruning_variant", "paper"),
    }


def neuron_scores(run_dir: str) -> Optional[Any]:
    """The pruner's EMA neuron scores (eq. 4, all layers in one array) from the newest checkpoint that has them."""
    from safetensors import safe_open

    checkpoint = _newest_checkpoint_with(run_dir, PRUNER_STATE_FILE)
    if checkpoint is None:
        return None
    with safe_open(os.path.join(checkpoint, PRUNER_STATE_FILE), framework="np") as f:
        return f.get_tensor("neuron_ema")


def _run_label(record: Mapping[str, Any], with_method: bool = True) -> str:
    method = f"-{record['method']}" if with_method else ""
    ratio = f"-r{record['ratio']:g}" if record.get("ratio") is not None else ""
    seed = f"-s{record['seed']}" if record.get("seed") is not None else ""
    return _slug(f"{record['model'] or 'model'}-{record['task'] or 'local'}{method}{ratio}{seed}")


def _or_warn(what: str, path: str, fn: Any, *args: Any) -> Any:
    """`fn(*args)`, or None with a warning when a run's files cannot be read or drawn (one bad run spoils nothing)."""
    import warnings

    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - unreadable or inconsistent files of one run
        warnings.warn(f"no {what} plot for {path}: {type(exc).__name__}: {exc}", stacklevel=3)
        return None


def write_schedule_plots(records: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
    """One p_t plot per distinct schedule among the pruning runs (named by its parameters)."""
    paths: dict[tuple, str] = {}
    for record in records:
        schedule = _or_warn("schedule", record["path"], run_schedule, record["path"])
        if schedule is None or tuple(schedule.values()) in paths:
            continue
        name = (f"schedule-T{schedule['total_steps']}-ti{schedule['warmup_steps']}-tf{schedule['final_steps']}"
                f"-p{schedule['final_fraction']:.4f}-dT{schedule['interval']}-{schedule['variant']}.png")
        path = _or_warn("schedule", record["path"], lambda: plot_kept_schedule(**schedule,
                                                                                 path=os.path.join(out_dir, name)))
        if path is not None:
            paths[tuple(schedule.values())] = path
    return list(paths.values())


def write_importance_plots(records: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
    """ITP vs LoSparse neuron importances (Figures 1/4) for every (model, task, ratio, seed) that has both."""
    pairs: dict[tuple, dict[str, Any]] = {}
    for record in records:
        if record["method"] in ("itp", "losparse") and not record["distillation"]:
            key = (record["model"], record["task"], record["ratio"], record["seed"])
            pairs.setdefault(key, {}).setdefault(record["method"], record)
    paths = []
    for pair in pairs.values():
        if len(pair) < 2:
            continue
        scores = {m: _or_warn("importance", pair[m]["path"], neuron_scores, pair[m]["path"]) for m in pair}
        if any(s is None for s in scores.values()):
            continue
        path = os.path.join(out_dir, f"importance-{_run_label(pair['losparse'], with_method=False)}.png")
        paths.append(plot_importance_histograms({"all S neurons": scores["itp"]},
                                                {"all S neurons": scores["losparse"]}, path, ncols=1))
    return paths


def _spectrum(weights: str, path: str) -> str:
    from safetensors.torch import load_file

    return plot_singular_values(load_file(weights), path)


def write_spectrum_plots(records: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
    """Singular values of the weight matrices of every fine-tuned dense model saved as model.safetensors
    (Figure 3): its first 12 two-dimensional weights other than embeddings."""
    paths = []
    for record in records:
        weights = os.path.join(record["path"], "model.safetensors")
        if record["method"] != "finetune" or record["distillation"] or not os.path.isfile(weights):
            continue
        path = _or_warn("spectrum", record["path"], _spectrum, weights,
                        os.path.join(out_dir, f"spectrum-{_run_label(record)}.png"))
        if path is not None:
            paths.append(path)
    return paths


def frontier_groups(records: Sequence[Mapping[str, Any]]) -> "OrderedDict[tuple, list[dict[str, Any]]]":
    """The runs that have a latency.json, as accuracy-vs-latency points per (model, task, timing setting).

    The setting (batch size, sequence length, threads, device, CPU model) is part of the key: latencies
    measured differently are never put on one plot. Each point: method, ratio, distillation, latency_ms,
    the record's metrics (percent) and the path.
    """
    groups: "OrderedDict[tuple, list[dict[str, Any]]]" = OrderedDict()
    for record in records:
        latency = read_latency(record["path"])
        if latency is None:
            continue
        setting = (latency.get("batch_size"), latency.get("seq_len"), latency.get("threads"), latency.get("device"),
                   (latency.get("machine") or {}).get("cpu_model"))
        groups.setdefault((record["model"], record["task"], setting), []).append(
            {"method": record.get("variant", record["method"]), "ratio": record["ratio"],
             "distillation": record["distillation"],
             "latency_ms": float(latency["latency_ms"]), "metrics": record["metrics"], "path": record["path"]})
    return groups


def write_frontier_plots(records: Sequence[Mapping[str, Any]], out_dir: str,
                         file_name: Optional[str] = None, chance: Optional[float] = None) -> list[str]:
    """One accuracy-vs-latency PNG per (model, task, timing setting) among the runs with a latency.json.

    Files are `frontier-<model>-<task>-b<batch>-s<seq>-t<threads>.png`; with `file_name` (frontier.py's
    --plot) the only group gets exactly that name, several get `<stem>-<model>-<task>-...png`.
    """
    groups = frontier_groups(records)
    paths = []
    for (model, task, setting), points in groups.items():
        metrics = quality_metrics(points)
        if not metrics:
            continue
        metric = metrics[0]
        batch, seq, threads, device, cpu = setting
        suffix = f"{_slug(model or 'model')}-{_slug(task or 'local')}-b{batch}-s{seq}-t{threads}"
        if file_name and len(groups) == 1:
            name = file_name
        elif file_name:
            stem, ext = os.path.splitext(file_name)
            name = f"{stem}-{suffix}{ext or '.png'}"
        else:
            name = f"frontier-{suffix}.png"
        subtitle = (f"batch {batch} × {seq} tokens, {threads} thread{'s' if threads != 1 else ''} on {device}"
                    + (f" ({cpu})" if cpu and device == "cpu" else ""))
        title = f"{model or 'model'} · {task or 'local data'}: {metric} vs latency"
        paths.append(plot_accuracy_vs_latency([{**p, "value": p["metrics"].get(metric)} for p in points],
                                              os.path.join(out_dir, name), metric=metric, title=title,
                                              subtitle=subtitle, chance=chance))
    return paths


def write_plots(records: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
    """Every figure the runs allow (the report's `--plots`): metric vs ratio per (task, metric), then
    the schedules, importances and spectra that the runs' saved files allow, and accuracy vs latency for
    the runs that `benchmarks.frontier` timed (their latency.json; nothing is measured here)."""
    paths = write_metric_plots(records, out_dir)
    for write in (write_schedule_plots, write_importance_plots, write_spectrum_plots, write_frontier_plots):
        paths += write(records, out_dir)
    return paths


def plot_recovery_curves(cells: Sequence[Mapping[str, Any]], path: str) -> str:
    """Held-out perplexity (log scale) vs fine-tuning steps, one panel per remaining ratio, one line per row; the
    dense row (ratio 1) is drawn in every panel as the reference (`benchmarks.clm_recovery`'s cells)."""
    ratios = sorted({c["ratio"] for c in cells if c["row"] != "dense"}) or [1.0]
    dense = [c for c in cells if c["row"] == "dense"]
    fig, axes = _figure(figsize=(5.0 * len(ratios), 4.0), ncols=len(ratios), sharey=True)
    for ax, ratio in zip(axes[0], ratios):
        for cell in [c for c in cells if c["ratio"] == ratio and c["row"] != "dense"] + dense:
            points = sorted(cell["points"], key=lambda p: p["steps"])
            style = {"color": "black", "linestyle": "--"} if cell["row"] == "dense" else {}
            ax.plot([p["steps"] for p in points], [p["perplexity"] for p in points], marker="o",
                    label=cell["row"], **style)
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(f"remaining ratio {ratio:g}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity")
    axes[0][-1].legend()
    return _save(fig, path)
