"""Dense vs LoSparse compact inference: latency, throughput, parameters, memory and the roofline floor.

    python scripts/benchmark_inference.py --arch bert-base --remaining_ratio 0.1 --low_rank_ratio 0.03 \
        --device cpu --batch_size 4 --seq_len 128 --json out.json

(scripts/benchmark_inference.py is this module's `main`.)

One run builds both models on the same weights: a model of the chosen architecture (random weights
from a built-in config, nothing downloaded; or --model_name_or_path) is decomposed (`losparse.apply`),
its sparse parts are pruned to the exact ratio with random neuron scores (the pruner's own global
ranking, fixed seed) and compacted (`losparse.compact`); the dense model is `losparse.merge` of a copy
of that compact model, so both compute the same function. Their outputs are compared (in fp32, then
in --dtype) and the run fails with exit code 1 if they disagree. Then both are timed, interleaved
(dense, compact, dense, ...; warm-up, then the median of the repeats; CUDA events on a GPU), in each
--mode: eager, compile (torch.compile) and, on CUDA, cudagraphs (torch.compile mode="reduce-overhead").

Workloads: encoders (bert-base, deberta-v3-base): one forward of batch × seq. bart-large: a forward
(decoder length --tgt_len) and `generate` with each of --num_beams, exactly --max_new_tokens new
tokens. llama-7b-layer: prefill (a forward over batch × seq, last-token logits) and batch-1 decode
(tokens/s from generate with --max_new_tokens minus generate with 1 new token).

--peers adds two like-sized models to the interleaved timing (BERT-family encoders, Llama-family decoders):
"structured" (whole heads and FFN neurons removed; decoders: key/value groups and FFN neurons, FLAP-style) and "lowrank" (method lowrank, compacted), both at the compact
model's achieved ratio (`benchmarks.peers`); each table row then also gives their latency and
their time over the compact model's. --sweep times every --sweep_batch_sizes × --sweep_seq_lens
shape (default 1/8/32 × 128/512; decoders: prefill and decode at each), and --plot PATH draws the
speed-up over dense vs tokens per call.

Beside each time the floor is printed: over all linear layers, FLOP floor = FLOPs / --peak_tflops,
byte floor = (read x + write y once + read the weights) / --peak_gbps; the floor is the larger. The
defaults are GPU numbers (800 TFLOP/s, 3000 GB/s) on CUDA; on a CPU the floor is n/a unless both
flags are given. Exit codes: 0 ok, 1 outputs disagree, 2 bad arguments, 3 a workload failed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any, Callable, Optional

import torch

import losparse
from benchmarks.common import (
    ARCHS,
    LinearCostCounter,
    TimingVerdict,
    build_model,
    combine_verdicts,
    compress_for_benchmark,
    cpu_name,
    environment_at_start,
    environment_record,
    fill_device_defaults,
    floor_ms,
    interleaved_latency_ms,
    judge_timing,
    load_average,
    load_model,
    machine_line,
    machine_load,
    measure_peaks,
    module_bytes,
    output_difference,
    parameter_count,
    random_inputs,
    threads_flag_error,
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("eager", "compile", "cudagraphs")
#: the models a run may time, in table order (the last two only with --peers)
MODEL_NAMES = ("dense", "compact", "structured", "lowrank")
MODE_ALIASES = {"both": ("eager", "compile"), "all": MODES}
#: relative tolerance (max |dense − compact| / max |dense| over logits and last hidden states)
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 8e-2, torch.float16: 2e-2}
GPU_PEAK_TFLOPS = 800.0
GPU_PEAK_GBPS = 3000.0


# ---------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--arch", choices=sorted(ARCHS), default=None,
                        help="built-in architecture with random weights (default: bert-base)")
    source.add_argument("--model_name_or_path", default=None,
                        help="a transformers model (local dir or hub id), or a LoSparse compact checkpoint "
                             "(then it is benchmarked as saved and the ratio flags are ignored)")
    parser.add_argument("--num_layers", type=int, default=None,
                        help="override the number of layers of a built-in arch (llama-7b-layer: default 4)")
    parser.add_argument("--remaining_ratio", type=float, default=0.2)
    parser.add_argument("--low_rank_ratio", type=float, default=0.05)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128, help="input (prompt / source) length")
    parser.add_argument("--tgt_len", type=int, default=32, help="decoder length of a seq2seq forward")
    parser.add_argument("--num_beams", default="1,8", help="seq2seq generate: comma-separated beam sizes")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens generated (min = max)")
    parser.add_argument("--no_generate", action="store_true", help="time forward/prefill only")
    parser.add_argument("--mode", default=None,
                        help="comma-separated subset of eager,compile,cudagraphs, or 'both' (eager,compile) or "
                             "'all'; default: eager on cpu, both on cuda")
    _add_timing_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--peers", action="store_true",
                        help="also time a structured (heads + FFN neurons removed) and a low-rank (method lowrank) "
                             "model of the compact model's size; BERT-family encoders and Llama-family decoders (prefill and "
                             "decode; see benchmarks.peers)")
    parser.add_argument("--sweep", action="store_true",
                        help="time every --sweep_batch_sizes x --sweep_seq_lens shape instead of --batch_size x "
                             "--seq_len (decoders: prefill and decode at each)")
    parser.add_argument("--sweep_batch_sizes", default="1,8,32", help="--sweep: comma-separated batch sizes")
    parser.add_argument("--sweep_seq_lens", default="128,512", help="--sweep: comma-separated sequence lengths")
    parser.add_argument("--plot", default=None, help="--sweep: write a PNG of speed-up vs tokens per call here")
    parser.add_argument("--contiguous", action="store_true",
                        help="permute FFN neurons so kept S rows form one block (losparse.make_contiguous) before timing")
    parser.add_argument("--optimize", action="store_true",
                        help="let losparse.optimize pick each layer's fastest exact form (compact / dense / triton) at "
                             "the --batch_size x --seq_len shape before timing")
    return parser


def _add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per model (default 2 cpu, 5 cuda)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per model (default 10 cpu, 50 cuda)")
    parser.add_argument("--max_seconds", type=float, default=None,
                        help="stop repeating a workload after this long (min 3 repeats); default 15 on cpu")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help=f"peak FLOP/s for the floor (default {GPU_PEAK_TFLOPS:g} on cuda, none on cpu)")
    parser.add_argument("--peak_gbps", type=float, default=None,
                        help=f"peak memory bandwidth in GB/s for the floor (default {GPU_PEAK_GBPS:g} on cuda)")
    parser.add_argument("--measure_peaks", action="store_true",
                        help="set --peak_tflops/--peak_gbps from a GEMM and a copy timed on this device now "
                             "(a floor for machines without data-sheet numbers, e.g. a shared CPU)")
    parser.add_argument("--svd_solver", choices=("randomized", "exact", "auto"), default="randomized",
                        help="top-k SVD used by losparse.apply (values do not affect timing; exact is slow on cpu)")
    parser.add_argument("--align", default="auto",
                        help="ranks and kept-neuron counts as multiples of N (LoSparseConfig.align): 'auto' = 16 "
                             "when a GPU is visible (the SVD runs there), else 8, for matrices whose smaller side is "
                             ">= 16·N; an integer aligns every matrix; 1 = off")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max relative output difference allowed in --dtype (fp32 check: 1e-3)")
    parser.add_argument("--threads", default=None,
                        help="torch CPU threads: a number, 'auto' (the cores the load average leaves free) or "
                             "'default'; default: auto on cpu, torch's default on cuda")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags, with the device-dependent defaults filled in; a bad combination exits 2 (argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cuda = fill_device_defaults(parser, args)
    if threads_flag_error(args.threads):
        parser.error(threads_flag_error(args.threads))
    args.modes = _modes(parser, args.mode or ("both" if cuda else "eager"), cuda)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.repeats = args.repeats if args.repeats is not None else (50 if cuda else 10)
    if args.max_seconds is None and not cuda:
        args.max_seconds = 15.0
    _peaks(parser, args, cuda)
    try:
        args.beams = [int(b) for b in args.num_beams.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--num_beams {args.num_beams!r} is not a comma-separated list of integers")
    args.sweep_shapes = _sweep_shapes(parser, args)
    for name in ("batch_size", "seq_len", "tgt_len", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.num_layers is not None and args.arch is not None and ARCHS[args.arch].layers_key is None:
        parser.error(f"--num_layers is not supported for --arch {args.arch}")
    if not 0.0 < args.low_rank_ratio < args.remaining_ratio <= 1.0:
        parser.error("need 0 < --low_rank_ratio < --remaining_ratio <= 1")
    try:
        args.align = losparse.LoSparseConfig(align=args.align).align
    except losparse.LoSparseUsageError as exc:
        parser.error(str(exc))
    return args


def _sweep_shapes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[int, int]]:
    """(batch, seq) pairs of --sweep; --plot without --sweep is an error."""
    if args.plot and not args.sweep:
        parser.error("--plot draws the --sweep; add --sweep")
    if not args.sweep:
        return []
    values = {}
    for name in ("sweep_batch_sizes", "sweep_seq_lens"):
        try:
            values[name] = [int(v) for v in getattr(args, name).split(",") if v.strip()]
        except ValueError:
            values[name] = []
        if not values[name] or min(values[name]) < 1:
            parser.error(f"--{name} {getattr(args, name)!r} is not a comma-separated list of integers >= 1")
    return [(b, n) for b in values["sweep_batch_sizes"] for n in values["sweep_seq_lens"]]


def _modes(parser: argparse.ArgumentParser, mode_text: str, cuda: bool) -> list[str]:
    """--mode as a list of modes, aliases expanded, each once."""
    modes: list[str] = []
    for item in mode_text.split(","):
        item = item.strip()
        for mode in MODE_ALIASES.get(item, (item,)):
            if mode not in MODES:
                parser.error(f"--mode {item!r} is not one of {', '.join(MODES + tuple(MODE_ALIASES))}")
            if mode == "cudagraphs" and not cuda:
                parser.error("--mode cudagraphs needs --device cuda")
            if mode not in modes:
                modes.append(mode)
    return modes


def _peaks(parser: argparse.ArgumentParser, args: argparse.Namespace, cuda: bool) -> None:
    """Where the floor's peak numbers come from: measured, given, the GPU defaults or none (CPU)."""
    if args.measure_peaks and (args.peak_tflops is not None or args.peak_gbps is not None):
        parser.error("--measure_peaks replaces --peak_tflops/--peak_gbps; give one or the other")
    if args.measure_peaks:
        args.peaks_source = "measured on this device at start: a GEMM and a copy"
    elif args.peak_tflops is not None or args.peak_gbps is not None:
        args.peaks_source = "given"
    elif cuda:
        args.peak_tflops, args.peak_gbps = GPU_PEAK_TFLOPS, GPU_PEAK_GBPS
        args.peaks_source = "default GPU numbers (dense bf16 tensor-core class); pass --peak_tflops for fp32"
    else:
        args.peaks_source = None


