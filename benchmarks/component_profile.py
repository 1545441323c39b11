"""Where the time of one forward goes, per component, for dense / compact / structured / low-rank models.

    python scripts/profile_components.py --arch bert-base --remaining_ratio 0.2 --contiguous --optimize \
        --batch_size 8 --seq_len 128 --json profile.json --plot profile.png

(scripts/profile_components.py is this module's `main`.)

Why. `scripts/benchmark_inference.py --peers` says *how much* slower or faster the LoSparse compact
model is than a like-sized structured-pruned one; this says *where*: the self CPU time of every aten
op of the forward, summed into components, side by side for the four models.

Models. Exactly those of the inference benchmark with `--peers` (its functions are called, in its
order): `build_pair` (random-weight model of --arch, `compress_for_benchmark`, dense = merge of the
compact), `build_peers` (structured and low-rank peers at the compact model's achieved ratio),
`random_inputs`, `prepare_compact` (--contiguous / --optimize on the compact model only), then its
output checks (dense vs compact must agree, peers must be finite). The benchmark's own `parse_args`
fills that namespace, so any model-building flag it has is available here after `--`.

Measurement (CPU, fp32, --threads default 1). After --warmup calls of each model, the four models are
timed unprofiled (interleaved, median of --timing_repeats), then profiled by `torch.profiler` for
--repeats rounds, interleaved (dense, compact, structured, lowrank, dense, ...), each call inside one
root `record_function` range. Figures are means over the profiled calls (means, so that the components
add up to the total; per-component medians and the spread of the profiled calls are in the JSON and the
table), in ms per forward; with one thread an op's self CPU time is its wall time.

Attribution. Forward pre/post hooks open a `record_function` range around every linear-like module
(`nn.Linear`, `CompactLoSparseLinear` and its dispatched forms, `LoSparseLinear`) and around each
embeddings block; its site comes from the module's name (`site_of`): attention (q/k/v and the
attention output), ffn (intermediate / output, mlp, fc), head (pooler, classifier) or embeddings. The
profiler's event tree is then walked from each root range: every event's *self* CPU time goes to one
component, decided by the innermost range above it (its site) and by the outermost aten op between
that range and the event (so `aten::mm` under `aten::linear` counts as that linear's GEMM):
  gemm_attention / gemm_ffn / gemm_head  any op in a linear of that site that is not scatter/gather;
  scatter      index_add_, index_select, index_copy, narrow + add_ (slice add), cat, ... in a linear:
               the LoSparse-specific work of putting the kept S rows in place (zero for dense models);
  attention_core  scaled_dot_product_attention (with its softmax, bmm inside), softmax, matmul outside
               a linear;
  activation   gelu, relu, silu, tanh, ...;
  norm_residual  layer_norm, and add outside a linear and outside the embeddings (residual adds);
  other        everything else (embedding lookups and their adds, mask building, copies, views);
  python       self time of the ranges themselves: Python and dispatch between aten ops (the model's
               code, the layers' forwards, and the small cost of these hooks).
By construction the components sum to the root ranges' time (µs rounding aside); the perf_counter wall
of the profiled calls is recorded too, and the unprofiled median says how much the profiler adds (its
cost is per op, so a model with more ops is inflated more: `ops_per_forward` is reported).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from benchmarks import inference as inference_benchmark
from benchmarks.common import (
    ARCHS,
    SPREAD_LIMIT,
    TimingVerdict,
    environment_at_start,
    environment_record,
    interleaved_latency_ms,
    judge_timing,
    load_average,
    machine_line,
    parameter_count,
    random_inputs,
    relative_spread,
    threads_flag_error,
    timed_call_ms,
    timing_line,
    write_json,
)
from benchmarks.peers import (
    PeerOutputsNotFinite,
    build_peers,
    check_peer_outputs,
    check_peers_supported,
    peer_target_params,
)
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear

#: the models profiled, in table (and interleaving) order
MODEL_NAMES = inference_benchmark.MODEL_NAMES
#: component key -> the row label of the table, in table order
COMPONENTS: dict[str, str] = {
    "gemm_attention": "GEMM attention q/k/v/o",
    "gemm_ffn": "GEMM FFN up/down (incl. S rows)",
    "gemm_head": "GEMM pooler + classifier",
    "scatter": "scatter/gather of kept rows",
    "attention_core": "attention core (sdpa/softmax/bmm)",
    "activation": "activation (gelu, tanh)",
    "norm_residual": "layer norm + residual add",
    "other": "other aten (embeddings, masks, copies)",
    "python": "Python/dispatch between ops",
}
#: aten ops that, directly inside a linear-like module, place or fetch the kept S rows
SCATTER_OPS = frozenset({
    "aten::index_add_", "aten::index_add", "aten::index_select", "aten::index_copy_", "aten::index_copy",
    "aten::index_put_", "aten::scatter_add_", "aten::gather", "aten::narrow", "aten::add_", "aten::add",
    "aten::cat", "aten::clone", "aten::new_zeros", "aten::zeros",
})
ATTENTION_OPS = frozenset({
    "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math", "aten::softmax", "aten::_softmax", "aten::matmul", "aten::bmm",
    "aten::baddbmm", "aten::masked_fill", "aten::masked_fill_",
})
ACTIVATION_OPS = frozenset({
    "aten::gelu", "aten::relu", "aten::silu", "aten::tanh", "aten::sigmoid", "aten::gelu_", "aten::relu_",
    "aten::silu_",
})
NORM_OPS = frozenset({"aten::layer_norm", "aten::native_layer_norm", "aten::rms_norm", "aten::_fused_rms_norm"})
RESIDUAL_OPS = frozenset({"aten::add", "aten::add_"})
#: every record_function range this module opens starts with this
RANGE_PREFIX = "losparse_profile:"
_ROOT = RANGE_PREFIX + "forward:"
_SITE_WORDS = (
    ("attention", ("attention", "attn", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")),
    ("ffn", ("intermediate", "output", "mlp", "ffn", "fc1", "fc2", "up_proj", "down_proj", "gate_proj")),
)


# ------------------------------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Arguments after -- go to the inference benchmark's parser unchanged (model-building flags it has "
               "and this script does not).",
    )
    parser.add_argument("--arch", default="bert-base",
                        help="a built-in architecture with random weights, one the structured peer supports: "
                             + ", ".join(peer_archs()))
    parser.add_argument("--num_layers", type=int, default=None, help="override the number of layers of --arch")
    parser.add_argument("--remaining_ratio", type=float, default=0.2,
                        help="kept fraction of the targeted matrices' weights, in (0, 1]")
    parser.add_argument("--low_rank_ratio", type=float, default=0.05,
                        help="its low-rank part, below --remaining_ratio")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--contiguous", action="store_true",
                        help="losparse.make_contiguous on the compact model (as benchmark_inference.py --contiguous)")
    parser.add_argument("--optimize", action="store_true",
                        help="losparse.optimize on the compact model (as benchmark_inference.py --optimize)")
    parser.add_argument("--threads", default="1", help="torch CPU threads: a number, 'auto' or 'default'")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each model first")
    parser.add_argument("--repeats", type=int, default=5, help="profiled calls of each model (interleaved)")
    parser.add_argument("--timing_repeats", type=int, default=10,
                        help="unprofiled calls of each model (interleaved; their median is the reference)")
    parser.add_argument("--top_ops", type=int, default=10, help="rows of the compact − structured op table")
    parser.add_argument("--svd_solver", choices=("randomized", "exact", "auto"), default="randomized")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write everything here")
    parser.add_argument("--plot", default=None, help="write a PNG of stacked component bars per model here")
    return parser


def peer_archs() -> list[str]:
    """The built-in architectures the four models can be built for (those `check_peers_supported` accepts)."""
    supported = []
    for name, spec in sorted(ARCHS.items()):
        try:
            check_peers_supported(spec.config())
        except LoSparseUsageError:
            continue
        supported.append(name)
    return supported


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(own arguments, arguments after `--` for the inference benchmark's parser)."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def check_args(args: argparse.Namespace) -> None:
    """A LoSparseUsageError naming the first bad value and what is allowed; runs before any model is built."""
    if args.arch not in ARCHS:
        raise LoSparseUsageError(f"--arch {args.arch!r} is not one of {', '.join(peer_archs())}")
    spec = ARCHS[args.arch]
    if args.num_layers is not None and (args.num_layers < 1 or spec.layers_key is None):
        raise LoSparseUsageError(f"--num_layers {args.num_layers} must be >= 1 and is only for archs with layers "
                                 f"to set ({args.arch}: {'no' if spec.layers_key is None else 'yes'})")
    try:
        check_peers_supported(spec.config(args.num_layers))
    except LoSparseUsageError as exc:
        raise LoSparseUsageError(f"--arch {args.arch}: the structured peer cannot be built ({exc})") from None
    for name in ("remaining_ratio", "low_rank_ratio"):
        value = getattr(args, name)
        if not 0.0 < value <= 1.0:
            raise LoSparseUsageError(f"--{name} {value:g} must be in (0, 1]")
    if not args.low_rank_ratio < args.remaining_ratio:
        raise LoSparseUsageError(f"--low_rank_ratio {args.low_rank_ratio:g} must be below --remaining_ratio "
                                 f"{args.remaining_ratio:g}")
    for name, least in (("batch_size", 1), ("seq_len", 1), ("repeats", 1), ("timing_repeats", 1), ("warmup", 0),
                        ("top_ops", 0)):
        if getattr(args, name) < least:
            raise LoSparseUsageError(f"--{name} {getattr(args, name)} must be >= {least}")
    positions = getattr(spec.config(args.num_layers), "max_position_embeddings", None)
    if positions is not None and args.seq_len > positions:
        raise LoSparseUsageError(f"--seq_len {args.seq_len} exceeds {args.arch}'s {positions} positions")
    if threads_flag_error(args.threads):
        raise LoSparseUsageError(threads_flag_error(args.threads))


def benchmark_args(args: argparse.Namespace, passthrough: list[str]) -> argparse.Namespace:
    """The inference benchmark's namespace for these settings (its parser supplies every default)."""
    argv = ["--arch", args.arch, "--remaining_ratio", repr(args.remaining_ratio),
            "--low_rank_ratio", repr(args.low_rank_ratio), "--device", "cpu", "--dtype", "fp32",
            "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--seed", str(args.seed),
            "--svd_solver", args.svd_solver, "--threads", args.threads, "--peers"]
    if args.num_layers is not None:
        argv += ["--num_layers", str(args.num_layers)]
    argv += ["--contiguous"] * args.contiguous + ["--optimize"] * args.optimize
    return inference_benchmark.parse_args(argv + passthrough)

# --------------------------------------------------------------------------------------------- models


@dataclass
class ProfileModels:
    """The four models (fp32, eval, CPU), the inputs and what building them reported."""

    models: dict[str, nn.Module]
    inputs: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def build_profile_models(bench_args: argparse.Namespace) -> ProfileModels:
    """Build, prepare and check the models as `benchmark_inference.py --peers` does (its own functions).

    Raises inference_benchmark.OutputsDisagree or peers.PeerOutputsNotFinite when a check fails.
    """
    device = torch.device("cpu")
    dense, compact, kind, info = inference_benchmark.build_pair(bench_args, device)
    peers = build_peers(dense, compact, seed=bench_args.seed, svd_solver=bench_args.svd_solver)
    inputs = random_inputs(compact, kind, bench_args.batch_size, bench_args.seq_len, bench_args.tgt_len,
                           seed=bench_args.seed)
    info["engineering"] = inference_benchmark.prepare_compact(bench_args, compact, inputs)
    info["peer_checks"] = check_peer_outputs(peers, inputs)
    info["fp32_check"], _ = inference_benchmark.check_outputs(
        bench_args, dense, compact, inputs, kind, torch.float32, inference_benchmark.TOLERANCE[torch.float32])
    models = {"dense": dense, "compact": compact, **peers}
    dense_target = info["report"]["target_dense_params"]
    info["models"] = {}
    for name, model in models.items():
        target = peer_target_params(name, model) if name in peers else (
            dense_target if name == "dense" else info["report"]["target_params"])
        info["models"][name] = {"params": parameter_count(model), "target_params": target,
                                "remaining_ratio": target / dense_target}
    return ProfileModels(models, inputs, info)

