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

Windowed sensitivity (`window=ΔT`, the `reference` pruning variant). The public reference code
(yxli2123/LoSparse, `Pruner.update_ipt_with_local_window`) does not fold every step into the EMA.
With its 0-based step counter g = t − 1 (t: this project's 1-based optimizer step) and
I_t = neuron mean of |s·∂L/∂s| after step t:
  position q = g mod ΔT
  q == 0:  Ī ← β·Ī + (1 − β)·A   (fold the finished window's mean A into the EMA, once)
           A ← I_t                (start a new window with this step)
  q  > 0:  A ← (A·q + I_t)/(q + 1) (running mean over the window)
The score Γ is Ī, so it changes only at window boundaries and never includes the step that has
just finished; its memory is about ΔT/(1 − β) steps instead of 1/(1 − β). A and its count are part of
`state_dict()`, so a resumed run continues the same window. A non-finite step is left out of the
window's mean (the count records how many steps A holds), and a window holding no step is not
folded -- which also covers g = 0, where the reference folds A = 0 into Ī = 0. With β2 > 0 the same is
done per entry, and at each fold Ū ← β2·Ū + (1 − β2)·|A − Ī| (with the new Ī), Γ = mean(Ī·Ū).
Magnitude and movement scores are not windowed (the reference code's Magnitude pruner takes |s| of
the current step; movement is a plain sum, which a window would not change).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from losparse.core.layers import LoSparseLinear
from losparse.core.sharding import any_sharded, check_shardable, local_tensor, sharded_neuron_means


def ema_update_(ema: torch.Tensor, current: torch.Tensor, beta: float) -> None:
    """ema ← β·ema + (1 − β)·current, in place — unless `current` holds a non-finite value.

    A non-finite score comes from a skipped mixed-precision step (the gradient overflowed); that step
    then changes nothing, without a host sync (the choice is a `torch.where` on the device).
    """
    updated = ema * beta + current * (1.0 - beta)
    ema.copy_(torch.where(torch.isfinite(current).all(), updated, ema))


def _all_neurons(layer: LoSparseLinear, means: torch.Tensor) -> torch.Tensor:
    """Per-neuron means over all neurons of `layer`: a shrunk S (`losparse.core.shrink`) scores only its alive
    neurons; the dropped ones get 0, what an unshrunk run's zeroed neurons score (their ranking is −inf anyway)."""
    if layer.sparse_alive_index is None:
        return means
    return means.new_zeros(layer.sparse_mask.numel()).index_copy_(0, layer.sparse_alive_index, means)


class NeuronImportance:
    """EMA neuron scores of the S matrices of `layers`, flattened in layer order.

    Under --shrink_sparse the per-entry states (β2 > 0, windowed entry means) follow their S's rows or columns
    (`losparse.core.shrink.narrow_layer` narrows them); the per-neuron EMA always covers every neuron."""

    def __init__(self, layers: Sequence[LoSparseLinear], metric: str = "sensitivity", beta1: float = 0.85,
                 beta2: float = 0.0, window: Optional[int] = None) -> None:
        """`window`: None folds every step into the EMA (eq. 3); an int ΔT ≥ 1 averages the sensitivity over
        ΔT-step windows and folds each window once (the reference code's arithmetic, see the module docstring)."""
        if metric not in ("sensitivity", "magnitude", "movement"):
            raise ValueError(f"importance metric {metric!r} is not one of: sensitivity, magnitude, movement")
        if window is not None and int(window) < 1:
            raise ValueError(f"importance window {window!r} must be >= 1")
        self.layers = list(layers)
        self.metric = metric
        self.beta1 = beta1
        self.beta2 = beta2
        self.num_neurons = [layer.sparse_mask.numel() for layer in self.layers]
        check_shardable(self.layers, metric == "sensitivity" and beta2 > 0.0)
        device = self.layers[0].sparse.device if self.layers else torch.device("cpu")
        self.neuron_ema = torch.zeros(sum(self.num_neurons), dtype=torch.float32, device=device)
        self.entry_ema: list[torch.Tensor] = []
        self.entry_uncertainty: list[torch.Tensor] = []
        if self.uses_uncertainty:
            self.entry_ema = [torch.zeros_like(layer.sparse, dtype=torch.float32) for layer in self.layers]
            self.entry_uncertainty = [torch.zeros_like(t) for t in self.entry_ema]
        self.num_updates = 0
        self.window = int(window) if window is not None and metric == "sensitivity" else None
        self.window_mean: Optional[torch.Tensor] = None
        self.window_count: Optional[torch.Tensor] = None
        self.entry_window_mean: list[torch.Tensor] = []
        if self.window is not None:
            self.window_count = torch.zeros((), dtype=torch.float32, device=device)
            if self.uses_uncertainty:
                self.entry_window_mean = [torch.zeros_like(t) for t in self.entry_ema]
            else:
                self.window_mean = torch.zeros_like(self.neuron_ema)

    @property
    def sharded(self) -> bool:
        """Some S is an FSDP2 DTensor: scores come from the local rows and are gathered (`losparse.core.sharding`)."""
        return any_sharded(self.layers)

    @property
    def uses_uncertainty(self) -> bool:
        return self.metric == "sensitivity" and self.beta2 > 0.0

    def _entry_scores(self) -> list[torch.Tensor]:
        sparse = [local_tensor(layer.sparse.detach()) for layer in self.layers]
        if self.metric == "magnitude":
            return [s.abs().float() for s in sparse]
        grads = [layer.sparse.grad for layer in self.layers]
        if self.sharded:
            grads = [None if g is None else local_tensor(g) for g in grads]
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

    def _layer_entry_scores(self, layer: LoSparseLinear) -> torch.Tensor:
        """One layer's entry scores (out, in), float32: |s|, |s·g| or −s·g."""
        sparse = layer.sparse.detach()
        if self.metric == "magnitude":
            return sparse.abs().float()
        if layer.sparse.grad is None:
            raise RuntimeError(
                "a sparse matrix has no gradient at the optimizer step: the importance update must run after "
                "backward() and before the gradients are zeroed (DeepSpeed/FSDP free them earlier)"
            )
        scores = sparse * layer.sparse.grad
        return (scores.neg_() if self.metric == "movement" else scores.abs_()).float()

    def _current_neuron_means(self) -> torch.Tensor:
        """This step's neuron means, layer by layer: at most one layer's (out, in) score tensor is alive at a
        time (scoring all layers at once would hold a second copy of every S, as much memory as S itself)."""
        if self.sharded:
            return self._neuron_means(self._entry_scores())
        means = []
        for layer in self.layers:
            scores = self._layer_entry_scores(layer)
            means.append(scores.reshape(-1) if layer.neuron_axis is None else
                         _all_neurons(layer, scores.mean(dim=1 - layer.neuron_axis)))
        return torch.cat(means)

    def _neuron_means(self, entry_scores: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 4 per neuron, flattened in layer order; an entry-masked layer (LPAF) keeps every entry's score."""
        if self.sharded:
            return sharded_neuron_means(entry_scores, self.layers)
        return torch.cat([t.reshape(-1) if layer.neuron_axis is None else
                          _all_neurons(layer, t.mean(dim=1 - layer.neuron_axis))
                          for t, layer in zip(entry_scores, self.layers)])

    @property
    def windowed(self) -> bool:
        return self.window is not None

    @torch.no_grad()
    def update(self, step: Optional[int] = None) -> None:
        """Fold the current step's scores into the moving averages (call once per optimizer step).

        `step` is the 1-based optimizer step that has just finished; only the windowed mode uses it (to know
        where the window starts), and without it the number of earlier calls + 1 is taken.
        """
        if not self.layers:
            return
        if self.windowed:
            self._update_windowed(self.num_updates + 1 if step is None else int(step))
            self.num_updates += 1
            return
        if self.metric == "magnitude":
            self.neuron_ema.copy_(self._current_neuron_means())
        elif self.metric == "movement":
            current = self._current_neuron_means()
            self.neuron_ema.add_(torch.where(torch.isfinite(current).all(), current, torch.zeros_like(current)))
        elif not self.uses_uncertainty:
            ema_update_(self.neuron_ema, self._current_neuron_means(), self.beta1)
        else:
            entry_scores = self._entry_scores()
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

    def _update_windowed(self, step: int) -> None:
        position = (step - 1) % self.window  # the reference code's (global_step % ΔT), global_step = step - 1
        count = self.window_count
        if position == 0:
            self._fold_window()
            count.zero_()
            if self.window_mean is not None:
                self.window_mean.zero_()
            for mean in self.entry_window_mean:
                mean.zero_()
        if self.window_mean is not None:
            current = self._current_neuron_means()
            finite = torch.isfinite(current).all()
            updated = (self.window_mean * count + current) / (count + 1.0)
            self.window_mean.copy_(torch.where(finite, updated, self.window_mean))
        else:
            entry_scores = self._entry_scores()
            finite = torch.stack([torch.isfinite(t).all() for t in entry_scores]).all()
            for current, mean in zip(entry_scores, self.entry_window_mean):
                updated = (mean * count + current) / (count + 1.0)
                mean.copy_(torch.where(finite, updated, mean))
        count.add_(finite.to(count.dtype))

    def _fold_window(self) -> None:
        """Ī ← β·Ī + (1 − β)·A for the window just finished (skipped if it holds no step)."""
        has_steps = self.window_count > 0
        if self.window_mean is not None:
            folded = self.beta1 * self.neuron_ema + (1 - self.beta1) * self.window_mean
            self.neuron_ema.copy_(torch.where(has_steps, folded, self.neuron_ema))
            return
        for mean, ema, unc in zip(self.entry_window_mean, self.entry_ema, self.entry_uncertainty):
            new_ema = self.beta1 * ema + (1 - self.beta1) * mean
            new_unc = self.beta2 * unc + (1 - self.beta2) * (mean - new_ema).abs()
            ema.copy_(torch.where(has_steps, new_ema, ema))
            unc.copy_(torch.where(has_steps, new_unc, unc))
        combined = [ema * unc for ema, unc in zip(self.entry_ema, self.entry_uncertainty)]
        self.neuron_ema.copy_(self._neuron_means(combined))

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
        if self.windowed:
            state["window_count"] = self.window_count
            if self.window_mean is not None:
                state["window_mean"] = self.window_mean
            for i, mean in enumerate(self.entry_window_mean):
                state[f"entry_window_mean.{i}"] = mean
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["neuron_ema"].shape != self.neuron_ema.shape:
            raise ValueError(
                f"importance state has {state['neuron_ema'].numel()} neurons, this model has {self.neuron_ema.numel()}"
            )
        if ("window_count" in state) != self.windowed:
            raise ValueError(
                "importance state holds a ΔT-window accumulator (written by --pruning_variant reference) but this run "
                "does not use one" if "window_count" in state else
                "importance state holds no ΔT-window accumulator (written by --pruning_variant paper) but this run "
                "uses --pruning_variant reference"
            )
        self.neuron_ema.copy_(state["neuron_ema"])
        self.num_updates = int(state["num_updates"])
        for i, (ema, unc) in enumerate(zip(self.entry_ema, self.entry_uncertainty)):
            ema.copy_(state[f"entry_ema.{i}"])
            unc.copy_(state[f"entry_uncertainty.{i}"])
        if self.windowed:
            self.window_count.copy_(state["window_count"])
            if self.window_mean is not None:
                self.window_mean.copy_(state["window_mean"])
            for i, mean in enumerate(self.entry_window_mean):
                mean.copy_(state[f"entry_window_mean.{i}"])
