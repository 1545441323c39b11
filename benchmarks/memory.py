"""Peak memory of one training step: dense fine-tuning vs LoSparse fine-tuning vs one-shot compression.

    python scripts/benchmark_memory.py --preset tiny --json memory.json
    python scripts/benchmark_memory.py --preset smollm2-135m-shape --batch_size 1 --seq_len 128
    python scripts/benchmark_memory.py --preset llama-7b-shape --device cuda      # GPU only

(scripts/benchmark_memory.py is this module's `main`.)

A Llama-shaped `LlamaForCausalLM` is built from a config with random weights (nothing downloaded). One
*steady-state* training step is measured per path: an optimizer step on zero gradients (outside the
measurement, no forward) creates the optimizer states, then forward + backward + [pruner importance update] + AdamW step + zero_grad(set_to_none)
are measured, with the same batch × seq, optimizer (AdamW, fused unless --no_fused) and precision
(fp32, or fp32 weights under bf16 autocast as `--bf16` in the Trainer):
  dense                 plain full fine-tuning of every parameter
  losparse-old          `F.linear(x, addmm(S, U, V), b)`, the forward before `losparse.core.functional`
  losparse-lean         `losparse.core.functional.losparse_linear` (no (out, in) matrix saved for the backward)
  losparse-lean-bf16m   lean forward + `LeanAdamW` (bf16 moments for S)
each LoSparse path before pruning and after pruning to the target (masks from random scores through
`LoSparsePruner.update_masks(p_T, scores=...)`, then a step with the pruner's importance update), and
  oneshot               `losparse.methods.oneshot.oneshot_compress` on calibration batches (forward only, block by
                        block: measured on the first 2 blocks, plus the parameter bytes of the others)
After pruning S is only masked, so the measured memory does not fall; `s_rows_shrunk_estimate` is what
the lean-bf16m step would hold if S, its gradient and its moments kept only the kept rows. That is measured
with `--shrink_fractions 0.5,0.2,final` (`--shrink_sparse`, `losparse.core.shrink`):
  losparse-lean-bf16m (shrunk to p)  lean forward + `LeanAdamW` after S, its gradient and its moments shrank to
                        the kept fraction p of S (monotone masks from one random score vector, so each set is
                        a subset of the one before, as in training), with the importance update

Measurement. CPU: `MemoryTracker`, a TorchDispatchMode that sees every tensor an op returns and tracks
live bytes per storage (deduplicated; weakref finalizers notice frees), after registering the tensors
alive before the step (parameters, buffers, optimizer state, batch); kernel-internal scratch is not seen.
Peaks are also kept per phase (forward, backward, importance, optimizer). CUDA: `max_memory_allocated`
after `reset_peak_memory_stats`, baseline included. An analytic extrapolation to Llama shapes (formula
printed with the table) gives the largest one that fits on one 80 GB GPU per path.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from losparse.core import decompose
from losparse.core.config import LoSparseConfig
from losparse.core.decompose import apply, get_config, rank_for_ratio
from losparse.core.errors import LoSparseUsageError
from losparse.core.functional import choose_strategy, losparse_linear
from losparse.core.layers import LoSparseLinear
from losparse.core.pruner import LoSparsePruner
from losparse.core.shrink import monotone_update_masks, shrink_pruned
from losparse.methods.oneshot.algorithm import oneshot_compress
from losparse.training.optim import LeanAdamW, sparse_parameters

GIB = float(1 << 30)
GPU_BYTES = 80e9
#: hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
PRESETS: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "tiny": (64, 128, 2, 4, 2, 256, True),
    "smollm2-135m-shape": (576, 1536, 30, 9, 3, 49152, True),
    "llama-7b-shape": (4096, 11008, 32, 32, 32, 32000, False),
}
#: The Llama-family shapes of the 80 GB extrapolation (same fields as PRESETS).
EXTRAPOLATION_SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "llama-1.1b": (2048, 5632, 22, 32, 4, 32000, False),
    "llama-3b": (3200, 8640, 26, 32, 32, 32000, False),
    "llama-7b": (4096, 11008, 32, 32, 32, 32000, False),
    "llama-13b": (5120, 13824, 40, 40, 40, 32000, False),
    "llama-34b": (8192, 22016, 48, 64, 8, 32000, False),
    "llama-70b": (8192, 28672, 80, 64, 8, 32000, False),
}
#: Calibration sequences of the one-shot extrapolation (`losparse.cli.oneshot.OneShotArguments` default).
ONESHOT_SAMPLES = 128
TRAINING_PATHS = ("dense", "losparse-old", "losparse-lean", "losparse-lean-bf16m")
PRECISIONS = ("fp32", "bf16-autocast")


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes, deduplicated by storage, and their peak (overall and per named phase).

    Every tensor an op returns under the mode is registered once per storage; a weakref finalizer on the
    storage subtracts it when it is freed. Tensors made before the mode are counted only if `track`ed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase: Optional[str] = None

    def track(self, tensors: Iterable[Optional[torch.Tensor]]) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._register(tensor)

    def _register(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()
        self.live[key] = nbytes
        self.current += nbytes
        weakref.finalize(storage, self._free, key)
        if self.current > self.peak:
            self.peak = self.current
        if self._phase is not None and self.current > self.phase_peaks[self._phase]:
            self.phase_peaks[self._phase] = self.current

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous = self._phase
        self._phase = name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)
        try:
            yield
        finally:
            self._phase = previous

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self._register(leaf)
        return out


class CudaPeak:
    """The same interface as `MemoryTracker` for CUDA, from the caching allocator's statistics."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phase_peaks: dict[str, int] = {}

    def track(self, tensors: Iterable[Optional[torch.Tensor]]) -> None:
        pass

    @property
    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    @property
    def peak(self) -> int:
        """Every op of a measured step runs inside a phase, so the step's peak is the largest phase peak."""
        return max([torch.cuda.max_memory_allocated(self.device), *self.phase_peaks.values()])

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            torch.cuda.synchronize(self.device)
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))

    def __enter__(self) -> "CudaPeak":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def llama_config(preset: str, hidden: Optional[int] = None, intermediate: Optional[int] = None,
                 layers: Optional[int] = None, heads: Optional[int] = None, kv_heads: Optional[int] = None,
                 vocab: Optional[int] = None) -> Any:
    """A `LlamaConfig` of `preset` with any field overridden."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise LoSparseUsageError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    h, i, n, a, kv, v, tied = PRESETS[preset]
    h, i, n, a = hidden or h, intermediate or i, layers or n, heads or a
    kv, v = kv_heads or min(kv, a), vocab or v
    if h % a or a % kv:
        raise LoSparseUsageError(f"--hidden {h} must be a multiple of --heads {a}, and --heads of --kv_heads {kv}")
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                       num_key_value_heads=kv, vocab_size=v, tie_word_embeddings=tied, max_position_embeddings=4096,
                       attn_implementation="sdpa")


def build_llama(config: Any, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.float().train()


@contextlib.contextmanager
def legacy_forward() -> Iterator[None]:
    """`LoSparseLinear.forward` as it was before `losparse.core.functional`: autograd keeps W_eff = S + U·V."""
    import torch.nn.functional as F

    lean = LoSparseLinear.forward

    def forward(self: LoSparseLinear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    LoSparseLinear.forward = forward
    try:
        yield
    finally:
        LoSparseLinear.forward = lean


def make_optimizer(model: torch.nn.Module, path: str, fused: bool, lr: float = 1e-4) -> torch.optim.Optimizer:

    params = [p for p in model.parameters() if p.requires_grad]
    low = sparse_parameters(model) if path == "losparse-lean-bf16m" else []
    return LeanAdamW(params, lr=lr, weight_decay=0.01, fused=fused, foreach=None if fused else True,
                     low_precision_params=low)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                  pruner: Any, autocast: bool, meter: Any) -> float:
    """forward, backward, [importance update], optimizer step, [mask], zero_grad — each a phase of `meter`."""
    device_type = input_ids.device.type
    with meter.phase("forward"), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    with meter.phase("backward"):
        loss.backward()
        value = float(loss.detach())
        del loss
    if pruner is not None:
        with meter.phase("importance"):
            pruner.importance.update()
    with meter.phase("optimizer"):
        optimizer.step()
        if pruner is not None:
            pruner.apply_masks()
        optimizer.zero_grad(set_to_none=True)
    return value


def measure(run: Callable[[Any], Any], tracked: Callable[[], Iterable[torch.Tensor]], device: torch.device
            ) -> dict[str, Any]:
    """Peak bytes of `run(meter)` with the tensors of `tracked()` counted as alive at the start."""
    if device.type == "cuda":
        meter = CudaPeak(device)
        meter.reset_peak()
        start = meter.current
        with meter:
            run(meter)
        peak = max(meter.phase_peaks.values()) if meter.phase_peaks else torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak), "start_bytes": int(start), "phase_peak_bytes": dict(meter.phase_peaks)}
    meter = MemoryTracker()
    meter.track(tracked())
    start = meter.current
    meter.reset_peak()
    with meter:
        run(meter)
    return {"peak_bytes": int(meter.peak), "start_bytes": int(start), "phase_peak_bytes": dict(meter.phase_peaks)}


def _state_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


class _NoPhase:
    """A meter that measures nothing (the warm-up step)."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


