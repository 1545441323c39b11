import pytest

from losparse.core.errors import LoSparseUsageError
from losparse.core.schedule import CubicSchedule, resolve_steps


def make(**overrides):
    values = dict(total_steps=100, warmup_steps=10, final_steps=30, final_fraction=0.2, interval=5)
    values.update(overrides)
    return CubicSchedule(**values)


def test_boundary_values():
    schedule = make()
    assert schedule.kept_fraction(1) == 1.0
    assert schedule.kept_fraction(9) == 1.0
    assert schedule.kept_fraction(10) == pytest.approx(1.0)
    assert schedule.kept_fraction(70) == pytest.approx(0.2)
    assert schedule.kept_fraction(100) == pytest.approx(0.2)
    # Halfway through the decay: p_T + (1 - p_T) * 0.5^3.
    assert schedule.kept_fraction(40) == pytest.approx(0.2 + 0.8 * 0.125)
    values = [schedule.kept_fraction(t) for t in range(1, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_masks_every_interval_during_decay_and_every_step_after():
    schedule = make()
    mask_steps = [t for t in range(1, 101) if schedule.is_mask_update_step(t)]
    assert mask_steps[:6] == [10, 15, 20, 25, 30, 35]
    assert 69 not in mask_steps
    assert all(t in mask_steps for t in range(70, 101))
    assert not any(schedule.is_pruning(t) for t in range(1, 10))


def test_step_counts_or_fractions():
    assert resolve_steps(675, 0.1, 10_000) == 675
    assert resolve_steps(None, 0.1, 1234) == 123


def test_warmup_plus_final_must_leave_room():
    with pytest.raises(LoSparseUsageError, match="fewer than the 100 total optimizer steps"):
        make(warmup_steps=40, final_steps=60)


def test_reference_variant_runs_one_step_behind():
    paper, reference = make(), make(variant="reference")
    for t in range(2, 101):
        assert reference.kept_fraction(t) == pytest.approx(paper.kept_fraction(t - 1), abs=1e-15)
    # g = t - 1 <= t_i = 10: p = 1; g > T - t_f = 70: p_T; at g = 40 (t = 41): halfway through the decay
    assert reference.kept_fraction(11) == 1.0 and reference.kept_fraction(12) < 1.0
    assert reference.kept_fraction(41) == pytest.approx(0.2 + 0.8 * 0.125)
    assert reference.kept_fraction(71) == pytest.approx(0.2) and reference.kept_fraction(72) == 0.2


def test_reference_mask_steps_are_multiples_of_delta_t_counted_from_the_start():
    schedule = make(variant="reference", warmup_steps=12)  # t_i = 12 is not a multiple of ΔT = 5
    mask_steps = [t for t in range(1, 101) if schedule.is_mask_update_step(t)]
    # g = t - 1 ∈ {15, 20, ..., 70} during the decay, then every g > 70
    assert mask_steps[:4] == [16, 21, 26, 31]
    assert [t for t in mask_steps if t <= 71] == list(range(16, 72, 5))
    assert mask_steps[12:] == list(range(72, 101))
    assert not schedule.reapplies_masks_every_step and make().reapplies_masks_every_step
    assert [t for t in range(1, 20) if schedule.is_pruning(t)][0] == 14  # g = 13 > t_i


def test_unknown_variant_is_refused():
    with pytest.raises(LoSparseUsageError, match="pruning variant 'ours' is not known"):
        make(variant="ours")
