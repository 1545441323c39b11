"""Accuracy vs latency of finished runs: every saved model loaded as a user would, timed side by side.

    python -m benchmarks.frontier outputs/frontier [MORE_ROOTS ...] [--batch_size 8] [--seq_len 128]
        [--threads 1] [--repeats 30] [--warmup 3] [--only REGEX] [--optimize] [--device cpu]
        [--json OUT.json] [--markdown OUT.md] [--plot OUT.png]

A *cell* is a run directory holding `all_results.json` and the model the run saved (`scripts/reproduce.py
frontier` makes them: LoSparse, ITP, structured and low-rank pruning at 20 % and 10 % plus the fine-tuned
dense model). Each model is loaded the way its method saved it:

  * LoSparse-family methods (losparse, itp, movement, lowrank, lpaf, ...): `losparse.load(dir, optimize=False)`,
    the compact layers exactly as saved, recorded forms not applied. ITP and movement keep no U·V: each
    layer is a `CompactLoSparseLinear` of rank 0, i.e. one GEMM over the kept rows of S whose outputs are
    added into a bias-filled output (index_add, or a slice add when the kept rows are contiguous); a layer
    with no kept row is its bias alone. Low-rank I keeps U·V and no S: two thin GEMMs per layer.
  * structured: `losparse.methods.structured.load_structured`, a plain transformers model with fewer heads/neurons.
  * finetune: the class named by config.json's `architectures`, `from_pretrained`: the dense reference.

`--optimize` also times each LoSparse-family model as `losparse.load(..., optimize=True, example_inputs=batch)`
(the fastest exact form per layer, measured on this machine first) and reports it beside the plain time.

All models are timed in one process on one random token batch (batch × seq ids from a fixed seed, below the
smallest vocabulary; full attention mask): warm-up, then round-robin repeats (a, b, c, a, b, c, ...;
`benchmarks.common.interleaved_latency_ms`, so a burst of load from elsewhere slows every model
alike); the number is the median. One torch thread by default: on a shared machine more threads than free
cores times the scheduler, not the model. The timing is judged (`judge_timing`: load average, spread of the
repeats) and an unreliable one says so everywhere it is printed.

Per cell `latency.json` (`LATENCY_FILE`) records the latency, shape, threads, versions, machine, date and how
the model was loaded. stdout gets a Markdown table per (model, task) — method, ratio requested / achieved,
accuracy, latency, speed-up vs dense, parameters — and the Pareto frontier in words; `--plot` draws accuracy
vs latency (`benchmarks.plots.write_frontier_plots`), which `python -m reproduce.report DIRS --plots OUT`
redraws from the latency.json files without timing anything.

The report reads `LATENCY_FILE` through `reproduce.results.read_latency`, which imports no torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import losparse
from benchmarks.common import (
    cpu_name,
    interleaved_latency_ms,
    judge_timing,
    load_average,
    parameter_count,
    timing_line,
    write_json,
)
from losparse.core.decompose import losparse_layers
from losparse.core.errors import LoSparseUsageError
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE
from losparse.methods import method_for_directory
from losparse.methods.structured.serialization import STRUCTURE_FILE, load_structured
from reproduce.results import (
    LATENCY_FILE,
    RESULTS_FILE,
    find_result_files,
    method_label,
    method_sort_key,
    quality_metrics,
    ratio_key,
    record_from_results,
)

#: written into each timed cell directory
#: the dense weight files `from_pretrained` reads (one of them marks a saved plain transformers model)
DENSE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
#: seed of the random token batch, the same for every model and every invocation
TOKEN_SEED = 0
#: model types whose position table holds pad_token_id + 1 extra rows (RoBERTa's position ids start there)
OFFSET_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert")
MINUS = "−"
#: the methods whose points the verdict is about: LoSparse and the methods built on it
LOSPARSE_METHODS = ("losparse", "structured_losparse", "cofi_losparse")


# ------------------------------------------------------------------------------------------------ cells


@dataclass
class Cell:
    """One finished run with a saved model: where it is, what all_results.json says, how to load it."""

    path: str
    record: dict[str, Any]      # `reproduce.results.record_from_results` of its all_results.json
    kind: str                   # "losparse"/"method" (losparse.load), "structured" (load_structured), "dense"
    config: dict[str, Any]      # the model's config.json
    label: str = ""             # unique short name: the path below the cells' common directory

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def is_dense_reference(self) -> bool:
        return self.method == "finetune" and self.kind == "dense" and not self.record["distillation"]

    @property
    def group(self) -> tuple[Optional[str], Optional[str]]:
        """(model, task): the cells compared in one table and plot."""
        return self.record["model"], self.record["task"]


def saved_model_kind(directory: str) -> Optional[str]:
    """How the model saved in `directory` loads: "losparse", "structured", "method" (another method's output,
    through `losparse.load`), "dense", or None (none saved)."""
    if os.path.isfile(os.path.join(directory, LOSPARSE_CONFIG_FILE)):
        return "losparse"
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return None
    if os.path.isfile(os.path.join(directory, STRUCTURE_FILE)):
        return "structured"
    if method_for_directory(directory) is not None:
        return "method"
    if any(os.path.isfile(os.path.join(directory, name)) for name in DENSE_WEIGHT_FILES):
        return "dense"
    return None


def find_cells(roots: Sequence[str], only: Optional[str] = None) -> tuple[list[Cell], list[str]]:
    """Every run directory under `roots` with all_results.json and a saved model, and why others were skipped.

    `only`: keep the directories whose path matches this regular expression (re.search). Cells are sorted by
    (model, task, method order, ratio descending, seed); each gets a unique `label`.
    """
    missing = [root for root in roots if not os.path.exists(root)]
    if missing:
        raise LoSparseUsageError(f"no such output root: {', '.join(missing)}")
    cells: list[Cell] = []
    skipped: list[str] = []
    for results_path in find_result_files(roots):
        directory = os.path.dirname(results_path)
        if only and not re.search(only, directory):
            continue
        try:
            with open(results_path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            record = record_from_results(data, results_path)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            skipped.append(f"{directory}: unreadable {RESULTS_FILE} ({exc})")
            continue
        kind = saved_model_kind(directory)
        if kind is None:
            skipped.append(f"{directory}: no saved model beside {RESULTS_FILE}")
            continue
        try:
            with open(os.path.join(directory, "config.json")) as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            skipped.append(f"{directory}: unreadable config.json ({exc})")
            continue
        if config.get("is_encoder_decoder"):
            skipped.append(f"{directory}: an encoder-decoder model ({config.get('model_type')}); only encoder "
                           "forwards are timed")
            continue
        cells.append(Cell(directory, record, kind, config))
    cells.sort(key=lambda c: (c.record["model"] or "", c.record["task"] or "", method_sort_key(c.method),
                              -(c.record["ratio"] if c.record["ratio"] is not None else 2.0), str(c.record["seed"]),
                              c.path))
    if cells:
        common = os.path.commonpath([c.path for c in cells]) if len(cells) > 1 else os.path.dirname(cells[0].path)
        for c in cells:
            c.label = os.path.relpath(c.path, common)
    return cells, skipped


def position_limit(config: Mapping[str, Any]) -> Optional[int]:
    """The longest sequence the model's position embeddings allow (None: the config sets no limit)."""
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    if config.get("model_type") in OFFSET_POSITION_TYPES:
        limit -= int(config.get("pad_token_id") or 0) + 1
    return limit


