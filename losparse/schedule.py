"""The cubic kept-fraction schedule of §3.2: pure functions of the optimizer step.

Steps count completed optimizer steps, starting at 1 for the first one. With T total steps,
warm-up t_i and final phase t_f:
  p_t = 1                                                for t < t_i
  p_t = p_T + (1 − p_T)·(1 − (t − t_i)/(T − t_i − t_f))³  for t_i ≤ t < T − t_f
  p_t = p_T                                              for t ≥ T − t_f
(The paper prints (t − t_i − t_f) in the numerator, a typo: with it p_t would not start at 1 at t_i.
The form above is PLATON's and the reference code's.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import LoSparseUsageError


def resolve_steps(steps: Optional[int], ratio: float, total_steps: int) -> int:
    """An exact step count if given, else `ratio` of the run (rounded)."""
    return int(steps) if steps is not None else int(round(ratio * total_steps))


@dataclass(frozen=True)
class CubicSchedule:
    total_steps: int
    warmup_steps: int
    final_steps: int
    final_fraction: float
    interval: int = 1

    def __post_init__(self) -> None:
        if self.warmup_steps + self.final_steps >= self.total_steps:
            raise LoSparseUsageError(
                f"pruning warm-up ({self.warmup_steps}) + final phase ({self.final_steps}) optimizer steps must be "
                f"fewer than the {self.total_steps} total optimizer steps; lower --pruning_warmup_steps/"
                "--pruning_final_steps (or their _ratio forms) or train longer"
            )

    @property
    def decay_end(self) -> int:
        return self.total_steps - self.final_steps

    def kept_fraction(self, step: int) -> float:
        """p_t for the step that has just finished."""
        if step < self.warmup_steps:
            return 1.0
        if step >= self.decay_end:
            return self.final_fraction
        progress = (step - self.warmup_steps) / (self.decay_end - self.warmup_steps)
        return self.final_fraction + (1.0 - self.final_fraction) * (1.0 - progress) ** 3

    def is_pruning(self, step: int) -> bool:
        """From t_i on the mask is in force (and re-applied after every optimizer step)."""
        return step >= self.warmup_steps

    def is_mask_update_step(self, step: int) -> bool:
        """Masks are recomputed every `interval` steps during the decay and every step after it."""
        if step < self.warmup_steps:
            return False
        if step >= self.decay_end:
            return True
        return (step - self.warmup_steps) % self.interval == 0
