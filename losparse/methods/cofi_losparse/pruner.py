"""`CofiLoSparsePruner`: CoFi's gates and Lagrangian over the structures, LoSparse's pruner over S.

One optimizer step: LoSparse's importance update and mask step (its cubic schedule spans the run up to the
end of CoFi's pruning stage, so S is fixed while the structure fine-tunes), then CoFi's gate step. Each of
LoSparse's mask updates keeps its kept fraction of the S rows that survive CoFi's current deterministic gates
(`SurvivorLoSparsePruner`); at the end of pruning, once CoFi's final gates are fixed, S is re-budgeted on the
final survivors. Checkpoints hold both states (the LoSparse one under the `sparse.` prefix).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.core.pruner import LoSparsePruner
from losparse.methods.cofi.pruner import CofiPruner
from losparse.methods.cofi.units import parse_units
from losparse.methods.cofi_losparse.survivors import alive_neurons, neuron_roles

#: the gates of the combination by default: CoFi's first and second level (Appendix F keeps those)
DEFAULT_UNITS = "mha_layer,head,ffn_layer"
SPARSE_PREFIX = "sparse."


def sparse_stage_config(config: LoSparseConfig) -> LoSparseConfig:
    """LoSparse's share of the survivors: remaining_ratio / structured_ratio (nothing structured left: 1.0)."""
    return dataclasses.replace(config, remaining_ratio=config.remaining_ratio / config.structured_ratio,
                               structured_ratio=1.0)


def check_prune_dim(config: LoSparseConfig) -> None:
    """S's neurons must be rows: the rows CoFi's heads and hidden dims remove with them."""
    if config.prune_dim != "rows":
        raise LoSparseUsageError(f"--prune_dim {config.prune_dim}: --method cofi_losparse prunes rows of S (the "
                                 "rows that CoFi's heads and hidden dims remove with them); use --prune_dim rows")


def combination_units(config: LoSparseConfig) -> tuple[str, ...]:
    """The gated units (`--cofi_units`, default `DEFAULT_UNITS`); neurons are LoSparse's, never CoFi's."""
    units = parse_units(config.cofi_units or DEFAULT_UNITS)
    if "neuron" in units:
        raise LoSparseUsageError(f"--cofi_units {config.cofi_units!r}: with --method cofi_losparse LoSparse's "
                                 "pruning of S replaces CoFi's neuron gates; drop 'neuron'")
    return units


class SurvivorLoSparsePruner(LoSparsePruner):
    """LoSparse's pruner whose kept fraction is a share of the S neurons `alive()` says survive (None: all)."""

    def __init__(self, model: nn.Module, total_steps: int, config: LoSparseConfig,
                 alive: Callable[[], Optional[torch.Tensor]]) -> None:
        super().__init__(model, total_steps, config)
        self.alive = alive

    @torch.no_grad()
    def step(self, step: int) -> None:
        """`LoSparsePruner.step`; a matrix outside this step's graph (its sub-layer skipped by a gate sampled at 0)
        had zero gradient, so zero sensitivity this step."""
        for layer in self.layers:
            if layer.sparse.grad is None:
                layer.sparse.grad = torch.zeros_like(layer.sparse)
        super().step(step)

    @torch.no_grad()
    def update_masks(self, kept_fraction: float, scores: Optional[torch.Tensor] = None) -> None:
        alive = self.alive() if self.layers else None
        if alive is None or bool(alive.all()):
            super().update_masks(kept_fraction, scores)
            return
        scores = (self.importance.scores() if scores is None else scores).to(self.neuron_sizes.device).clone()
        alive = alive.to(scores.device)
        scores[~alive] = float("-inf")
        share = float((alive.to(torch.float64) * self.neuron_sizes).sum()) / self.total_sparse_params
        super().update_masks(kept_fraction * share, scores)