@torch.no_grad()
def create_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pruner: Any) -> None:
    """One optimizer step on zero gradients (no forward/backward): the states exist, as from step 2 on."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    if pruner is not None:
        pruner.importance.update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_training(model: torch.nn.Module, path: str, input_ids: torch.Tensor, pruner: Any, autocast: bool,
                     fused: bool) -> dict[str, Any]:
    """Optimizer state created (`create_optimizer_state`), then one measured step of `path`."""
    optimizer = make_optimizer(model, path, fused)
    context = legacy_forward() if path == "losparse-old" else contextlib.nullcontext()
    with context:
        create_optimizer_state(model, optimizer, pruner)
        sparse = [p for group in optimizer.param_groups for p in group["params"]
                  if id(p) in optimizer.low_precision_ids]
        tensors = lambda: [*model.parameters(), *model.buffers(), *optimizer_tensors(optimizer), input_ids,
                           *([] if pruner is None else pruner.importance.state_dict().values())]
        started = time.perf_counter()
        result = measure(lambda meter: training_step(model, optimizer, input_ids, pruner, autocast, meter),
                         tensors, input_ids.device)
        result["seconds"] = round(time.perf_counter() - started, 3)
    result["param_bytes"] = _state_bytes(model.parameters())
    result["optimizer_state_bytes"] = _state_bytes(optimizer_tensors(optimizer))
    result["sparse_state_bytes"] = _state_bytes([t for p in sparse for t in optimizer.state[p].values()
                                                 if t.dim() > 0])
    return result


@contextlib.contextmanager
def random_factors() -> Iterator[None]:
    """`decompose.svd_split` replaced by small random factors: memory does not depend on which U, V the model
    holds, and 210 SVDs would dominate the benchmark's time (S = W − U·V keeps the model exact anyway)."""
    exact = decompose.svd_split

    def split(weight: torch.Tensor, rank: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(rank)
        u = torch.randn(weight.shape[0], rank, generator=generator) * 0.02
        v = torch.randn(rank, weight.shape[1], generator=generator) * 0.02
        return u.to(weight.device, weight.dtype), v.to(weight.device, weight.dtype)

    decompose.svd_split = split
    try:
        yield
    finally:
        decompose.svd_split = exact


def losparse_model(dense: torch.nn.Module, remaining_ratio: float, low_rank_ratio: float,
                   exact_svd: bool = False) -> torch.nn.Module:
    """A `losparse.apply` copy of `dense` (random U, V unless `exact_svd`: see `random_factors`)."""
    model = copy.deepcopy(dense)
    with contextlib.nullcontext() if exact_svd else random_factors():
        apply(model, LoSparseConfig(remaining_ratio=remaining_ratio, low_rank_ratio=low_rank_ratio,
                                    svd_solver="randomized"))
    return model.train()


def prune_randomly(model: torch.nn.Module, seed: int = 0) -> Any:
    """A `LoSparsePruner` whose masks are set to the final kept fraction from random neuron scores."""
    pruner = LoSparsePruner(model, total_steps=100)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(pruner.neuron_sizes.shape, generator=generator)
    pruner.update_masks(pruner.final_kept_fraction, scores=scores)
    return pruner


def measure_oneshot(dense: torch.nn.Module, remaining_ratio: float, low_rank_ratio: float, batch_size: int,
                    seq_len: int, num_samples: int, max_blocks: int = 2) -> dict[str, Any]:
    """Peak of `oneshot_compress` on `num_samples` random calibration sequences, the dense model counted.

    It works block by block, so only the parameters depend on the depth: the measurement runs on a copy
    with the first `max_blocks` blocks and adds the parameter bytes of the others (`extra_block_bytes`).
    """
    blocks = dense.model.layers
    extra = _state_bytes(p for block in blocks[max_blocks:] for p in block.parameters())
    if extra:
        shallow = copy.copy(dense)
        shallow.model = copy.copy(dense.model)
        shallow.model.layers = torch.nn.ModuleList(list(blocks[:max_blocks]))
        shallow.config = copy.deepcopy(dense.config)
        shallow.config.num_hidden_layers = max_blocks
        dense = shallow
    model = copy.deepcopy(dense).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (num_samples, seq_len), generator=generator).to(device)
    config = LoSparseConfig(remaining_ratio=remaining_ratio, low_rank_ratio=low_rank_ratio, svd_solver="randomized")
    started = time.perf_counter()
    result = measure(lambda meter: oneshot_compress(model, config, calibration_input_ids=ids, batch_size=batch_size,
                                                    show_progress=False),
                     lambda: [*model.parameters(), *model.buffers(), ids], device)
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["measured_blocks"] = min(max_blocks, len(blocks))
    result["extra_block_bytes"] = extra
    result["peak_bytes"] += extra
    result["start_bytes"] += extra
    result["param_bytes"] = _state_bytes(dense.parameters()) + extra
    return result


