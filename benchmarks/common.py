"""Timing, size and cost measurements shared by the quickstart report and the benchmark scripts.

* Timing: `median_latency_ms` (one function) and `interleaved_latency_ms` (several functions timed
  round-robin, so a change in machine load hits all of them alike); CUDA events on a GPU.
* Timing reliability: `judge_timing` turns the repeats of a comparison and the load average around
  them into a `TimingVerdict` (reliable or not, and why), which every printed speed-up carries
  (`annotate`) and every JSON records (`fields`: timing_reliable, timing_warning, timing_check).
* Size: `parameter_count`, `module_bytes` (parameters + buffers in memory), `weights_size_mb` (on disk).
* Cost: `LinearCostCounter` counts the FLOPs and bytes of every linear layer (dense `nn.Linear`,
  `LoSparseLinear`, `CompactLoSparseLinear`) during a real call; `floor_ms` turns them into the
  roofline floor max(FLOPs / peak FLOP/s, bytes / peak bandwidth).
* Models for benchmarks: `ARCHS` (built-in configs with random weights, nothing downloaded),
  `build_model`, `random_inputs`, and `compress_for_benchmark`, which decomposes, prunes to the exact
  ratio with random neuron scores and compacts, so a compact model can be timed without training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.decompose import apply
from losparse.core.errors import LoSparseUsageError
from losparse.core.families import get_family
from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear
from losparse.core.pruner import LoSparsePruner
from losparse.deploy.compact import compact
from losparse.deploy.serialization import load
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE


def write_json(path: str, result: dict[str, Any], sort_keys: bool = False) -> None:
    """A benchmark's results as indented JSON at `path` (its directory created if needed)."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=sort_keys)

# --------------------------------------------------------------------------------------------- timing


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def timed_call_ms(fn: Callable[[], Any], cuda: Optional[bool] = None) -> float:
    """Wall time of one call of `fn()` in milliseconds; CUDA events (and a sync) when a GPU is in use."""
    if cuda is None:
        cuda = _cuda_in_use()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))
    start_time = time.perf_counter()
    fn()
    return (time.perf_counter() - start_time) * 1e3


def latency_stats(times_ms: list[float]) -> dict[str, Any]:
    """Median (the number to report), min, mean, 90th percentile and count of a list of times."""
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {
        "median_ms": statistics.median(ordered),
        "min_ms": ordered[0],
        "mean_ms": statistics.fmean(ordered),
        "p90_ms": p90,
        "n": len(ordered),
    }


@torch.inference_mode()
def median_latency_ms(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of `fn()` in milliseconds (CUDA-synchronised when a GPU is in use)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_call_ms(fn) for _ in range(repeats))


def interleaved_latency_ms(
    fns: dict[str, Callable[[], Any]],
    warmup: int = 3,
    repeats: int = 20,
    max_seconds: Optional[float] = None,
    min_repeats: int = 3,
    cuda: Optional[bool] = None,
    inference: bool = True,
) -> dict[str, dict[str, Any]]:
    """Time several functions round-robin (a, b, a, b, ...) after `warmup` calls of each.

    Stops after `repeats` rounds, or earlier once `max_seconds` have passed and at least
    `min_repeats` rounds are done. Returns `latency_stats` per name (plus the raw `times_ms`).
    Interleaving makes the comparison fair on a shared machine: a burst of load from someone
    else slows all candidates, not just the one that happened to be running.
    """
    context = torch.inference_mode() if inference else contextlib.nullcontext()
    times: dict[str, list[float]] = {name: [] for name in fns}
    with context:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        if cuda is None:
            cuda = _cuda_in_use()
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for round_index in range(repeats):
            for name, fn in fns.items():
                times[name].append(timed_call_ms(fn, cuda))
            out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
            if out_of_time and round_index + 1 >= min_repeats:
                break
    return {name: {**latency_stats(t), "times_ms": [round(x, 4) for x in t]} for name, t in times.items()}


# -------------------------------------------------------------------------------- timing reliability

#: timings count as contended when the 1-minute load average (which includes our own busy threads)
#: exceeds the number of cores by more than this: then something else wanted the cores we timed on.
LOAD_MARGIN = 0.5
#: a candidate's repeats are too scattered when their interquartile range exceeds this fraction of
#: their median (a quiet CPU gives a few percent; contention gives tens of percent).
SPREAD_LIMIT = 0.2
#: fewer repeats than this: the spread is not judged (a quartile of two numbers means nothing).
MIN_REPEATS_FOR_SPREAD = 3
RERUN_ADVICE = "rerun on a quiet machine"


def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):  # pragma: no cover - not on every platform
        return None


def relative_spread(times: Any) -> Optional[float]:
    """Interquartile range / median of a list of times; None with fewer than MIN_REPEATS_FOR_SPREAD values."""
    values = sorted(float(t) for t in times)
    if len(values) < MIN_REPEATS_FOR_SPREAD:
        return None
    median = statistics.median(values)
    if median <= 0:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / median


@dataclass
class TimingVerdict:
    """Whether a set of timings can be trusted, and why not.

    `reliable` is False when a check failed (`reasons` says which, in words to print); checks that
    could not be made (no load average, too few repeats) are listed in `notes` and do not fail it.
    """

    reliable: bool
    reasons: list
    notes: list
    load_before: Optional[float] = None
    load_after: Optional[float] = None
    cpu_count: Optional[int] = None
    threads: Optional[int] = None
    spreads: Optional[dict] = None

    @property
    def warning(self) -> Optional[str]:
        """The sentence to print next to a figure (None when the timings are reliable)."""
        if self.reliable:
            return None
        return "; ".join(self.reasons) + f"; {RERUN_ADVICE}"

    def tag(self) -> str:
        """'' when reliable, else '  [UNRELIABLE: <why>; rerun on a quiet machine]'."""
        return "" if self.reliable else f"  [UNRELIABLE: {self.warning}]"

    def annotate(self, figure: str) -> str:
        """`figure` with the tag after it, e.g. '0.73x  [UNRELIABLE: load average 4.6 on 2 cores ...]'."""
        return figure + self.tag()

    def fields(self) -> dict[str, Any]:
        """The JSON record: timing_reliable, timing_warning and what was checked (timing_check)."""
        return {
            "timing_reliable": self.reliable,
            "timing_warning": self.warning,
            "timing_check": {
                "load_avg_1min_before": None if self.load_before is None else round(self.load_before, 2),
                "load_avg_1min_after": None if self.load_after is None else round(self.load_after, 2),
                "cpu_count": self.cpu_count,
                "threads": self.threads,
                "relative_spread_iqr": {k: None if v is None else round(v, 4) for k, v in (self.spreads or {}).items()},
                "load_limit": None if self.cpu_count is None else self.cpu_count + LOAD_MARGIN,
                "spread_limit": SPREAD_LIMIT,
                "reasons": list(self.reasons),
                "notes": list(self.notes),
            },
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "TimingVerdict":
        """The verdict back from the JSON record `fields()` wrote (e.g. to combine stored records)."""
        check = fields["timing_check"]
        return cls(reliable=fields["timing_reliable"], reasons=list(check["reasons"]), notes=list(check["notes"]),
                   load_before=check["load_avg_1min_before"], load_after=check["load_avg_1min_after"],
                   cpu_count=check["cpu_count"], threads=check["threads"],
                   spreads=dict(check["relative_spread_iqr"]))


_LOAD_REASON = "load average "


def _load_reason(load: float, cpu_count: Optional[int]) -> str:
    return f"{_LOAD_REASON}{load:.1f} on {cpu_count} cores during timing"


def judge_timing(times: dict[str, Any], load_before: Optional[float], load_after: Optional[float],
                 threads: Optional[int] = None, cpu_count: Optional[int] = None,
                 spread_limit: float = SPREAD_LIMIT, load_margin: float = LOAD_MARGIN) -> TimingVerdict:
    """Judge the repeats of one comparison (`{candidate: [times]}`) and the load around them.

    Unreliable when:
      * the 1-minute load average before or after the timing exceeds cores + `load_margin`: more
        runnable threads than cores, so the timed code waited for CPU (the load average includes our
        own threads, so a quiet machine running the benchmark on every core sits near `cores`);
      * more torch threads than cores were used (the benchmark contended with itself);
      * a candidate's repeats spread more than `spread_limit` (interquartile range / median): the
        machine was not steady, whatever the load average (which lags by about a minute) says.
    `threads` defaults to torch's CPU thread count, `cpu_count` to os.cpu_count().
    """
    cpu_count = cpu_count if cpu_count is not None else os.cpu_count()
    threads = threads if threads is not None else torch.get_num_threads()
    reasons: list[str] = []
    notes: list[str] = []
    loads = [x for x in (load_before, load_after) if x is not None]
    if not loads or not cpu_count:
        notes.append("load not checked (no load average or core count on this platform)")
    elif max(loads) > cpu_count + load_margin:
        reasons.append(_load_reason(max(loads), cpu_count))
    if cpu_count and threads and threads > cpu_count:
        reasons.append(f"{threads} threads on {cpu_count} cores")
    spreads = {name: relative_spread(values) for name, values in times.items()}
    for name, spread in spreads.items():
        n = len(list(times[name]))
        if spread is None:
            notes.append(f"spread of {name} not checked ({n} repeat{'s' if n != 1 else ''}; "
                         f"needs {MIN_REPEATS_FOR_SPREAD})")
        elif spread > spread_limit:
            reasons.append(f"{name} repeats spread {100 * spread:.0f}% (IQR/median over {n} repeats; "
                           f"limit {100 * spread_limit:.0f}%)")
    return TimingVerdict(reliable=not reasons, reasons=reasons, notes=notes, load_before=load_before,
                         load_after=load_after, cpu_count=cpu_count, threads=threads, spreads=spreads)


def combine_verdicts(verdicts: dict[str, TimingVerdict]) -> TimingVerdict:
    """One verdict for several (e.g. every workload of a run): unreliable if any is.

    The load is one machine-wide reason (the highest load average of the flagged parts); the other
    reasons are prefixed with the part's name.
    """
    items = list(verdicts.items())
    if not items:
        return TimingVerdict(True, [], ["nothing was timed"])
    loaded = [max(x for x in (v.load_before, v.load_after) if x is not None)
              for _, v in items if any(r.startswith(_LOAD_REASON) for r in v.reasons)]
    reasons: list[str] = []
    if loaded:
        reasons.append(_load_reason(max(loaded), items[0][1].cpu_count))
    for name, verdict in items:
        for reason in verdict.reasons:
            if reason.startswith(_LOAD_REASON):
                continue
            text = reason if len(items) == 1 or reason.endswith("cores") else f"{name}: {reason}"
            if text not in reasons:
                reasons.append(text)
    notes = list(dict.fromkeys(note if len(items) == 1 else f"{name}: {note}"
                               for name, verdict in items for note in verdict.notes))
    before = [v.load_before for _, v in items if v.load_before is not None]
    after = [v.load_after for _, v in items if v.load_after is not None]
    spreads = {(k if len(items) == 1 else f"{name}/{k}"): s for name, v in items for k, s in (v.spreads or {}).items()}
    first = items[0][1]
    return TimingVerdict(reliable=not reasons, reasons=reasons, notes=notes,
                         load_before=max(before) if before else None, load_after=max(after) if after else None,
                         cpu_count=first.cpu_count, threads=first.threads, spreads=spreads)


def timing_line(verdict: TimingVerdict) -> str:
    """One line under a benchmark's table: whether its timings can be trusted, and the thresholds."""
    if not verdict.reliable:
        return f"timing: UNRELIABLE: {verdict.warning}"
    checked = f"load average <= cores + {LOAD_MARGIN:g}, repeats' IQR/median <= {100 * SPREAD_LIMIT:.0f}%"
    unchecked = f" ({'; '.join(verdict.notes)})" if verdict.notes else ""
    return f"timing: reliable ({checked}){unchecked}"

# ----------------------------------------------------------------------------------------------- size


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def module_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of `model` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def weights_size_mb(directory: str) -> float:
    """Size on disk of the weight files (*.safetensors) in a saved model directory."""
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))
    return total / 2**20

