"""`--pruning_variant paper|reference`: per-step scores and masks locked on fixed synthetic sequences.

The expected values are computed here with plain Python arithmetic from the README's definition of each
variant (not with the code under test): literal numbers for short sequences, and a small list-based
simulation for the mask sequence. Resume is checked for both variants, directly on the pruner and through
the Trainer.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import ToyDataset, tiny_bert_classifier, trainer_args
from torch import nn

from losparse import LoSparseConfig, LoSparsePruner, LoSparseTrainer
from losparse.core.importance import NeuronImportance
from losparse.core.layers import LoSparseLinear
from losparse.core.schedule import CubicSchedule

VARIANTS = ("paper", "reference")


# ---------------------------------------------------------------------------------------------------------
# Scores: one layer, S = 1, per-row constant gradients, so a neuron's sensitivity is its gradient value.
# ---------------------------------------------------------------------------------------------------------

def _row_layer(num_rows: int, width: int = 4) -> LoSparseLinear:
    layer = LoSparseLinear(width, num_rows, rank=0)
    with torch.no_grad():
        layer.sparse.fill_(1.0)
    return layer


def _set_row_grads(layer: LoSparseLinear, values) -> None:
    layer.sparse.grad = torch.tensor(values, dtype=torch.float32).unsqueeze(1).expand_as(layer.sparse).clone()


# Neuron 0 sees 4, 8, 2, 6, 10, 0; neuron 1 sees 1 every step.
SENSITIVITIES = [(4.0, 1.0), (8.0, 1.0), (2.0, 1.0), (6.0, 1.0), (10.0, 1.0), (0.0, 1.0)]
# paper, β = 0.5:  Ī_t = 0.5·Ī_{t-1} + 0.5·I_t
PAPER_SCORES = [(2.0, 0.5), (5.0, 0.75), (3.5, 0.875), (4.75, 0.9375), (7.375, 0.96875), (3.6875, 0.984375)]
# reference, β = 0.5, ΔT = 2, g = t - 1:
#   t=1 (g=0): fold of an empty window (Ī stays 0), A = 4      t=2 (g=1): A = (4·1 + 8)/2 = 6
#   t=3 (g=2): Ī = 0.5·0 + 0.5·6 = 3, A = 2                      t=4 (g=3): A = (2 + 6)/2 = 4
#   t=5 (g=4): Ī = 0.5·3 + 0.5·4 = 3.5, A = 10                   t=6 (g=5): A = (10 + 0)/2 = 5
#   neuron 1: A = 1 in every window, Ī = 0, 0, 0.5, 0.5, 0.75, 0.75
REFERENCE_SCORES = [(0.0, 0.0), (0.0, 0.0), (3.0, 0.5), (3.0, 0.5), (3.5, 0.75), (3.5, 0.75)]
REFERENCE_WINDOW = [(4.0, 1.0), (6.0, 1.0), (2.0, 1.0), (4.0, 1.0), (10.0, 1.0), (5.0, 1.0)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_scores_follow_the_hand_computed_sequence(variant):
    layer = _row_layer(2)
    tracker = NeuronImportance([layer], beta1=0.5, window=2 if variant == "reference" else None)
    expected = PAPER_SCORES if variant == "paper" else REFERENCE_SCORES
    for step, (values, scores) in enumerate(zip(SENSITIVITIES, expected), start=1):
        _set_row_grads(layer, values)
        tracker.update(step)
        assert tracker.scores().tolist() == list(scores), f"step {step}"
        if variant == "reference":
            assert tracker.window_mean.tolist() == list(REFERENCE_WINDOW[step - 1]), f"step {step}"
    assert (tracker.windowed, "window_count" in tracker.state_dict()) == ((variant == "reference",) * 2)


def test_reference_window_skips_non_finite_steps_and_folds_the_uncertainty():
    layer = _row_layer(1)
    tracker = NeuronImportance([layer], beta1=0.5, window=2)
    _set_row_grads(layer, [4.0])
    tracker.update(1)
    _set_row_grads(layer, [float("inf")])
    tracker.update(2)  # left out of the window: A stays 4 (1 step)
    _set_row_grads(layer, [7.0])
    tracker.update(3)
    assert tracker.scores().tolist() == [2.0] and tracker.window_mean.tolist() == [7.0]

    platon = NeuronImportance([_row_layer(1)], beta1=0.5, beta2=0.5, window=2)
    for step, value in enumerate((4.0, 8.0, 2.0), start=1):
        _set_row_grads(platon.layers[0], [value])
        platon.update(step)
    # at t = 3: A = 6, Ī = 0.5·6 = 3, Ū = 0.5·|6 - 3| = 1.5, Γ = mean(Ī·Ū) = 4.5
    assert platon.scores().tolist() == [4.5]
    assert platon.entry_window_mean[0].unique().tolist() == [2.0]


def test_magnitude_is_not_windowed():
    tracker = NeuronImportance([_row_layer(2)], metric="magnitude", window=3)
    assert not tracker.windowed and "window_count" not in tracker.state_dict()


# ---------------------------------------------------------------------------------------------------------
# Masks: two layers of different neuron sizes, a synthetic optimizer (S += D each step) and fixed gradients.
# ---------------------------------------------------------------------------------------------------------

SIZES = [2, 2, 2, 4, 4]            # neurons a0 a1 a2 (layer A: 3 rows of 2) and b0 b1 (layer B: 2 rows of 4)
S0 = [1.0, 2.0, 3.0, 1.0, 2.0]     # every entry of a row starts equal and stays equal
DELTA = [1.0, 0.0, -1.0, 0.5, 0.0]  # the "optimizer" adds this to every row after each step, pruned or not
T, T_I, T_F, DT, P_T, BETA = 16, 3, 5, 2, 0.5, 0.5


def _grad(step: int, neuron: int) -> float:
    return float((step * (neuron + 2)) % 5 + 1)


class TwoRowLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = LoSparseLinear(2, 3, rank=0)
        self.b = LoSparseLinear(4, 2, rank=0)
        with torch.no_grad():
            self.a.sparse.copy_(torch.tensor(S0[:3]).unsqueeze(1).expand(3, 2))
            self.b.sparse.copy_(torch.tensor(S0[3:]).unsqueeze(1).expand(2, 4))


def _config(variant: str) -> LoSparseConfig:
    return LoSparseConfig(method="itp", remaining_ratio=P_T, beta1=BETA, pruning_warmup_steps=T_I,
                          pruning_final_steps=T_F, pruning_interval=DT, pruning_variant=variant)


def _torch_step(model: TwoRowLayers, pruner: LoSparsePruner, step: int) -> None:
    with torch.no_grad():
        model.a.sparse.add_(torch.tensor(DELTA[:3]).unsqueeze(1))
        model.b.sparse.add_(torch.tensor(DELTA[3:]).unsqueeze(1))
    model.a.sparse.grad = torch.tensor([_grad(step, n) for n in range(3)]).unsqueeze(1).expand(3, 2).clone()
    model.b.sparse.grad = torch.tensor([_grad(step, n) for n in range(3, 5)]).unsqueeze(1).expand(2, 4).clone()
    pruner.step(step)


def _torch_state(model: TwoRowLayers, pruner: LoSparsePruner):
    masks = torch.cat([model.a.sparse_mask, model.b.sparse_mask]).tolist()
    rows = torch.cat([model.a.sparse[:, 0], model.b.sparse[:, 0]]).tolist()
    return pruner.importance.scores().tolist(), masks, rows


def _paper_kept(t: int) -> float:
    if t < T_I:
        return 1.0
    if t >= T - T_F:
        return P_T
    return P_T + (1 - P_T) * (1 - (t - T_I) / (T - T_I - T_F)) ** 3


def _simulate(variant: str):
    """The README's definition of each variant, in lists: per step (scores, masks, S rows)."""
    n, total = len(SIZES), sum(SIZES)
    s, ema, keep = list(S0), [0.0] * n, [True] * n
    window, count = [0.0] * n, 0
    history = []
    for t in range(1, T + 1):
        s = [v + d for v, d in zip(s, DELTA)]
        sens = [abs(s[i] * _grad(t, i)) for i in range(n)]
        if variant == "paper":
            ema = [BETA * e + (1 - BETA) * x for e, x in zip(ema, sens)]
            if t >= T_I:
                p = _paper_kept(t)
                if t >= T - T_F or (t - T_I) % DT == 0:
                    order = sorted(range(n), key=lambda i: -ema[i])  # stable: ties keep the lower index first
                    keep, used = [False] * n, 0
                    for i in order:
                        used += SIZES[i]
                        keep[i] = used <= p * total + 0.5
                s = [v if k else 0.0 for v, k in zip(s, keep)]  # re-zeroed after every step
        else:
            g = t - 1
            if g % DT == 0:
                if count:
                    ema = [BETA * e + (1 - BETA) * a for e, a in zip(ema, window)]
                window, count = [0.0] * n, 0
            window = [(a * count + x) / (count + 1) for a, x in zip(window, sens)]
            count += 1
            p = 1.0 if g <= T_I else P_T if g > T - T_F else \
                P_T + (1 - P_T) * (1 - (g - T_I) / (T - T_I - T_F)) ** 3
            if (T_I < g <= T - T_F and g % DT == 0) or g > T - T_F:
                entries = sorted(e for e, size in zip(ema, SIZES) for _ in range(size))
                k = int(total * (1 - p))
                keep = [True] * n if k == 0 else [e >= entries[k - 1] for e in ema]  # torch.kthvalue's k-th
                s = [v if kk else 0.0 for v, kk in zip(s, keep)]  # zeroed only here
        history.append((list(ema), list(keep), list(s)))
    return history


