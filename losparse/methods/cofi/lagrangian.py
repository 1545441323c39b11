"""CoFi's sparsity constraint as a Lagrangian: L_c = λ₁(ŝ − t) + λ₂(ŝ − t)², λ trained by gradient ascent.

ŝ is the expected sparsity (`size.expected_sparsity`), t the target, warmed up linearly from 0 to
1 − remaining_ratio over the first W pruning steps (the reference's `get_target_sparsity` with start 0).
Minimising over log α while maximising over λ drives ŝ to t: while ŝ < t, ascent makes λ₁ negative, so
the term rewards more sparsity; λ₂ grows with (ŝ − t)² and penalises the gap either way.
"""

from __future__ import annotations

import torch
from torch import nn


class Lagrangian(nn.Module):
    """λ₁, λ₂ (scalars, initialised 0 as in the reference) and the target schedule."""

    def __init__(self, final_sparsity: float, warmup_steps: int = 0, device=None) -> None:
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros((), device=device))
        self.lambda_2 = nn.Parameter(torch.zeros((), device=device))
        self.final_sparsity = float(final_sparsity)
        self.warmup_steps = int(warmup_steps)

    def target(self, pruned_steps: int) -> float:
        """t after `pruned_steps` optimizer steps of pruning: linear from 0 to the final sparsity over the warmup."""
        if self.warmup_steps <= 0:
            return self.final_sparsity
        return self.final_sparsity * min(1.0, pruned_steps / self.warmup_steps)

    def forward(self, expected: torch.Tensor, pruned_steps: int) -> torch.Tensor:
        """() L_c for the expected sparsity `expected` (differentiable in it and in λ)."""
        gap = expected - self.target(pruned_steps)
        return self.lambda_1 * gap + self.lambda_2 * gap * gap