def check_batch_shape(cells: Sequence[Cell], batch_size: int, seq_len: int) -> int:
    """Usage errors for a batch the models cannot take; returns the vocabulary size every model accepts."""
    limits = [(position_limit(c.config), c) for c in cells]
    limits = [(limit, c) for limit, c in limits if limit is not None]
    if limits:
        limit, cell = min(limits, key=lambda lc: lc[0])
        if seq_len > limit:
            raise LoSparseUsageError(f"--seq_len {seq_len} is longer than {cell.label} allows "
                                     f"(max_position_embeddings: {limit} tokens); use --seq_len {limit} or less")
    vocabularies = []
    for c in cells:
        vocab = c.config.get("vocab_size")
        if not isinstance(vocab, int) or vocab < 1:
            raise LoSparseUsageError(f"{c.path}/config.json has no vocab_size (got {vocab!r}): cannot draw its tokens")
        vocabularies.append(vocab)
    return min(vocabularies)

# ------------------------------------------------------------------------------------ loading and timing


def token_batch(batch_size: int, seq_len: int, vocab_size: int, device: Any) -> dict[str, Any]:
    """input_ids (batch, seq) drawn uniformly below `vocab_size` with `TOKEN_SEED`, and a full attention mask."""
    import torch

    generator = torch.Generator().manual_seed(TOKEN_SEED)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _recorded_forms(directory: str) -> dict[str, str]:

    try:
        with open(os.path.join(directory, LOSPARSE_CONFIG_FILE)) as f:
            return dict(json.load(f).get("forms") or {})
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def load_model(cell: Cell, device: Any, optimize_inputs: Optional[dict[str, Any]] = None) -> tuple[Any, str]:
    """(the cell's model in eval mode on `device`, how it was loaded in words).

    `optimize_inputs` (LoSparse-family cells only): load with `optimize=True` measuring on these inputs.
    """
    if cell.kind == "losparse":

        if optimize_inputs is not None:
            model = losparse.load(cell.path, device=device, optimize=True, example_inputs=optimize_inputs)
            return model, "losparse.load(optimize=True, example_inputs=the timed batch)"
        model = losparse.load(cell.path, device=device, optimize=False)
        ignored = " (its recorded forms not applied)" if _recorded_forms(cell.path) else ""
        return model, f"losparse.load(optimize=False): compact layers as saved{ignored}"
    if cell.kind == "method":
        return losparse.load(cell.path, device=device), "losparse.load: a plain smaller transformers model"
    if cell.kind == "structured":

        return load_structured(cell.path, device=device), "load_structured: dense layers with fewer heads/neurons"
    import transformers

    architecture = (cell.config.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture or "", None) or transformers.AutoModel
    model = model_class.from_pretrained(cell.path).to(device).eval()
    return model, f"{model_class.__name__}.from_pretrained (dense)"


