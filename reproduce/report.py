"""Our runs beside the paper's tables, in Markdown, and the report's command line.

    python -m reproduce.report outputs/ [more dirs...] [--table 1|2|3|4|5|7|claim|all]
                              [--plots OUT_DIR] [--markdown OUT.md]
    (the same as python -m reproduce.report ...)

`render_table` prints one of the paper's Tables 1–5 and 7 (`reproduce.paper_results`) with each cell ours
beside the paper's number and the difference, or the generic task × method × ratio table of every run
(`claim`). The runs come from `reproduce.results`; `--plots` draws the figures of
`benchmarks.plots`, among them accuracy vs latency for runs that `python -m benchmarks.frontier`
timed (it reads their latency.json; the report itself never times anything). Tables need no torch; the
figures that read saved weights do.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence

from reproduce.paper_results import TABLES, as_tuple, canonical_model
from reproduce.results import (
    RESULTS_FILE,
    collect_results,
    group_runs,
    method_label,
    method_sort_key,
    quality_metrics,
    ratio_key,
    summarize,
)

TABLE_CHOICES = ("1", "2", "3", "4", "5", "7", "claim", "all")
NO_RUN = "—"
MINUS = "−"


# --------------------------------------------------------------------------------------------- formatting
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


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- tables
def _matches_column(record: Mapping[str, Any], column: Mapping[str, Any], table: Mapping[str, Any]) -> bool:
    if record["task"] != column["task"]:
        return False
    if record["method"] != "lead3" and canonical_model(record["model"]) != column["model"]:
        return False
    if record["method"] in ("finetune", "lead3"):
        return True
    if table.get("methods") and record["method"] not in table["methods"]:
        return False
    return record["distillation"] == bool(table.get("distillation"))


def _paper_metric(cell: Any, index: int) -> Any:
    values = as_tuple(cell)
    if values is None:
        return None
    return values[index] if index < len(values) else _MISSING


def render_paper_table(records: Sequence[Mapping[str, Any]], table_id: str) -> str:
    """Markdown for one of the paper's Tables 1–5 and 7 with our runs beside the printed numbers."""
    table = TABLES[str(table_id)]
    decimals = table["decimals"]
    columns = table["columns"]
    # (method, ratio) -> column key -> list of per-run metric dicts
    ours: dict[tuple, dict[str, list[dict[str, float]]]] = {}
    for record in records:
        for column in columns:
            if _matches_column(record, column, table):
                key = (record["method"], ratio_key(record["ratio"]) if record["method"] != "lead3" else None)
                ours.setdefault(key, {}).setdefault(column["key"], []).append(record["metrics"])

    paper_rows = OrderedDict(((m, ratio_key(r)), cells) for (m, r), cells in table["results"].items())
    extra = sorted((k for k in ours if k not in paper_rows),
                   key=lambda k: (-(k[1] if k[1] is not None else 2.0), method_sort_key(k[0])))
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
        metrics = quality_metrics(task_records)
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
    """Markdown for `table_id`: '1'–'5' or '7' (a paper table, ours beside the paper's numbers), 'claim'
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


# --------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reproduce.report",
        description="Collect the all_results.json of finished runs, compare them with the LoSparse paper's "
                    "Tables 1-5 and 7 (ours beside the paper's numbers, with the difference), and draw metric vs "
                    "remaining-ratio plots. Runs are matched by their JSON fields, not by directory names.",
    )
    parser.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR",
                        help="Directories searched recursively for all_results.json (or such files themselves).")
    parser.add_argument("--table", choices=TABLE_CHOICES, default="all",
                        help="Paper table 1-5 or 7 (1: DeBERTaV3 GLUE, 2: BERT GLUE, 3: SQuAD, 4: BART summarization, "
                             "5: distillation, 7: CoFi and CoFi + LoSparse), 'claim' for the generic task x method "
                             "x ratio table of every run, "
                             "or 'all' (default): the paper tables with at least one run, then the generic table.")
    parser.add_argument("--plots", metavar="OUT_DIR",
                        help="Write one metric-vs-remaining-ratio PNG per (task, metric) found into OUT_DIR, and "
                             "where the runs saved what they need: each pruning schedule p_t (from a checkpoint), "
                             "ITP vs LoSparse neuron importances (pruner state of a checkpoint) and the "
                             "singular values of fine-tuned dense models (model.safetensors), and accuracy vs "
                             "latency for the runs that hold a latency.json (written by python -m "
                             "benchmarks.frontier; the report only reads it).")
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
        from benchmarks.plots import write_plots

        plots = write_plots(records, args.plots)
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
