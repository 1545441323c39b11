"""LPAF's central observation and its sparsity-aware SVD at unit size, as one rerunnable experiment.

    python scripts/lpaf_unit_experiment.py            # Markdown table, ~10 s on a CPU

`fine_tune_and_prune`: a full-rank "pretrained" W0 (dim × dim) is fine-tuned by SGD towards W0 + L (L of
rank 4) on a linear regression, then pruned to equal sparsity by accumulated first-order scores (−w·g,
`losparse.methods.lpaf.factorize.first_order_scores`) and by magnitude |w|. `pruned_test_matrix`: a noisy rank-3 matrix
pruned by magnitude, on which the sparsity-aware factorisation is compared with the plain SVD.
tests/test_lpaf.py asserts the directions on the same functions; this module prints the sizes.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import torch

from losparse.methods.lpaf.factorize import (
    effective_rank,
    entropy_effective_rank,
    first_order_scores,
    magnitude_scores,
    sparsity_aware_factorize,
    svd_factors,
    unstructured_keep_mask,
    weighted_reconstruction_error,
)


def fine_tune_and_prune(seed: int, dim: int = 48, samples: int = 512, steps: int = 300,
                        sparsity: float = 0.7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first-order-pruned W, magnitude-pruned W, trained dense W), all dim × dim, equal nonzero counts."""
    g = torch.Generator().manual_seed(seed)
    pretrained = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    update = torch.randn(dim, 4, generator=g) @ torch.randn(4, dim, generator=g) / math.sqrt(dim)
    inputs = torch.randn(samples, dim, generator=g)
    targets = inputs @ (pretrained + update).T
    weight = pretrained.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([weight], lr=0.05)
    movement = torch.zeros(dim, dim)
    for _ in range(steps):
        loss = (inputs @ weight.T - targets).square().mean()
        optimizer.zero_grad()
        loss.backward()
        first_order_scores(weight.detach(), weight.grad, movement)
        optimizer.step()
    trained = weight.detach()
    first_order = trained * unstructured_keep_mask(movement, 1 - sparsity)
    magnitude = trained * unstructured_keep_mask(magnitude_scores(trained), 1 - sparsity)
    return first_order, magnitude, trained


def pruned_test_matrix(seed: int = 0, out_features: int = 40, in_features: int = 30,
                       keep: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned matrix, keep mask): a rank-3 matrix plus noise, magnitude-pruned to `keep` of its entries."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out_features, 3, generator=g) @ torch.randn(3, in_features, generator=g)
    weight = low + 0.3 * torch.randn(out_features, in_features, generator=g)
    mask = unstructured_keep_mask(weight.abs(), keep)
    return weight * mask, mask


def sparsity_aware_error_ratio(method: str, rank: int = 4, iterations: int = 30) -> float:
    """Kept-entry reconstruction error of the sparsity-aware factors / that of the plain truncated SVD."""
    pruned, mask = pruned_test_matrix()
    weights = mask.float()
    plain = weighted_reconstruction_error(pruned, weights, *svd_factors(pruned, rank))
    u, v = sparsity_aware_factorize(pruned, mask, rank, iterations=iterations, method=method)
    return weighted_reconstruction_error(pruned, weights, u, v) / plain


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    print("| seed | first-order: rank for 90% energy | magnitude | dense trained | "
          "first-order: entropy rank | magnitude |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        first_order, magnitude, trained = fine_tune_and_prune(seed)
        print(f"| {seed} | {effective_rank(first_order, 0.9)} | {effective_rank(magnitude, 0.9)} | "
              f"{effective_rank(trained, 0.9)} | {entropy_effective_rank(first_order):.1f} | "
              f"{entropy_effective_rank(magnitude):.1f} |")
    print()
    for method in ("em", "als"):
        print(f"sparsity-aware SVD ({method}), 40x30 matrix, 40% kept, rank 4: kept-entry error "
              f"{sparsity_aware_error_ratio(method):.2f}x the plain SVD's")