# ----------------------------------------------------------------------------------------------- cost


def linear_cost(module: nn.Module, tokens: int, element_size: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one call of a linear layer on `tokens` rows of input.

    FLOPs count the multiply-adds of the GEMMs (2 per MAC). Bytes are the ideal traffic: read the
    input x once, write the output y once, read every weight once (the intermediate z of a compact
    layer is not counted — the floor assumes it stays on chip).
    """
    in_f, out_f = module.in_features, module.out_features
    io_bytes = tokens * (in_f + out_f) * element_size
    weight_bytes = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    if isinstance(module, CompactLoSparseLinear):
        k, m = module.rank, module.num_kept
        if module.prune_dim == "rows":
            macs = tokens * ((k + m) * in_f + k * out_f)
        else:
            macs = tokens * (k * in_f + (k + m) * out_f)
    elif isinstance(module, LoSparseLinear):
        # effective weight U·V (+ S) once per call, then one dense GEMM
        macs = tokens * in_f * out_f + module.rank * in_f * out_f
    else:
        macs = tokens * in_f * out_f
    return 2.0 * macs, float(io_bytes + weight_bytes)


class LinearCostCounter:
    """Counts FLOPs and bytes of every linear layer of `model` while the context is open.

        with LinearCostCounter(model) as cost:
            model(**inputs)
        cost.flops, cost.bytes, cost.calls

    Attention score/softmax, normalisation and embedding lookups are not counted, so the floor built
    from these numbers is a lower bound of the whole model's time.
    """

    def __init__(self, model: nn.Module) -> None:

        self.modules = [m for m in model.modules() if isinstance(m, (nn.Linear, CompactLoSparseLinear, LoSparseLinear))]
        self.flops = 0.0
        self.bytes = 0.0
        self.calls = 0
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0]
        # rows of x from its shape: a layer with every input pruned (in_features 0) still has rows
        flops, nbytes = linear_cost(module, x.shape[:-1].numel(), x.element_size())
        self.flops += flops
        self.bytes += nbytes
        self.calls += 1

    def __enter__(self) -> "LinearCostCounter":
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def floor_ms(flops: Optional[float], nbytes: Optional[float], peak_tflops: Optional[float],
             peak_gbps: Optional[float]) -> Optional[float]:
    """Roofline floor in ms: the larger of FLOPs / peak FLOP/s and bytes / peak bandwidth.

    None when the peaks are not known (e.g. on a CPU without --peak_tflops/--peak_gbps).
    With only one of the two peaks given, that one alone makes the floor.
    """
    if flops is None or nbytes is None or (not peak_tflops and not peak_gbps):
        return None
    compute = flops / (peak_tflops * 1e12) if peak_tflops else 0.0
    memory = nbytes / (peak_gbps * 1e9) if peak_gbps else 0.0
    return max(compute, memory) * 1e3


@torch.inference_mode()
def measure_peaks(device: Any = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048,
                  copy_mb: int = 256, repeats: int = 5) -> tuple[float, float]:
    """(TFLOP/s of a square GEMM, GB/s of a large copy) actually reached on `device` right now.

    A measured stand-in for the data-sheet peaks where none are known (a CPU, a shared machine):
    the floor built from them says how far a model is from what this machine does on its best
    kernel, not from a marketing number. Best of `repeats`.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    gemm_ms = min(timed_call_ms(lambda: torch.mm(a, b), cuda) for _ in range(repeats + 1))
    source = torch.empty(copy_mb * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    copy_ms = min(timed_call_ms(lambda: target.copy_(source), cuda) for _ in range(repeats + 1))
    tflops = 2 * size**3 / (gemm_ms / 1e3) / 1e12
    gbps = 2 * source.numel() * 4 / (copy_ms / 1e3) / 1e9  # read + write
    return tflops, gbps

# ---------------------------------------------------------------------------------- benchmark models


@dataclass(frozen=True)
class ArchSpec:
    """A built-in architecture: a transformers config class and values, and what head to put on it."""

    kind: str  # "classification", "seq2seq" or "causal"
    config_class: str
    values: tuple[tuple[str, Any], ...]
    description: str
    layers_key: Optional[str] = None  # the config field --num_layers overrides, if any

    def config(self, num_layers: Optional[int] = None) -> Any:
        import transformers

        values = dict(self.values)
        if num_layers is not None:
            if self.layers_key is None:
                raise ValueError(f"--num_layers is not supported for this architecture ({self.description})")
            values[self.layers_key] = num_layers
        return getattr(transformers, self.config_class)(**values)


ARCHS: dict[str, ArchSpec] = {
    "bert-base": ArchSpec(
        "classification", "BertConfig",
        (("vocab_size", 30522), ("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12),
         ("intermediate_size", 3072), ("max_position_embeddings", 512), ("num_labels", 2)),
        "BERT-base: 12 layers, hidden 768, FFN 3072, 12 heads, sequence classification head",
        layers_key="num_hidden_layers",
    ),
    "deberta-v3-base": ArchSpec(
        "classification", "DebertaV2Config",
        (("vocab_size", 128100), ("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12),
         ("intermediate_size", 3072), ("hidden_act", "gelu"), ("max_position_embeddings", 512),
         ("type_vocab_size", 0), ("relative_attention", True), ("max_relative_positions", -1),
         ("position_buckets", 256), ("norm_rel_ebd", "layer_norm"), ("share_att_key", True),
         ("pos_att_type", ["p2c", "c2p"]), ("position_biased_input", False), ("layer_norm_eps", 1e-7),
         ("pad_token_id", 0), ("num_labels", 2)),
        "DeBERTaV3-base: 12 layers, hidden 768, FFN 3072, 12 heads, relative attention (256 buckets)",
        layers_key="num_hidden_layers",
    ),
    "bart-large": ArchSpec(
        "seq2seq", "BartConfig",
        (("vocab_size", 50265), ("d_model", 1024), ("encoder_layers", 12), ("decoder_layers", 12),
         ("encoder_attention_heads", 16), ("decoder_attention_heads", 16), ("encoder_ffn_dim", 4096),
         ("decoder_ffn_dim", 4096), ("max_position_embeddings", 1024), ("activation_function", "gelu"),
         ("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2), ("decoder_start_token_id", 2),
         ("forced_eos_token_id", None)),
        "BART-large: 12+12 layers, d_model 1024, FFN 4096, 16 heads, LM head (vocab 50265)",
    ),
    "llama-7b-layer": ArchSpec(
        "causal", "LlamaConfig",
        (("vocab_size", 32000), ("hidden_size", 4096), ("intermediate_size", 11008), ("num_hidden_layers", 4),
         ("num_attention_heads", 32), ("num_key_value_heads", 32), ("max_position_embeddings", 4096),
         ("rms_norm_eps", 1e-6), ("hidden_act", "silu"), ("tie_word_embeddings", False),
         ("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)),
        "a stack of Llama-7B-shaped decoder layers: hidden 4096, FFN 11008, 32 heads (--num_layers, default 4)",
        layers_key="num_hidden_layers",
    ),
    # tiny ones, for tests and smoke runs
    "tiny-bert": ArchSpec(
        "classification", "BertConfig",
        (("vocab_size", 1000), ("hidden_size", 64), ("num_hidden_layers", 2), ("num_attention_heads", 4),
         ("intermediate_size", 256), ("max_position_embeddings", 512), ("num_labels", 2)),
        "tiny BERT for tests: 2 layers, hidden 64", layers_key="num_hidden_layers",
    ),
    "tiny-bart": ArchSpec(
        "seq2seq", "BartConfig",
        (("vocab_size", 1000), ("d_model", 64), ("encoder_layers", 2), ("decoder_layers", 2),
         ("encoder_attention_heads", 4), ("decoder_attention_heads", 4), ("encoder_ffn_dim", 256),
         ("decoder_ffn_dim", 256), ("max_position_embeddings", 512), ("pad_token_id", 1), ("bos_token_id", 0),
         ("eos_token_id", 2), ("decoder_start_token_id", 2), ("forced_eos_token_id", None)),
        "tiny BART for tests: 2+2 layers, d_model 64",
    ),
    "tiny-llama": ArchSpec(
        "causal", "LlamaConfig",
        (("vocab_size", 1000), ("hidden_size", 64), ("intermediate_size", 172), ("num_hidden_layers", 2),
         ("num_attention_heads", 4), ("num_key_value_heads", 4), ("max_position_embeddings", 512),
         ("tie_word_embeddings", False), ("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)),
        "tiny Llama for tests: 2 layers, hidden 64", layers_key="num_hidden_layers",
    ),
}

_MODEL_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "causal": "AutoModelForCausalLM",
}


def fill_device_defaults(parser: Any, args: Any) -> bool:
    """The defaults both benchmark CLIs share: bert-base, the GPU if there is one, bf16 there and fp32 on the
    CPU, default torch threads on the GPU and 'auto' on the CPU. Returns whether the run is on CUDA."""
    if args.arch is None and args.model_name_or_path is None:
        args.arch = "bert-base"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.threads is None:
        args.threads = "default" if cuda else "auto"
    return cuda


def model_kind(config: Any) -> str:
    """'seq2seq', 'causal' or 'classification' for a transformers config (by its architectures/type)."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"

    names = " ".join(getattr(config, "architectures", None) or [])
    family = get_family(config.model_type)
    if "CausalLM" in names or "LMHeadModel" in names or (family is not None and family.kind == "decoder"):
        return "causal"
    return "classification"


def build_model(arch: str, num_layers: Optional[int] = None, device: Any = None, seed: int = 0) -> nn.Module:
    """A model of a built-in architecture with random weights (fp32, eval mode); nothing is downloaded."""
    import transformers

    spec = ARCHS[arch]
    config = spec.config(num_layers)
    model_class = getattr(transformers, _MODEL_CLASSES[spec.kind])
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = model_class.from_config(config)
    return model.float().eval()


def load_model(path: str, device: Any = None) -> tuple[nn.Module, str, bool]:
    """Load a local or hub model: (model in fp32 eval mode, kind, is_compact).

    A LoSparse compact checkpoint (written by `losparse.save`) is rebuilt as is; anything else is
    loaded with the transformers Auto class for its kind (sequence classification with 2 labels
    unless the config says otherwise, seq2seq LM, causal LM).
    """
    import transformers

    if os.path.isfile(os.path.join(path, LOSPARSE_CONFIG_FILE)):
        model = load(path, device=device).float()
        return model, model_kind(model.config), True
    config = transformers.AutoConfig.from_pretrained(path)
    kind = model_kind(config)
    model = getattr(transformers, _MODEL_CLASSES[kind]).from_pretrained(path, dtype=torch.float32)
    if device is not None:
        model.to(device)
    return model.eval(), kind, False


def random_inputs(model: nn.Module, kind: str, batch_size: int, seq_len: int, tgt_len: int = 32,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (avoiding the low, usually special, ids) and an all-ones attention mask.

    seq2seq models also get `decoder_input_ids` of length `tgt_len`.
    """
    device = next(model.parameters()).device
    config = model.config
    vocab = config.vocab_size if hasattr(config, "vocab_size") else config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    low = min(5, vocab - 1)
    inputs = {
        "input_ids": torch.randint(low, vocab, (batch_size, seq_len), generator=generator).to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
    }
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(low, vocab, (batch_size, tgt_len), generator=generator).to(device)
    return inputs


def prune_with_random_scores(model: nn.Module, seed: int = 0) -> float:
    """Mask S of a decomposed model to the config's exact final kept fraction with random neuron scores.

    Stands in for training: the global, parameter-weighted ranking of `LoSparsePruner.update_masks`
    runs on random scores (fixed seed), which gives the exact ratio with a realistic scattered pattern
    of kept rows. Returns the kept fraction of S.
    """
    pruner = LoSparsePruner(model, total_steps=10)
    generator = torch.Generator().manual_seed(seed)
    pruner.update_masks(pruner.final_kept_fraction, scores=torch.rand(pruner.neuron_sizes.shape, generator=generator))
    return pruner.achieved_kept_fraction()


def compress_for_benchmark(model: nn.Module, remaining_ratio: float, low_rank_ratio: float, seed: int = 0,
                           svd_solver: str = "randomized", **config_values: Any) -> nn.Module:
    """decompose (`losparse.apply`) → prune with random scores → `losparse.compact`, in place; returns `model`.

    The SVD defaults to the randomized solver: for timing, which U and V the model holds does not
    matter (the dense reference is merged from the same factors), and an exact SVD of every matrix
    takes minutes on a CPU for 4096×11008 matrices.
    """
    config = LoSparseConfig(remaining_ratio=remaining_ratio, low_rank_ratio=low_rank_ratio, svd_solver=svd_solver,
                            **config_values)
    torch.manual_seed(seed)
    apply(model, config)
    prune_with_random_scores(model, seed)
    return compact(model)


def output_difference(reference: Any, other: Any) -> dict[str, float]:
    """Max |a − b| over the logits and last hidden states of two model outputs, and relative to max |a|."""
    pairs = []
    for key in ("logits", "last_hidden_state", "encoder_last_hidden_state"):
        a, b = getattr(reference, key, None), getattr(other, key, None)
        if a is not None and b is not None:
            pairs.append((key, a, b))
    hidden_a, hidden_b = getattr(reference, "hidden_states", None), getattr(other, "hidden_states", None)
    if hidden_a and hidden_b:
        pairs.append(("hidden_states[-1]", hidden_a[-1], hidden_b[-1]))
    if not pairs:
        raise ValueError("the model outputs hold neither logits nor hidden states to compare")
    worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "output_scale": 0.0, "compared": ",".join(p[0] for p in pairs)}
    for _, a, b in pairs:
        a, b = a.detach().float(), b.detach().float()
        diff = float((a - b).abs().max())
        scale = float(a.abs().max())
        worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
        worst["max_rel_diff"] = max(worst["max_rel_diff"], diff / max(scale, 1e-12))
        worst["output_scale"] = max(worst["output_scale"], scale)
    return worst


def choose_threads(requested: Optional[str]) -> tuple[int, str]:
    """Set torch's CPU thread count: an integer, "auto" or None (leave torch's default).

    "auto" takes the cores that the 1-minute load average leaves free (at least 1, at most torch's
    default). On a shared machine more threads than free cores is far slower, not faster: every
    parallel region waits for a thread that the scheduler has parked (a 2-layer model measured 90 ms
    per forward with 2 threads under load 3 on 2 cores, 0.8 ms with 1 thread).
    Returns (threads in use, how they were chosen).
    """
    default = torch.get_num_threads()
    if requested in (None, "", "default"):
        return default, "torch default"
    if requested == "auto":
        try:
            busy = math.ceil(os.getloadavg()[0] - 0.25)
        except OSError:  # pragma: no cover
            return default, "torch default (no load average here)"
        threads = max(1, min(default, (os.cpu_count() or default) - busy))
        torch.set_num_threads(threads)
        return threads, f"auto: {os.cpu_count()} CPUs, 1-min load {os.getloadavg()[0]:.2f} before start"
    threads = int(requested)
    if threads < 1:
        raise ValueError(f"--threads {requested!r} must be >= 1 or 'auto'")
    torch.set_num_threads(threads)
    return threads, "--threads"


def threads_flag_error(value: str) -> Optional[str]:
    """The message for a bad `--threads` value (a positive number, 'auto' or 'default'), or None if it is fine."""
    if value in ("auto", "default") or (value.isdigit() and int(value) >= 1):
        return None
    return f"--threads {value!r}: give a positive number, 'auto' or 'default'"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_load() -> dict[str, Any]:
    """Load averages and thread count, to print next to every number taken on a shared machine."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {"load_avg_1_5_15": load, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def environment_at_start(threads: Optional[str]) -> dict[str, Any]:
    """Record the load average, then set torch's CPU threads (`choose_threads`) and say so on stderr.

    Call first thing in a benchmark script; pass the result to `environment_record` at the end.
    """
    import sys

    load_at_start = machine_load()["load_avg_1_5_15"]
    count, choice = choose_threads(threads)
    print(f"torch CPU threads: {count} ({choice})", file=sys.stderr)
    return {"load_at_start": load_at_start, "threads_choice": choice}


def environment_record(start: dict[str, Any], script: str, argv: Optional[list[str]],
                       wall_started: float) -> dict[str, Any]:
    """Machine, versions, threads, load at start and end, the command and the wall time of a benchmark run."""
    import platform
    import sys
    import time

    import transformers

    return {
        "machine": f"{platform.node()}: {cpu_name()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads_choice": start["threads_choice"],
        "load_at_start": start["load_at_start"],
        "load_at_end": machine_load()["load_avg_1_5_15"],
        "command": [script] + (argv if argv is not None else sys.argv[1:]),
        "wall_s": time.perf_counter() - wall_started,
    }


def machine_line(result: dict[str, Any]) -> str:
    """One line with the `environment_record` fields, printed under every benchmark table."""
    return (f"machine: {result['machine']}; load average (1/5/15 min) at start {result['load_at_start']}, at end "
            f"{result['load_at_end']}; {result['torch_threads']} torch threads ({result['threads_choice']}); "
            f"wall {result['wall_s']:.1f} s")


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """A benchmark's command line: INFO logs on stdout, a usage error as one line on stderr and exit code 2."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, stream=sys.stdout)
    try:
        main(argv)
    except LoSparseUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