def shrink_fractions(text: str) -> list[Any]:
    """`--shrink_fractions`: kept fractions of S in (0, 1] (or "final"), decreasing; refuses anything else."""
    fractions: list[Any] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = "final" if part == "final" else float(part)
        except ValueError:
            value = None
        if value is None or (value != "final" and not 0.0 < value <= 1.0):
            raise LoSparseUsageError(f"--shrink_fractions {text!r}: {part!r} is not a kept fraction in (0, 1] "
                                     "or final")
        fractions.append(value)
    numeric = [f for f in fractions if f != "final"]
    final_last = "final" not in fractions or (fractions.count("final") == 1 and fractions[-1] == "final")
    if numeric != sorted(numeric, reverse=True) or not final_last:
        raise LoSparseUsageError(f"--shrink_fractions {text!r} must decrease (S only shrinks), final last")
    return fractions


def measure_shrinking(model: torch.nn.Module, fractions: list[Any], input_ids: torch.Tensor, autocast: bool,
                      fused: bool, seed: int = 0) -> dict[str, Any]:
    """The lean-bf16m step of a copy of `model` after S shrank (`losparse.core.shrink`) to each kept fraction in turn.

    The masks come from one random score vector through the monotone keep rule, so each kept set is a subset of
    the one before; S, its gradient and its moments narrow to it (a fresh optimizer per measurement holds the
    moments at the narrowed shapes, as `shrink_pruned` leaves them), then one step is measured as above.
    """
    import dataclasses

    model = copy.deepcopy(model)
    config = dataclasses.replace(get_config(model), shrink_sparse=True)
    model.losparse_config = config
    pruner = LoSparsePruner(model, total_steps=100, config=config)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(pruner.neuron_sizes.shape, generator=generator).to(pruner.importance.neuron_ema.device)
    results: dict[str, Any] = {}
    for fraction in fractions:
        kept = pruner.final_kept_fraction if fraction == "final" else float(fraction)
        pruner.importance.neuron_ema.copy_(scores)  # the measured step's importance update overwrites it
        monotone_update_masks(pruner, kept)
        shrink_pruned(pruner)
        row = measure_training(model, "losparse-lean-bf16m", input_ids, pruner, autocast, fused)
        row["kept_fraction"] = pruner.achieved_kept_fraction()
        row["sparse_param_bytes"] = _state_bytes(layer.sparse for layer in pruner.layers)
        results[f"losparse-lean-bf16m (shrunk to {kept:.3f})"] = row
    return results


def parameter_split(config: Any) -> dict[str, int]:
    """Targeted (the 7 linears of every block) and other parameters of a Llama config."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    targeted = n * (2 * h * h + 2 * h * kv + 3 * h * i)
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    other = embeddings + n * 2 * h + h
    return {"targeted": targeted, "other": other}


def low_rank_share(config: Any, low_rank_ratio: float) -> float:
    """Achieved U·V parameters / targeted parameters (ranks rounded up, as `losparse.apply` does)."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    low = sum(rank_for_ratio(o, n, low_rank_ratio) * (o + n) for o, n in shapes)
    return low / sum(o * n for o, n in shapes)


#: bytes per targeted parameter (fp32 master weights, AdamW): persistent W/S + grad + moments, U/V per ρ,
#: and what is alive in the forward → backward window (saved W_eff, autocast weight cache).
def bytes_per_targeted_param(path: str, rho: float, autocast: bool) -> dict[str, float]:
    """Persistent (weights+moments), gradient, forward-window and pruner-window bytes per targeted parameter."""
    cache = 2.0 if autocast else 0.0  # autocast keeps a bf16 copy of every weight it casts until its backward
    if path == "dense":
        return {"persistent": 12.0, "grad": 4.0, "forward": cache, "importance": 0.0}
    moments = 4.0 if path == "losparse-lean-bf16m" else 8.0
    persistent = 4.0 + moments + 12.0 * rho
    grad = 4.0 + 4.0 * rho
    if path == "losparse-old":
        forward = (2.0 + cache * (1 + rho)) if autocast else 4.0
    else:
        forward = 0.0
    return {"persistent": persistent, "grad": grad, "forward": forward, "importance": 4.0}


