"""Decomposition W → U·V + S (paper §3.2, eqs. 6–8) and the choice of which layers get it."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from typing import Iterable, Optional

import torch
from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.core.families import builtin_target_modules
from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear, dense_features, dense_type_of, dense_weight_of
from losparse.core.methods import rank_ratio

logger = logging.getLogger(__name__)


def rank_for_ratio(out_features: int, in_features: int, low_rank_ratio: float, align: int = 1) -> int:
    """k = ceil(r·out·in / (out+in)): the rank whose U, V hold a share r of the matrix's parameters.

    Rounds up (so the achieved low-rank share is slightly above r) and is capped at min(out, in).
    With `align` N > 1 the ideal r·out·in/(out+in) is rounded to the nearest multiple of N instead (at least N,
    still capped at min(out, in)); the sparse part's p_T = ratio − achieved low-rank share absorbs the difference.
    """
    ideal = low_rank_ratio * out_features * in_features / (out_features + in_features)
    if align > 1:
        return min(align * max(1, math.floor(ideal / align + 0.5)), out_features, in_features)
    rank = math.ceil(ideal)
    return max(1, min(rank, out_features, in_features))


def allocate_ranks(shapes: list[tuple[int, int]], share: float, aligns: Optional[list[int]] = None) -> list[int]:
    """Ranks that spend at most `share` of the matrices' parameters on U·V, as close to it as possible.

    For methods whose whole budget is the low-rank part, rounding every rank up (the paper's rule for
    r) would overshoot the ratio. Here each rank is rounded down, then the leftover budget buys one
    more rank for the layers with the largest rounding loss while it still fits.
    shapes: (out_features, in_features) per layer. aligns: a multiple N per layer (default 1): its rank is
    rounded down to a multiple of N and the leftover buys N more ranks at a time (a rank is never above
    min(out, in), which may leave a full-rank layer off the grid).
    """
    aligns = aligns or [1] * len(shapes)
    ideal = [share * o * i / (o + i) for o, i in shapes]
    ranks = [max(0, min(n * math.floor(x / n), o, i)) for x, n, (o, i) in zip(ideal, aligns, shapes)]
    leftover = share * sum(o * i for o, i in shapes) - sum(k * (o + i) for k, (o, i) in zip(ranks, shapes))
    for index in sorted(range(len(shapes)), key=lambda j: ideal[j] - ranks[j], reverse=True):
        out_features, in_features = shapes[index]
        step = min(aligns[index], min(out_features, in_features) - ranks[index])
        cost = step * (out_features + in_features)
        if step > 0 and cost <= leftover + 1e-9:
            ranks[index] += step
            leftover -= cost
    return ranks


#: `align="auto"`: the multiple on a CUDA device and on any other (CPU) device
AUTO_ALIGN_CUDA = 16
AUTO_ALIGN_CPU = 8
#: `align="auto"` aligns a matrix only when its smaller side is at least this many multiples (small layers stay exact)
AUTO_ALIGN_MIN_GROUPS = 16


def resolve_align(config: LoSparseConfig, weight_device: Optional[torch.device] = None) -> int:
    """The multiple N that `config.align` means here: the integer, or for 'auto' 16 when the decomposition runs on
    CUDA (`resolve_svd_device`: --svd_device, or the GPU if one is visible) and 8 otherwise.

    `weight_device` defaults to the CPU, where the run scripts load the model; the answer is the same for a model
    already on the GPU, so `apply`, one-shot, the preflight and the pruner agree.
    """
    if config.align != "auto":
        return int(config.align)
    device = resolve_svd_device(config.svd_device, weight_device or torch.device("cpu"))
    return AUTO_ALIGN_CUDA if device.type == "cuda" else AUTO_ALIGN_CPU


def matrix_alignments(shapes: list[tuple[int, int]], config: LoSparseConfig,
                      weight_device: Optional[torch.device] = None) -> list[int]:
    """The multiple N per target matrix (out, in) for its rank and its kept-neuron count; 1 = exact counts.

    An explicit --align N applies to every matrix; 'auto' only to those with min(out, in) >= 16·N. LPAF (ranks
    from its own pruner, entry masks) ignores --align.
    """
    if config.method_spec.prune_then_factorize:
        return [1] * len(shapes)
    align = resolve_align(config, weight_device)
    if align == 1 or config.align != "auto":
        return [align] * len(shapes)
    return [align if min(shape) >= AUTO_ALIGN_MIN_GROUPS * align else 1 for shape in shapes]


#: `svd_solver="auto"` switches to the randomized SVD for matrices whose smaller side is at least this.
RANDOMIZED_SVD_MIN_DIM = 2048


def plan_ranks(shapes: list[tuple[int, int]], config: LoSparseConfig,
               weight_device: Optional[torch.device] = None) -> list[int]:
    """The rank of U·V per target matrix (out, in), as `apply` gives them: `allocate_ranks` over the whole budget
    for the low-rank methods, ceil(r·out·in/(out+in)) per layer for `low_rank_ratio`, 0 without a low-rank part,
    each on the matrix's --align grid (`matrix_alignments`). (LPAF's factor slots are then widened to
    `lpaf_max_ranks`.)"""
    spec = config.method_spec
    share = rank_ratio(spec, config.remaining_ratio, config.low_rank_ratio)
    if share is None:
        return [0] * len(shapes)
    aligns = matrix_alignments(shapes, config, weight_device)
    if spec.rank_from == "remaining_ratio":
        return allocate_ranks(shapes, share, aligns)
    return [rank_for_ratio(out_features, in_features, share, align)
            for (out_features, in_features), align in zip(shapes, aligns)]


def lpaf_max_ranks(shapes: list[tuple[int, int]], target_ranks: list[int], factor: float) -> list[int]:
    """LPAF's largest mixed rank per layer: R = min(ceil(factor·r), min(out, in)) for target rank r."""
    return [min(min(shape), max(rank, math.ceil(factor * rank - 1e-9))) for shape, rank in zip(shapes, target_ranks)]


