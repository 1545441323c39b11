"""CoFi's distillation objective: α_ce·KL(T ‖ S)·τ² + α_layer·(layer loss), with no hard-label term.

The layer loss (the reference's `layer_distill_version` 4): a learned projection P (hidden → teacher hidden,
initialised to the identity, trained with the model) maps each student layer output; a set of teacher
layers — 2, 5, 8, 11 of a 12-layer teacher, i.e. every third layer counted back from the last
(`teacher_layers`) — is matched, from the last one backwards, each to the student layer of lowest
MSE(P(student), teacher) below the previous match among the layers whose MHA gate is not 0 in this forward.
The loss is the sum of the matched MSEs (means over batch, tokens and dims, padding included, as the
reference). A teacher layer left without a candidate contributes nothing (the reference would index past
the last layer there). The output term reuses `losparse.training.distill.output_distillation_loss`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def teacher_layers(num_layers: int) -> list[int]:
    """0-based indices of the matched teacher layers: every third from the last, none below 2 (12 → 2, 5, 8, 11)."""
    if num_layers < 1:
        return []
    return list(range(num_layers - 1, min(2, num_layers - 1) - 1, -3))[::-1]


class LayerProjection(nn.Linear):
    """(…, student hidden) → (…, teacher hidden), initialised to the identity with a zero bias."""

    def __init__(self, student_hidden: int, teacher_hidden: int, like: torch.Tensor) -> None:
        super().__init__(student_hidden, teacher_hidden, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            self.weight.copy_(torch.eye(teacher_hidden, student_hidden))
            self.bias.zero_()


def layer_alignment(losses: torch.Tensor, existing: Optional[Sequence[bool]]) -> list[tuple[int, int]]:
    """(teacher row, student layer) pairs from a (teachers, students) loss table, matched from the last backwards."""
    pairs, last = [], losses.shape[1]
    for row in range(losses.shape[0] - 1, -1, -1):
        order = losses[row].detach().argsort().tolist()
        candidates = [j for j in order if j < last and (existing is None or existing[j])]
        if candidates:
            pairs.append((row, candidates[0]))
            last = candidates[0]
    return pairs[::-1]


def layer_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], projection: nn.Module,
               existing: Optional[Sequence[bool]] = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """() the summed MSE of the aligned pairs, and the pairs (teacher layer, student layer), 0-based.

    `student_hidden`, `teacher_hidden`: `hidden_states` of the two models (embeddings first, then each layer's
    output, (batch, tokens, hidden)); `existing`: per student layer whether it is present (None: all).
    """
    students = [projection(h) for h in student_hidden[1:]]
    picks = teacher_layers(len(teacher_hidden) - 1)
    targets = [teacher_hidden[1 + i] for i in picks]
    losses = torch.stack([torch.stack([F.mse_loss(s.float(), t.float()) for s in students]) for t in targets])
    pairs = layer_alignment(losses, existing)
    total = sum((losses[row, j] for row, j in pairs), losses.new_zeros(()))
    return total, [(picks[row], j) for row, j in pairs]
