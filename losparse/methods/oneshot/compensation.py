"""Paired calibration statistics for block-scope one-shot: the compressed model's inputs against the dense ones.

In block scope every block is calibrated on the outputs of the already-compressed blocks before it (X̃), while
the dense model would have fed it X. Two streams run through each (still dense) block chunk by chunk: the dense
stream gives X (and the dense block outputs, the next block's dense inputs), the compressed stream gives X̃ for
the same tokens. Per target layer G̃ = Σ x̃ x̃ᵀ and H = Σ x̃ xᵀ (in, in) are all the compensated target
`reconstruction.compensated_target` needs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from losparse.core.layers import dense_features


class PairedStatistics:
    """G̃ = Σ x̃ x̃ᵀ and H = Σ x̃ xᵀ over paired tokens (in, in) float64, and the token count."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.cross = torch.zeros_like(self.gram)
        self.tokens = 0

    @torch.no_grad()
    def add(self, compressed: torch.Tensor, dense: torch.Tensor) -> None:
        """compressed, dense: (..., in) the same tokens' layer inputs in the two streams."""
        x_tilde = compressed.reshape(-1, compressed.shape[-1]).to(torch.float32)
        x = dense.reshape(-1, dense.shape[-1]).to(torch.float32)
        self.gram += (x_tilde.T @ x_tilde).to(torch.float64)
        self.cross += (x_tilde.T @ x).to(torch.float64)
        self.tokens += x.shape[0]

    def second_moment(self) -> torch.Tensor:
        """E[x̃ x̃ᵀ] (in, in)."""
        return self.gram / max(self.tokens, 1)

    def cross_moment(self) -> torch.Tensor:
        """E[x̃ xᵀ] (in, in)."""
        return self.cross / max(self.tokens, 1)


@torch.no_grad()
def record_paired_statistics(block: nn.Module, layers: dict[str, nn.Module],
                             dense_states: list[tuple[torch.Tensor, dict[str, Any]]],
                             compressed_states: list[tuple[torch.Tensor, dict[str, Any]]],
                             run_block: Callable) -> tuple[dict[str, PairedStatistics], list[torch.Tensor]]:
    """Paired statistics of `layers` (name -> dense layer in `block`) and the block's dense-stream outputs.

    `run_block(block, [state])` -> [output] runs one chunk (the one-shot driver's `_run_block`); the chunks of
    the two streams hold the same sequences in the same order.
    """
    stats: dict[str, PairedStatistics] = {}
    dense_inputs: dict[str, torch.Tensor] = {}
    stream = {"dense": True}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if stream["dense"]:
                dense_inputs[name] = inputs[0]
                return
            if name not in stats:
                stats[name] = PairedStatistics(dense_features(module)[1], inputs[0].device)
            stats[name].add(inputs[0], dense_inputs.pop(name))
        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers.items()]
    outputs = []
    try:
        for dense_state, compressed_state in zip(dense_states, compressed_states):
            stream["dense"] = True
            outputs.extend(run_block(block, [dense_state]))
            stream["dense"] = False
            run_block(block, [compressed_state])
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs
