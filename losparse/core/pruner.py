"""Ties importance and schedule into masks (Algorithm 1, lines 10–13). Framework-agnostic.

`LoSparsePruner.step(t)` is called once per optimizer step, after `optimizer.step()` and before the
gradients are zeroed; any training loop can drive it (the Trainer does so through
`losparse.training.trainer.LoSparseCallback`).

Ranking is global: all neurons of all S matrices compete under one threshold. Neurons hold
different numbers of parameters (a row of a 3072-wide FFN output holds 4× a row of a 768-wide
one), so the threshold is placed where the kept *parameters* reach p_t of all S parameters — the
paper's ratio is a parameter ratio. With `--align N` the units of that ranking are groups of N
neurons of one layer (`NeuronGroups`), so every aligned layer keeps a multiple of N neurons.

Two variants (`LoSparseConfig.pruning_variant`):
  paper      Algorithm 1 as printed: the EMA is updated every step, masks are recomputed every ΔT
             steps from t_i (every step from T − t_f) and re-applied after every optimizer step, and
             the kept neurons are the highest-scoring ones whose cumulative parameters fit in p_t.
  reference  the public reference code's arithmetic (yxli2123/LoSparse, `utils.Pruner`): the
             sensitivity is averaged over ΔT-step windows and folded into the EMA once per window
             (`NeuronImportance(window=ΔT)`); schedule and mask steps use g = t − 1
             (`CubicSchedule(variant="reference")`); pruned neurons are not re-zeroed between mask
             steps; and the keep rule is "score ≥ the k-th smallest entry score", k = int(N·(1 − p_t))
             over all N entries of all S (each neuron counted once per parameter, ties all kept), so
             the kept share is ≥ p_t. Both variants use this project's p_T = Ratio − achieved low-rank
             share. Deviations from the reference, by choice: p_t ≤ 0 prunes everything (the reference
             cannot prune to zero), k = 0 keeps everything (the reference would fail), and the mask is
             re-applied after the last step T if that step is not a mask step, so the trained S matches
             its mask (in the reference this holds whenever t_f ≥ 2).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from losparse.core.checkpoint import PRUNER_META_FILE, PRUNER_STATE_FILE
from losparse.core.config import LoSparseConfig
from losparse.core.decompose import get_config, matrix_alignments
from losparse.core.errors import LoSparseUsageError
from losparse.core.importance import NeuronImportance
from losparse.core.layers import LoSparseLinear
from losparse.core.methods import final_kept_fraction
from losparse.core.schedule import CubicSchedule, resolve_steps
from losparse.core.shrink import monotone_update_masks


def target_budget(layers: list[LoSparseLinear], config: LoSparseConfig) -> dict[str, float]:
    """Split the remaining-parameter budget between the low-rank part and S.

    Returns the dense parameter count of the targeted matrices, the achieved low-rank share (ranks
    round up, so it is a bit above r) and the kept fraction p_T of S; for LoSparse,
    low-rank share + p_T == remaining_ratio.
    """
    dense = sum(layer.in_features * layer.out_features for layer in layers)
    low_rank = sum(layer.rank * (layer.in_features + layer.out_features) for layer in layers)
    low_rank_share = low_rank / dense if dense else 0.0
    return {
        "dense_params": dense,
        "low_rank_share": low_rank_share,
        "final_kept_fraction": final_kept_fraction(config.method_spec, config.remaining_ratio, low_rank_share),
    }


def keep_within_budget(scores: torch.Tensor, sizes: torch.Tensor, kept_fraction: float,
                       total: Optional[float] = None) -> torch.Tensor:
    """The paper keep rule: the best-scoring units whose cumulative sizes fit in `kept_fraction` of `total`.

    scores, sizes: (N,) per unit (neuron, head, FFN neuron); total defaults to Σ sizes. Ties are broken by
    position (stable sort); the kept size falls short of the budget by less than one unit.
    """
    total = float(sizes.sum()) if total is None else total
    order = torch.argsort(scores.to(sizes.device), descending=True, stable=True)
    fits = torch.cumsum(sizes[order], dim=0) <= kept_fraction * total + 0.5
    keep = torch.empty_like(fits)
    keep[order] = fits
    return keep


def _keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest scores (ties: the earlier entry wins), in O(N) via `kthvalue` instead of a full sort.

    For unit-sized neurons (entries) the paper rule "best neurons whose parameters fit in p" is exactly
    top-k; with millions of entries a stable argsort at every mask step would dominate the step time.
    """
    total = scores.numel()
    k = max(0, min(total, k))
    if k == 0 or k == total:
        return torch.full_like(scores, k == total, dtype=torch.bool)
    threshold = torch.kthvalue(scores, total - k + 1).values
    keep = scores > threshold
    ties = torch.nonzero(scores == threshold, as_tuple=False).flatten()
    keep[ties[: k - int(keep.sum())]] = True
    return keep


