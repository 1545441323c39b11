"""Memory-lean LoSparse training: a linear op that saves no (out, in) matrix, and AdamW with bf16 moments for S.

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

`LeanAdamW` is `torch.optim.AdamW` (decoupled weight decay, same defaults, fused/foreach kept for the
ordinary parameters) that keeps the two moments of chosen parameters -- the S matrices -- in bf16 with
stochastic rounding, in bounded row chunks: 8 → 4 bytes of optimizer state per S entry. Round-to-nearest
would stall exp_avg_sq (β2 = 0.999 moves it by 0.1 % a step, below bf16's 0.39 % spacing); stochastic
rounding is unbiased, so the moments follow the fp32 ones in expectation. The trajectory differs slightly
from fp32 moments (measured in the README's memory section). `lean_optimizer_cls_and_kwargs(model, args)`
is the Trainer switch: pass it as `Trainer(optimizer_cls_and_kwargs=...)`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.optim.adam import adam

from .errors import LoSparseUsageError

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
    """`_LoSparseLinearFunction` for an S that stores only its alive neurons (`losparse.shrink`).

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
    A shrunk S (`losparse.shrink`): `alive_index` (alive,) long, increasing, the neurons S stores along
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


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: Optional[torch.Generator],
                      noise: Optional[torch.Tensor] = None) -> None:
    """Write fp32 `value` into the bf16 `target`, rounding up or down with probability by distance (unbiased).

    Adds 16 random low bits (`noise`, int32 in [0, 2¹⁶), drawn from `generator` if not given) to the fp32
    bit pattern and truncates them: the bf16 result is exact.
    """
    bits = value.contiguous().view(torch.int32)
    if noise is None:
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    bits = (bits + noise).bitwise_and_(-65536)
    target.copy_(bits.view(torch.float32))


class LeanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments are bf16 for the parameters in `low_precision_params`.

    Every other parameter is updated by torch's own AdamW kernel (`torch.optim.adam.adam` with
    `decoupled_weight_decay=True`, fused or foreach as asked), so its trajectory is torch's bit for bit.
    A low-precision parameter p (an S matrix, fp32) keeps exp_avg and exp_avg_sq in `moment_dtype` and
    is updated in chunks of about `chunk_bytes` of fp32 work: per chunk the moments are widened to fp32,
    the AdamW update is applied to p in fp32, and the moments are stored back with stochastic rounding
    (seeded by `seed`, so a run is repeatable). Optimizer memory for p: 2·2 instead of 2·4 bytes per entry,
    plus one bounded chunk. `load_state_dict` keeps those moments in `moment_dtype` (torch would cast
    them to the parameter's dtype).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 low_precision_params: Iterable[torch.Tensor] = (), moment_dtype: torch.dtype = torch.bfloat16,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, chunk_bytes: int = 64 << 20,
                 seed: int = 0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise LoSparseUsageError(f"LeanAdamW: lr={lr}, eps={eps}, weight_decay={weight_decay} must be >= 0 and "
                                     f"betas={betas} in [0, 1)")
        if moment_dtype not in (torch.bfloat16, torch.float32):
            raise LoSparseUsageError(f"LeanAdamW: moment_dtype {moment_dtype} is not one of torch.bfloat16, torch.float32")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "foreach": foreach,
                    "fused": fused}
        super().__init__(params, defaults)
        self.low_precision_ids = {id(p) for p in low_precision_params}
        self.moment_dtype = moment_dtype
        self.chunk_bytes = int(chunk_bytes)
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _is_low_precision(self, p: torch.Tensor) -> bool:
        return id(p) in self.low_precision_ids and p.dtype != self.moment_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            fused = bool(group["fused"])
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LeanAdamW does not support sparse gradients")
                state = self.state[p]
                low = self._is_low_precision(p)
                if not state:
                    on_device = fused and not low
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                    dtype = self.moment_dtype if low else p.dtype
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                if low:
                    state["step"] += 1
                    self._low_precision_update(p, state, group["lr"], beta1, beta2, group["eps"],
                                               group["weight_decay"])
                    continue
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if params:
                adam(
                    params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"], fused=group["fused"],
                    decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        return loss

    def _low_precision_update(self, p: torch.Tensor, state: dict[str, torch.Tensor], lr: float, beta1: float,
                              beta2: float, eps: float, weight_decay: float) -> None:
        step = float(state["step"])
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        flat_p, flat_g = p.view(-1), p.grad.view(-1)
        flat_m, flat_v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        chunk = max(1, self.chunk_bytes // 16)  # four fp32 work tensors per chunk
        generator = self._generator(p.device)
        for start in range(0, flat_p.numel(), chunk):
            part = slice(start, start + chunk)
            grad = flat_g[part].float()
            exp_avg = flat_m[part].float().lerp_(grad, 1 - beta1)
            exp_avg_sq = flat_v[part].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            if p.dtype == torch.float32:
                flat_p[part].addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
            else:
                flat_p[part].copy_(flat_p[part].float().addcdiv_(exp_avg, denom, value=-lr / bias_correction1))
            # one 32-bit draw per entry: its low half rounds exp_avg, its high half exp_avg_sq
            random_bits = torch.empty(exp_avg.shape, dtype=torch.int32, device=p.device).random_(
                -(1 << 31), 1 << 31, generator=generator)
            stochastic_round_(flat_m[part], exp_avg, None, random_bits.bitwise_and(0xFFFF))
            stochastic_round_(flat_v[part], exp_avg_sq, None, random_bits.bitwise_right_shift_(16).bitwise_and_(0xFFFF))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and self._is_low_precision(p):
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = state[key].to(self.moment_dtype)
                    state["step"] = state["step"].to("cpu")


def sparse_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The S matrices of every `LoSparseLinear` in `model` (the parameters whose moments `LeanAdamW` narrows)."""
    from .layers import LoSparseLinear

    return [m.sparse for m in model.modules() if isinstance(m, LoSparseLinear) and m.sparse is not None]


def lean_optimizer_cls_and_kwargs(model: nn.Module, args: Any = None, **adamw_kwargs: Any) -> tuple[type, dict]:
    """`(LeanAdamW, kwargs)` for `Trainer(optimizer_cls_and_kwargs=...)`: the Trainer's AdamW with bf16 S moments.

    With `args` (TrainingArguments) lr, betas, eps and fused/foreach follow them as the Trainer's own
    AdamW would (the Trainer still sets weight decay per parameter group); only adamw_torch[_fused] are
    accepted. `adamw_kwargs` override. Without LoSparse layers this is plain AdamW.
    """
    kwargs: dict[str, Any] = {}
    if args is not None:
        optim = str(getattr(args.optim, "value", args.optim))
        if optim not in ("adamw_torch", "adamw_torch_fused"):
            raise LoSparseUsageError(f"--optim {optim!r}: the lean optimizer replaces only adamw_torch or "
                                     "adamw_torch_fused")
        kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                  "fused": optim == "adamw_torch_fused", "seed": args.seed}
    kwargs.update(adamw_kwargs)
    kwargs["low_precision_params"] = sparse_parameters(model)
    return LeanAdamW, kwargs
