"""`LeanAdamW`, the `--lean_optimizer` AdamW: the moments of the sparse parts S in bf16, stochastically rounded.

S is the largest trained tensor of a LoSparse model; its two AdamW moments in fp32 are what makes LoSparse
fine-tuning need more memory than dense fine-tuning. Keeping exactly those moments in bf16 (unbiased
stochastic rounding, so small updates are not lost) brings it back below dense; every other tensor
keeps the plain AdamW update.

`LeanAdamW` is `torch.optim.AdamW` (decoupled weight decay, same defaults, fused/foreach kept for the
ordinary parameters) that keeps the two moments of chosen parameters -- the S matrices -- in bf16 with
stochastic rounding, in bounded row chunks: 8 → 4 bytes of optimizer state per S entry. Round-to-nearest
would stall exp_avg_sq (β2 = 0.999 moves it by 0.1 % a step, below bf16's 0.39 % spacing); stochastic
rounding is unbiased, so the moments follow the fp32 ones in expectation. The trajectory differs slightly
from fp32 moments (measured in the memory benchmark, docs/benchmarks.md). `lean_optimizer_cls_and_kwargs(model, args)`
is the Trainer switch: pass it as `Trainer(optimizer_cls_and_kwargs=...)`.
"""


from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.optim.adam import adam

from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import LoSparseLinear


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