# ----------------------------------------------------------------------------------------- attribution


def _linear_types() -> tuple[type, ...]:

    return (nn.Linear, CompactLoSparseLinear, LoSparseLinear)


def site_of(module_name: str) -> str:
    """'attention', 'ffn' or 'head' for a linear-like module, from the words of its dotted name.

    BERT: `...layer.3.attention.self.query` / `...attention.output.dense` -> attention,
    `...layer.3.intermediate.dense` / `...layer.3.output.dense` -> ffn, `...pooler.dense`, `classifier` -> head.
    Attention words are looked for first (BERT's attention output is also called "output").
    """
    words = module_name.lower().split(".")
    for site, markers in _SITE_WORDS:
        if any(word in markers for word in words):
            return site
    return "head"


def _is_embeddings(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Embeddings")


def _range_hooks(label: str, open_ranges: list) -> tuple[Callable[..., None], Callable[..., None]]:
    """(forward pre-hook, forward hook) that open and close the profiler range `label` around a module's forward."""
    def enter(module: nn.Module, args: Any) -> None:
        scope = torch.profiler.record_function(label)
        scope.__enter__()
        open_ranges.append(scope)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    return enter, leave


class SiteRanges:
    """While open, every linear-like module and embeddings block of `model` runs inside a named profiler range.

    The range is `losparse_profile:<site>:<module name>` with site from `site_of` (or "embeddings").
    """

    def __init__(self, model: nn.Module) -> None:
        linear_types = _linear_types()
        self.labels: dict[str, str] = {}
        for name, module in model.named_modules():
            if isinstance(module, linear_types):
                self.labels[name] = f"{RANGE_PREFIX}{site_of(name)}:{name}"
            elif _is_embeddings(module):
                self.labels[name] = f"{RANGE_PREFIX}embeddings:{name}"
        self.model = model
        self._handles: list[Any] = []
        self._open_ranges: list = []

    def __enter__(self) -> "SiteRanges":
        modules = dict(self.model.named_modules())
        for name, label in self.labels.items():
            enter, leave = _range_hooks(label, self._open_ranges)
            self._handles.append(modules[name].register_forward_pre_hook(enter))
            self._handles.append(modules[name].register_forward_hook(leave))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        while self._open_ranges:  # a forward that raised leaves its ranges open
            self._open_ranges.pop().__exit__(None, None, None)


def classify(site: Optional[str], top_op: str) -> str:
    """The component of an aten op's self time: `site` of the innermost range (None: outside every module
    range), `top_op` the outermost aten op below that range on the way to the event."""
    if site in ("attention", "ffn", "head"):
        return "scatter" if top_op in SCATTER_OPS else f"gemm_{site}"
    if top_op in ATTENTION_OPS:
        return "attention_core"
    if top_op in ACTIVATION_OPS:
        return "activation"
    if top_op in NORM_OPS or (site is None and top_op in RESIDUAL_OPS):
        return "norm_residual"
    return "other"


@dataclass
class CallProfile:
    """One profiled forward: self time per component and per (component, site, top op), in µs."""

    model: str
    root_us: float
    components: dict[str, float]
    ops: dict[tuple[str, str, str], list]  # -> [µs, calls of the top op]


def attribute_call(root: Any) -> CallProfile:
    """Walk the event tree under one root range (a FunctionEvent) and sum every self time into components."""
    model = root.name[len(_ROOT):].split(":")[0]
    components = {key: 0.0 for key in COMPONENTS}
    ops: dict[tuple[str, str, str], list] = {}
    # (event, site of the innermost range, outermost aten op below it)
    pending: list[tuple[Any, Optional[str], Optional[str]]] = [(root, None, None)]
    while pending:
        event, site, top_op = pending.pop()
        name = event.name
        starts_op = False
        if name.startswith(RANGE_PREFIX):
            if event is not root:
                site = name[len(RANGE_PREFIX):].split(":")[0]
            top_op = None
            component, op_key = "python", "(range self time)"
        else:
            starts_op = top_op is None
            top_op = name if starts_op else top_op
            component, op_key = classify(site, top_op), top_op
        self_us = float(event.self_cpu_time_total)
        components[component] += self_us
        entry = ops.setdefault((component, site or "-", op_key), [0.0, 0])
        entry[0] += self_us
        entry[1] += int(starts_op)
        pending.extend((child, site, top_op) for child in event.cpu_children)
    return CallProfile(model, float(root.cpu_time_total), components, ops)


def root_events(events: Any) -> Iterator[Any]:
    """The root ranges (one per profiled forward) among a profiler's events."""
    return (event for event in events if event.name.startswith(_ROOT))

# -------------------------------------------------------------------------------------------- running


def profile_models(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], warmup: int, repeats: int,
                   timing_repeats: int) -> dict[str, Any]:
    """Unprofiled interleaved timing, then `repeats` interleaved profiled rounds; the attributed result per model.

    Returns {"models": {name: `summarize_calls`}, "unattributed_ms": self time per forward recorded outside every
    root range (other threads, between calls; ~0), and the unprofiled timing's verdict (`TimingVerdict.fields`)}.
    """
    fns = {name: (lambda model=model: model(**inputs)) for name, model in models.items()}
    load_before = load_average()
    unprofiled = interleaved_latency_ms(fns, warmup=warmup, repeats=timing_repeats, cuda=False)
    verdict = judge_timing({name: s["times_ms"] for name, s in unprofiled.items()}, load_before, load_average())
    walls: dict[str, list[float]] = {name: [] for name in models}
    ranges = {name: SiteRanges(model) for name, model in models.items()}
    with torch.inference_mode():
        for name, fn in fns.items():  # once with the hooks in place, unprofiled
            with ranges[name]:
                fn()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for round_index in range(repeats):
                for name, fn in fns.items():
                    with ranges[name]:
                        label = f"{_ROOT}{name}:{round_index}"
                        walls[name].append(timed_call_ms(lambda: _in_range(label, fn), cuda=False))
    events = profiler.events()
    calls = [attribute_call(root) for root in root_events(events)]
    attributed = sum(call.root_us for call in calls)
    total_self = sum(float(e.self_cpu_time_total) for e in events)
    result = {"models": {name: summarize_calls([c for c in calls if c.model == name], walls[name], unprofiled[name])
                         for name in models},
              "unattributed_ms": (total_self - attributed) / 1e3 / max(1, repeats * len(models))}
    result.update(verdict.fields())
    return result


