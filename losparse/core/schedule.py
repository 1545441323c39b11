"""The cubic kept-fraction schedule of §3.2: pure functions of the optimizer step.

Steps count completed optimizer steps, starting at 1 for the first one. With T total steps,
warm-up t_i and final phase t_f, the `paper` variant is
  p_t = 1                                                for t < t_i
  p_t = p_T + (1 − p_T)·(1 − (t − t_i)/(T − t_i − t_f))³  for t_i ≤ t < T − t_f
  p_t = p_T                                              for t ≥ T − t_f
with masks recomputed at t_i, t_i + ΔT, t_i + 2ΔT, ... and at every step from T − t_f on, and
re-applied (pruned neurons zeroed again) after every optimizer step from t_i on.
(The paper prints (t − t_i − t_f) in the numerator, a typo: with it p_t would not start at 1 at t_i.
The form above is PLATON's and the reference code's.)

The `reference` variant is the arithmetic of the public reference code (yxli2123/LoSparse,
`Pruner.schedule_threshold_comb`). That code is called after optimizer step t with its own
0-based counter g = t − 1 (it passes the number of steps completed *before* this one), so in
this module's 1-based steps:
  p_t = 1                                                for g ≤ t_i          (t ≤ t_i + 1)
  p_t = p_T + (1 − p_T)·(1 − (g − t_i)/(T − t_i − t_f))³  for t_i < g ≤ T − t_f
  p_t = p_T                                              for g > T − t_f      (t ≥ T − t_f + 2)
i.e. p_t(reference) = p_{t−1}(paper): the schedule runs one step behind. Masks are computed at the
steps with t_i < g ≤ T − t_f and g ≡ 0 (mod ΔT) -- multiples of ΔT counted from the start of
training, not from t_i -- and at every step with g > T − t_f; they are *not* re-applied in between
(see `reapplies_masks_every_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from losparse.core.errors import LoSparseUsageError

SCHEDULE_VARIANTS = ("paper", "reference")


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
    variant: str = "paper"

    def __post_init__(self) -> None:
        if self.variant not in SCHEDULE_VARIANTS:
            raise LoSparseUsageError(
                f"pruning variant {self.variant!r} is not known; choose one of: {', '.join(SCHEDULE_VARIANTS)}"
            )
        if self.warmup_steps + self.final_steps >= self.total_steps:
            raise LoSparseUsageError(
                f"pruning warm-up ({self.warmup_steps}) + final phase ({self.final_steps}) optimizer steps must be "
                f"fewer than the {self.total_steps} total optimizer steps; lower --pruning_warmup_steps/"
                "--pruning_final_steps (or their _ratio forms) or train longer"
            )

    @property
    def decay_end(self) -> int:
        return self.total_steps - self.final_steps

    @property
    def reapplies_masks_every_step(self) -> bool:
        """`paper`: pruned neurons are zeroed again after every step once pruning has begun (Algorithm 1's
        T(·) at every iteration). `reference`: only at mask steps; in between, pruned neurons regrow through
        the optimizer's momentum (and take part in the forward pass) until the next mask step."""
        return self.variant == "paper"

    def kept_fraction(self, step: int) -> float:
        """p_t for the step that has just finished."""
        if self.variant == "reference":
            return self._reference_kept_fraction(step - 1)
        if step < self.warmup_steps:
            return 1.0
        if step >= self.decay_end:
            return self.final_fraction
        progress = (step - self.warmup_steps) / (self.decay_end - self.warmup_steps)
        return self.final_fraction + (1.0 - self.final_fraction) * (1.0 - progress) ** 3

    def _reference_kept_fraction(self, g: int) -> float:
        if g <= self.warmup_steps:
            return 1.0
        if g > self.decay_end:
            return self.final_fraction
        remaining = 1.0 - (g - self.warmup_steps) / (self.total_steps - self.warmup_steps - self.final_steps)
        return self.final_fraction + (1.0 - self.final_fraction) * remaining ** 3

    def is_pruning(self, step: int) -> bool:
        """Whether masking has begun: `paper` from t_i on (the mask is then in force and re-applied after
        every optimizer step); `reference` once g = step − 1 > t_i (the first step that can be a mask step)."""
        if self.variant == "reference":
            return step - 1 > self.warmup_steps
        return step >= self.warmup_steps

    def is_mask_update_step(self, step: int) -> bool:
        """Whether masks are recomputed after this step.

        `paper`: every `interval` steps from t_i during the decay, every step from T − t_f on.
        `reference`: with g = step − 1, at g ≡ 0 (mod interval) for t_i < g ≤ T − t_f, and every step for
        g > T − t_f.
        """
        if self.variant == "reference":
            g = step - 1
            if g <= self.warmup_steps:
                return False
            if g > self.decay_end:
                return True
            return g % self.interval == 0
        if step < self.warmup_steps:
            return False
        if step >= self.decay_end:
            return True
        return (step - self.warmup_steps) % self.interval == 0