@pytest.mark.parametrize("variant", VARIANTS)
def test_masks_and_scores_follow_the_definition_step_by_step(variant):
    expected = _simulate(variant)
    model = TwoRowLayers()
    pruner = LoSparsePruner(model, total_steps=T, config=_config(variant))
    assert pruner.final_kept_fraction == P_T
    for step in range(1, T + 1):
        _torch_step(model, pruner, step)
        scores, masks, rows = _torch_state(model, pruner)
        want_scores, want_masks, want_rows = expected[step - 1]
        assert scores == pytest.approx(want_scores, abs=1e-5), f"step {step}"
        assert masks == want_masks, f"step {step}"
        assert rows == pytest.approx(want_rows, abs=1e-6), f"step {step}"
        for layer in (model.a, model.b):  # whole rows are equal: no entry-level drift
            assert torch.equal(layer.sparse, layer.sparse[:, :1].expand_as(layer.sparse))
    # the two variants do differ on this sequence (otherwise the test would not tell them apart)
    other = _simulate("reference" if variant == "paper" else "paper")
    assert [m for _, m, _ in expected] != [m for _, m, _ in other]


def test_the_locked_mask_sequences():
    """Hand-checked consequences of the definitions on the sequence above."""
    paper, reference = _simulate("paper"), _simulate("reference")
    paper_updates = [t for t in range(1, T + 1) if CubicSchedule(T, T_I, T_F, P_T, DT).is_mask_update_step(t)]
    reference_updates = [t for t in range(1, T + 1)
                         if CubicSchedule(T, T_I, T_F, P_T, DT, variant="reference").is_mask_update_step(t)]
    assert paper_updates == [3, 5, 7, 9, 11, 12, 13, 14, 15, 16]
    # g = t - 1 ∈ {4, 6, 8, 10} (multiples of ΔT in t_i < g ≤ T - t_f = 11), then every g > 11
    assert reference_updates == [5, 7, 9, 11, 13, 14, 15, 16]
    # reference: nothing is masked before t = 5; between mask steps pruned rows regrow (S += DELTA)
    assert all(all(m) for _, m, _ in reference[:4])
    regrown = [t for t in range(2, T + 1) if t not in reference_updates
               and any(not k and s != 0.0 for k, s in zip(reference[t - 2][1], reference[t - 1][2]))]
    assert regrown, "a row pruned at a mask step should be non-zero at the next non-mask step"
    # paper: from t_i on, every pruned row is zero after every step
    assert all(s == 0.0 for _, m, row in paper[T_I - 1:] for k, s in zip(m, row) if not k)
    # both end at p_T = 0.5 of the 14 entries: paper keeps <= 7.5 parameters, reference >= 7
    kept = lambda masks: sum(size for size, k in zip(SIZES, masks) if k)
    assert kept(paper[-1][1]) <= 7 and kept(reference[-1][1]) >= 7


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruner_resume_mid_window_is_exact(variant, tmp_path):
    straight_model = TwoRowLayers()
    straight = LoSparsePruner(straight_model, total_steps=T, config=_config(variant))
    for step in range(1, T + 1):
        _torch_step(straight_model, straight, step)
        if step == 7:  # g = 6: a reference window has just started and holds one step
            straight.save(str(tmp_path))
            saved_model_state = {k: v.clone() for k, v in straight_model.state_dict().items()}
            if variant == "reference":
                assert float(straight.importance.window_count) == 1.0
                assert straight.importance.window_mean.abs().sum() > 0

    resumed_model = TwoRowLayers()
    resumed_model.load_state_dict(saved_model_state)
    resumed = LoSparsePruner(resumed_model, total_steps=T, config=_config(variant))
    assert resumed.load(str(tmp_path)) and resumed.last_step == 7
    for step in range(8, T + 1):
        _torch_step(resumed_model, resumed, step)
    for a, b in zip(_torch_state(straight_model, straight), _torch_state(resumed_model, resumed)):
        assert a == b
    for key, value in straight.importance.state_dict().items():
        assert torch.equal(value, resumed.importance.state_dict()[key]), key


