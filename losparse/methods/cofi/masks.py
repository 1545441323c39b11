"""The hard-concrete (L0) gate of CoFi (Louizos et al. 2018, as in princeton-nlp/CoFiPruning's `L0Module`).

A gate z ∈ [0, 1] per unit, parametrised by log α. Training samples it (reparametrised, so ∂z/∂log α exists):
    u ~ U(ε, 1 − ε),  s = σ((ln u − ln(1 − u) + log α) / β),  z = clamp(s·(r − l) + l, 0, 1)
with the stretch l = −0.1, r = 1.1, the temperature β = 2/3 and ε = 1e-6. The probability that z is not
zero (what the expected size counts) is P(z ≠ 0) = σ(log α − β·ln(−l/r)), clamped to [ε, 1 − ε] like the
reference's `cdf_qz`. Evaluation uses the reference's deterministic gate (`_deterministic_z`, after
asappresearch/flop): per group (one row of log α), the round(size − ΣP(z ≠ 0)) units of smallest soft value
σ(log α / β · 0.8) are zero, the others keep that soft value.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LIMIT_LEFT, LIMIT_RIGHT, EPSILON = -0.1, 1.1, 1e-6
TEMPERATURE = 2.0 / 3.0
#: the reference's scale of the soft deterministic value (its "magical number", from Wang et al. 2020)
SOFT_SCALE = 0.8
#: log α is kept in [ln 0.01, ln 100] after every step (the reference's `constrain_parameters`)
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)


class HardConcreteMask(nn.Module):
    """Gates of shape (groups, size): one row per mask group (a layer's heads, the hidden dims, ...).

    `init_mean` is the mean of the N(mean, 0.01) initialisation of log α (10 for hidden/head/layer
    gates, 0 for FFN neurons: see `losparse.methods.cofi.pruner`).
    """

    def __init__(self, groups: int, size: int, init_mean: float, device=None) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.empty(groups, size, device=device, dtype=torch.float32))
        with torch.no_grad():
            self.log_alpha.normal_(init_mean, 1e-2)

    @property
    def size(self) -> int:
        return self.log_alpha.shape[1]

    def prob_nonzero(self) -> torch.Tensor:
        """(groups, size) P(z ≠ 0) = 1 − CDF(0), differentiable in log α."""
        shift = TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT)
        return torch.sigmoid(self.log_alpha - shift).clamp(EPSILON, 1 - EPSILON)

    def sample(self) -> torch.Tensor:
        """(groups, size) z drawn from the hard-concrete distribution (reparametrised; training)."""
        u = torch.empty_like(self.log_alpha).uniform_(EPSILON, 1 - EPSILON)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / TEMPERATURE)
        return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """(groups, size) the reference's evaluation gate: per row the expected number of zeros, soft elsewhere."""
        soft = torch.sigmoid(self.log_alpha / TEMPERATURE * SOFT_SCALE)
        expected_zeros = self.size - self.prob_nonzero().sum(dim=1)
        zeros = torch.tensor([round(float(n)) for n in expected_zeros], device=soft.device)
        rank = soft.argsort(dim=1).argsort(dim=1)
        return torch.where(rank < zeros[:, None], torch.zeros_like(soft), soft)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