def activation_bytes(config: Any, tokens: int, autocast: bool) -> float:
    """Saved activations of a Llama forward for `tokens` tokens (flash/efficient attention, no checkpointing).

    Per block and token about 10·h + 4·i values (norm inputs/outputs, q/k/v/attention output, MLP
    gate/up/act/product), in the compute dtype; plus the logits and their fp32 loss copies (3 values per
    vocabulary entry per token). An approximation: the table reports it next to the measured value.
    """
    width = 2.0 if autocast else 4.0
    h, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    return tokens * (n * (10 * h + 4 * i) * width + v * (width + 8.0))


def predicted_peak(config: Any, path: str, tokens: int, autocast: bool, low_rank_ratio: float,
                   importance_per_layer: bool = False) -> float:
    """peak ≈ Σ persistent + max(forward window + activations, gradients + pruner transient) + other params."""
    split = parameter_split(config)
    rho = low_rank_share(config, low_rank_ratio) if path != "dense" else 0.0
    b = bytes_per_targeted_param(path, rho, autocast)
    n_t, n_o = split["targeted"], split["other"]
    persistent = n_t * b["persistent"] + n_o * 12.0
    forward = n_t * b["forward"] + (2.0 * n_o if autocast else 0.0) + activation_bytes(config, tokens, autocast)
    importance = b["importance"] * (n_t / config.num_hidden_layers / 7 * 3 if importance_per_layer else n_t)
    backward_end = n_t * b["grad"] + n_o * 4.0 + importance
    return persistent + max(forward, backward_end)


FORMULA = ("peak ≈ N_t·(w + m + 12ρ) + N_o·12 + max(N_t·f + A(B·T), N_t·(4 + 4ρ) + N_o·4 + X);  "
           "N_t targeted / N_o other parameters, ρ low-rank share, w = 4 (fp32 W or S), m = 8 (fp32 moments; 4 for "
           "bf16 S moments), f = forward-window bytes (old forward: 4 saved W_eff, autocast: 2 W_eff + 2 cast "
           "cache; dense under autocast: 2 cast cache), A = activations = B·T·(L·(10h + 4i)·a + V·(a + 8)), "
           "a = 2 under bf16 autocast else 4, X = pruner transient (4·N_t: importance.update multiplies all S "
           "by their gradients at once; 0 for dense)")


def extrapolate(tokens: int, autocast: bool, low_rank_ratio: float, budget: float = GPU_BYTES) -> dict[str, Any]:
    """Predicted peak of every path for every Llama shape, and the largest shape that fits in `budget` bytes."""
    from transformers import LlamaConfig

    rows: dict[str, dict[str, float]] = {}
    largest: dict[str, Optional[str]] = {}
    paths = [*TRAINING_PATHS, "losparse-lean-bf16m (per-layer importance)", "oneshot"]
    for name, (h, i, n, a, kv, v, tied) in EXTRAPOLATION_SHAPES.items():
        config = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                             num_key_value_heads=kv, vocab_size=v, tie_word_embeddings=tied)
        split = parameter_split(config)
        row = {"params_billion": round((split["targeted"] + split["other"]) / 1e9, 2)}
        for path in paths:
            if path == "oneshot":
                # fp32 model + inputs and outputs of one block for all calibration tokens + one chunk's block
                # forward (8 samples) + the SVD workspace of the largest matrix
                peak = ((split["targeted"] + split["other"]) * 4.0 + 2 * ONESHOT_SAMPLES * tokens * h * 4.0
                        + 8 * tokens * (10 * h + 4 * i) * 4.0 + 3 * h * i * 4.0)
            elif path.endswith("(per-layer importance)"):
                peak = predicted_peak(config, "losparse-lean-bf16m", tokens, autocast, low_rank_ratio, True)
            else:
                peak = predicted_peak(config, path, tokens, autocast, low_rank_ratio)
            row[path] = round(peak / 1e9, 1)
            if peak <= budget:
                largest[path] = name
            else:
                largest.setdefault(path, None)
        rows[name] = row
    return {"budget_bytes": budget, "tokens": tokens, "autocast_bf16": autocast, "low_rank_ratio": low_rank_ratio,
            "formula": FORMULA, "oneshot_formula": (f"peak ≈ 4·(N_t + N_o) + 2·{ONESHOT_SAMPLES}·T·h·4 (block inputs and "
                                                     "outputs of all calibration samples) + 8·T·(10h + 4i)·4 (one "
                                                     "8-sample chunk's block forward) + 3·h·i·4 (SVD), T = tokens per sample"),
            "predicted_peak_gb": rows, "largest_fitting": largest}