class CofiLoSparsePruner(CofiPruner):
    """`CofiPruner` to `structured_ratio` on decomposed matrices, plus a `SurvivorLoSparsePruner` over S."""

    decomposed_ok = True

    def __init__(self, model: nn.Module, config: LoSparseConfig, adam: tuple[float, float, float] = (0.9, 0.999, 1e-8),
                 extra_modules: Optional[dict[str, nn.Module]] = None) -> None:
        check_prune_dim(config)
        super().__init__(model, config, adam, extra_modules, target_ratio=config.structured_ratio)
        self.sparse_config = sparse_stage_config(config)
        self.sparse_pruner: Optional[SurvivorLoSparsePruner] = None

    def units_of(self, config: LoSparseConfig) -> tuple[str, ...]:
        return combination_units(config)

    def plan(self, total_steps: int, num_train_epochs: float) -> None:
        super().plan(total_steps, num_train_epochs)
        if self.sparse_pruner is None:
            self.sparse_pruner = SurvivorLoSparsePruner(self.model, self.prune_end, self.sparse_config,
                                                        self.surviving_neurons)
            self._roles = neuron_roles(self.model, self.sparse_pruner.layers)

    def current_gates(self) -> Optional[dict[str, Optional[torch.Tensor]]]:
        """The structure S is budgeted on: the final gates, else the deterministic ones (None before pruning)."""
        if self.final_gates is not None:
            return self.final_gates
        return None if self.stage() == "prefinetune" else self.deterministic_gates()

    def surviving_neurons(self) -> Optional[torch.Tensor]:
        gates = self.current_gates()
        if gates is None:
            return None
        return alive_neurons(self._roles, self.sparse_pruner.layers, gates, self.shape.head_size)

    @torch.no_grad()
    def step(self, step: int) -> None:
        if step <= self.sparse_pruner.schedule.total_steps:
            self.sparse_pruner.step(step)
        else:
            self.sparse_pruner.apply_masks()
        super().step(step)

    def finalize(self) -> None:
        """CoFi's final gates, then S re-budgeted on their survivors so that the product is remaining_ratio: the
        structure may keep less than `structured_ratio` (the Lagrangian's end, or the budget rule's last unit)."""
        first = self.final_gates is None
        super().finalize()
        if first and self.sparse_pruner is not None:
            sparse = self.sparse_pruner
            low_rank_share = self.sparse_config.remaining_ratio - sparse.final_kept_fraction
            share = min(1.0, self.config.remaining_ratio / max(self._ratio(self.final_gates), 1e-12))
            sparse.final_kept_fraction = max(share - low_rank_share, 0.0)
            sparse.update_masks(sparse.final_kept_fraction)

    def sparse_kept_fraction(self) -> float:
        """Kept S parameters of the surviving rows / those rows' parameters (LoSparse's share of the survivors)."""
        alive = self.surviving_neurons()
        if alive is None:
            return self.sparse_pruner.achieved_kept_fraction()
        masks = torch.cat([layer.sparse_mask.reshape(-1) for layer in self.sparse_pruner.layers])
        sizes = self.sparse_pruner.neuron_sizes
        kept = float((masks.to(sizes) * sizes).sum())
        return kept / max(float((alive.to(sizes) * sizes).sum()), 1.0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors()
        tensors.update({SPARSE_PREFIX + k: v for k, v in self.sparse_pruner.state_tensors().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: str) -> None:
        super().load_state_tensors(tensors, path)
        sparse = {k[len(SPARSE_PREFIX):]: v for k, v in tensors.items() if k.startswith(SPARSE_PREFIX)}
        if not sparse:
            raise LoSparseUsageError(f"{path} holds no LoSparse state: not a cofi_losparse checkpoint")
        self.sparse_pruner.load_state_tensors(sparse, path)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "kind": "cofi_losparse", "sparse": self.sparse_pruner.extra_state()}

    def restore_extra_state(self, meta: dict) -> None:
        super().restore_extra_state(meta)
        self.sparse_pruner.restore_extra_state(meta.get("sparse") or {})
        self.sparse_pruner.last_step = self.last_step
