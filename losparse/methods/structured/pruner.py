"""`StructuredPruner`: the cubic schedule and global keep rule of LoSparse, applied to whole heads and neurons.

Importance is the project's sensitivity (or magnitude, `--importance`), per group: the sum of
|w·∂L/∂w| over the group's weights divided by its weight count (a per-parameter mean, so heads and
neurons compete on one scale), smoothed by an EMA with `beta1`. Masking is by zeroing: after every
optimizer step from t_i the pruned groups' weights are set to zero, so momentum or weight decay never
revives them.
"""


from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.core.importance import ema_update_
from losparse.core.pruner import BasePruner
from losparse.core.schedule import CubicSchedule, resolve_steps
from losparse.methods.structured.blocks import (
    EncoderBlock,
    encoder_blocks,
    group_sizes,
    select_groups,
    split_keep,
    zero_pruned,
)


class GroupImportance:
    """EMA of the per-weight mean |w·∂L/∂w| (or |w|) of every group, one flat float32 vector."""

    def __init__(self, blocks: list[EncoderBlock], metric: str = "sensitivity", beta1: float = 0.85) -> None:
        self.blocks, self.metric, self.beta1 = blocks, metric, beta1
        device = blocks[0].attention_output.weight.device
        self.sizes = group_sizes(blocks, device)
        self.ema = torch.zeros(self.sizes.numel(), dtype=torch.float32, device=device)
        self.num_updates = 0

    def _entry(self, linear: nn.Linear) -> torch.Tensor:
        weight = linear.weight.detach()
        if self.metric == "magnitude":
            return weight.abs().float()
        if linear.weight.grad is None:
            raise RuntimeError(
                "a targeted weight has no gradient at the optimizer step: the structured importance update must run "
                "after backward() and before the gradients are zeroed"
            )
        return (weight * linear.weight.grad).abs().float()

    def current(self) -> torch.Tensor:
        """This step's per-weight mean score of every group (flat, layout order)."""
        parts = []
        for block in self.blocks:
            d = block.head_size
            head_sum = sum(self._entry(q).view(block.heads, d, -1).sum(dim=(1, 2)) for q in block.qkv)
            head_sum = head_sum + self._entry(block.attention_output).view(-1, block.heads, d).sum(dim=(0, 2))
            neuron_sum = self._entry(block.intermediate).sum(dim=1) + self._entry(block.ffn_output).sum(dim=0)
            parts += [head_sum / block.head_params, neuron_sum / block.neuron_params]
        return torch.cat(parts)

    @torch.no_grad()
    def update(self) -> None:
        """Fold this step into the EMA; a step with non-finite scores (skipped fp16 step) changes nothing."""
        current = self.current()
        if self.metric == "magnitude":
            self.ema.copy_(current)
        else:
            ema_update_(self.ema, current, self.beta1)
        self.num_updates += 1


class StructuredPruner(BasePruner):
    """Group importance + cubic schedule + global head/neuron masks for one BERT-family model.

    `step(t)` after optimizer step t (1-based, before the gradients are zeroed). The current masks are
    also kept on the model (`model.structured_keep`), where `remove_pruned_structures` reads them.
    """

    def __init__(self, model: nn.Module, total_steps: int, config: LoSparseConfig) -> None:
        check_structured_config(config)
        self.model, self.config = model, config
        self.blocks = encoder_blocks(model)
        self.importance = GroupImportance(self.blocks, config.importance, config.beta1)
        self.sizes = self.importance.sizes
        self.total_params = float(self.sizes.sum())
        self.keep = torch.ones(self.sizes.numel(), dtype=torch.bool, device=self.sizes.device)
        self.schedule = CubicSchedule(
            total_steps=total_steps,
            warmup_steps=resolve_steps(config.pruning_warmup_steps, config.pruning_warmup_ratio, total_steps),
            final_steps=resolve_steps(config.pruning_final_steps, config.pruning_final_ratio, total_steps),
            final_fraction=config.remaining_ratio,
            interval=config.pruning_interval,
        )
        self.final_kept_fraction = config.remaining_ratio
        self.last_step = 0
        self.kept_fraction = 1.0
        self._publish()

    @torch.no_grad()
    def update_masks(self, kept_fraction: float, scores: Optional[torch.Tensor] = None) -> None:
        """Keep the best groups fitting in `kept_fraction` of the targeted weights; `scores` replaces the EMA."""
        if scores is None:
            scores = self.importance.ema
        elif scores.shape != self.sizes.shape:
            raise ValueError(f"update_masks: {scores.numel()} scores given for {self.sizes.numel()} groups")
        self.keep = select_groups(scores, self.sizes, kept_fraction)
        self._publish()
        self.apply_masks()

    def _publish(self) -> None:
        self.model.structured_keep = split_keep(self.blocks, self.keep)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned groups again (after the optimizer moved them)."""
        zero_pruned(self.blocks, split_keep(self.blocks, self.keep))

    def achieved_kept_fraction(self) -> float:
        """Kept weights of the targeted matrices / all of them, counted from the masks."""
        return float((self.keep.to(torch.float64) * self.sizes).sum()) / self.total_params

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"group_ema": self.importance.ema, "keep": self.keep.to(torch.uint8)}

    def extra_state(self) -> dict:
        return {"kind": "structured", "num_updates": self.importance.num_updates}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: str) -> None:
        if tensors.get("group_ema") is None or tensors["group_ema"].shape != self.importance.ema.shape:
            raise LoSparseUsageError(f"{path} is not the structured pruner state of this model")
        self.importance.ema.copy_(tensors["group_ema"].to(self.importance.ema.device))
        self.keep = tensors["keep"].to(device=self.sizes.device, dtype=torch.bool)

    def restore_extra_state(self, meta: dict) -> None:
        self.importance.num_updates = int(meta.get("num_updates", 0))
        self._publish()
        self.apply_masks()


def check_structured_config(config: LoSparseConfig) -> None:
    """Usage errors for the settings --method structured does not implement."""
    if config.pruning_variant != "paper":
        raise LoSparseUsageError(
            f"--pruning_variant {config.pruning_variant!r}: --method structured implements only 'paper'"
        )
    if config.beta2 > 0.0:
        raise LoSparseUsageError(f"--beta2 {config.beta2}: --method structured has no uncertainty term; use 0")