def test_a_checkpoint_of_the_other_variant_is_refused(tmp_path):
    paper = LoSparsePruner(TwoRowLayers(), total_steps=T, config=_config("paper"))
    paper.save(str(tmp_path))
    reference = LoSparsePruner(TwoRowLayers(), total_steps=T, config=_config("reference"))
    with pytest.raises(ValueError, match="pruning_variant"):
        reference.load(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# Through the Trainer: checkpoint + resume_from_checkpoint gives the same final masks, for both variants.
# ---------------------------------------------------------------------------------------------------------

def _bert(seed=0):
    return tiny_bert_classifier(seed)


def _args(output_dir, **overrides):
    return trainer_args(output_dir, **{"num_train_epochs": 1, **overrides})


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainer_resume_gives_the_same_final_masks(variant, tmp_path):
    # 64 examples / batch 8 = 8 optimizer steps; t_i = 1, t_f = 2, ΔT = 2. Reference mask steps: g = t - 1 = 2, 4,
    # 6 (t = 3, 5, 7) and g = 7 (t = 8); the checkpoint at step 4 (g = 3) holds a half-full window and regrown rows.
    config = LoSparseConfig(remaining_ratio=0.3, low_rank_ratio=0.1, pruning_warmup_steps=1, pruning_final_steps=2,
                            pruning_interval=2, pruning_variant=variant)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = LoSparseTrainer(model=_bert(), args=_args(straight_dir, save_strategy="steps", save_steps=4),
                               train_dataset=ToyDataset(), losparse_config=config)
    straight.train()
    shutil.copytree(straight_dir / "checkpoint-4", resumed_dir / "checkpoint-4")
    resumed = LoSparseTrainer(model=_bert(seed=123), args=_args(resumed_dir), train_dataset=ToyDataset(),
                              losparse_config=config)
    resumed.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-4"))

    assert straight.pruner.variant == resumed.pruner.variant == variant
    for key, value in straight.pruner.importance.state_dict().items():
        torch.testing.assert_close(resumed.pruner.importance.state_dict()[key], value, msg=key)
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    masks = [name for name in expected if name.endswith("sparse_mask")]
    assert masks and any(not bool(expected[name].all()) for name in masks), "nothing was pruned"
    for name in masks:
        assert torch.equal(actual[name], expected[name]), name
    for name in expected:
        if name.endswith(".sparse"):
            torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