def layer_summary(model: Any) -> Optional[dict[str, Any]]:
    """What the compact layers of a LoSparse-family model compute, or None for a model without them."""
    layers = [layer for _, layer in losparse_layers(model)]
    if not layers:
        return None
    forms = getattr(model, "losparse_forms", None) or {}
    counts: dict[str, int] = {}
    for form in [forms.get(name, "compact") for name, _ in losparse_layers(model)]:
        counts[form] = counts.get(form, 0) + 1
    return {
        "compact_layers": len(layers),
        "rank_zero": sum(layer.rank == 0 for layer in layers),
        "no_kept_neurons": sum(layer.num_kept == 0 for layer in layers),
        "contiguous_kept": sum(bool(layer.num_kept) and layer.kept_start is not None for layer in layers),
        "total_rank": sum(int(layer.rank) for layer in layers),
        "total_kept_neurons": sum(int(layer.num_kept) for layer in layers),
        "forms": counts,
    }


def environment(device: Any) -> dict[str, Any]:
    """Versions, machine, device, torch threads and the date: what a latency number depends on."""
    import torch
    import transformers

    device = str(device)
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": {"processor": platform.processor(), "cpu_model": cpu_name(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "node": platform.node()},
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


@dataclass
class Timed:
    """One timed model: the cell, how it was loaded, its parameter count and its latency statistics."""

    cell: Cell
    variant: str                 # "plain" or "optimized"
    loaded_with: str
    parameters: int
    dtype: str
    layers: Optional[dict[str, Any]]
    extra_params: int = 0        # optimized: the merged dense matrices it holds beside the compact tensors
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cell.label + (" (optimized)" if self.variant == "optimized" else "")

    @property
    def latency_ms(self) -> float:
        return float(self.stats["median_ms"])