def resolve_svd_device(svd_device: str, weight_device: torch.device) -> torch.device:
    """The device the SVD runs on: the named one, or for 'auto' this process's GPU if any, else the weight's.

    "This process's GPU" is cuda:LOCAL_RANK under torchrun / accelerate launch (the model is built
    before the Trainer selects the device), else the current CUDA device.
    """
    if svd_device != "auto":
        device = torch.device(svd_device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LoSparseUsageError(f"--svd_device {svd_device!r}: no CUDA GPU is visible; use 'auto' or 'cpu'")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise LoSparseUsageError(f"--svd_device {svd_device!r}: only {torch.cuda.device_count()} GPU(s) are "
                                     "visible (cuda:0 ...)")
        return device
    if weight_device.type == "cpu" and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", -1))
        if 0 <= local_rank < torch.cuda.device_count():
            return torch.device("cuda", local_rank)
        return torch.device("cuda", torch.cuda.current_device())
    return weight_device


@torch.no_grad()
def randomized_top_svd(matrix: torch.Tensor, rank: int, oversample: int = 16, power_iterations: int = 4,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of `matrix` (m, n) by a randomized range finder (Halko, Martinsson & Tropp 2011).

    A Gaussian sketch (n, rank + oversample) drawn from a generator seeded with `seed` (so the result
    is reproducible and identical on every DDP rank), `power_iterations` rounds of re-orthonormalised
    power iteration to sharpen a slowly decaying spectrum, then an exact SVD of the small projected
    matrix. Returns (left (m, rank), sigma (rank,), right_t (rank, n)) like `torch.linalg.svd`.
    """
    rows, cols = matrix.shape
    width = min(rank + oversample, rows, cols)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    sketch = torch.randn(cols, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    left_small, sigma, right_t = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ left_small)[:, :rank], sigma[:rank], right_t[:rank]


def use_randomized_svd(shape: tuple[int, int], rank: int, svd_solver: str) -> bool:
    """Whether `svd_solver` means the randomized SVD for a matrix of this shape and rank."""
    if svd_solver == "auto":
        return min(shape) >= RANDOMIZED_SVD_MIN_DIM and rank <= min(shape) // 4
    return svd_solver == "randomized"


@torch.no_grad()
def svd_split(weight: torch.Tensor, rank: int, svd_solver: str = "exact",
              svd_device: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD factors with √σ on both sides: U (out, k) = u·√σ, V (k, in) = √σ·vᵀ (eqs. 6–7).

    Computed in float32 (float64 stays float64) on `svd_device` whatever the weight's dtype and device,
    returned in those. `svd_solver`: see `LoSparseConfig.svd_solver`. (The remainder S = W − U·V of
    `decompose_linear` is formed from the returned factors, so the decomposition is exact either way.)
    """
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    work = weight.to(device=resolve_svd_device(svd_device, weight.device), dtype=work_dtype)
    if use_randomized_svd(tuple(weight.shape), rank, svd_solver):
        left, sigma, right_t = randomized_top_svd(work, rank)
    else:
        left, sigma, right_t = torch.linalg.svd(work, full_matrices=False)
    root = sigma[:rank].clamp_min(0).sqrt()
    u = left[:, :rank] * root
    v = root.unsqueeze(1) * right_t[:rank]
    return u.to(weight.device, weight.dtype), v.to(weight.device, weight.dtype)


def _matches_any(name: str, patterns: Optional[Iterable[str]]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns or ())


def _compile_patterns(patterns: Optional[list[str]], flag: str) -> None:
    for pattern in patterns or ():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise LoSparseUsageError(f"--{flag} {pattern!r} is not a valid regular expression ({exc})") from None


def find_target_modules(model: nn.Module, config: LoSparseConfig) -> list[tuple[str, nn.Module]]:
    """The dense layers to decompose, as (qualified name, module) pairs.

    User patterns (`target_modules`, regexes matched against the *whole* module name) or module class
    names (`target_module_types`) win over the family's registered patterns (`losparse.core.families`, by
    `config.model_type`); `exclude_modules` removes names afterwards. Only dense layers are ever
    targeted: `nn.Linear` and transformers' GPT-2 `Conv1D`.
    """
    _compile_patterns(config.target_modules, "target_modules")
    _compile_patterns(config.exclude_modules, "exclude_modules")
    patterns = config.target_modules
    types = set(config.target_module_types or ())
    if patterns is None and not types:
        patterns = builtin_target_modules(getattr(getattr(model, "config", None), "model_type", None))
    found = []
    for name, module in model.named_modules():
        if dense_type_of(module) is None:
            continue
        wanted = _matches_any(name, patterns) or type(module).__name__ in types
        if wanted and not _matches_any(name, config.exclude_modules):
            found.append((name, module))
    return found


def require_targets(model: nn.Module, config: LoSparseConfig) -> list[tuple[str, nn.Module]]:
    """`find_target_modules`, but an empty result is a usage error that lists some linear layer names."""
    targets = find_target_modules(model, config)
    if not targets:
        linear_names = [n for n, m in model.named_modules() if dense_type_of(m) is not None]
        sample = ", ".join(linear_names[:6]) + (", ..." if len(linear_names) > 6 else "")
        raise LoSparseUsageError(
            f"no module matches the targets (target_modules={config.target_modules}, "
            f"target_module_types={config.target_module_types}, exclude_modules={config.exclude_modules}); "
            f"the model's linear layers are named like: {sample or 'none'}"
        )
    return targets


def set_submodule(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


@torch.no_grad()
def decompose_linear(linear: nn.Module, low_rank_ratio: Optional[float], prune_dim: str = "rows",
                     has_sparse: bool = True, rank: Optional[int] = None, svd_solver: str = "exact",
                     svd_device: str = "auto", svd_init: bool = True,
                     factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> LoSparseLinear:
    """Replace-ready `LoSparseLinear` with U·V + S == W, the (out, in) weight of `linear` (to float rounding).

    `linear` is an `nn.Linear` or a GPT-2 `Conv1D` (whose stored weight is Wᵀ); the layer computes the
    same function either way and remembers the type for `merge`.
    The rank is `rank` if given, else k = ceil(r·out·in/(out+in)) for r = `low_rank_ratio`, else 0:
    no low-rank part (S = W, for pruning baselines). `has_sparse=False` keeps only U·V (the SVD
    truncation, for low-rank baselines). `svd_solver`, `svd_device`: see `svd_split`.
    `svd_init=False` leaves U and V at zero and S = W (LPAF: the factors are filled in after pruning; while
    both are zero neither gets a gradient, so they stay inert until then). `factors`: a precomputed (U, V) of
    that rank instead of the SVD of W (one-shot's activation-aware split); S = W − U·V all the same.
    """
    weight = dense_weight_of(linear)
    out_features, in_features = weight.shape
    if rank is None:
        rank = rank_for_ratio(out_features, in_features, low_rank_ratio) if low_rank_ratio is not None else 0
    layer = LoSparseLinear(
        in_features,
        out_features,
        rank,
        bias=linear.bias is not None,
        has_sparse=has_sparse,
        prune_dim=prune_dim,
        device=weight.device,
        dtype=weight.dtype,
        dense_type=dense_type_of(linear),
    )
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    remainder = weight.to(work_dtype)
    if rank and (svd_init or factors is not None):
        u, v = factors if factors is not None else svd_split(weight, rank, svd_solver, svd_device)
        layer.low_rank_u.copy_(u)
        layer.low_rank_v.copy_(v)
        remainder = remainder - u.to(work_dtype) @ v.to(work_dtype)
    if has_sparse:
        layer.sparse.copy_(remainder)
        layer.sparse.requires_grad_(weight.requires_grad)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)
    return layer


def losparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All LoSparse layers (training or compact form) of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoSparseLinear, CompactLoSparseLinear))]


