"""LPAF's schedule in one training run: prune entries, factorise, fine-tune with mixed ranks (`--method lpaf`).

LPAF (Low-Rank Prune-And-Factorize, Ren & Zhu 2023) reuses the project's pruning seams, so the Trainer,
the callback and checkpointing are those of every other method (`losparse.training.trainer`); only this pruner
differs. The T optimizer steps split at T₁ = round(`lpaf_prune_fraction` · T):

  steps 1..T₁   prune.  Each targeted layer holds S = W (`decompose.apply` with prune_dim "entries" and
                U = V = 0, which receive no gradient while both are zero). S is pruned entry by entry with
                the `LoSparsePruner` machinery -- one global threshold over all layers, the cubic schedule
                (warm-up and final phase as fractions of T₁) -- to `remaining_ratio` of its entries, i.e.
                to the parameter budget of the finished model. Scores: `lpaf_importance`, first-order
                (accumulated −w·∂L/∂w) by default, magnitude or sensitivity for the comparison.
  step T₁       factorise.  Each pruned S (out, in) becomes U (out, R) · V (R, in) by the sparsity-aware SVD
                (`lpaf.sparsity_aware_factorize`: the low-rank fit weighted 1 on kept entries and
                `lpaf_pruned_weight` (0.1) on pruned ones, so little rank is spent on reproducing pruned
                zeros, yet U·V cannot grow large there), R = ceil(`lpaf_max_rank_factor` · r), r the rank
                `remaining_ratio` allows (`decompose.allocate_ranks`). S leaves the forward for good.
  steps T₁+1..T mixed-rank fine-tuning.  Before every step each layer draws the rank k ∈ [r, R_t] it
                computes with (`lpaf.sample_mixed_rank`: seeded by step and layer, the range's top R_t
                shrinking cubically to r, exactly r for the last `pruning_final_ratio` of these steps).
                The forward uses the leading k columns of U and rows of V, so the factors stay nested:
                every rank ≤ R is trained, the leading ones most often, and truncating to r at the end
                keeps what matters most (`lpaf.truncate_factors`).

After step T every layer's `active_rank` is r; `losparse.compact` keeps U[:, :r], V[:r] and no S, so the
saved model is pure U·V with ratio Σ r(out + in) / Σ out·in (within one rank per layer of the target).
All of it is deterministic in the step number, so a resumed run restores the phase and ranks from the
saved step (`extra_state`).
"""

from __future__ import annotations

import logging
import statistics
from typing import Optional

import torch
from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.decompose import allocate_ranks
from losparse.core.errors import LoSparseUsageError
from losparse.core.pruner import LoSparsePruner
from losparse.methods.lpaf.factorize import (
    factorization_weights,
    sample_mixed_rank,
    sparsity_aware_factorize,
    svd_factors,
    weighted_reconstruction_error,
)

logger = logging.getLogger(__name__)

#: `lpaf_importance` → the `NeuronImportance` metric that computes it (first-order is movement's score)
IMPORTANCE_METRIC = {"first_order": "movement", "magnitude": "magnitude", "sensitivity": "sensitivity"}
#: mixed-rank draws are seeded by (this, step, layer): the same ranks in every process and every resumed run
RANK_SEED = 0


