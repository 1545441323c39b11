"""One-shot LoSparse: compress a decoder LM from calibration text, with no training.

The flow (as SparseGPT / OATS run it) goes block by block over the decoder's blocks
(`model.model.layers` of Llama/Qwen2/Mistral, `transformer.h` of GPT-2, `model.decoder.layers` of OPT,
or the ModuleList holding most target layers):

  1. the first block's inputs (hidden states plus the keyword arguments the model passes it: attention
     mask, rotary position embeddings, ...) are captured by a forward pre-hook that stops the forward;
  2. per block, hooks on its target linears accumulate the input statistics G = Σ_tokens x xᵀ (in, in)
     over the calibration tokens (each chunk's product in float32, summed in float64); layers that read
     the same tensor (q/k/v, gate/up) share one G;
  3. each target linear is decomposed W = U·V + S with an activation-aware low-rank part (below),
     S = W − U·V, and every neuron of S (a row or column, `prune_dim`) is scored from the calibration;
  4. the block runs again on the calibration inputs and its outputs are the next block's inputs, so each
     block sees the outputs of the already-compressed blocks before it.
Only one block's activations are alive at a time (inputs and outputs of all calibration samples, the
block forward in chunks of `batch_size` samples).

Activation-aware low rank: SVD-LLM's whitening. The calibration error of a low-rank L is
‖X Wᵀ − X Lᵀ‖²_F = ‖(W − L) C‖²_F with C the Cholesky factor of G = C Cᵀ, so the best rank-k L is the
truncated SVD of W·C mapped back: W·C ≈ P_k Σ_k Q_kᵀ, U = P_k Σ_k^½, V = Σ_k^½ Q_kᵀ C⁻¹. Chosen over
ASVD's diagonal scaling D = diag(rms(x_j)) because it is *optimal* for the full second-moment matrix
(ASVD is optimal only when the input channels are uncorrelated, which attention/MLP inputs are not),
at the same cost: one Cholesky of an (in, in) matrix per distinct layer input. Rank-deficient G
(fewer calibration tokens than input channels, dead channels) gets damping λ·mean(diag G)·I
(`damping`, 1% by default as in GPTQ); if the Cholesky still fails the damping grows ×10 up to three
times, and an all-zero G falls back to plain SVD. S = W − U·V keeps the layer exact whatever U·V is.

Neuron scores ("activation"): entry score |S_ij|·‖x_j‖ with ‖x_j‖ = sqrt(mean x_j²) (Wanda's
weight × input-norm), summed over the neuron's entries like the training-time importance is; so
pruning favours neurons that carry output energy on real inputs. "magnitude" sums |S_ij|.

Pruning: by default (`prune_scope="global"`) the scores of every block are computed block by block
and ONE global threshold is applied at the end, through `LoSparsePruner.update_masks(p_T, scores)`
(the training pruner's parameter-weighted rule, p_T from `target_budget`). Consequence: every block
was calibrated on the outputs of *unpruned* earlier blocks (U·V + S == W, so these are the dense
model's activations), but the budget is shared across blocks by one ranking, as LoSparse's training
does; the low-rank part (the only approximation made before pruning) is what later blocks see.
`prune_scope="block"` instead prunes each block right after its decomposition with the same p_T
(its own share of the global budget: every block keeps p_T of its S parameters), so later blocks are
calibrated on really compressed inputs, at the price of a fixed per-block allocation.

Solvers. Steps 3 and the pruning above are the "select" solver (`solver="select"`, the earlier one-shot):
S = W − U·V with rows cut by a score, nothing compensating for them. The default "reconstruct" solver
(`reconstruction`) instead solves for U·V and the kept rows of S together against the calibration error,
alternating a whitened SVD on the unkept rows with the choice of rows, each matrix choosing its own split between
rank and rows within its share of the ratio (`split="auto"`); in block scope with `compensate` every block is fitted
to the dense model's outputs from the compressed model's inputs (`compensation`).

The result is an ordinary LoSparse model (`model.losparse_config` as `losparse.apply` sets it):
`compact`/`save`/`load`/`merge` and continued LoSparse fine-tuning work on it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.decompose import (
    decompose_linear,
    losparse_layers,
    matrix_alignments,
    plan_ranks,
    require_targets,
    resolve_svd_device,
    set_submodule,
    svd_split,
    use_randomized_svd,
)
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import dense_features, dense_type_of, dense_weight_of
from losparse.core.methods import rank_ratio
from losparse.core.pruner import LoSparsePruner
from losparse.methods.oneshot.compensation import record_paired_statistics
from losparse.methods.oneshot.reconstruction import DEFAULT_ITERATIONS, SPLITS, compensated_target, solve_layers
from losparse.training.preflight import check_low_rank_share

logger = logging.getLogger("losparse")

LOWRANK_CHOICES = ("activation", "plain")
SCORE_CHOICES = ("activation", "magnitude")
PRUNE_SCOPES = ("global", "block")
#: "reconstruct": U·V and the kept rows of S solved for the calibration error (`reconstruction`); "select": S =
#: W − U·V with rows cut by a score (no compensation)
SOLVER_CHOICES = ("reconstruct", "select")
#: Where the decoder blocks live in the families we know; other models: the ModuleList with most targets.
#: The methods with a one-shot form (U·V from SVD, S neuron-pruned by calibration scores).
ONESHOT_METHODS = ("losparse", "lowrank", "itp")
KNOWN_BLOCK_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")


# ---------------------------------------------------------------------------------------------
# Statistics and blocks
# ---------------------------------------------------------------------------------------------

class InputStatistics:
    """Σ x xᵀ over the calibration tokens seen by one layer's input (in, in), float64, and the token count."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """x: (..., in) layer input of one chunk."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.gram += (flat.T @ flat).to(torch.float64)
        self.tokens += flat.shape[0]

    def second_moment(self) -> torch.Tensor:
        """E[x xᵀ] (in, in)."""
        return self.gram / max(self.tokens, 1)

    def channel_rms(self) -> torch.Tensor:
        """sqrt(E[x_j²]) per input channel (in,)."""
        return self.second_moment().diagonal().clamp_min(0).sqrt()


def find_decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: a known family path, else the ModuleList holding most dense layers."""
    for path in KNOWN_BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    best, best_count = None, 0
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(dense_type_of(m) is not None for m in module.modules())
            if count > best_count:
                best, best_count = module, count
    if best is None:
        raise LoSparseUsageError(f"{type(model).__name__}: no ModuleList of decoder blocks found for one-shot "
                                 "compression (known paths: " + ", ".join(KNOWN_BLOCK_PATHS) + ")")
    return best


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor,
                          batch_size: int) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """[(hidden_states, kwargs)] per chunk of `batch_size` sequences: what the model feeds its first block."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        extra = {f"__positional_{i}": a for i, a in enumerate(args[1:])}  # e.g. GPT-2's (cache, mask) positionals
        captured.append((hidden, {**extra, **kwargs}))
        raise _StopForward

    device = next(model.parameters()).device
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, states: list[tuple[torch.Tensor, dict[str, Any]]]) -> list[torch.Tensor]:
    outputs = []
    for hidden, kwargs in states:
        positional = [kwargs[k] for k in sorted(k for k in kwargs if k.startswith("__positional_"))]
        named = {k: v for k, v in kwargs.items() if not k.startswith("__positional_")}
        outputs.append(_block_output(block(hidden, *positional, **named)))
    return outputs


@torch.no_grad()
def _record_block_statistics(block: nn.Module, layers: dict[str, nn.Module],
                             states: list[tuple[torch.Tensor, dict[str, Any]]]
                             ) -> tuple[dict[str, InputStatistics], list[torch.Tensor]]:
    """Input statistics of `layers` (name -> dense layer inside `block`) and the block's outputs."""
    stats: dict[str, InputStatistics] = {}
    readers: dict[int, str] = {}  # id(input tensor) -> first layer that read it in this chunk
    alive: list[torch.Tensor] = []  # keeps this chunk's inputs alive, so no id is reused within the chunk
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            owner = readers.get(id(x))
            if owner is not None:  # same tensor as an earlier layer (q/k/v, gate/up): share its statistics
                stats.setdefault(name, stats[owner])
                if stats[name] is stats[owner]:
                    return
            readers[id(x)] = name
            alive.append(x)
            if name not in stats:
                stats[name] = InputStatistics(dense_features(module)[1], x.device)
            stats[name].add(x)
        return hook

    for name, module in layers.items():
        handles.append(module.register_forward_hook(make_hook(name)))
    outputs = []
    try:
        for state in states:
            outputs.extend(_run_block(block, [state]))
            readers.clear()
            alive.clear()
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs

# ---------------------------------------------------------------------------------------------
# Decomposition of one layer
# ---------------------------------------------------------------------------------------------


def whitening_factor(second_moment: torch.Tensor, damping: float = 0.01) -> Optional[torch.Tensor]:
    """Lower-triangular C with C·Cᵀ = E[x xᵀ] + λ·mean(diag)·I (float64), or None for all-zero statistics.

    The damping grows ×10 (up to three times) while the Cholesky fails, for badly rank-deficient inputs.
    """
    moment = second_moment.to(torch.float64)
    scale = float(moment.diagonal().mean())
    if not scale > 0.0:
        return None
    eye = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
    lam = max(damping, 1e-8)
    for _ in range(4):
        factor, info = torch.linalg.cholesky_ex(moment + lam * scale * eye)
        if int(info) == 0:
            return factor
        lam *= 10.0
    raise RuntimeError(f"input statistics are not positive definite even with damping {lam / 10:g}")


def _thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.linalg.svd(matrix, full_matrices=False)`, computed on the tall orientation.

    On CPU (LAPACK gesdd) a wide matrix is several times slower than its transpose: measured 9.8 s vs
    1.7 s for a float64 576 x 1536 matrix (a down projection of SmolLM2) on this project's CPUs.
    """
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    left, sigma, right_t = torch.linalg.svd(matrix.T, full_matrices=False)
    return right_t.T, sigma, left.T


@torch.no_grad()
def plain_split(weight: torch.Tensor, rank: int, svd_solver: str = "exact",
                svd_device: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`decompose.svd_split` (the factors `losparse.apply` starts from), with the exact SVD on the tall side."""
    if use_randomized_svd(tuple(weight.shape), rank, svd_solver):
        return svd_split(weight, rank, svd_solver, svd_device)
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    work = weight.to(device=resolve_svd_device(svd_device, weight.device), dtype=work_dtype)
    left, sigma, right_t = _thin_svd(work)
    root = sigma[:rank].clamp_min(0).sqrt()
    return (left[:, :rank] * root).to(weight.device, weight.dtype), \
        (root.unsqueeze(1) * right_t[:rank]).to(weight.device, weight.dtype)


@torch.no_grad()
def activation_aware_split(weight: torch.Tensor, second_moment: torch.Tensor, rank: int,
                           damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, k), V (k, in) minimising ‖X Wᵀ − X (U V)ᵀ‖_F for inputs with E[x xᵀ] = `second_moment`.

    SVD of W·C (C the Cholesky factor, see `whitening_factor`), then V = Σ_k^½ Q_kᵀ C⁻¹ by a triangular
    solve. Computed in float64 on the statistics' device, returned in the weight's dtype and device.
    All-zero statistics (a layer that never saw input) fall back to the plain SVD.
    """
    factor = whitening_factor(second_moment, damping)
    if factor is None:
        return plain_split(weight, rank)
    work = weight.to(device=factor.device, dtype=torch.float64)
    left, sigma, right_t = _thin_svd(work @ factor)
    root = sigma[:rank].clamp_min(0).sqrt()
    u = left[:, :rank] * root
    # V·C = Σ^½ Q_kᵀ  <=>  Cᵀ·Vᵀ = (Σ^½ Q_kᵀ)ᵀ
    v = torch.linalg.solve_triangular(factor.T, (root.unsqueeze(1) * right_t[:rank]).T, upper=True).T
    return u.to(weight.device, weight.dtype), v.to(weight.device, weight.dtype)


def neuron_scores(sparse: torch.Tensor, prune_dim: str, metric: str,
                  channel_rms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One score per neuron of S (out,) for rows or (in,) for columns, float64.

    "activation": Σ over the neuron of |S_ij|·rms(x_j); "magnitude": Σ |S_ij|.
    """
    magnitude = sparse.detach().abs().to(torch.float64)
    if metric == "activation":
        if channel_rms is None:
            raise ValueError("activation scores need the input channels' rms")
        magnitude = magnitude * channel_rms.to(magnitude.device, torch.float64).unsqueeze(0)
    elif metric != "magnitude":
        raise ValueError(f"metric {metric!r} is not one of {', '.join(SCORE_CHOICES)}")
    return magnitude.sum(dim=1 if prune_dim == "rows" else 0)


@torch.no_grad()
def _decompose_with_statistics(linear: nn.Module, rank: int, has_sparse: bool, config: LoSparseConfig,
                               lowrank: str, statistics: Optional[InputStatistics], damping: float,
                               factor_cache: Optional[dict] = None, name: str = "") -> nn.Module:
    """`decompose.decompose_linear` with the activation-aware (or plain, tall-side) factors of this layer.

    The factors of each (layer, kind) are cached at the largest rank asked; a smaller rank is their prefix
    (both factors carry √σ, ordered by σ).
    """
    factors = None
    if rank:
        cached = factor_cache.get((name, lowrank)) if factor_cache is not None else None
        if cached is not None and cached[0].shape[1] >= rank:
            factors = cached[0][:, :rank], cached[1][:rank]
        else:
            weight = dense_weight_of(linear)
            if lowrank == "activation" and statistics is not None:
                factors = activation_aware_split(weight, statistics.second_moment(), rank, damping)
            else:
                factors = plain_split(weight, rank, config.svd_solver, config.svd_device)
            if factor_cache is not None:
                factor_cache[(name, lowrank)] = factors
    return decompose_linear(linear, None, config.prune_dim, has_sparse=has_sparse, rank=rank, factors=factors)


def check_oneshot_method(config: LoSparseConfig) -> None:
    """One-shot builds U·V and/or a neuron-pruned S from calibration data: `losparse`, `lowrank` (U·V only) and
    `itp` (S = W only). The other methods differ from these only in training-time scores (movement), prune S
    to nothing (lowrank_prune_all = lowrank), prune entries and factorise while training (lpaf) or do not
    compress (finetune)."""
    if config.method not in ONESHOT_METHODS:
        raise LoSparseUsageError(f"--oneshot has no form for --method {config.method}; choose one of: "
                                 + ", ".join(ONESHOT_METHODS))


def _plan(model: nn.Module, config: LoSparseConfig) -> tuple[list[tuple[str, nn.Module]], list[int], float]:
    """Targets, their ranks (as `apply` chooses them) and p_T; a budget with nothing left for S is an error."""
    check_oneshot_method(config)
    spec = config.method_spec
    if losparse_layers(model):
        raise LoSparseUsageError("this model already has LoSparse layers; one-shot compression needs a dense model")
    targets = require_targets(model, config)
    shapes = [dense_features(linear) for _, linear in targets]
    ranks = plan_ranks(shapes, config)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    kept = check_low_rank_share(shapes, config, name) if spec.has_sparse else 0.0
    return targets, ranks, kept


def _group_by_block(model: nn.Module, blocks: nn.ModuleList,
                    targets: list[tuple[str, nn.Module]]) -> list[dict[str, nn.Module]]:
    owner = {}
    for index, block in enumerate(blocks):
        for module in block.modules():
            owner[id(module)] = index
    groups: list[dict[str, nn.Module]] = [{} for _ in blocks]
    outside = [name for name, linear in targets if id(linear) not in owner]
    if outside:
        raise LoSparseUsageError(f"one-shot compresses decoder blocks only, but {len(outside)} target layer(s) lie "
                                 f"outside them (e.g. {outside[0]}); exclude them with --exclude_modules")
    for name, linear in targets:
        groups[owner[id(linear)]][name] = linear
    return groups


def _blockwise(model: nn.Module, groups: list[dict[str, nn.Module]], blocks: nn.ModuleList,
               calibration_input_ids: torch.Tensor, batch_size: int, show_progress: bool,
               after_statistics: Callable[[int, dict[str, InputStatistics]], bool]) -> None:
    """Drive the block-by-block flow; `after_statistics(block_index, stats)` returns whether the block changed
    in a way that needs a new forward for the next block's inputs."""
    from tqdm.auto import tqdm

    states = capture_block_inputs(model, blocks[0], calibration_input_ids, batch_size)
    if not states:
        raise RuntimeError("the first decoder block was never called")
    for index in tqdm(range(len(blocks)), desc="one-shot blocks", disable=not show_progress):
        started = time.perf_counter()
        stats, outputs = _record_block_statistics(blocks[index], groups[index], states)
        if after_statistics(index, stats):
            outputs = _run_block(blocks[index], states)
        states = [(out, kwargs) for out, (_, kwargs) in zip(outputs, states)]
        logger.info("one-shot block %d/%d: %d layers in %.1f s", index + 1, len(blocks), len(groups[index]),
                    time.perf_counter() - started)


@torch.no_grad()
def collect_statistics(model: nn.Module, config: LoSparseConfig, calibration_input_ids: torch.Tensor,
                       batch_size: int = 8, show_progress: bool = True) -> dict[str, InputStatistics]:
    """Input statistics of every target layer on the dense model, block by block (name -> statistics).

    These are what `oneshot_compress(prune_scope="global")` computes on the way; computing them once lets a
    comparison compress the same model many ways (`statistics=`) without new calibration passes.
    """
    targets, _, _ = _plan(model, config)
    blocks = find_decoder_blocks(model)
    groups = _group_by_block(model, blocks, targets)
    collected: dict[str, InputStatistics] = {}
    was_training = model.training
    model.eval()
    try:
        _blockwise(model, groups, blocks, calibration_input_ids, batch_size, show_progress,
                   lambda index, stats: bool(collected.update(stats)))
    finally:
        model.train(was_training)
    return collected


@torch.no_grad()
def oneshot_compress(model: nn.Module, config: LoSparseConfig, calibration_input_ids: Optional[torch.Tensor] = None,
                     lowrank: str = "activation", scores: str = "activation", prune_scope: str = "global",
                     batch_size: int = 8, damping: float = 0.01, prune: bool = True,
                     statistics: Optional[dict[str, InputStatistics]] = None,
                     factor_cache: Optional[dict] = None, show_progress: bool = True, solver: str = "reconstruct",
                     iterations: int = DEFAULT_ITERATIONS, compensate: bool = True, split: str = "auto") -> nn.Module:
    """Compress `model` in place from calibration token ids (num_samples, seq_len); returns `model`.

    See the module docstring for the flow. `solver`: "reconstruct" (`reconstruction`: U·V and the kept rows
    solved for the calibration error, `iterations` alternations; in block scope with `compensate` the target is
    the dense outputs from the compressed inputs; `split` "auto" picks each matrix's rank and rows within its share
    of the ratio, "fixed" takes the rank from `low_rank_ratio`) or "select" (S = W − U·V, rows cut by `scores`). `lowrank`:
    "activation" | "plain" (no whitening); `scores` ("select" only): "activation" | "magnitude";
    `prune_scope`: "global" | "block". `prune=False` stops before any mask (U·V + S == W: the model computes
    what the dense one did; always the select path's decomposition). `statistics` (from `collect_statistics`,
    global scope only) skips the calibration passes. `factor_cache` ("select" only: a dict the caller keeps,
    across calls with the same dense model and `statistics`) keeps each layer's U, V so a smaller rank later is
    a slice. The method's spec decides the parts, as in `apply`: `losparse` U·V from `low_rank_ratio` + S,
    `lowrank` only U·V with the whole ratio, `itp` only S = W. `model.oneshot_history` holds the reconstruct
    solver's objective per alternation (per block in block scope).
    """
    _check_oneshot_arguments(calibration_input_ids, lowrank, scores, prune_scope, statistics, solver, config, split)
    targets, ranks, kept_fraction = _plan(model, config)
    run = _OneshotRun(model, config, {name: rank for (name, _), rank in zip(targets, ranks)}, kept_fraction,
                      lowrank, scores, damping, factor_cache)
    run.split = split if run.spec.has_sparse and any(ranks) else "fixed"  # auto only where both parts exist
    run.align_of = dict(zip((name for name, _ in targets),
                            matrix_alignments([dense_features(linear) for _, linear in targets], config)))
    reconstruct = prune and solver == "reconstruct"
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if reconstruct and prune_scope == "block":
            run.reconstruct_blockwise(targets, calibration_input_ids, batch_size, show_progress, iterations,
                                      compensate)
        elif reconstruct and statistics is None and run.needs_statistics:
            run.reconstruct_each_block(targets, calibration_input_ids, batch_size, show_progress, iterations)
        elif reconstruct:
            run.reconstruct(dict(targets), statistics or {}, iterations)
        elif statistics is not None or not run.needs_statistics:
            run.decompose_all(targets, statistics or {})
        else:
            run.decompose_blockwise(targets, calibration_input_ids, batch_size, show_progress,
                                    prune_each_block=prune and prune_scope == "block")
        model.losparse_config = config
        if prune and not reconstruct and run.spec.has_sparse and prune_scope == "global":
            run.prune(model)
        model.oneshot_history = run.history
    finally:
        model.train(was_training)
    logger.info("one-shot %s (solver: %s, low rank: %s, pruning: %s) of %d layers in %.1f s", config.method,
                solver if prune else "none", lowrank, prune_scope if prune else "none", len(targets),
                time.perf_counter() - started)
    return model


def _check_oneshot_arguments(calibration_input_ids: Optional[torch.Tensor], lowrank: str, scores: str,
                             prune_scope: str, statistics: Optional[dict[str, InputStatistics]], solver: str,
                             config: LoSparseConfig, split: str = "auto") -> None:
    """`oneshot_compress`'s option errors, raised before the model is touched."""
    if split not in SPLITS:
        raise LoSparseUsageError(f"--oneshot_split {split!r} is not known; choose one of: {', '.join(SPLITS)}")
    if solver not in SOLVER_CHOICES:
        raise LoSparseUsageError(f"--oneshot_solver {solver!r} is not known; choose one of: {', '.join(SOLVER_CHOICES)}")
    if solver == "reconstruct" and config.prune_dim != "rows":
        raise LoSparseUsageError(f"--oneshot_solver reconstruct keeps whole rows of S, but --prune_dim is "
                                 f"{config.prune_dim!r}; use --prune_dim rows or --oneshot_solver select")
    if lowrank not in LOWRANK_CHOICES:
        raise LoSparseUsageError(f"--oneshot_lowrank {lowrank!r} is not known; choose one of: {', '.join(LOWRANK_CHOICES)}")
    if scores not in SCORE_CHOICES:
        raise LoSparseUsageError(f"--oneshot_scores {scores!r} is not known; choose one of: {', '.join(SCORE_CHOICES)}")
    if prune_scope not in PRUNE_SCOPES:
        raise LoSparseUsageError(f"--oneshot_prune_scope {prune_scope!r} is not known; choose one of: "
                                 f"{', '.join(PRUNE_SCOPES)}")
    if statistics is not None and prune_scope != "global":
        raise ValueError("precomputed statistics are the dense model's: only prune_scope='global' can use them")
    if statistics is None and (calibration_input_ids is None or calibration_input_ids.numel() == 0):
        raise LoSparseUsageError("one-shot compression needs calibration token ids (or precomputed statistics)")


class _OneshotRun:
    """One `oneshot_compress` call: the plan (rank per target, p_T, the options) and the neuron scores of each
    new layer's S, kept from its decomposition until the pruning (global: once at the end; block: per block).

    `score_of`: id(LoSparseLinear) -> neuron scores, (out,) for rows or (in,) for columns, float64.
    `needs_statistics`: whether any part uses the calibration (an activation-aware U·V, or activation scores
    of an S); if not, no calibration pass is run at all.
    """

    def __init__(self, model: nn.Module, config: LoSparseConfig, rank_of: dict[str, int], kept_fraction: float,
                 lowrank: str, scores: str, damping: float, factor_cache: Optional[dict]) -> None:
        self.model, self.config, self.spec = model, config, config.method_spec
        self.rank_of, self.kept_fraction = rank_of, kept_fraction
        self.lowrank, self.scores, self.damping, self.factor_cache = lowrank, scores, damping, factor_cache
        has_low_rank = rank_ratio(self.spec, config.remaining_ratio, config.low_rank_ratio) is not None
        self.needs_statistics = (lowrank == "activation" and has_low_rank) \
            or (scores == "activation" and self.spec.has_sparse)
        self.score_of: dict[int, torch.Tensor] = {}
        self.history: list[list[float]] = []  # the reconstruct solver's objective per alternation, per solve
        self.split = "fixed"
        self.align_of: dict[str, int] = {}  # the --align grid per target (reconstruct solver)
        # masks at once: no warmup/final phase, one `update_masks` at p_T
        self.pruner_config = dataclasses.replace(config, pruning_warmup_steps=0, pruning_final_steps=0)

    def decompose(self, names: dict[str, nn.Module], stats: dict[str, InputStatistics]) -> None:
        """Replace each named dense layer in the model by its LoSparse layer and score that layer's S neurons;
        a layer without statistics (never reached by the calibration) gets plain factors and magnitude scores."""
        for name, linear in names.items():
            layer = _decompose_with_statistics(linear, self.rank_of[name], self.spec.has_sparse, self.config,
                                               self.lowrank, stats.get(name), self.damping, self.factor_cache, name)
            if name not in stats and self.needs_statistics:
                logger.warning("one-shot: %s saw no calibration input; plain SVD and magnitude scores for it", name)
            if self.spec.has_sparse:
                metric = self.scores if name in stats else "magnitude"
                rms = stats[name].channel_rms() if metric == "activation" else None
                self.score_of[id(layer)] = neuron_scores(layer.sparse, self.config.prune_dim, metric, rms)
            set_submodule(self.model, name, layer)

    def decompose_all(self, targets: list[tuple[str, nn.Module]], stats: dict[str, InputStatistics]) -> None:
        """Decompose every target at once from given (precomputed, or unneeded and empty) statistics."""
        missing = [name for name, _ in targets if self.needs_statistics and name not in stats]
        if missing:
            raise ValueError(f"statistics are missing for {len(missing)} target layers, e.g. {missing[0]}")
        self.decompose(dict(targets), stats)

    def decompose_blockwise(self, targets: list[tuple[str, nn.Module]], calibration_input_ids: torch.Tensor,
                            batch_size: int, show_progress: bool, prune_each_block: bool) -> None:
        """Decompose block by block from each block's calibration statistics; with `prune_each_block` each
        block is pruned right away and run again, so the next block is calibrated on its pruned outputs."""
        blocks = find_decoder_blocks(self.model)
        groups = _group_by_block(self.model, blocks, targets)

        def after_statistics(index: int, stats: dict[str, InputStatistics]) -> bool:
            self.decompose(groups[index], stats)
            if prune_each_block and self.spec.has_sparse:
                self.prune(blocks[index])
                return True
            return False  # U·V + S == W: the block's outputs are unchanged

        _blockwise(self.model, groups, blocks, calibration_input_ids, batch_size, show_progress, after_statistics)

    def prune(self, root: nn.Module) -> None:
        """Mask the S neurons of the LoSparse layers under `root` by one ranking of their scores at p_T."""
        pruner = LoSparsePruner(root, total_steps=1, config=self.pruner_config)
        if pruner.layers:
            order = torch.cat([self.score_of[id(layer)].to(torch.float64) for layer in pruner.layers])
            pruner.update_masks(self.kept_fraction, scores=order)

    def _factor_of(self, moments: dict[str, torch.Tensor]) -> Callable[[str], Optional[torch.Tensor]]:
        """name -> whitening factor of its input second moment, computed when asked ("plain" low rank: None, the
        identity). Layers that read one input (q/k/v, gate/up) come one after another and share the last factor."""
        last: dict[str, Any] = {"moment": None, "factor": None}

        def factor_of(name: str) -> Optional[torch.Tensor]:
            moment = moments.get(name)
            if self.lowrank != "activation" or moment is None:
                return None
            if moment is not last["moment"]:
                last.update(moment=moment, factor=whitening_factor(moment, self.damping))
            return last["factor"]
        return factor_of

    def _solve(self, names: dict[str, nn.Module], target_of: Callable[[str], torch.Tensor],
               moments: dict[str, torch.Tensor], iterations: int) -> None:
        history = solve_layers(names, target_of, self._factor_of(moments),
                               lambda name, layer: set_submodule(self.model, name, layer), self.rank_of,
                               self.kept_fraction, iterations, self.spec.has_sparse, self.split,
                               self.config.remaining_ratio, align_of=self.align_of)
        self.history.append(history)

    def reconstruct(self, names: dict[str, nn.Module], stats: dict[str, InputStatistics], iterations: int) -> None:
        """Global scope: every target solved from the dense model's statistics, one matrix at a time (each keeps
        its own share of the ratio, `reconstruction.select_rows`)."""
        moments: dict[str, torch.Tensor] = {}
        by_stats: dict[int, torch.Tensor] = {}
        for name in names:
            if name in stats:
                moments[name] = by_stats.setdefault(id(stats[name]), stats[name].second_moment())
            elif self.needs_statistics:
                logger.warning("one-shot: %s saw no calibration input; plain SVD and weight-energy rows", name)
        self._solve(names, lambda name: dense_weight_of(names[name]), moments, iterations)

    def reconstruct_each_block(self, targets: list[tuple[str, nn.Module]], calibration_input_ids: torch.Tensor,
                               batch_size: int, show_progress: bool, iterations: int) -> None:
        """Global scope without precomputed statistics: each block solved from its dense statistics as soon as they
        are recorded (then freed); the next block still sees the dense outputs recorded before the solve."""
        blocks = find_decoder_blocks(self.model)
        groups = _group_by_block(self.model, blocks, targets)

        def after_statistics(index: int, stats: dict[str, InputStatistics]) -> bool:
            self.reconstruct(groups[index], stats, iterations)
            return False

        _blockwise(self.model, groups, blocks, calibration_input_ids, batch_size, show_progress, after_statistics)

    def reconstruct_blockwise(self, targets: list[tuple[str, nn.Module]], calibration_input_ids: torch.Tensor,
                              batch_size: int, show_progress: bool, iterations: int, compensate: bool) -> None:
        """Block scope: each block solved on its own (p_T of its S parameters) from the compressed model's
        inputs; with `compensate` its targets reproduce the dense outputs (`compensated_target`)."""
        from tqdm.auto import tqdm

        blocks = find_decoder_blocks(self.model)
        groups = _group_by_block(self.model, blocks, targets)
        dense_states = capture_block_inputs(self.model, blocks[0], calibration_input_ids, batch_size)
        if not dense_states:
            raise RuntimeError("the first decoder block was never called")
        compressed_states = list(dense_states)
        for index in tqdm(range(len(blocks)), desc="one-shot blocks", disable=not show_progress):
            stats, dense_outputs = record_paired_statistics(blocks[index], groups[index], dense_states,
                                                            compressed_states, _run_block)
            names = groups[index]
            targets_of = {name: dense_weight_of(linear).to(torch.float64) for name, linear in names.items()}
            for name in names:
                if name not in stats:
                    logger.warning("one-shot: %s saw no calibration input; plain SVD and weight-energy rows", name)
                elif compensate:
                    targets_of[name] = compensated_target(targets_of[name], stats[name].cross_moment(),
                                                          stats[name].second_moment(), self.damping)
            moments = {name: s.second_moment() for name, s in stats.items()}
            self._solve(names, targets_of.__getitem__, moments, iterations)
            compressed_outputs = _run_block(blocks[index], compressed_states)
            dense_states = [(out, kwargs) for out, (_, kwargs) in zip(dense_outputs, dense_states)]
            compressed_states = [(out, kwargs) for out, (_, kwargs) in zip(compressed_outputs, compressed_states)]