#: (tokens, in, out, rank at low_rank_ratio 0.05) of `--time_ops`: BERT-base attention and FFN, Llama-7B's.
OP_TIME_SHAPES = [(128, 768, 768, 20), (1024, 768, 768, 20), (128, 768, 3072, 31), (1024, 768, 3072, 31),
                  (128, 4096, 4096, 103), (1024, 4096, 4096, 103), (256, 4096, 11008, 150)]


def time_ops(shapes: list[tuple[int, int, int, int]], repeats: int = 3) -> list[dict[str, Any]]:
    """Forward+backward time of the merged and factored strategies of `losparse_linear` (tokens, in, out, k)."""
    rows = []
    for tokens, fan_in, fan_out, rank in shapes:
        x = torch.randn(tokens, fan_in, requires_grad=True)
        u = torch.randn(fan_out, rank, requires_grad=True)
        v = torch.randn(rank, fan_in, requires_grad=True)
        s = torch.randn(fan_out, fan_in, requires_grad=True)
        row: dict[str, Any] = {"tokens": tokens, "in": fan_in, "out": fan_out, "rank": rank}
        for strategy in ("merged", "factored"):
            times = []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                losparse_linear(x, u, v, s, None, strategy=strategy).sum().backward()
                times.append(time.perf_counter() - started)
            row[f"{strategy}_ms"] = round(1000 * sorted(times[1:])[len(times[1:]) // 2], 2)

        row["auto_picks"] = choose_strategy(tokens, fan_in, fan_out, rank)
        rows.append(row)
    return rows


def moment_precision_loss_check(steps: int, lr: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Train the tiny preset's LoSparse model `steps` steps twice, fp32 vs bf16 S moments; the losses of both.

    Same data (a fixed random batch per step), same initialisation, same pruning (masks from random scores
    halfway), so the only difference is `LeanAdamW`'s bf16 moments for S.
    """
    config = llama_config("tiny")
    dense = build_llama(config, torch.device("cpu"), seed)
    model = losparse_model(dense, 0.2, 0.05)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(5, config.vocab_size, (4, 32), generator=generator) for _ in range(steps)]
    losses: dict[str, list[float]] = {}
    for path in ("losparse-lean", "losparse-lean-bf16m"):
        trained = copy.deepcopy(model)
        optimizer = make_optimizer(trained, path, fused=False, lr=lr)
        pruner = None
        losses[path] = []
        for step, batch in enumerate(batches):
            if step == steps // 2:
                pruner = prune_randomly(trained, seed)
            losses[path].append(training_step(trained, optimizer, batch, pruner, False, _NoPhase()))
    fp32, bf16 = losses["losparse-lean"], losses["losparse-lean-bf16m"]
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    return {"steps": steps, "lr": lr, "loss_fp32_moments": fp32, "loss_bf16_moments": bf16,
            "max_abs_loss_difference": max(gaps), "final_loss_difference": bf16[-1] - fp32[-1],
            "loss_drop_fp32": fp32[0] - fp32[-1]}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="tiny", help=f"model shape: {', '.join(PRESETS)}")
    for flag in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"override the preset's {flag}")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--remaining_ratio", type=float, default=0.2)
    parser.add_argument("--low_rank_ratio", type=float, default=0.05)
    parser.add_argument("--no_fused", action="store_true", help="foreach AdamW instead of the fused kernel")
    parser.add_argument("--no_oneshot", action="store_true", help="skip the one-shot measurement")
    parser.add_argument("--oneshot_samples", type=int, default=4, help="calibration sequences for one-shot")
    parser.add_argument("--paths", default=",".join(TRAINING_PATHS), help="training paths to measure")
    parser.add_argument("--pruned_paths", default="losparse-lean-bf16m",
                        help="LoSparse paths measured again after pruning ('' for none); masking does not change "
                             "their memory except for the pruner's importance update")
    parser.add_argument("--shrink_fractions", default="",
                        help="also measure losparse-lean-bf16m with --shrink_sparse after S shrank to each of these "
                             "kept fractions of S, in turn (comma-separated, decreasing; 'final' = p_T), e.g. "
                             "0.5,0.2,final")
    parser.add_argument("--extrapolate_tokens", type=int, default=2048, help="batch×seq of the 80 GB table")
    parser.add_argument("--time_ops", action="store_true", help="also time merged vs factored losparse_linear")
    parser.add_argument("--loss_check", type=int, default=0,
                        help="also train the tiny model this many steps with fp32 vs bf16 S moments (losses)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before any model is built."""
    if args.preset not in PRESETS:
        raise LoSparseUsageError(f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    if args.precision not in PRECISIONS:
        raise LoSparseUsageError(f"--precision {args.precision!r} is not one of {', '.join(PRECISIONS)}")
    paths = [p for p in args.paths.split(",") if p]
    pruned = [p for p in args.pruned_paths.split(",") if p]
    unknown = [p for p in paths if p not in TRAINING_PATHS] + [p for p in pruned if p not in paths or p == "dense"]
    if unknown:
        raise LoSparseUsageError(f"--paths/--pruned_paths {','.join(unknown)}: --paths takes {', '.join(TRAINING_PATHS)}; "
                                 "--pruned_paths the LoSparse ones among --paths")
    if args.loss_check < 0:
        raise LoSparseUsageError(f"--loss_check {args.loss_check} must be >= 0 (steps)")
    if shrink_fractions(args.shrink_fractions) and "losparse-lean-bf16m" not in paths:
        raise LoSparseUsageError("--shrink_fractions measures losparse-lean-bf16m: keep it in --paths")
    if args.batch_size < 1 or args.seq_len < 2:
        raise LoSparseUsageError(f"--batch_size {args.batch_size} must be >= 1 and --seq_len {args.seq_len} >= 2")
    if args.preset == "llama-7b-shape" and not str(args.device).startswith("cuda"):
        raise LoSparseUsageError("--preset llama-7b-shape is GPU only (--device cuda); on CPU the 80 GB table "
                                 "extrapolates it analytically")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise LoSparseUsageError(f"--device {args.device}: CUDA is not available here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    device = torch.device(args.device)
    autocast = args.precision == "bf16-autocast"
    fused = not args.no_fused
    config = llama_config(args.preset, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads,
                          args.vocab)
    dense = build_llama(config, device)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, config.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
    paths = [p for p in args.paths.split(",") if p]
    results: dict[str, Any] = {}
    started = time.perf_counter()
    progress = lambda what: print(f"[{time.perf_counter() - started:7.1f} s] {what}", file=sys.stderr, flush=True)
    if "dense" in paths:
        results["dense"] = measure_training(dense, "dense", input_ids, None, autocast, fused)
        progress("dense measured")
    losparse_paths = [p for p in paths if p != "dense"]
    kept_fraction = None
    if losparse_paths:
        model = losparse_model(dense, args.remaining_ratio, args.low_rank_ratio)
        progress("decomposed")
        for path in losparse_paths:
            results[path] = measure_training(model, path, input_ids, None, autocast, fused)
            progress(f"{path} measured")
        fractions = shrink_fractions(args.shrink_fractions)
        if fractions:  # on a copy, before the masked measurement below prunes `model`
            results.update(measure_shrinking(model, fractions, input_ids, autocast, fused))
            progress("shrunk S measured")
        pruned_paths = [p for p in args.pruned_paths.split(",") if p]
        if pruned_paths:
            pruner = prune_randomly(model)
            kept_fraction = pruner.achieved_kept_fraction()
            for path in pruned_paths:
                results[f"{path} (pruned)"] = measure_training(model, path, input_ids, pruner, autocast, fused)
                progress(f"{path} (pruned) measured")
            lean = results.get("losparse-lean-bf16m (pruned)")
            if lean is not None:
                sparse_param = _state_bytes(layer.sparse for layer in pruner.layers)
                freed = (1.0 - kept_fraction) * (2 * sparse_param + lean["sparse_state_bytes"])
                results["s_rows_shrunk_estimate"] = {"peak_bytes": int(lean["peak_bytes"] - freed),
                                                     "formula": "lean-bf16m pruned peak − (1 − kept)·(S + ∂S + "
                                                                "moments of S)"}
        del model
    if not args.no_oneshot:
        results["oneshot"] = measure_oneshot(dense, args.remaining_ratio, args.low_rank_ratio, args.batch_size,
                                             args.seq_len, args.oneshot_samples)
        progress("oneshot measured")
    tokens = args.batch_size * args.seq_len
    measured_prediction = {path: predicted_peak(config, path, tokens, autocast, args.low_rank_ratio)
                           for path in paths}
    report = {
        "preset": args.preset, "device": str(device), "precision": args.precision, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "optimizer": "AdamW " + ("fused" if fused else "foreach"),
        "measurement": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                       "MemoryTracker (live tensor bytes by storage, TorchDispatchMode)",
        "config": {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
                   "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                   "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size},
        "remaining_ratio": args.remaining_ratio, "low_rank_ratio": args.low_rank_ratio,
        "kept_fraction_after_pruning": kept_fraction, "results": results,
        "formula_prediction_bytes": measured_prediction,
        "extrapolation": extrapolate(args.extrapolate_tokens, autocast, args.low_rank_ratio),
    }
    if args.loss_check:
        report["moment_precision_loss_check"] = moment_precision_loss_check(args.loss_check)
    if args.time_ops:
        report["op_times"] = time_ops(OP_TIME_SHAPES)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"peak memory of one training step, {report['preset']} {report['config']}, batch {report['batch_size']}"
             f" × seq {report['seq_len']}, {report['precision']}, {report['optimizer']}, on {report['device']} "
             f"({report['measurement']})",
             f"{'path':<36}{'peak GiB':>10}{'start GiB':>11}{'formula GiB':>12}  phase peaks (GiB)"]
    predictions = report["formula_prediction_bytes"]
    for name, row in report["results"].items():
        phases = " ".join(f"{k}={v / GIB:.4f}" for k, v in row.get("phase_peak_bytes", {}).items())
        start = f"{row['start_bytes'] / GIB:>11.4f}" if "start_bytes" in row else " " * 11
        formula = f"{predictions[name] / GIB:>12.4f}" if name in predictions else " " * 12
        lines.append(f"{name:<36}{row['peak_bytes'] / GIB:>10.4f}{start}{formula}  {phases}")
    extra = report["extrapolation"]
    lines.append(f"\npredicted peak (GB) at {extra['tokens']} tokens, autocast bf16={extra['autocast_bf16']}, "
                 f"low_rank_ratio {extra['low_rank_ratio']}; budget {extra['budget_bytes'] / 1e9:.0f} GB")
    lines.append(extra["formula"])
    lines.append("one-shot: " + extra["oneshot_formula"])
    table = extra["predicted_peak_gb"]
    columns = list(next(iter(table.values())).keys())
    lines.append(f"{'shape':<12}" + "".join(f"{c[:22]:>24}" for c in columns))
    for shape, row in table.items():
        lines.append(f"{shape:<12}" + "".join(f"{row[c]:>24}" for c in columns))
    lines.append("largest fitting: " + ", ".join(f"{k}: {v}" for k, v in extra["largest_fitting"].items()))
    check = report.get("moment_precision_loss_check")
    if check:
        lines.append(f"bf16 vs fp32 S moments, tiny model, {check['steps']} steps at lr {check['lr']}: max |loss "
                     f"difference| {check['max_abs_loss_difference']:.2e}, final {check['final_loss_difference']:+.2e} "
                     f"(fp32 loss fell by {check['loss_drop_fp32']:.3f})")
    for row in report.get("op_times", []):
        lines.append(f"op time T={row['tokens']} {row['in']}→{row['out']} k={row['rank']}: merged {row['merged_ms']} ms, "
                     f"factored {row['factored_ms']} ms (auto: {row['auto_picks']})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None, wall_started: Optional[float] = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
    except LoSparseUsageError as error:
        print(f"error: {error}")
        return 2
    started = wall_started or time.perf_counter()
    report = run(args)
    report["wall_seconds"] = round(time.perf_counter() - started, 2)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