def load_all(cells: Sequence[Cell], inputs: dict[str, Any], device: Any, optimize: bool) -> tuple[list[Timed], dict]:
    """Load every cell (and its optimized variant), run the batch once through each and keep the models.

    Returns the Timed entries (stats empty) and {entry name: model}. A model whose output is not finite
    fails here, before any timing.
    """
    import torch

    entries: list[Timed] = []
    models: dict[str, Any] = {}
    for cell in cells:
        variants = [("plain", None)] + ([("optimized", inputs)] if optimize and cell.kind == "losparse" else [])
        for variant, optimize_inputs in variants:
            model, how = load_model(cell, device, optimize_inputs)
            report = getattr(model, "losparse_optimize_report", None) or {}
            first = next(model.parameters())
            entry = Timed(cell, variant, how, parameter_count(model), str(first.dtype).replace("torch.", ""),
                          layer_summary(model), int(report.get("total_extra_params") or 0))
            with torch.inference_mode():
                output = model(**inputs)
            logits = output.logits if getattr(output, "logits", None) is not None else output[0]
            if not bool(torch.isfinite(logits).all()):
                raise LoSparseUsageError(f"{cell.path}: the loaded model's output on the timing batch is not finite")
            entries.append(entry)
            models[entry.name] = model
    return entries, models


def time_all(entries: Sequence[Timed], models: Mapping[str, Any], inputs: dict[str, Any], warmup: int,
             repeats: int, max_seconds: Optional[float]) -> Any:
    """Time every model round-robin on `inputs`; fills each entry's `stats`; returns the `TimingVerdict`."""
    calls = {entry.name: (lambda model=models[entry.name]: model(**inputs)) for entry in entries}
    load_before = load_average()
    stats = interleaved_latency_ms(calls, warmup=warmup, repeats=repeats, max_seconds=max_seconds)
    load_after = load_average()
    for entry in entries:
        entry.stats = stats[entry.name]
    return judge_timing({name: s["times_ms"] for name, s in stats.items()}, load_before, load_after)

# ------------------------------------------------------------------------------------ results per cell


def quality_metric(cells: Sequence[Cell]) -> Optional[str]:
    """The metric a group is compared on: the first of `quality_metrics` (accuracy where there is one)."""
    metrics = quality_metrics([c.record for c in cells])
    return metrics[0] if metrics else None


def dense_latency(entries: Sequence[Timed]) -> Optional[float]:
    """Mean latency of the dense reference cells among `entries` (plain variant), None without one."""
    dense = [e.latency_ms for e in entries if e.cell.is_dense_reference and e.variant == "plain"]
    return statistics.fmean(dense) if dense else None


def _timing_fields(entry: Timed, dense_ms: Optional[float]) -> dict[str, Any]:
    stats = entry.stats
    return {"latency_ms": round(entry.latency_ms, 4), "min_ms": round(stats["min_ms"], 4),
            "p90_ms": round(stats["p90_ms"], 4), "mean_ms": round(stats["mean_ms"], 4), "repeats": stats["n"],
            "times_ms": stats["times_ms"], "loaded_with": entry.loaded_with, "parameters": entry.parameters,
            "layers": entry.layers, "speedup_vs_dense": round(dense_ms / entry.latency_ms, 4) if dense_ms else None}