# ------------------------------------------------------------------------------------------- models


def build_pair(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, str, dict[str, Any]]:
    """(dense, compact, kind, info): same function, dense = merge(copy of compact); both fp32, eval."""
    info: dict[str, Any] = {}
    started = time.perf_counter()
    if args.model_name_or_path:
        model, kind, is_compact = load_model(args.model_name_or_path, device=device)
        info["model"] = args.model_name_or_path
        if is_compact:
            info["note"] = ("LoSparse compact checkpoint benchmarked as saved; "
                            "--remaining_ratio/--low_rank_ratio/--align ignored")
            args.remaining_ratio = model.losparse_config.remaining_ratio
            args.low_rank_ratio = model.losparse_config.low_rank_ratio
            args.align = model.losparse_config.align
    else:
        model = build_model(args.arch, args.num_layers, device=device, seed=args.seed)
        kind, is_compact = ARCHS[args.arch].kind, False
        info["model"] = ARCHS[args.arch].description
    info["build_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    if not is_compact:
        compress_for_benchmark(model, args.remaining_ratio, args.low_rank_ratio, seed=args.seed,
                               svd_solver=args.svd_solver, align=args.align)
    info["compress_s"] = round(time.perf_counter() - started, 2)
    compact = model.eval()
    report = losparse.parameter_report(compact)
    info["report"] = {k: v for k, v in report.items() if k != "layers"}
    dense = losparse.merge(copy.deepcopy(compact)).eval()
    return dense, compact, kind, info


def prepare_compact(args: argparse.Namespace, compact: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """--contiguous / --optimize on the compact model (both exact: the output check that follows still holds)."""
    done: dict[str, Any] = {}
    if args.contiguous:
        report = losparse.make_contiguous(compact)
        done["contiguous"] = {"contiguous_layers": len(report.get("contiguous_layers", [])),
                              "indexed_layers": len(report.get("indexed_layers", []))}
        print(f"contiguous: {done['contiguous']['contiguous_layers']} layers slice, "
              f"{done['contiguous']['indexed_layers']} keep the indexed add", file=sys.stderr)
    if args.optimize:
        report = losparse.optimize(compact, inputs)
        done["optimize"] = {"chosen": report["chosen"], "extra_params": report["total_extra_params"]}
        print(losparse.format_optimize_report(report), file=sys.stderr)
    return done


def compare(dense: Any, compact: Any, inputs: dict[str, torch.Tensor], kind: str) -> dict[str, Any]:
    extra = {"use_cache": False} if kind != "classification" else {}
    with torch.inference_mode():
        reference = dense(**inputs, output_hidden_states=True, **extra)
        other = compact(**inputs, output_hidden_states=True, **extra)
    return output_difference(reference, other)


# ---------------------------------------------------------------------------------------- workloads


class Workload:
    """One thing to time. `make(model, compiled, mode)` returns the zero-argument callable."""

    def __init__(self, name: str, tokens: int, make: Callable[[Any, Any, str], Callable[[], Any]],
                 generate: bool = False, new_tokens: int = 0) -> None:
        self.name, self.tokens, self.make, self.generate, self.new_tokens = name, tokens, make, generate, new_tokens


def generation_kwargs(mode: str, device: torch.device) -> dict[str, Any]:
    if mode == "eager":
        return {"disable_compile": True}
    from transformers import CompileConfig

    config = CompileConfig(mode="reduce-overhead" if mode == "cudagraphs" else "default")
    if device.type != "cuda":
        config._compile_all_devices = True  # transformers compiles generate's forward on GPUs only otherwise
    return {"cache_implementation": "static", "compile_config": config}


def make_workloads(args: argparse.Namespace, kind: str, inputs: dict[str, torch.Tensor],
                   decode_inputs: dict[str, torch.Tensor], device: torch.device) -> list[Workload]:
    batch, seq = inputs["input_ids"].shape
    if kind == "classification":
        return [Workload("forward", batch * seq, lambda m, c, mode: lambda: c(**inputs))]
    if kind == "seq2seq":
        workloads = [Workload("forward", batch * (seq + args.tgt_len),
                              lambda m, c, mode: lambda: c(**inputs, use_cache=False))]
        if not args.no_generate:
            source = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
            for beams in args.beams:
                def make(m, c, mode, beams=beams):
                    kwargs = dict(num_beams=beams, do_sample=False, max_new_tokens=args.max_new_tokens,
                                  min_new_tokens=args.max_new_tokens, early_stopping=False,
                                  **generation_kwargs(mode, device))
                    return lambda: m.generate(**source, **kwargs)
                workloads.append(Workload(f"generate_beam{beams}", batch * args.max_new_tokens, make,
                                          generate=True, new_tokens=args.max_new_tokens))
        return workloads
    workloads = [Workload("prefill", batch * seq,
                          lambda m, c, mode: lambda: c(**inputs, use_cache=False, logits_to_keep=1))]
    if not args.no_generate:
        for new_tokens in sorted({1, args.max_new_tokens}):
            def make(m, c, mode, new_tokens=new_tokens):
                kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              **generation_kwargs(mode, device))
                return lambda: m.generate(**decode_inputs, **kwargs)
            workloads.append(Workload(f"generate_new{new_tokens}", new_tokens, make, generate=True,
                                      new_tokens=new_tokens))
    return workloads


class _MarkStep:
    """Calls a model compiled with CUDA graphs after marking a new step, so the graph may reuse its
    output buffers (the previous call's outputs are dropped by the timing loop anyway)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return self.module(*args, **kwargs)


def compile_model(model: Any, mode: str) -> Any:
    if mode == "eager":
        return model
    if mode == "cudagraphs":
        return _MarkStep(torch.compile(model, mode="reduce-overhead"))
    return torch.compile(model)


def snapshot(output: Any) -> Any:
    """Copies of the tensors the checks compare (a CUDA-graph output buffer is reused by the next call)."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    keys = ("logits", "last_hidden_state", "encoder_last_hidden_state", "sequences")
    kept = {k: getattr(output, k).clone() for k in keys if isinstance(getattr(output, k, None), torch.Tensor)}
    return type("Snapshot", (), kept)()


def sequences_agreement(a: Any, b: Any) -> Optional[float]:
    a = getattr(a, "sequences", a)
    b = getattr(b, "sequences", b)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return None
    return float((a == b).float().mean())


# ------------------------------------------------------------------------------------------ running


def run_workload(args: argparse.Namespace, workload: Workload, mode: str, models: dict[str, Any],
                 compiled: dict[str, Any], costs: dict[tuple[str, str], tuple[float, float]],
                 device: torch.device, tolerance: float) -> dict[str, Any]:
    cuda = device.type == "cuda"
    fns = {name: workload.make(models[name], compiled[name], mode) for name in models}
    record: dict[str, Any] = {"mode": mode, "workload": workload.name, "tokens_per_call": workload.tokens}
    warmup = args.warmup
    # First call of each model: eager cost count (linear FLOPs/bytes), output check; counts as warm-up.
    outputs = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            if (name, workload.name) not in costs:
                eager_fn = workload.make(models[name], models[name], "eager") if mode != "eager" else fn
                with LinearCostCounter(models[name]) as counter:
                    out = eager_fn()
                costs[(name, workload.name)] = (counter.flops, counter.bytes)
                if mode == "eager":
                    outputs[name] = out
                    continue
            outputs[name] = snapshot(fn())
    warmup = max(0, warmup - 1)
    if workload.generate:
        record["tokens_agree"] = sequences_agreement(outputs["dense"], outputs["compact"])
    else:
        diff = output_difference(outputs["dense"], outputs["compact"])
        record["max_rel_diff"] = diff["max_rel_diff"]
        if diff["max_rel_diff"] > tolerance:
            raise OutputsDisagree(f"{mode}/{workload.name}: compact and dense outputs differ by "
                                  f"{diff['max_rel_diff']:.3g} (relative) > {tolerance:g}")
    del outputs
    load_before = load_average()
    stats = interleaved_latency_ms(fns, warmup=warmup, repeats=args.repeats, max_seconds=args.max_seconds, cuda=cuda)
    verdict = judge_timing({name: s["times_ms"] for name, s in stats.items()}, load_before, load_average())
    for name in models:
        s = stats[name]
        record[f"{name}_ms"] = s["median_ms"]
        record[f"{name}_stats"] = {k: v for k, v in s.items() if k != "median_ms"}
        flops, nbytes = costs[(name, workload.name)]
        record[f"{name}_linear_gflops"] = flops / 1e9
        record[f"{name}_linear_gbytes"] = nbytes / 1e9
        record[f"{name}_floor_ms"] = floor_ms(flops, nbytes, args.peak_tflops, args.peak_gbps)
        record[f"{name}_tokens_per_s"] = workload.tokens / (s["median_ms"] / 1e3)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with torch.inference_mode():
                fns[name]()
            torch.cuda.synchronize()
            activation = torch.cuda.max_memory_allocated() - before
            record[f"{name}_peak_mem_mb"] = (module_bytes(models[name]) + activation) / 2**20
        else:
            record[f"{name}_peak_mem_mb"] = module_bytes(models[name]) / 2**20
    record["speedup"] = record["dense_ms"] / record["compact_ms"]
    for name in models:
        if name not in ("dense", "compact"):
            record[f"speedup_vs_{name}"] = record[f"{name}_ms"] / record["compact_ms"]
    record["load_avg"] = machine_load()["load_avg_1_5_15"]
    record.update(verdict.fields())
    return record


def decode_record(records: list[dict[str, Any]], mode: str, new_tokens: int) -> Optional[dict[str, Any]]:
    """Batch-1 decode per token = (generate N new tokens − generate 1) / (N − 1)."""
    by_name = {r["workload"]: r for r in records if r["mode"] == mode and "error" not in r}
    one, many = by_name.get("generate_new1"), by_name.get(f"generate_new{new_tokens}")
    if one is None or many is None or new_tokens < 2:
        return None
    record: dict[str, Any] = {"mode": mode, "workload": "decode", "tokens_per_call": 1,
                              "derived_from": ["generate_new1", f"generate_new{new_tokens}"]}
    steps = new_tokens - 1
    names = [name for name in MODEL_NAMES if f"{name}_ms" in many]
    for name in names:
        record[f"{name}_ms"] = (many[f"{name}_ms"] - one[f"{name}_ms"]) / steps
        record[f"{name}_tokens_per_s"] = 1e3 / record[f"{name}_ms"] if record[f"{name}_ms"] > 0 else None
        for key in ("linear_gflops", "linear_gbytes"):
            record[f"{name}_{key}"] = (many[f"{name}_{key}"] - one[f"{name}_{key}"]) / steps
        floor_one, floor_many = one[f"{name}_floor_ms"], many[f"{name}_floor_ms"]
        record[f"{name}_floor_ms"] = None if floor_one is None else (floor_many - floor_one) / steps
        record[f"{name}_peak_mem_mb"] = many[f"{name}_peak_mem_mb"]
    record["speedup"] = record["dense_ms"] / record["compact_ms"] if record["compact_ms"] > 0 else None
    for name in names[2:]:
        record[f"speedup_vs_{name}"] = record[f"{name}_ms"] / record["compact_ms"] if record["compact_ms"] > 0 else None
    record["tokens_agree"] = many.get("tokens_agree")
    record["load_avg"] = many["load_avg"]
    record.update(combine_verdicts({"generate_new1": TimingVerdict.from_fields(one),
                                    f"generate_new{new_tokens}": TimingVerdict.from_fields(many)}).fields())
    return record


class OutputsDisagree(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _mb(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def speedup_cell(record: dict[str, Any]) -> str:
    """The speed-up as printed: the figure, then [UNRELIABLE: why] when its timings cannot be trusted."""
    figure = f"{_fmt(record['speedup'])}×"
    return TimingVerdict.from_fields(record).annotate(figure) if "timing_check" in record else figure


def format_tables(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['arch'] or result['model']} — {result['device']} {result['dtype']}, "
        f"batch {result['batch_size']} "
        f"× seq {result['seq_len']}, remaining ratio {result['achieved_remaining_ratio']:.4f} "
        f"(asked {result['remaining_ratio']}, low-rank {result['low_rank_ratio']})",
        "",
        "| mode | workload | dense ms (floor) | compact ms (floor) | speedup | dense tok/s | compact tok/s | check "
        "| load 1m |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {_workload_label(r)} | failed: {r['error'][:80]} | | | | | | |")
            continue
        load = r.get("load_avg")
        if r.get("max_rel_diff") is not None:
            check = f"rel Δ {r['max_rel_diff']:.1e}"
        elif r.get("tokens_agree") is not None:
            check = f"{100 * r['tokens_agree']:.0f}% tokens same"
        else:
            check = ""
        lines.append(
            f"| {r['mode']} | {_workload_label(r)} | {_fmt(r['dense_ms'])} ({_fmt(r['dense_floor_ms'], 3)}) | "
            f"{_fmt(r['compact_ms'])} ({_fmt(r['compact_floor_ms'], 3)}) | {speedup_cell(r)} | "
            f"{_fmt(r['dense_tokens_per_s'], 1)} | {_fmt(r['compact_tokens_per_s'], 1)} | {check} | "
            f"{_fmt(load[0] if load else None)} |"
        )
    lines += [
        "",
        "| model | params | targeted-matrix params | weights MB | peak mem MB |",
        "|---|---|---|---|---|",
        f"| dense | {result['dense_params'] / 1e6:.2f}M | {result['dense_target_params'] / 1e6:.2f}M | "
        f"{result['dense_weight_mb']:,.1f} | {_mb(result.get('dense_peak_mem_mb'))} |",
        f"| compact | {result['compact_params'] / 1e6:.2f}M | {result['compact_target_params'] / 1e6:.2f}M | "
        f"{result['compact_weight_mb']:,.1f} | {_mb(result.get('compact_peak_mem_mb'))} |",
        "",
        f"outputs agree: fp32 max |dense − compact| = {result['fp32_check']['max_abs_diff']:.3g} "
        f"(relative {result['fp32_check']['max_rel_diff']:.3g}, tolerance {TOLERANCE[torch.float32]:g})"
        + (f"; {result['dtype']}: relative {result['dtype_check']['max_rel_diff']:.3g} "
           f"(tolerance {result['dtype_tolerance']:g})" if result.get("dtype_check") else ""),
        f"floor: {result['floor_note']}",
        f"peak memory: {result['peak_mem_note']}",
        timing_line(TimingVerdict.from_fields(result)),
        machine_line(result),
    ]
    return "\n".join(lines + peer_lines(result))


def _workload_label(record: dict[str, Any]) -> str:
    """The workload's name, with its shape in a --sweep."""
    if "sweep_batch_size" in record:
        return f"{record['workload']} {record['sweep_batch_size']}×{record['sweep_seq_len']}"
    return record["workload"]


def peer_lines(result: dict[str, Any]) -> list[str]:
    """With --peers: each peer's latency and the compact model's speed-up over it, then their sizes."""
    names = list(result.get("peers", {}))
    if not names:
        return []
    lines = ["", "| mode | workload | compact ms | " + " | ".join(f"{n} ms | {n} / compact" for n in names) + " |",
             "|---|---|---|" + "---|---|" * len(names)]
    for r in result["results"]:
        if "error" in r:
            continue
        cells = " | ".join(f"{_fmt(r[f'{n}_ms'])} | {_fmt(r[f'speedup_vs_{n}'])}×" for n in names)
        lines.append(f"| {r['mode']} | {_workload_label(r)} | {_fmt(r['compact_ms'])} | {cells} |")
    lines += ["", "| peer | params | targeted-matrix params | remaining ratio | weights MB | outputs |",
              "|---|---|---|---|---|---|"]
    for name, p in result["peers"].items():
        lines.append(f"| {name} | {p['params'] / 1e6:.2f}M | {p['target_params'] / 1e6:.2f}M | "
                     f"{p['remaining_ratio']:.4f} | {p['weight_mb']:,.1f} | finite (max |logit| "
                     f"{p['output_check']['output_scale']:.3g}) |")
    return lines


def peer_fields(peers: dict[str, Any], checks: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """What each peer is: parameters, targeted-matrix parameters and ratio, weight size, its output check."""
    fields = {}
    for name, model in peers.items():
        target = peer_target_params(name, model)
        fields[name] = {"params": parameter_count(model), "target_params": target,
                        "remaining_ratio": target / result["dense_target_params"],
                        "target_params_minus_compact": target - result["compact_target_params"],
                        "weight_mb": module_bytes(model) / 2**20, "output_check": checks[name]}
    return fields


def sweep_workloads(args: argparse.Namespace, kind: str, models: dict[str, Any], device: torch.device,
                    tolerance: float) -> tuple[list[dict[str, Any]], bool]:
    """`time_workloads` at every --sweep shape; each record gets sweep_batch_size and sweep_seq_len."""
    records: list[dict[str, Any]] = []
    failed = False
    for batch, seq in args.sweep_shapes:
        inputs = random_inputs(models["compact"], kind, batch, seq, args.tgt_len, seed=args.seed)
        shape_records, shape_failed = time_workloads(args, kind, models, inputs, device, tolerance)
        for record in shape_records:
            record.update(sweep_batch_size=batch, sweep_seq_len=seq)
        records += shape_records
        failed = failed or shape_failed
    return records, failed


def plot_sweep(result: dict[str, Any], path: str) -> str:
    """PNG: speed-up over dense (dense ms / model ms) vs tokens per call, one line per mode and model.

    Forward / prefill records are drawn against batch × seq tokens; decode records (batch-1, one token)
    in a second panel against the prompt length.
    """
    from benchmarks.plots import _figure, _save

    records = [r for r in result["results"] if "error" not in r and "sweep_batch_size" in r]
    decode = [r for r in records if r["workload"] == "decode"]
    forward = [r for r in records if r["workload"] in ("forward", "prefill")]
    panels = [("tokens per call (batch × seq)", forward, "tokens_per_call")]
    if decode:
        panels.append(("prompt length (batch-1 decode)", decode, "sweep_seq_len"))
    fig, axes = _figure(figsize=(6.0 * len(panels), 4.0), ncols=len(panels))
    names = [n for n in MODEL_NAMES[1:] if any(f"{n}_ms" in r for r in records)]
    for ax, (xlabel, rows, xkey) in zip(axes[0], panels):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            for name in names:
                points = sorted((r[xkey], r["dense_ms"] / r[f"{name}_ms"]) for r in rows
                                if r["mode"] == mode and r.get(f"{name}_ms"))
                if points:
                    ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=f"{name} ({mode})")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speed-up over dense (×)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0][0].set_title(f"{result['arch'] or result['model']} — {result['device']} {result['dtype']}, "
                         f"ratio {result['achieved_remaining_ratio']:.3f}", fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- main


def check_outputs(args: argparse.Namespace, dense: Any, compact: Any, inputs: dict[str, torch.Tensor], kind: str,
                  dtype: torch.dtype, tolerance: float) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """(fp32 check, --dtype check or None): dense and compact outputs compared; OutputsDisagree if they differ."""
    fp32_check = compare(dense, compact, inputs, kind)
    print(f"fp32 check: max |dense − compact| = {fp32_check['max_abs_diff']:.3g} (relative "
          f"{fp32_check['max_rel_diff']:.3g}) over {fp32_check['compared']}", file=sys.stderr)
    if fp32_check["max_rel_diff"] > TOLERANCE[torch.float32]:
        raise OutputsDisagree(f"the compact and the dense model disagree in fp32 (relative difference "
                              f"{fp32_check['max_rel_diff']:.3g} > {TOLERANCE[torch.float32]:g})")
    if dtype == torch.float32:
        return fp32_check, None
    dense.to(dtype)
    compact.to(dtype)
    dtype_check = compare(dense, compact, inputs, kind)
    if dtype_check["max_rel_diff"] > tolerance:
        raise OutputsDisagree(f"the compact and the dense model disagree in {args.dtype} (relative difference "
                              f"{dtype_check['max_rel_diff']:.3g} > {tolerance:g})")
    return fp32_check, dtype_check


def time_workloads(args: argparse.Namespace, kind: str, models: dict[str, Any], inputs: dict[str, torch.Tensor],
                   device: torch.device, tolerance: float) -> tuple[list[dict[str, Any]], bool]:
    """(one record per mode and workload, whether any failed); OutputsDisagree stops it.

    A compile or generate path that does not work here is recorded as an error, and the others go on.
    """
    decode_inputs = {k: v[:1] for k, v in inputs.items() if k != "decoder_input_ids"}
    workloads = make_workloads(args, kind, inputs, decode_inputs, device)
    records: list[dict[str, Any]] = []
    costs: dict[tuple[str, str], tuple[float, float]] = {}
    failed = False
    for mode in args.modes:
        compiled = {name: compile_model(model, mode) for name, model in models.items()}
        for workload in workloads:
            print(f"timing {mode}/{workload.name} ...", file=sys.stderr)
            try:
                records.append(run_workload(args, workload, mode, models, compiled, costs, device, tolerance))
            except OutputsDisagree:
                raise
            except Exception as exc:  # report, go on
                failed = True
                print(f"error: {mode}/{workload.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                records.append({"mode": mode, "workload": workload.name, "error": f"{type(exc).__name__}: {exc}"})
        if kind == "causal":
            decoded = decode_record(records, mode, args.max_new_tokens)
            if decoded is not None:
                records.append(decoded)
        torch._dynamo.reset()
    return records, failed


def model_fields(args: argparse.Namespace, info: dict[str, Any], kind: str, dense: Any, compact: Any,
                 device: torch.device) -> dict[str, Any]:
    """What was benchmarked: the run's settings, the achieved ratio, parameters and weight sizes."""
    report = info["report"]
    return {
        "arch": args.arch,
        "model": info["model"],
        "kind": kind,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "modes": args.modes,
        "remaining_ratio": args.remaining_ratio,
        "low_rank_ratio": args.low_rank_ratio,
        "align": args.align,
        "achieved_remaining_ratio": report["remaining_ratio"],
        "low_rank_share": report["low_rank_share"],
        "sparse_share": report["sparse_share"],
        "dense_params": parameter_count(dense),
        "compact_params": parameter_count(compact),
        "dense_target_params": report["target_dense_params"],
        "compact_target_params": report["target_params"],
        "dense_weight_mb": module_bytes(dense) / 2**20,
        "compact_weight_mb": module_bytes(compact) / 2**20,
    }


def check_fields(args: argparse.Namespace, fp32_check: dict[str, Any], dtype_check: Optional[dict[str, Any]],
                 tolerance: float, cuda: bool) -> dict[str, Any]:
    """The output checks, and what the floor and the peak memory figures mean on this device."""
    return {
        "outputs_agree": True,
        "fp32_check": fp32_check,
        "dtype_check": dtype_check,
        "dtype_tolerance": tolerance,
        "max_abs_diff": (dtype_check or fp32_check)["max_abs_diff"],
        "max_rel_diff": (dtype_check or fp32_check)["max_rel_diff"],
        "peak_tflops": args.peak_tflops,
        "peak_gbps": args.peak_gbps,
        "peaks_source": args.peaks_source,
        "floor_note": (
            "over all linear layers: max(FLOPs / peak FLOP/s, (read x + write y once + read weights) / peak "
            f"bandwidth) with {_fmt(args.peak_tflops, 4)} TFLOP/s and {_fmt(args.peak_gbps, 1)} GB/s "
            f"({args.peaks_source}); attention scores, norms and embeddings not counted, so it is a lower bound"
            if args.peak_tflops or args.peak_gbps else
            "n/a (no peak numbers for this device; pass --peak_tflops and --peak_gbps, or --measure_peaks)"
        ),
        "peak_mem_note": (
            "per model: its parameters + buffers, plus torch.cuda.max_memory_allocated() growth during one call"
            if cuda else
            "on CPU the peak is not measured: *_peak_mem_mb = parameters + buffers of that model (= *_weight_mb)"
        ),
    }


def add_headline(result: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """The first workload's figures at the top level, and one timing verdict for the whole run."""
    first = next((r for r in records if "error" not in r), None)
    if first is not None:
        for key in ("dense_ms", "compact_ms", "speedup", "dense_floor_ms", "compact_floor_ms",
                    "dense_peak_mem_mb", "compact_peak_mem_mb"):
            result[key] = first[key]
        for name in result.get("peers", {}):
            result[f"{name}_ms"], result[f"speedup_vs_{name}"] = first[f"{name}_ms"], first[f"speedup_vs_{name}"]
        result["headline"] = f"{first['mode']}/{first['workload']}"
    # Unreliable if the timings of any workload are (the headline is the first); decode is derived
    # from two generate records, which are in it already.
    timed = {f"{r['mode']}/{r['workload']}": TimingVerdict.from_fields(r) for r in records
             if "timing_check" in r and "derived_from" not in r}
    result.update(combine_verdicts(timed).fields())


def main(argv: Optional[list[str]] = None, wall_started: Optional[float] = None) -> int:
    """Exit codes: 0 ok, 1 outputs disagree, 2 bad arguments, 3 a workload failed.

    `wall_started`: when the process started (the script passes it, so the wall time includes imports).
    """
    args = parse_args(argv)
    wall_started = wall_started if wall_started is not None else time.perf_counter()
    environment = environment_at_start(args.threads)
    for name, value in (("cache_size_limit", 64), ("recompile_limit", 64)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.measure_peaks:
        args.peak_tflops, args.peak_gbps = measure_peaks(device, dtype)
        print(f"measured peaks: {args.peak_tflops:.3f} TFLOP/s, {args.peak_gbps:.1f} GB/s", file=sys.stderr)
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[dtype]
    peers: dict[str, Any] = {}
    try:
        if args.peers and args.arch:
            check_peers_supported(ARCHS[args.arch].config(args.num_layers))
        dense, compact, kind, info = build_pair(args, device)
        if args.peers:
            peers = build_peers(dense, compact, seed=args.seed, svd_solver=args.svd_solver)
    except losparse.LoSparseUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    inputs = random_inputs(compact, kind, args.batch_size, args.seq_len, args.tgt_len, seed=args.seed)
    engineering = prepare_compact(args, compact, inputs)
    models = {"dense": dense, "compact": compact}
    try:
        peer_checks = check_peer_outputs(peers, inputs)
        fp32_check, dtype_check = check_outputs(args, dense, compact, inputs, kind, dtype, tolerance)
        for peer in peers.values():
            peer.to(dtype)
        models.update(peers)
        if args.sweep:
            records, failed = sweep_workloads(args, kind, models, device, tolerance)
        else:
            records, failed = time_workloads(args, kind, models, inputs, device, tolerance)
    except (OutputsDisagree, PeerOutputsNotFinite) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = {**model_fields(args, info, kind, dense, compact, device),
              **check_fields(args, fp32_check, dtype_check, tolerance, device.type == "cuda"),
              "results": records, "build_s": info["build_s"], "compress_s": info["compress_s"],
              "repeats": args.repeats, "warmup": args.warmup}
    if "note" in info:
        result["note"] = info["note"]
    result.update(engineering)
    if peers:
        result["peers"] = peer_fields(peers, peer_checks, result)
    if args.sweep:
        result["sweep_shapes"] = [list(shape) for shape in args.sweep_shapes]
        result["batch_size"] = sorted({b for b, _ in args.sweep_shapes})
        result["seq_len"] = sorted({n for _, n in args.sweep_shapes})
    add_headline(result, records)
    result.update(environment_record(environment, "scripts/benchmark_inference.py", argv, wall_started))
    print(format_tables(result))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        result["plot"] = plot_sweep(result, args.plot)
        print(f"plot: {result['plot']}", file=sys.stderr)
    return 3 if failed else 0