def _in_range(label: str, fn: Callable[[], Any]) -> Any:
    with torch.profiler.record_function(label):
        return fn()


def summarize_calls(calls: list[CallProfile], walls_ms: list[float], unprofiled: dict[str, Any]) -> dict[str, Any]:
    """Means over the profiled calls of one model (ms per forward), its unprofiled reference and the overhead."""
    if not calls:
        raise RuntimeError("the profiler recorded no forward of this model")
    n = len(calls)
    components = {key: sum(c.components[key] for c in calls) / n / 1e3 for key in COMPONENTS}
    ops: dict[tuple[str, str, str], list] = {}
    for call in calls:
        for key, (us, count) in call.ops.items():
            entry = ops.setdefault(key, [0.0, 0])
            entry[0] += us
            entry[1] += count
    detail = sorted(({"component": c, "site": s, "op": o, "ms": us / n / 1e3, "calls": count / n}
                     for (c, s, o), (us, count) in ops.items()), key=lambda d: -d["ms"])
    profiled_ms = sum(c.root_us for c in calls) / n / 1e3
    unprofiled_ms = unprofiled["median_ms"]
    return {
        "components_ms": components,
        "components_median_ms": {key: statistics.median(c.components[key] for c in calls) / 1e3 for key in COMPONENTS},
        "components_sum_ms": sum(components.values()),
        "profiled_calls_ms": [round(c.root_us / 1e3, 4) for c in calls],
        "profiled_spread": relative_spread([c.root_us for c in calls]),
        "profiled_ms": profiled_ms,
        "profiled_wall_ms": statistics.fmean(walls_ms),
        "profiled_calls": n,
        "unprofiled_ms": unprofiled_ms,
        "unprofiled_stats": {k: v for k, v in unprofiled.items() if k != "median_ms"},
        "profiler_overhead": profiled_ms / unprofiled_ms - 1.0 if unprofiled_ms > 0 else None,
        "ops_per_forward": sum(d["calls"] for d in detail),
        "detail": detail,
    }