class LpafPruner(LoSparsePruner):
    """Unstructured pruning for the first T₁ steps, then one factorisation, then mixed ranks (module docstring)."""

    factorizes = True

    def __init__(self, model: nn.Module, total_steps: int, config: Optional[LoSparseConfig] = None) -> None:
        self.total_steps = int(total_steps)
        super().__init__(model, total_steps, config)
        if any(layer.prune_dim != "entries" or layer.low_rank_u is None for layer in self.layers):
            raise LoSparseUsageError("--method lpaf needs a model decomposed with method 'lpaf' (entry masks, U·V slots)")
        shapes = [(layer.out_features, layer.in_features) for layer in self.layers]
        self.target_ranks = allocate_ranks(shapes, self.config.remaining_ratio)
        self.max_ranks = [layer.rank for layer in self.layers]
        if any(r > big for r, big in zip(self.target_ranks, self.max_ranks)):
            raise LoSparseUsageError("the model's U·V slots are smaller than the target ranks: it was decomposed with "
                                     "another --remaining_ratio")
        self.finetune_steps = self.total_steps - self.prune_steps
        self.finetune_final_steps = int(round(self.config.pruning_final_ratio * self.finetune_steps))
        self.factorized = False
        self.factorization_report: dict[str, float] = {}
        self.set_ranks(1)
        logger.info("LPAF: prune entries for %d of %d steps, then factorise at mean rank %.1f (target %.1f), mixed ranks "
                    "for %d steps, the last %d at the target", self.prune_steps, self.total_steps,
                    statistics.fmean(self.max_ranks) if self.layers else 0.0,
                    statistics.fmean(self.target_ranks) if self.layers else 0.0,
                    self.finetune_steps, self.finetune_final_steps)

    # ------------------------------------------------------------------ hooks of LoSparsePruner

    def pruning_steps(self, total_steps: int) -> int:
        self.prune_steps = int(round(self.config.lpaf_prune_fraction * total_steps))
        if self.prune_steps < 1 or self.prune_steps >= total_steps:
            raise LoSparseUsageError(
                f"--lpaf_prune_fraction {self.config.lpaf_prune_fraction} of {total_steps} optimizer steps leaves "
                f"{self.prune_steps} pruning and {total_steps - self.prune_steps} fine-tuning steps; both need at "
                "least one (train longer or change the fraction)"
            )
        return self.prune_steps

    def importance_metric(self) -> str:
        return IMPORTANCE_METRIC[self.config.lpaf_importance]

    # ------------------------------------------------------------------ the three phases

    @torch.no_grad()
    def step(self, step: int) -> None:
        """After optimizer step `step` (1-based): prune (≤ T₁), factorise (= T₁), then set the next step's ranks."""
        if step <= self.prune_steps:
            super().step(step)
            if step == self.prune_steps:
                self.factorize()
        self.last_step = step
        self.set_ranks(step + 1)

    @torch.no_grad()
    def factorize(self) -> dict[str, float]:
        """Replace every pruned S by rank-R factors (sparsity-aware SVD) and take S out of the forward."""
        method = self.config.lpaf_factorization
        ratios = []
        for layer, rank in zip(self.layers, self.max_ranks):
            mask = layer.sparse_mask
            pruned = layer.sparse.detach() * mask
            weights = mask.to(pruned.dtype)
            plain_u, plain_v = svd_factors(pruned, rank)
            plain_error = weighted_reconstruction_error(pruned, weights, plain_u, plain_v)
            if method == "plain":
                u, v, error = plain_u, plain_v, plain_error
            else:
                fit_weights = factorization_weights(mask, pruned_weight=self.config.lpaf_pruned_weight)
                u, v = sparsity_aware_factorize(pruned, fit_weights, rank,
                                                iterations=self.config.lpaf_factorization_iterations, method=method)
                error = weighted_reconstruction_error(pruned, weights, u, v)
            if plain_error > 0:
                ratios.append(error / plain_error)
            layer.low_rank_u.copy_(u)
            layer.low_rank_v.copy_(v)
        self._drop_sparse()
        self.factorized = True
        self.factorization_report = {
            "step": self.prune_steps,
            "layers": len(self.layers),
            "masked_error_vs_plain_svd_median": statistics.median(ratios) if ratios else 1.0,
        }
        logger.info(
            "LPAF: step %d, factorised %d pruned matrices (%s) at ranks up to %d; on the kept entries the error is "
            "%.3f× the plain SVD's (median); mixed-rank fine-tuning for %d steps, the last %d at the target ranks",
            self.prune_steps, len(self.layers), "plain SVD" if method == "plain" else f"sparsity-aware {method}",
            max(self.max_ranks, default=0), self.factorization_report["masked_error_vs_plain_svd_median"],
            self.finetune_steps, self.finetune_final_steps,
        )
        return self.factorization_report

    @torch.no_grad()
    def _drop_sparse(self) -> None:
        for layer in self.layers:
            layer.sparse.zero_()
            layer.sparse.grad = None
            layer.sparse.requires_grad_(False)
            layer.sparse_active = False

    def set_ranks(self, step: int) -> None:
        """The ranks the layers compute with at optimizer step `step` (all of R before factorising)."""
        local = step - self.prune_steps
        for index, (layer, target, top) in enumerate(zip(self.layers, self.target_ranks, self.max_ranks)):
            if local < 1:
                layer.active_rank = None
            else:
                layer.active_rank = sample_mixed_rank(
                    min(local, self.finetune_steps), target, top, self.finetune_steps, self.finetune_final_steps,
                    seed=RANK_SEED, layer=index)

    def apply_masks(self) -> None:
        if not self.factorized:
            super().apply_masks()

    # ------------------------------------------------------------------ state

    def extra_state(self) -> dict:
        return {"lpaf_factorized": self.factorized, "lpaf_prune_steps": self.prune_steps,
                "lpaf_factorization": self.factorization_report}

    def restore_extra_state(self, meta: dict) -> None:
        if meta.get("lpaf_factorized"):
            self._drop_sparse()
            self.factorized = True
            self.factorization_report = dict(meta.get("lpaf_factorization") or {})
        self.set_ranks(self.last_step + 1)

    def rank_summary(self) -> dict[str, float]:
        """Mean active, target and largest rank over the layers (for logs)."""
        active = [layer.current_rank for layer in self.layers]
        return {"mean_rank": statistics.fmean(active) if active else 0.0,
                "mean_target_rank": statistics.fmean(self.target_ranks) if active else 0.0,
                "mean_max_rank": statistics.fmean(self.max_ranks) if active else 0.0}

