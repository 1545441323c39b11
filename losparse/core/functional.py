"""Memory-lean LoSparse training: a linear op that saves no (out, in) matrix (its optimizer: training.optim).

Why. The plain training forward `F.linear(x, addmm(S, U, V), b)` makes autograd keep the effective weight
W_eff = S + U·V, an (out, in) matrix per layer, alive from the forward to the backward: for every
targeted layer the model holds S *and* a second matrix of the same size, more than dense fine-tuning,
which only saves the input (its weight is a parameter anyway). `losparse_linear` saves only the input
x and references to the parameters (no copies): W_eff exists transiently, one layer at a time.

    y = x·W_effᵀ + b                              W_eff = S + U·V   (out, in); U (out, k), V (k, in)
    backward, with g = ∂L/∂y flattened to (T, out) and x to (T, in):
      G      = gᵀ·x                  (out, in)  = ∂L/∂W_eff = ∂L/∂S  (the full gradient the pruner scores)
      ∂L/∂U  = G·Vᵀ                  (out, k)   (reuses G, as autograd does for addmm)
      ∂L/∂V  = Uᵀ·G                  (k, in)
      ∂L/∂x  = g·W_eff               (T, in)    W_eff rebuilt transiently, or g·S + (g·U)·V
      ∂L/∂b  = Σ_T g
Two ways to apply W_eff (`strategy`): "merged" builds W_eff (out·k·in extra flops, one (out, in)
transient) and runs one GEMM; "factored" computes x·Sᵀ + (x·Vᵀ)·Uᵀ (T·k·(in+out) extra flops, no
(out, in) transient). The flop break-even is T = in·out/(in+out); the factored form's thin GEMMs are
slower per flop, so "auto" picks factored only for T < in·out/(4·(in+out)) (96 tokens for BERT's 768×768,
512 for Llama-7B's 4096×4096, 746 for its 4096×11008), merged above -- the rule that matched the CPU
timings of `scripts/benchmark_memory.py --time_ops` (README memory section). Memory is alike either way:
merged holds one (out, in) transient for one layer at a time.

Under autocast the op casts x and the parameters to the autocast dtype itself (transiently, inside the
op, so no cast copy of a weight outlives it; autocast's own weight cache would keep one per layer until
the forward ends) and computes in that dtype, like `F.linear` under autocast; gradients come back in
each parameter's own dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from losparse.core.errors import LoSparseUsageError

STRATEGIES = ("auto", "merged", "factored")
#: The thin rank-k GEMMs of the factored form run at a fraction of a full GEMM's throughput on CPU; measured
#: (`scripts/benchmark_memory.py --time_ops`), factored pays off only below ~1/4 of the flop break-even.
FACTORED_COST_FACTOR = 4


def choose_strategy(tokens: int, in_features: int, out_features: int, rank: int, has_sparse: bool = True) -> str:
    """"merged" or "factored" for `tokens` rows of input: the cheaper one by the rule in the module doc."""
    if rank == 0 or not has_sparse:
        return "merged" if rank == 0 else "factored"
    return "factored" if FACTORED_COST_FACTOR * tokens * (in_features + out_features) < in_features * out_features \
        else "merged"


def _effective(u: Optional[torch.Tensor], v: Optional[torch.Tensor], sparse: Optional[torch.Tensor]) -> torch.Tensor:
    if sparse is None:
        return u @ v
    if u is None:
        return sparse
    return torch.addmm(sparse, u, v)


def _apply_weight(x2: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                  sparse: Optional[torch.Tensor], strategy: str) -> torch.Tensor:
    """x2 (T, in) · W_effᵀ → (T, out), W_eff never materialised when `strategy` is factored."""
    if strategy == "merged" or u is None:
        return x2 @ _effective(u, v, sparse).T
    low_rank = (x2 @ v.T) @ u.T
    return low_rank if sparse is None else low_rank.addmm_(x2, sparse.T)


def _apply_weight_transposed(g2: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                             sparse: Optional[torch.Tensor], strategy: str) -> torch.Tensor:
    """g2 (T, out) · W_eff → (T, in)."""
    if strategy == "merged" or u is None:
        return g2 @ _effective(u, v, sparse)
    low_rank = (g2 @ u) @ v
    return low_rank if sparse is None else low_rank.addmm_(g2, sparse)


def _backward_operands(ctx: Any, grad_output: torch.Tensor, x: torch.Tensor, params: list) -> tuple:
    """U, V, S in the forward's compute dtype, and grad_output / x flattened to (T, out) / (T, in) in x's dtype."""
    dtype = ctx.compute_dtype
    u, v, sparse = (t if t is None or dtype is None else t.to(dtype) for t in params)
    g2 = grad_output.reshape(-1, grad_output.shape[-1])
    if g2.dtype != x.dtype:
        g2 = g2.to(x.dtype)
    return u, v, sparse, g2, x.reshape(-1, x.shape[-1])


def _in_param_dtypes(grads: tuple, params: list) -> tuple:
    """Each gradient in its parameter's dtype (None stays None)."""
    return tuple(None if g is None else g.to(p.dtype) for g, p in zip(grads, params))


class _LoSparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                sparse: Optional[torch.Tensor], bias: Optional[torch.Tensor], strategy: str,
                compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
        factors = (u, v, sparse, bias)
        ctx.bias_dtype = None if bias is None else bias.dtype
        if compute_dtype is not None:
            x = x.to(compute_dtype)
            u, v, sparse, bias = (None if t is None else t.to(compute_dtype) for t in factors)
        x2 = x.reshape(-1, x.shape[-1])
        out_features = (sparse if sparse is not None else u).shape[0]
        if strategy == "auto":
            strategy = choose_strategy(x2.shape[0], x2.shape[1], out_features, 0 if u is None else u.shape[1],
                                       sparse is not None)
        y = _apply_weight(x2, u, v, sparse, strategy)
        if bias is not None:
            y.add_(bias)
        ctx.strategy = strategy
        ctx.compute_dtype = compute_dtype
        ctx.input_shape = x.shape
        # x (already in the compute dtype: the same tensor F.linear under autocast would keep) and the
        # parameters themselves -- references, no copies.
        ctx.save_for_backward(x, *factors[:3])
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, *params = ctx.saved_tensors
        u, v, sparse, g2, x2 = _backward_operands(ctx, grad_output, x, params)
        need_x, need_u, need_v, need_s, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_u = grad_v = grad_s = grad_b = None
        if need_x:
            grad_x = _apply_weight_transposed(g2, u, v, sparse, ctx.strategy).view(ctx.input_shape)
        if need_s:
            full = g2.T @ x2  # ∂L/∂S = ∂L/∂W_eff, reused for U and V
            if need_u:
                grad_u = full @ v.T
            if need_v:
                grad_v = u.T @ full
            grad_s = full
        elif need_u or need_v:  # no (out, in) gradient is needed: contract through the rank k instead
            if need_u:
                grad_u = g2.T @ (x2 @ v.T)
            if need_v:
                grad_v = (g2 @ u).T @ x2
        if need_b:
            grad_b = g2.sum(0)
        grad_u, grad_v, grad_s = _in_param_dtypes((grad_u, grad_v, grad_s), params)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_u, grad_v, grad_s, grad_b, None, None


def choose_shrunk_strategy(tokens: int, in_features: int, out_features: int, rank: int, sparse_entries: int) -> str:
    """The `choose_strategy` rule for an S that stores only `sparse_entries` of its out·in entries.

    Merged costs k·in·out (W_eff) + T·in·out; factored costs FACTORED_COST_FACTOR·T·k·(in+out) (thin GEMMs,
    weighted as in `choose_strategy`) + T·sparse_entries. With every entry stored this is `choose_strategy`.
    """
    if rank == 0:
        return "factored"  # no U·V: the alive neurons alone, never a zero-filled (out, in) matrix
    merged = rank * in_features * out_features + tokens * in_features * out_features
    factored = FACTORED_COST_FACTOR * tokens * rank * (in_features + out_features) + tokens * sparse_entries
    return "factored" if factored < merged else "merged"


class _ShrunkLoSparseLinearFunction(torch.autograd.Function):
    """`_LoSparseLinearFunction` for an S that stores only its alive neurons (`losparse.core.shrink`).

    S_a: (alive, in) rows at `alive` (axis 0) or (out, alive) columns (axis 1); the other neurons are zero.
      forward, factored:  rows  y = (x·Vᵀ)·Uᵀ;  y[:, alive] += x·S_aᵀ      (index_add, like the compact layer)
                          cols  y = (x·Vᵀ)·Uᵀ + x[:, alive]·S_aᵀ          (gather)
               merged:    W_eff = U·V with S_a added at `alive` (transient), y = x·W_effᵀ
      backward: ∂L/∂S_a = g[:, alive]ᵀ·x (rows) or gᵀ·x[:, alive] (cols), ∂L/∂U = gᵀ·(x·Vᵀ), ∂L/∂V = (g·U)ᵀ·x:
      no (out, in) gradient is ever formed, so the backward's memory falls with the alive share too.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                sparse: torch.Tensor, bias: Optional[torch.Tensor], alive: torch.Tensor, axis: int,
                out_features: int, strategy: str, compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
        factors = (u, v, sparse)
        ctx.bias_dtype = None if bias is None else bias.dtype
        if compute_dtype is not None:
            x = x.to(compute_dtype)
            u, v, sparse, bias = (None if t is None else t.to(compute_dtype) for t in (u, v, sparse, bias))
        x2 = x.reshape(-1, x.shape[-1])
        if strategy == "auto" or u is None:
            strategy = choose_shrunk_strategy(x2.shape[0], x2.shape[1], out_features,
                                              0 if u is None else u.shape[1], sparse.numel())
        ctx.strategy, ctx.axis, ctx.out_features = strategy, axis, out_features
        ctx.compute_dtype, ctx.input_shape = compute_dtype, x.shape
        y = _shrunk_apply(x2, u, v, sparse, alive, axis, out_features, strategy)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, *factors, alive)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, *params, alive = ctx.saved_tensors
        u, v, sparse, g2, x2 = _backward_operands(ctx, grad_output, x, params)
        need_x, need_u, need_v, need_s, need_b = ctx.needs_input_grad[:5]
        axis = ctx.axis
        grad_x = grad_u = grad_v = grad_s = grad_b = None
        if need_x:
            grad_x = _shrunk_apply_transposed(g2, u, v, sparse, alive, axis, x2.shape[1], ctx.strategy)
            grad_x = grad_x.view(ctx.input_shape)
        if need_s:
            grad_s = g2.index_select(1, alive).T @ x2 if axis == 0 else g2.T @ x2.index_select(1, alive)
        if need_u:
            grad_u = g2.T @ (x2 @ v.T)
        if need_v:
            grad_v = (g2 @ u).T @ x2
        if need_b:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        grad_u, grad_v, grad_s = _in_param_dtypes((grad_u, grad_v, grad_s), params)
        return grad_x, grad_u, grad_v, grad_s, grad_b, None, None, None, None, None


def _shrunk_effective(u: Optional[torch.Tensor], v: Optional[torch.Tensor], sparse: torch.Tensor, alive: torch.Tensor,
                      axis: int, out_features: int, in_features: int) -> torch.Tensor:
    """W_eff (out, in) = U·V (or zeros) with the alive neurons of S added at their places."""
    weight = u @ v if u is not None else sparse.new_zeros(out_features, in_features)
    return weight.index_add_(axis, alive, sparse)


def _shrunk_apply(x2: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor], sparse: torch.Tensor,
                  alive: torch.Tensor, axis: int, out_features: int, strategy: str) -> torch.Tensor:
    """x2 (T, in) · W_effᵀ → (T, out) for a shrunk S."""
    if strategy == "merged":
        return x2 @ _shrunk_effective(u, v, sparse, alive, axis, out_features, x2.shape[1]).T
    low_rank = None if u is None else (x2 @ v.T) @ u.T
    if axis == 0:
        y = x2.new_zeros(x2.shape[0], out_features) if low_rank is None else low_rank
        return y.index_add_(1, alive, x2 @ sparse.T)
    gathered = x2.index_select(1, alive)
    return gathered @ sparse.T if low_rank is None else low_rank.addmm_(gathered, sparse.T)


def _shrunk_apply_transposed(g2: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                             sparse: torch.Tensor, alive: torch.Tensor, axis: int, in_features: int,
                             strategy: str) -> torch.Tensor:
    """g2 (T, out) · W_eff → (T, in) for a shrunk S."""
    if strategy == "merged":
        return g2 @ _shrunk_effective(u, v, sparse, alive, axis, g2.shape[1], in_features)
    low_rank = None if u is None else (g2 @ u) @ v
    if axis == 0:
        gathered = g2.index_select(1, alive)
        return gathered @ sparse if low_rank is None else low_rank.addmm_(gathered, sparse)
    y = g2.new_zeros(g2.shape[0], in_features) if low_rank is None else low_rank
    return y.index_add_(1, alive, g2 @ sparse)


def losparse_linear(x: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                    sparse: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None,
                    strategy: str = "auto", alive_index: Optional[torch.Tensor] = None,
                    neuron_axis: Optional[int] = None, out_features: Optional[int] = None) -> torch.Tensor:
    """y = x·(U·V + S)ᵀ + b without keeping any (out, in) matrix for the backward.

    x: (..., in); u: (out, k) or None; v: (k, in) or None (both or neither); sparse: (out, in) or None;
    bias: (out,) or None. Returns (..., out). Gradients equal those of `F.linear(x, S + U·V, b)`.
    A shrunk S (`losparse.core.shrink`): `alive_index` (alive,) long, increasing, the neurons S stores along
    `neuron_axis` (0: sparse is (alive, in); 1: (out, alive)); `out_features` the layer's full output width.
    """
    if strategy not in STRATEGIES:
        raise LoSparseUsageError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if (u is None) != (v is None):
        raise LoSparseUsageError("losparse_linear needs both low-rank factors u and v, or neither")
    if u is None and sparse is None:
        raise LoSparseUsageError("losparse_linear needs a low-rank part (u, v), a sparse part, or both")
    if alive_index is not None and (sparse is None or neuron_axis not in (0, 1) or out_features is None):
        raise LoSparseUsageError("losparse_linear with alive_index needs sparse, neuron_axis 0 or 1 and out_features")
    compute_dtype = None
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        compute_dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if alive_index is not None:
            return _ShrunkLoSparseLinearFunction.apply(x, u, v, sparse, bias, alive_index, neuron_axis, out_features,
                                                       strategy, compute_dtype)
        return _LoSparseLinearFunction.apply(x, u, v, sparse, bias, strategy, compute_dtype)