class NeuronGroups:
    """Whole groups of N neurons per layer as the units of the global ranking (`--align`), so a layer keeps a
    multiple of N neurons (or all of them).

    For a layer with multiple N > 1 its neurons are sorted by score (descending, stable) and cut into consecutive
    groups of N (the last may be smaller); a group scores the mean of its members and weighs the sum of their
    sizes. A layer with N = 1 contributes each neuron as its own group, in neuron order. Groups are numbered layer
    by layer, so the rank of a group in the global order depends only on scores and sizes.
    Everything is on the device of `neuron_sizes`; `assign` costs two stable sorts, O(n log n) for n neurons.

    num_neurons, aligns: per layer; neuron_sizes: (n,) parameters per neuron (equal within a layer).
    """

    def __init__(self, num_neurons: list[int], aligns: list[int], neuron_sizes: torch.Tensor) -> None:
        device = neuron_sizes.device
        counts = torch.tensor(num_neurons, dtype=torch.long, device=device)
        align = torch.tensor(aligns, dtype=torch.long, device=device)
        groups_per_layer = (counts + align - 1) // align
        self.layer_of_neuron = torch.repeat_interleave(torch.arange(len(num_neurons), device=device), counts)
        self.layer_start = (torch.cumsum(counts, 0) - counts)[self.layer_of_neuron]
        self.group_start = (torch.cumsum(groups_per_layer, 0) - groups_per_layer)[self.layer_of_neuron]
        self.align = align[self.layer_of_neuron]
        self.aligned = self.align > 1
        self.local_index = torch.arange(int(counts.sum()), device=device) - self.layer_start
        # Membership counts and sizes do not depend on which neurons fill a group (sizes are equal within a
        # layer), so they are fixed here from the neuron order.
        static_group = self.group_start + self.local_index // self.align
        self.num_groups = int(groups_per_layer.sum())
        self.members = torch.zeros(self.num_groups, dtype=torch.float64, device=device).index_add_(
            0, static_group, torch.ones_like(neuron_sizes, dtype=torch.float64))
        self.sizes = torch.zeros(self.num_groups, dtype=torch.float64, device=device).index_add_(
            0, static_group, neuron_sizes.to(torch.float64))

    def assign(self, scores: torch.Tensor) -> torch.Tensor:
        """(n,) the group of every neuron for these (n,) scores."""
        by_score = torch.argsort(scores, descending=True, stable=True)
        order = by_score[torch.argsort(self.layer_of_neuron[by_score], stable=True)]  # layer by layer, best first
        rank_in_layer = torch.empty_like(order)
        rank_in_layer[order] = torch.arange(order.numel(), device=order.device)
        rank_in_layer -= self.layer_start
        within = torch.where(self.aligned, rank_in_layer // self.align, self.local_index)
        return self.group_start + within

    def mean_scores(self, scores: torch.Tensor, group_of: torch.Tensor) -> torch.Tensor:
        """(groups,) the mean score of each group's members (float64)."""
        sums = torch.zeros(self.num_groups, dtype=torch.float64, device=scores.device)
        return sums.index_add_(0, group_of, scores.to(torch.float64)) / self.members


class BasePruner:
    """The pruning lifecycle every pruner shares (LoSparse's S neurons, LPAF's entries, structured groups).

    `step(t)` after optimizer step t (1-based, before the gradients are zeroed): fold this step into the
    importance, then — while the schedule prunes — recompute the masks on a mask step or re-apply them
    otherwise. `save`/`load` write the state into a checkpoint: `state_tensors()` (safetensors) and a JSON
    with the step, the kept fraction, the config and `extra_state()`. Subclasses set `config`, `schedule`,
    `importance` (with `update()`), `last_step` and `kept_fraction`, and implement `update_masks`,
    `apply_masks`, `achieved_kept_fraction`, `state_tensors` and `load_state_tensors`.
    """

    config: LoSparseConfig
    last_step: int
    kept_fraction: float

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Run after optimizer step number `step` (1-based): update scores, then mask if due."""
        self.importance.update()
        self.last_step = step
        if not self.schedule.is_pruning(step):
            return
        self.kept_fraction = self.schedule.kept_fraction(step)
        if self.schedule.is_mask_update_step(step):
            self.update_masks_at_step(self.kept_fraction)
        else:
            self.apply_masks()

    def update_masks_at_step(self, kept_fraction: float) -> None:
        """The mask update of a mask step (subclasses may constrain it, e.g. monotone masks)."""
        self.update_masks(kept_fraction)

    def extra_state(self) -> dict:
        """More JSON-able state for `save` (subclasses); `restore_extra_state` gets it back on `load`."""
        return {}

    def restore_extra_state(self, meta: dict) -> None:
        """Counterpart of `extra_state`, called by `load` with the saved JSON."""

    def save(self, directory: str) -> None:
        """Write the pruner state (safetensors + a small JSON) into a checkpoint directory."""
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_tensors().items()}
        save_file(tensors, os.path.join(directory, PRUNER_STATE_FILE))
        with open(os.path.join(directory, PRUNER_META_FILE), "w") as f:
            json.dump({"last_step": self.last_step, "kept_fraction": self.kept_fraction,
                       "config": self.config.to_dict(), **self.extra_state()}, f, indent=2)

    def load(self, directory: str) -> bool:
        """Restore the state saved by `save`; returns False if the directory holds none."""
        state_path = os.path.join(directory, PRUNER_STATE_FILE)
        if not os.path.isfile(state_path):
            return False
        self.load_state_tensors(load_file(state_path), state_path)
        with open(os.path.join(directory, PRUNER_META_FILE)) as f:
            meta = json.load(f)
        self.last_step = int(meta["last_step"])
        self.kept_fraction = float(meta["kept_fraction"])
        self.restore_extra_state(meta)
        return True


class LoSparsePruner(BasePruner):
    """Importance tracking + cubic schedule + global structured masking for one model."""

    #: whether this pruner factorises S into U·V itself (methods with `prune_then_factorize`: `LpafPruner`)
    factorizes = False

    def __init__(self, model: nn.Module, total_steps: int, config: Optional[LoSparseConfig] = None) -> None:
        self.config = config or get_config(model)
        if self.config.method_spec.prune_then_factorize and not self.factorizes:
            raise LoSparseUsageError(
                f"method {self.config.method!r} prunes S and then factorises it: its pruner is "
                "losparse.methods.lpaf.LpafPruner (pass pruner_class=LpafPruner to the trainer; the run scripts do)")
        self.layers = [m for m in model.modules() if isinstance(m, LoSparseLinear) and m.sparse is not None]
        all_layers = [m for m in model.modules() if isinstance(m, LoSparseLinear)]
        budget = target_budget(all_layers, self.config)
        self.final_kept_fraction = budget["final_kept_fraction"]
        if self.final_kept_fraction <= 0.0 and not self.config.method_spec.prunes_to_zero and self.layers:
            raise LoSparseUsageError(
                f"--low_rank_ratio {self.config.low_rank_ratio} leaves nothing for the sparse part: with ranks rounded "
                f"up the low-rank share is {budget['low_rank_share']:.4f} >= --remaining_ratio "
                f"{self.config.remaining_ratio}; lower --low_rank_ratio"
                + ("" if self.config.align == "1" else f" (or --align {self.config.align}: ranks are multiples of it)")
            )
        pruning_steps = self.pruning_steps(total_steps)
        self.schedule = CubicSchedule(
            total_steps=pruning_steps,
            warmup_steps=resolve_steps(self.config.pruning_warmup_steps, self.config.pruning_warmup_ratio, pruning_steps),
            final_steps=resolve_steps(self.config.pruning_final_steps, self.config.pruning_final_ratio, pruning_steps),
            final_fraction=self.final_kept_fraction,
            interval=self.config.pruning_interval,
            variant=self.config.pruning_variant,
        )
        metric = self.importance_metric()
        window = self.config.pruning_interval if self.variant == "reference" else None
        self.importance = NeuronImportance(self.layers, metric, self.config.beta1, self.config.beta2, window=window)
        device = self.importance.neuron_ema.device
        self.neuron_sizes = torch.cat(
            [torch.full((layer.sparse_mask.numel(),), layer.neuron_size, dtype=torch.float64, device=device)
             for layer in self.layers]
        ) if self.layers else torch.zeros(0, dtype=torch.float64)
        self.total_sparse_params = float(self.neuron_sizes.sum()) if self.layers else 0.0
        #: every "neuron" is one entry (LPAF's unstructured masks): the keep rule is a plain top-k
        self.unit_sized = bool(self.layers) and all(layer.neuron_size == 1 for layer in self.layers)
        #: --align: groups of neurons ranked as units; None when every layer keeps exact counts (entry masks do)
        self.neuron_groups = self._neuron_groups(device)
        self.last_step = 0
        self.kept_fraction = 1.0

    def _neuron_groups(self, device: torch.device) -> Optional[NeuronGroups]:
        if not self.layers:
            return None
        aligns = matrix_alignments([(layer.out_features, layer.in_features) for layer in self.layers], self.config,
                                   self.layers[0].sparse.device)
        aligns = [align if layer.neuron_axis is not None else 1 for align, layer in zip(aligns, self.layers)]
        if all(align == 1 for align in aligns):
            return None
        return NeuronGroups(self.importance.num_neurons, aligns, self.neuron_sizes.to(device))

    @property
    def variant(self) -> str:
        return self.config.pruning_variant

    def pruning_steps(self, total_steps: int) -> int:
        """The optimizer steps the cubic schedule spans (all of them; LPAF prunes in the first part only)."""
        return total_steps

    def importance_metric(self) -> str:
        """The score `NeuronImportance` tracks: the method's own, else the config's --importance."""
        return self.config.method_spec.importance or self.config.importance

    @torch.no_grad()
    def step(self, step: int) -> None:
        """`BasePruner.step`; the reference variant has its own order (`_reference_step`)."""
        if self.variant == "reference":
            self._reference_step(step)
        else:
            super().step(step)

    def _reference_step(self, step: int) -> None:
        self.importance.update(step)
        self.last_step = step
        self.kept_fraction = self.schedule.kept_fraction(step)
        if self.schedule.is_mask_update_step(step):
            self.update_masks_at_step(self.kept_fraction)
        elif step >= self.schedule.total_steps and self.schedule.is_pruning(step):
            self.apply_masks()  # the last step: no regrown row survives into the trained model

    @torch.no_grad()
    def update_masks(self, kept_fraction: float, scores: Optional[torch.Tensor] = None) -> None:
        """Recompute the masks for `kept_fraction` of all S parameters with this variant's keep rule.

        `paper`: keep the highest-scoring neurons whose cumulative parameters fit in `kept_fraction`.
        `reference`: keep every neuron whose score is ≥ the k-th smallest entry score, k = int(N·(1 − p)).
        `scores`: one score per neuron of all layers, in layer order, to rank instead of the tracked
        importance (which is left untouched), e.g. random scores to prune an untrained model for a benchmark.
        With --align the units of either rule are `NeuronGroups` (mean score, summed size) instead of neurons.
        """
        if not self.layers:
            return
        if scores is None:
            scores = self.importance.scores()
        elif scores.shape != self.neuron_sizes.shape:
            raise ValueError(f"update_masks: {scores.numel()} scores given for {self.neuron_sizes.numel()} neurons")
        scores = scores.to(self.neuron_sizes.device)
        if self.neuron_groups is not None:
            keep = self._aligned_keep(kept_fraction, scores)
        elif self.variant == "reference":
            keep = self._reference_keep(kept_fraction, scores)
        elif self.unit_sized:
            keep = _keep_top_k(scores, int(kept_fraction * self.total_sparse_params + 0.5))
        else:
            keep = keep_within_budget(scores, self.neuron_sizes, kept_fraction, self.total_sparse_params)
        for layer, mask in zip(self.layers, torch.split(keep, self.importance.num_neurons)):
            layer.set_sparse_mask(mask.view(layer.sparse_mask.shape))

    def _aligned_keep(self, kept_fraction: float, scores: torch.Tensor) -> torch.Tensor:
        """The variant's keep rule over whole groups; every member of a kept group is kept."""
        groups = self.neuron_groups
        group_of = groups.assign(scores)
        group_scores = groups.mean_scores(scores, group_of)
        if self.variant == "reference":
            keep = self._reference_keep(kept_fraction, group_scores, groups.sizes)
        else:
            keep = keep_within_budget(group_scores, groups.sizes, kept_fraction, self.total_sparse_params)
        return keep[group_of]

    def _reference_keep(self, kept_fraction: float, scores: torch.Tensor,
                        sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`scores`, `sizes`: per unit (default: per neuron, `neuron_sizes`)."""
        sizes = self.neuron_sizes if sizes is None else sizes
        if kept_fraction <= 0.0:
            return torch.zeros_like(scores, dtype=torch.bool)
        num_entries = int(round(self.total_sparse_params))
        k = int(num_entries * (1 - kept_fraction))  # the reference's torch.kthvalue(all_scores, k), 1-based k
        if k <= 0:
            return torch.ones_like(scores, dtype=torch.bool)
        # The k-th smallest entry score is the score of the neuron in which the cumulative parameter count,
        # in ascending score order, first reaches k (each neuron holds neuron_size entries of equal score).
        order = torch.argsort(scores, stable=True)
        cumulative = torch.cumsum(sizes[order], dim=0)
        position = torch.searchsorted(cumulative, torch.full((1,), float(k), dtype=cumulative.dtype,
                                                             device=cumulative.device))
        threshold = scores[order[position.clamp_(max=scores.numel() - 1)]]
        return scores >= threshold

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero pruned neurons again so optimizer momentum or weight decay never revives them."""
        for layer in self.layers:
            layer.apply_sparse_mask()

    def update_masks_at_step(self, kept_fraction: float) -> None:
        """The mask update of a mask step: `update_masks`, made monotone under --shrink_sparse.

        With `config.shrink_sparse` a neuron pruned once is never kept again (`losparse.core.shrink.monotone_update_masks`);
        the layers are narrowed afterwards by `losparse.core.shrink.shrink_pruned(pruner, optimizer)`, which needs the
        optimizer (the Trainer callback passes it; a custom loop calls it after `step`).
        """
        if self.config.shrink_sparse:
            monotone_update_masks(self, kept_fraction)
        else:
            self.update_masks(kept_fraction)

    def achieved_kept_fraction(self) -> float:
        """Kept S parameters / all S parameters, counted from the masks (host sync; for reports)."""
        if not self.layers:
            return 0.0
        masks = torch.cat([layer.sparse_mask.reshape(-1) for layer in self.layers]).to(torch.float64)
        return float((masks * self.neuron_sizes).sum()) / self.total_sparse_params

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.importance.state_dict()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: str) -> None:
        device = self.importance.neuron_ema.device
        self.importance.load_state_dict({k: v.to(device) for k, v in tensors.items()})