def latency_records(entries: Sequence[Timed], verdict: Any, env: dict[str, Any], settings: dict[str, Any],
                    command: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{cell path: the content of its latency.json}."""
    groups: dict[tuple, list[Timed]] = {}
    for entry in entries:
        groups.setdefault(entry.cell.group, []).append(entry)
    timed_names = [e.name for e in entries]
    out: dict[str, dict[str, Any]] = {}
    for group_entries in groups.values():
        dense_ms = dense_latency(group_entries)
        metric = quality_metric([e.cell for e in group_entries])
        for entry in group_entries:
            if entry.variant != "plain":
                continue
            record = entry.cell.record
            body = {
                **_timing_fields(entry, dense_ms), **settings, **env, "dtype": entry.dtype,
                "model_kind": entry.cell.kind, "method": record["method"], "ratio": record["ratio"],
                "achieved_ratio": record["achieved_ratio"], "seed": record["seed"], "model": record["model"],
                "task": record["task"], "metric": metric,
                "metric_value": record["metrics"].get(metric) if metric else None,
                "dense_latency_ms": round(dense_ms, 4) if dense_ms else None,
                "interleaved_with": [n for n in timed_names if n != entry.name],
                **verdict.fields(), "command": list(command),
            }
            body["timing_check"]["relative_spread_iqr"] = {
                k: v for k, v in body["timing_check"]["relative_spread_iqr"].items()
                if k in (entry.name, entry.name + " (optimized)")}
            optimized = [e for e in group_entries if e.cell is entry.cell and e.variant == "optimized"]
            if optimized:
                body["optimized"] = {**_timing_fields(optimized[0], dense_ms),
                                     "extra_params": optimized[0].extra_params}
            out[entry.cell.path] = body
    return out


def write_latency(directory: str, body: dict[str, Any]) -> str:
    """Write `body` as `directory`/latency.json (replacing it atomically); returns the path."""
    path = os.path.join(directory, LATENCY_FILE)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(body, f, indent=2, sort_keys=True)
    os.replace(temporary, path)
    return path

# ------------------------------------------------------------------------------------ the frontier in words


@dataclass
class Point:
    """One (method, ratio) of a group: mean accuracy and mean latency over its seeds."""

    method: str
    ratio: Optional[float]
    value: float
    latency_ms: float
    runs: int = 1

    @property
    def name(self) -> str:
        ratio = "" if self.method == "finetune" or self.ratio is None else f" {self.ratio * 100:g}%"
        method, distilled = (self.method[:-3], True) if self.method.endswith("+kd") else (self.method, False)
        label = "Fine-tune (dense)" if method == "finetune" else method_label(method)
        return label + (" + distillation" if distilled else "") + ratio

    @property
    def contains_losparse(self) -> bool:
        """A point of LoSparse or of a method built on it (the hybrids): the ones the verdict is about."""
        return self.method.split("-")[0].split("+")[0] in LOSPARSE_METHODS

    def dominates(self, other: "Point") -> bool:
        """At least as accurate and as fast, and strictly better in one of the two."""
        return (self.value >= other.value and self.latency_ms <= other.latency_ms
                and (self.value > other.value or self.latency_ms < other.latency_ms))


def group_points(rows: Sequence[Mapping[str, Any]]) -> list[Point]:
    """Rows with method, ratio, distillation, value, latency_ms -> one Point per (method, ratio), seeds averaged."""
    grouped: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("value") is None:
            continue
        method = row["method"] + ("+kd" if row.get("distillation") else "")
        grouped.setdefault((method, ratio_key(row["ratio"])), []).append(row)
    return [Point(method, ratio, statistics.fmean(r["value"] for r in rs),
                  statistics.fmean(r["latency_ms"] for r in rs), len(rs))
            for (method, ratio), rs in grouped.items()]


def beyond_noise_lines(points: Sequence[Point], error: float) -> list[str]:
    """Per LoSparse-containing point: is another point faster *and* more accurate by more than one standard error
    of the difference (each point's error: `error` / sqrt(its runs))? If none is, the point is on the frontier
    within the noise."""
    lines = []
    for p in sorted((p for p in points if p.contains_losparse), key=lambda p: (-(p.ratio or 0.0), p.name)):
        clear = [q for q in points if q.latency_ms < p.latency_ms
                 and q.value - p.value > error * math.sqrt(1.0 / q.runs + 1.0 / p.runs)]
        if clear:
            best = max(clear, key=lambda q: q.value - p.value)
            lines.append(f"{p.name} ({p.runs} run{'s' if p.runs > 1 else ''}): beaten beyond one standard error by "
                         f"{best.name} ({_signed(best.value - p.value, 2, ' points')}, "
                         f"{_signed(best.latency_ms - p.latency_ms, 2, ' ms')}).")
        else:
            lines.append(f"{p.name} ({p.runs} run{'s' if p.runs > 1 else ''}): no point is both faster and more "
                         "accurate beyond one standard error.")
    return lines


def _signed(value: float, decimals: int, unit: str) -> str:
    text = f"{abs(value):.{decimals}f}{unit}"
    return ("+" if value >= 0 else MINUS) + text


def frontier_lines(points: Sequence[Point], metric: str, eval_examples: Optional[int] = None,
                   latency_spread: Optional[float] = None, chance: Optional[float] = None) -> list[str]:
    """The Pareto frontier (more `metric`, less latency) in words, and where every LoSparse point stands.

    `eval_examples` (evaluation set size) adds the binomial noise of one run's metric; `latency_spread`
    (the largest IQR/median of the timed repeats) the resolution of the latencies. Domination itself is
    strict (any margin counts): read it together with those two lines. `chance` (the metric of a constant
    predictor, e.g. the majority class's share) takes the points within one standard error of it out of the
    frontier and the verdicts: a model at chance is fast, not useful, and would otherwise sit on the front.
    """
    if not points:
        return []
    error = _binomial_error(points, eval_examples) if eval_examples else None
    lines, points = _chance_lines(points, chance, error or 0.0, metric)
    if not points:
        return lines
    ordered = sorted(points, key=lambda p: (p.latency_ms, -p.value))
    front = [p for p in ordered if not any(q.dominates(p) for q in points)]
    lines.insert(0, "Pareto frontier (no other point is at least as accurate and as fast): "
                 + ", ".join(f"{p.name} ({p.value:.2f}, {p.latency_ms:.2f} ms)" for p in front) + ".")
    lines += [_domination_line(p, points) for p in sorted((p for p in points if p.contains_losparse),
                                                          key=lambda p: -(p.ratio or 0.0))]
    if error is not None:
        lines.append(f"Noise: one run per point on {eval_examples} evaluation examples; the binomial standard error of "
                     f"{metric} is about {error:.1f} points, so differences under ~{2 * math.sqrt(2) * error:.1f} "
                     "points between two points are not resolved.")
        lines += beyond_noise_lines(points, error)
    if latency_spread is not None:
        lines.append(f"Latency: the repeats' interquartile range is up to {100 * latency_spread:.0f}% of their median; "
                     "closer latencies are not resolved.")
    return lines


def _binomial_error(points: Sequence[Point], eval_examples: int) -> float:
    """One run's binomial standard error in points, at the dense model's accuracy (else the points' mean)."""
    dense = next((p for p in points if p.method == "finetune"), None)
    share = (dense.value if dense else statistics.fmean(p.value for p in points)) / 100.0
    return 100.0 * math.sqrt(max(share * (1.0 - share), 1e-12) / eval_examples)


def _chance_lines(points: Sequence[Point], chance: Optional[float], error: float,
                  metric: str) -> tuple[list[str], list[Point]]:
    """The line naming the points at chance (metric <= chance + one standard error), and the other points."""
    if chance is None:
        return [], list(points)
    at_chance = [p for p in points if p.value <= chance + error]
    if not at_chance:
        return [], list(points)
    names = ", ".join(f"{p.name} ({p.value:.2f})" for p in sorted(at_chance, key=lambda p: p.name))
    line = (f"At chance ({metric} <= {chance:.2f}, a constant predictor's, + one standard error; left out of the "
            f"frontier and the verdicts): {names}.")
    return [line], [p for p in points if p not in at_chance]


def _domination_line(p: Point, points: Sequence[Point]) -> str:
    """Whether any point dominates `p` (the one with the largest margin is named) and which points `p` dominates."""
    beaten_by = [q for q in points if q.dominates(p)]
    beats = [q.name for q in points if p.dominates(q)]
    if beaten_by:
        best = max(beaten_by, key=lambda q: (q.value - p.value, p.latency_ms - q.latency_ms))
        text = (f"{p.name}: dominated by {best.name} ({_signed(best.value - p.value, 2, ' points')}, "
                f"{_signed(best.latency_ms - p.latency_ms, 2, ' ms')})")
    else:
        text = f"{p.name}: on the frontier"
    if beats:
        text += f"; it dominates {', '.join(beats)}"
    return text + "."


def evaluation_examples(cell: Cell) -> Optional[int]:
    """The evaluation set size, from eval_runtime × eval_samples_per_second of all_results.json (None if absent)."""
    try:
        with open(os.path.join(cell.path, RESULTS_FILE)) as f:
            data = json.load(f)
        return int(round(float(data["eval_runtime"]) * float(data["eval_samples_per_second"]))) or None
    except (OSError, ValueError, TypeError, KeyError):
        return None

# ------------------------------------------------------------------------------------ the table


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio_text(record: Mapping[str, Any]) -> str:
    requested = "100%" if record["method"] == "finetune" else (
        f"{record['ratio'] * 100:g}%" if record["ratio"] is not None else "?")
    achieved = record["achieved_ratio"]
    return f"{requested} / {achieved:.4f}" if achieved is not None else f"{requested} / ?"


def render_markdown(entries: Sequence[Timed], verdict: Any, env: dict[str, Any], settings: dict[str, Any],
                    chance: Optional[float] = None) -> str:
    """One Markdown table per (model, task), the frontier in words, the timing verdict and the machine.

    `chance`: a constant predictor's metric (%), see `frontier_lines`."""
    groups: dict[tuple, list[Timed]] = {}
    for entry in entries:
        groups.setdefault(entry.cell.group, []).append(entry)
    optimized = any(e.variant == "optimized" for e in entries)
    parts = []
    for (model, task), group_entries in groups.items():
        cells = list(dict.fromkeys(e.cell.path for e in group_entries))
        cell_of = {e.cell.path: e.cell for e in group_entries}
        metric = quality_metric(list(cell_of.values())) or "accuracy"
        dense_ms = dense_latency(group_entries)
        header = ["Method", "Ratio (requested / achieved)", f"{metric} (%)", "Latency (ms)", "Speed-up vs dense",
                  "Parameters"] + (["Optimized (ms)"] if optimized else []) + ["Loaded with", "Run"]
        rows, point_rows = [], []
        for path in cells:
            cell = cell_of[path]
            plain = next(e for e in group_entries if e.cell is cell and e.variant == "plain")
            best = next((e for e in group_entries if e.cell is cell and e.variant == "optimized"), None)
            value = cell.record["metrics"].get(metric)
            label = method_label(cell.record["variant"]) + (" + distillation" if cell.record["distillation"] else "")
            row = [label, _ratio_text(cell.record), "—" if value is None else f"{value:.2f}",
                   f"{plain.latency_ms:.2f}", f"{dense_ms / plain.latency_ms:.2f}×" if dense_ms else "—",
                   f"{plain.parameters:,}"]
            if optimized:
                row.append(f"{best.latency_ms:.2f}" if best else "")
            rows.append(row + [plain.loaded_with, cell.label])
            point_rows.append({"method": cell.record["variant"], "ratio": cell.record["ratio"], "value": value,
                               "distillation": cell.record["distillation"], "latency_ms": plain.latency_ms})
        examples = next((n for n in (evaluation_examples(cell_of[p]) for p in cells) if n), None)
        parts += [f"### Accuracy vs latency: {model or 'model'} · {task or 'local data'}", "",
                  f"One forward of a random batch of {settings['batch_size']} × {settings['seq_len']} tokens, "
                  f"{env['threads']} torch thread{'s' if env['threads'] != 1 else ''} on {env['device']}, median of "
                  f"{min(e.stats['n'] for e in group_entries)} round-robin repeats over all models; {metric} from each "
                  f"run's all_results.json (the evaluation of exactly the saved model).", "",
                  _markdown_table(header, rows), ""]
        spreads = [v for k, v in (verdict.spreads or {}).items()
                   if v is not None and any(k == e.name for e in group_entries if e.variant == "plain")]
        parts += frontier_lines(group_points(point_rows), metric, examples, max(spreads) if spreads else None,
                                chance) + [""]
    machine = env["machine"]
    parts += [timing_line(verdict),
              f"machine: {machine['cpu_model']} ({machine['processor'] or machine['platform']}), "
              f"{machine['cpu_count']} CPUs; device {env['device_name']}; torch {env['torch']}, transformers {env['transformers']}; "
              f"{env['date']}"]
    return "\n".join(parts)

# ------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.frontier",
        description="Time the saved model of every finished run under the roots (loaded as a user would, "
                    "all interleaved in one process on one random batch), write latency.json per run, print "
                    "accuracy vs latency per (model, task) and the Pareto frontier, and draw the plot.")
    parser.add_argument("roots", nargs="+", metavar="OUTPUT_ROOT",
                        help="directories searched recursively for runs (all_results.json + a saved model)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=30, help="timed round-robin rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each model first (default 3)")
    parser.add_argument("--max_seconds", type=float, default=None,
                        help="stop the rounds after this many seconds (at least 3 rounds); default: no limit")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--only", metavar="REGEX", help="keep only the run directories whose path matches")
    parser.add_argument("--optimize", action="store_true",
                        help="also time each LoSparse-family model loaded with optimize=True (per-layer fastest "
                             "form measured on the batch first); reported beside the plain time")
    parser.add_argument("--json", metavar="OUT.json", help="write every cell's latency record to this file")
    parser.add_argument("--markdown", metavar="OUT.md", help="write the tables to this Markdown file")
    parser.add_argument("--chance_accuracy", type=float, metavar="PCT",
                        help="the metric (in %%) of a constant predictor, e.g. the majority class's share of the "
                             "evaluation set: points within one standard error of it are named as at chance and "
                             "left out of the frontier (the summarize command scripts/frontier_minilm.sh prints passes it)")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="draw accuracy vs latency here (one file per (model, task): -<model>-<task> is added "
                             "to the name when there are several)")
    return parser


def check_options(args: argparse.Namespace) -> None:
    """Usage errors for the numeric options and the device, before anything is loaded."""
    for name in ("batch_size", "seq_len", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise LoSparseUsageError(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.warmup < 0:
        raise LoSparseUsageError(f"--warmup {args.warmup}: must be >= 0")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise LoSparseUsageError(f"--max_seconds {args.max_seconds}: must be a positive number of seconds")
    if args.only:
        try:
            re.compile(args.only)
        except re.error as exc:
            raise LoSparseUsageError(f"--only {args.only!r} is not a regular expression: {exc}") from None
    if args.chance_accuracy is not None and not 0.0 <= args.chance_accuracy <= 100.0:
        raise LoSparseUsageError(f"--chance_accuracy {args.chance_accuracy:g}: must be a percentage in [0, 100]")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise LoSparseUsageError(f"--device {args.device!r}: use cpu or cuda[:N]")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise LoSparseUsageError(f"--device {args.device}: CUDA is not available here")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    check_options(args)
    cells, skipped = find_cells(args.roots, args.only)
    for line in skipped:
        print(f"skip {line}", file=sys.stderr)
    if not cells:
        raise LoSparseUsageError(f"no run with {RESULTS_FILE} and a saved model under {', '.join(args.roots)}")
    vocab = check_batch_shape(cells, args.batch_size, args.seq_len)

    import torch

    from benchmarks.plots import write_frontier_plots

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs = token_batch(args.batch_size, args.seq_len, vocab, device)
    print(f"loading {len(cells)} models ({', '.join(c.label for c in cells)})", file=sys.stderr, flush=True)
    entries, models = load_all(cells, inputs, device, args.optimize)
    print(f"timing {len(entries)} models round-robin: {args.warmup} warm-up + {args.repeats} rounds, batch "
          f"{args.batch_size} x {args.seq_len}, {torch.get_num_threads()} thread(s)", file=sys.stderr, flush=True)
    verdict = time_all(entries, models, inputs, args.warmup, args.repeats, args.max_seconds)
    env = environment(device)
    settings = {"batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup,
                "tokens_per_forward": args.batch_size * args.seq_len}
    bodies = latency_records(entries, verdict, env, settings, ["python", "-m", "benchmarks.frontier", *argv])
    for path, body in bodies.items():
        print(f"wrote {write_latency(path, body)}", file=sys.stderr)
    text = render_markdown(entries, verdict, env, settings, args.chance_accuracy)
    print(text)
    if args.json:

        write_json(args.json, {"cells": bodies, "environment": env, **settings, **verdict.fields()}, sort_keys=True)
        print(f"wrote {args.json}", file=sys.stderr)
    plots: list[str] = []
    if args.plot:
        plots = write_frontier_plots([c.record for c in cells], os.path.dirname(os.path.abspath(args.plot)),
                                     file_name=os.path.basename(args.plot), chance=args.chance_accuracy)
        for plot in plots:
            print(f"wrote {plot}", file=sys.stderr)
    if args.markdown:
        directory = os.path.dirname(os.path.abspath(args.markdown))
        os.makedirs(directory, exist_ok=True)
        links = "".join(f"\n![{os.path.basename(p)}]({os.path.relpath(p, directory)})\n" for p in plots)
        with open(args.markdown, "w") as f:
            f.write(text + "\n" + links)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; a usage error is one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except LoSparseUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