# --------------------------------------------------------------------------------------------- output


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def _diff(value: float) -> str:
    return ("+" if value > 0 else "") + _ms(value)


def gap_rows(result: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """The (component, site, op) entries with the largest |compact − structured| in ms per forward."""
    per_model = {name: {(d["component"], d["site"], d["op"]): d for d in result["models"][name]["detail"]}
                 for name in ("compact", "structured")}
    keys = set(per_model["compact"]) | set(per_model["structured"])
    rows = []
    for key in keys:
        compact, structured = per_model["compact"].get(key), per_model["structured"].get(key)
        c_ms, s_ms = (compact or {}).get("ms", 0.0), (structured or {}).get("ms", 0.0)
        rows.append({"component": key[0], "site": key[1], "op": key[2], "compact_ms": c_ms, "structured_ms": s_ms,
                     "compact_calls": (compact or {}).get("calls", 0.0),
                     "structured_calls": (structured or {}).get("calls", 0.0), "gap_ms": c_ms - s_ms})
    return sorted(rows, key=lambda r: -abs(r["gap_ms"]))[:top]


def format_report(result: dict[str, Any]) -> str:
    """The component table (ms per forward), totals, profiler overhead, then the largest op-level gaps."""
    names = [n for n in MODEL_NAMES if n in result["models"]]
    models = result["models"]
    prep = [flag for flag in ("contiguous", "optimize") if result.get(flag)]
    lines = [
        f"### {result['arch']} — cpu fp32, {result['torch_threads']} thread(s), batch {result['batch_size']} × seq "
        f"{result['seq_len']}, remaining ratio {result['achieved_remaining_ratio']:.4f} (asked "
        f"{result['remaining_ratio']}, low-rank {result['low_rank_ratio']})"
        + (f", compact: {' + '.join(prep)}" if prep else ""),
        "",
        f"self CPU time in ms per forward (mean of {result['repeats']} profiled calls per model, interleaved)",
        "",
        "| component | " + " | ".join(names) + " | compact − structured |",
        "|---|" + "---|" * len(names) + "---|",
    ]

    def row(label: str, values: dict[str, Optional[float]], gap: Optional[float]) -> str:
        cells = " | ".join(_ms(values[n]) for n in names)
        return f"| {label} | {cells} | {'' if gap is None else _diff(gap)} |"

    def gap_of(values: dict[str, Optional[float]]) -> Optional[float]:
        if values.get("compact") is None or values.get("structured") is None:
            return None
        return values["compact"] - values["structured"]

    for key, label in COMPONENTS.items():
        values = {n: models[n]["components_ms"][key] for n in names}
        lines.append(row(label, values, gap_of(values)))
    for label, key in (("**sum of components**", "components_sum_ms"), ("profiled total (root ranges)", "profiled_ms"),
                       ("profiled wall (perf_counter)", "profiled_wall_ms"),
                       (f"unprofiled (median of {result['timing_repeats']})", "unprofiled_ms")):
        values = {n: models[n][key] for n in names}
        lines.append(row(label, values, gap_of(values)))
    spreads = " | ".join("n/a" if models[n]["profiled_spread"] is None else f"{100 * models[n]['profiled_spread']:.0f}%"
                         for n in names)
    lines.append(f"| profiled calls' spread (IQR/median; > {100 * SPREAD_LIMIT:.0f}%: the means are noisy) "
                 f"| {spreads} | |")
    overhead = " | ".join(f"{100 * models[n]['profiler_overhead']:+.0f}%" for n in names)
    lines.append(f"| profiler overhead (profiled / unprofiled − 1) | {overhead} | |")
    counts = " | ".join(f"{models[n]['ops_per_forward']:.0f}" for n in names)
    lines.append(f"| aten ops per forward (outermost) | {counts} | "
                 f"{models['compact']['ops_per_forward'] - models['structured']['ops_per_forward']:+.0f} |")
    gaps = result.get("gaps") or []
    if gaps:
        lines += ["", "largest gaps compact − structured by op (ms per forward; calls per forward)", "",
                  "| component | site | op | compact ms (calls) | structured ms (calls) | gap ms |",
                  "|---|---|---|---|---|---|"]
        for g in gaps:
            lines.append(f"| {g['component']} | {g['site']} | {g['op']} | {_ms(g['compact_ms'])} "
                         f"({g['compact_calls']:.0f}) | {_ms(g['structured_ms'])} ({g['structured_calls']:.0f}) | "
                         f"{_diff(g['gap_ms'])} |")
    params = ", ".join(f"{n} {result['models'][n]['target_params'] / 1e6:.2f}M "
                       f"({result['models'][n]['remaining_ratio']:.3f})" for n in names)
    chosen = (result.get("engineering", {}).get("optimize") or {}).get("chosen")
    if chosen:
        params += "; optimize chose " + ", ".join(f"{form} {count}" for form, count in chosen.items() if count)
    lines += ["", f"targeted-matrix params (ratio): {params}",
              f"outputs: dense vs compact fp32 relative difference {result['fp32_check']['max_rel_diff']:.2g}; "
              "peers finite",
              "attribution: see benchmarks/component_profile.py (self time of aten ops by module site and "
              "outermost op; 'python' = time in no aten op)",
              timing_line(TimingVerdict.from_fields(result)) + " (unprofiled timing)",
              machine_line(result)]
    return "\n".join(lines)


def plot_components(result: dict[str, Any], path: str) -> str:
    """PNG: one stacked bar per model (components, ms per forward), a marker at its unprofiled median."""
    from benchmarks.plots import _figure, _save

    names = [n for n in MODEL_NAMES if n in result["models"]]
    fig, axes = _figure(figsize=(7.5, 4.5))
    ax = axes[0][0]
    bottoms = [0.0] * len(names)
    colors = ("#1f77b4", "#aec7e8", "#17becf", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#c7c7c7")
    for (key, label), color in zip(COMPONENTS.items(), colors):
        values = [result["models"][n]["components_ms"][key] for n in names]
        ax.bar(names, values, bottom=bottoms, label=label, color=color, width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.plot(names, [result["models"][n]["unprofiled_ms"] for n in names], linestyle="none", marker="_",
            markersize=40, markeredgewidth=2, color="black", zorder=3, label="unprofiled median")
    ax.set_ylabel("ms per forward (profiled self CPU time)")
    ax.set_title(f"{result['arch']}: batch {result['batch_size']} × {result['seq_len']}, ratio "
                 f"{result['achieved_remaining_ratio']:.3f}, {result['torch_threads']} thread(s)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=0.4)
    return _save(fig, path)

# ----------------------------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None, wall_started: Optional[float] = None) -> int:
    """Exit codes: 0 ok, 1 the models' outputs fail the benchmark's checks, 2 bad arguments."""
    wall_started = wall_started if wall_started is not None else time.perf_counter()
    own, passthrough = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    try:
        check_args(args)
    except LoSparseUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bench_args = benchmark_args(args, passthrough)
    environment = environment_at_start(args.threads)
    try:
        built = build_profile_models(bench_args)
    except LoSparseUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (inference_benchmark.OutputsDisagree, PeerOutputsNotFinite) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"profiling {', '.join(built.models)}: {args.warmup} warm-up, {args.timing_repeats} unprofiled and "
          f"{args.repeats} profiled calls each ...", file=sys.stderr)
    profiled = profile_models(built.models, built.inputs, args.warmup, args.repeats, args.timing_repeats)
    report = built.info["report"]
    result: dict[str, Any] = {
        "arch": args.arch, "num_layers": args.num_layers, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "remaining_ratio": args.remaining_ratio, "low_rank_ratio": args.low_rank_ratio,
        "achieved_remaining_ratio": report["remaining_ratio"], "contiguous": args.contiguous,
        "optimize": args.optimize, "warmup": args.warmup, "repeats": args.repeats,
        "timing_repeats": args.timing_repeats, "seed": args.seed, "passthrough": passthrough,
        "components": dict(COMPONENTS), "fp32_check": built.info["fp32_check"],
        "peer_checks": built.info["peer_checks"], "engineering": built.info["engineering"],
        "benchmark_args": {k: v for k, v in vars(bench_args).items()
                           if v is None or isinstance(v, (bool, int, float, str, list))},
    }
    result.update(profiled)
    for name, fields in built.info["models"].items():
        result["models"][name].update(fields)
    result["gaps"] = gap_rows(result, args.top_ops)
    command = own + (["--", *passthrough] if passthrough else [])
    result.update(environment_record(environment, "scripts/profile_components.py", command, wall_started))
    print(format_report(result))
    if args.plot:
        result["plot"] = plot_components(result, args.plot)
        print(f"plot: {result['plot']}", file=sys.stderr)
    if args.json:
        write_json(args.json, result)
    return 0