def get_config(model: nn.Module) -> LoSparseConfig:
    config = getattr(model, "losparse_config", None)
    if config is None:
        raise LoSparseUsageError("this model has not been decomposed: call losparse.apply(model, config) first")
    return config


def _log_alignment(shapes: list[tuple[int, int]], config: LoSparseConfig, weight_device: torch.device) -> None:
    if config.method_spec.prune_then_factorize and config.align not in ("auto", "1"):
        logger.warning("method %s ignores --align %s: its ranks and entry masks keep exact counts", config.method,
                       config.align)
    aligns = matrix_alignments(shapes, config, weight_device)
    aligned = sum(align > 1 for align in aligns)
    if aligned:
        logger.info("--align %s: ranks and kept-neuron counts of %d of %d matrices are multiples of %d", config.align,
                    aligned, len(shapes), max(aligns))


def apply(model: nn.Module, config: LoSparseConfig) -> nn.Module:
    """Decompose every targeted linear layer of `model` in place; returns `model`.

    The model's outputs are unchanged (S holds the SVD remainder); `model.losparse_config` records
    the config for the trainer, `compact`, `save` and `parameter_report`.
    """
    if losparse_layers(model):
        raise LoSparseUsageError("this model already has LoSparse layers; apply() runs once per model")
    spec = config.method_spec
    if not spec.decomposes:
        raise LoSparseUsageError(f"method {config.method!r} does not decompose the model; apply() is not needed")
    if not spec.uses_low_rank_ratio:
        logger.warning("method %s puts %s into U·V: --low_rank_ratio %s is ignored", config.method,
                       "nothing" if spec.rank_from is None else "the whole --remaining_ratio", config.low_rank_ratio)
    share = rank_ratio(spec, config.remaining_ratio, config.low_rank_ratio)
    targets = require_targets(model, config)
    svd_device = resolve_svd_device(config.svd_device, targets[0][1].weight.device)
    started = time.perf_counter()
    shapes = [dense_features(linear) for _, linear in targets]
    weight_device = targets[0][1].weight.device
    ranks = plan_ranks(shapes, config, weight_device)
    _log_alignment(shapes, config, weight_device)
    prune_dim = config.prune_dim
    if spec.prune_then_factorize:  # LPAF: room for its largest mixed rank, unstructured masks, no SVD yet
        ranks = lpaf_max_ranks(shapes, ranks, config.lpaf_max_rank_factor)
        prune_dim = "entries"
    for (name, linear), rank in zip(targets, ranks):
        set_submodule(model, name, decompose_linear(linear, share, prune_dim, has_sparse=spec.has_sparse,
                                                    rank=rank, svd_solver=config.svd_solver,
                                                    svd_device=config.svd_device,
                                                    svd_init=not spec.prune_then_factorize))
    if spec.prune_then_factorize:
        logger.info("Wrapped %d linear layers for LPAF (unstructured pruning first; U·V of rank up to %d filled in "
                    "when S is factorised)", len(targets), max(ranks, default=0))
    elif share is None:
        logger.info("Wrapped %d linear layers for pruning in %.1f s (no low-rank part, no SVD)", len(targets),
                    time.perf_counter() - started)
    else:
        logger.info("Decomposed %d linear layers in %.1f s (SVD: %s on %s)", len(targets),
                    time.perf_counter() - started, config.svd_solver, svd_device)
    model.losparse_config = config
    return model
