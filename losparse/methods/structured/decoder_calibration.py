"""Calibration passes over a decoder's blocks: the first block's inputs, block forwards, input-channel statistics.

The flow is the one of `losparse.methods.oneshot.algorithm` (SparseGPT / OATS): a forward pre-hook on the
first block records what the model feeds it (hidden states and the keyword arguments: attention mask,
rotary position embeddings, ...) and stops the forward; every block then runs on the recorded inputs, and its
outputs become the next block's inputs (the capture is the one-shot driver's own; this folder builds on
`oneshot`, tests/test_architecture.py `METHOD_BUILDS_ON`).

`ChannelStatistics` holds, per input channel j of one linear, Σ x_j and Σ x_j² over the calibration tokens
(float64), from which the mean E[x_j], the fluctuation Var(x_j) = E[x_j²] − E[x_j]² (FLAP) and the
norm ‖x_j‖₂ (Wanda) follow.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from losparse.methods.oneshot.algorithm import capture_block_inputs as capture_oneshot_inputs

#: one chunk of calibration sequences: (hidden states (B, L, H), the keyword arguments of the block call)
BlockState = tuple[torch.Tensor, dict[str, Any]]


def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor,
                         batch_size: int) -> list[BlockState]:
    """[(hidden_states, kwargs)] per chunk of `batch_size` sequences of `input_ids` (N, L): the first block's inputs
    (the one-shot driver's capture; Llama-family blocks take no extra positional arguments)."""
    captured = capture_oneshot_inputs(model, first_block, input_ids, batch_size)
    if not captured:
        raise RuntimeError("the first decoder block was never called")
    return captured


@torch.no_grad()
def run_block(block: nn.Module, states: list[BlockState]) -> list[BlockState]:
    """The block's outputs on `states`, as the next block's states (same keyword arguments)."""
    outputs = []
    for hidden, kwargs in states:
        out = block(hidden, **kwargs)
        outputs.append((out[0] if isinstance(out, (tuple, list)) else out, kwargs))
    return outputs


class ChannelStatistics:
    """Σ x_j and Σ x_j² per input channel of one linear over the calibration tokens (float64), and the count."""

    def __init__(self, channels: int, device: Any) -> None:
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """x: (..., channels), one chunk of the linear's input."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum += flat.sum(dim=0)
        self.sum_sq += flat.square().sum(dim=0)
        self.tokens += flat.shape[0]

    def mean(self) -> torch.Tensor:
        """E[x_j] (channels,)."""
        return self.sum / max(self.tokens, 1)

    def variance(self) -> torch.Tensor:
        """Var(x_j) = E[x_j²] − E[x_j]² over the tokens (channels,), FLAP's fluctuation."""
        return (self.sum_sq / max(self.tokens, 1) - self.mean().square()).clamp_min(0.0)

    def norm(self) -> torch.Tensor:
        """‖x_j‖₂ over the tokens (channels,), Wanda's input norm."""
        return self.sum_sq.sqrt()


@torch.no_grad()
def record_inputs(block: nn.Module, linears: dict[str, nn.Linear],
                  states: list[BlockState]) -> tuple[dict[str, ChannelStatistics], list[BlockState]]:
    """Input statistics of `linears` (name -> linear inside `block`) over `states`, and the block's outputs."""
    stats = {name: ChannelStatistics(linear.in_features, linear.weight.device) for name, linear in linears.items()}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            stats[name].add(inputs[0])
        return hook

    handles = [linear.register_forward_pre_hook(make_hook(name)) for name, linear in linears.items()]
    try:
        outputs = run_block(block, states)
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs
