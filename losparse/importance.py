"""Neuron importance of the sparse matrices S (paper §2.2–2.3, eqs. 2–4).

Entry score I(s) = |s · ∂L/∂s| (sensitivity) or |s| (magnitude); its exponential moving average
Ī = β·Ī + (1 − β)·I (eq. 3); neuron score Γ = mean of Ī over the neuron (eq. 4).
The movement-pruning baseline (Sanh et al., 2020) instead accumulates −s·∂L/∂s over all steps
(no absolute value, no decay): weights moving away from zero gain importance.

Because the mean over a neuron is linear, mean(EMA(I)) == EMA(mean(I)): without PLATON's
uncertainty term we keep only one float per neuron instead of one per entry of S. That makes the
state tiny (one flat vector over all layers, already concatenated for the global ranking) and the
per-step update a handful of kernels. With the uncertainty term (β2 > 0) the product
Ī·Ū is not linear, so full-size EMAs are kept, as in PLATON.

All updates stay on the device (no `.item()`): a step whose gradients are not finite (an fp16
overflow step, which the optimizer also skips) leaves the scores unchanged via `torch.where`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layers import LoSparseLinear


class NeuronImportance:
    """EMA neuron scores of the S matrices of `layers`, flattened in layer order."""

    def __init__(self, layers: Sequence[LoSparseLinear], metric: str = "sensitivity", beta1: float = 0.85,
                 beta2: float = 0.0) -> None:
        if metric not in ("sensitivity", "magnitude", "movement"):
            raise ValueError(f"importance metric {metric!r} is not one of: sensitivity, magnitude, movement")
        self.layers = list(layers)
        self.metric = metric
        self.beta1 = beta1
        self.beta2 = beta2
        self.num_neurons = [layer.sparse_mask.numel() for layer in self.layers]
        device = self.layers[0].sparse.device if self.layers else torch.device("cpu")
        self.neuron_ema = torch.zeros(sum(self.num_neurons), dtype=torch.float32, device=device)
        self.entry_ema: list[torch.Tensor] = []
        self.entry_uncertainty: list[torch.Tensor] = []
        if self.uses_uncertainty:
            self.entry_ema = [torch.zeros_like(layer.sparse, dtype=torch.float32) for layer in self.layers]
            self.entry_uncertainty = [torch.zeros_like(t) for t in self.entry_ema]
        self.num_updates = 0

    @property
    def uses_uncertainty(self) -> bool:
        return self.metric == "sensitivity" and self.beta2 > 0.0

    def _entry_scores(self) -> list[torch.Tensor]:
        sparse = [layer.sparse.detach() for layer in self.layers]
        if self.metric == "magnitude":
            return [s.abs().float() for s in sparse]
        grads = [layer.sparse.grad for layer in self.layers]
        if any(g is None for g in grads):
            raise RuntimeError(
                "a sparse matrix has no gradient at the optimizer step: the importance update must run after "
                "backward() and before the gradients are zeroed (DeepSpeed/FSDP free them earlier)"
            )
        scores = torch._foreach_mul(sparse, grads)
        if self.metric == "movement":
            torch._foreach_neg_(scores)
        else:
            torch._foreach_abs_(scores)
        return [s.float() for s in scores]

    def _neuron_means(self, entry_scores: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.mean(dim=1 - layer.neuron_axis) for t, layer in zip(entry_scores, self.layers)])

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current step's scores into the moving averages (call once per optimizer step)."""
        if not self.layers:
            return
        entry_scores = self._entry_scores()
        if self.metric == "magnitude":
            self.neuron_ema.copy_(self._neuron_means(entry_scores))
        elif self.metric == "movement":
            current = self._neuron_means(entry_scores)
            self.neuron_ema.add_(torch.where(torch.isfinite(current).all(), current, torch.zeros_like(current)))
        elif not self.uses_uncertainty:
            current = self._neuron_means(entry_scores)
            finite = torch.isfinite(current).all()
            updated = self.neuron_ema * self.beta1 + current * (1.0 - self.beta1)
            self.neuron_ema.copy_(torch.where(finite, updated, self.neuron_ema))
        else:
            finite = torch.stack([torch.isfinite(t).all() for t in entry_scores]).all()
            weight_ipt = finite.float() * (1.0 - self.beta1)
            weight_unc = finite.float() * (1.0 - self.beta2)
            for current, ema, unc in zip(entry_scores, self.entry_ema, self.entry_uncertainty):
                current = torch.nan_to_num(current, nan=0.0, posinf=0.0, neginf=0.0)
                ema.lerp_(current, weight_ipt)
                unc.lerp_((current - ema).abs_(), weight_unc)
            combined = [ema * unc for ema, unc in zip(self.entry_ema, self.entry_uncertainty)]
            self.neuron_ema.copy_(self._neuron_means(combined))
        self.num_updates += 1

    def scores(self) -> torch.Tensor:
        """Γ for every neuron of every layer, flattened in layer order (float32, on the model's device)."""
        return self.neuron_ema

    def per_layer_scores(self) -> list[torch.Tensor]:
        return list(torch.split(self.neuron_ema, self.num_neurons))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"neuron_ema": self.neuron_ema, "num_updates": torch.tensor(self.num_updates)}
        for i, (ema, unc) in enumerate(zip(self.entry_ema, self.entry_uncertainty)):
            state[f"entry_ema.{i}"] = ema
            state[f"entry_uncertainty.{i}"] = unc
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["neuron_ema"].shape != self.neuron_ema.shape:
            raise ValueError(
                f"importance state has {state['neuron_ema'].numel()} neurons, this model has {self.neuron_ema.numel()}"
            )
        self.neuron_ema.copy_(state["neuron_ema"])
        self.num_updates = int(state["num_updates"])
        for i, (ema, unc) in enumerate(zip(self.entry_ema, self.entry_uncertainty)):
            ema.copy_(state[f"entry_ema.{i}"])
            unc.copy_(state[f"entry_uncertainty.{i}"])
