"""Masking decoder groups in place (dense shapes kept), with FLAP's bias compensation.

A pruned key/value group g has its rows of q_proj, k_proj, v_proj (and their biases, Qwen2) zeroed and its
G·d columns of o_proj zeroed; a pruned FFN neuron j has row j of gate_proj and up_proj zeroed and column j
of down_proj. The zeroed output-side columns make a pruned group contribute exactly nothing, which is why
slicing the groups out (`decoder_removal`) keeps the masked model's function exactly.

Bias compensation (FLAP): for the output-side linear y = W x + b with the channels R removed, the removed
part W[:, R] x_R is replaced by its calibration mean, so

    b ← b + W[:, R] · E[x_R]          (W: (H, in), E[x_R]: (|R|,), the added bias: (H,))

and the error left is W[:, R](x_R − E[x_R]): its mean over the calibration tokens is zero, and its
energy is the removed fluctuation, never more than the uncompensated Σ‖W[:, R] x_R‖² (which exceeds it by
N·‖W[:, R] E[x_R]‖² over N tokens). o_proj and down_proj have no bias in Llama/Mistral (nor o_proj in
Qwen2): one is created (zeros plus the compensation), so the saved structure records it per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from losparse.methods.structured.decoder_blocks import DecoderBlock


@torch.no_grad()
def compensate_bias(linear: nn.Linear, removed: torch.Tensor, mean: torch.Tensor) -> None:
    """b ← b + W[:, removed] · mean[removed] (a bias is created if the linear has none); removed: (in,) bool."""
    removed = removed.to(linear.weight.device)
    if not bool(removed.any()):
        return
    weight = linear.weight.detach()
    delta = weight[:, removed].to(torch.float64) @ mean.to(device=weight.device, dtype=torch.float64)[removed]
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device))
    linear.bias.add_(delta.to(linear.bias.dtype))


@torch.no_grad()
def _zero_rows(linear: nn.Linear, keep: torch.Tensor) -> None:
    keep = keep.to(device=linear.weight.device, dtype=linear.weight.dtype)
    linear.weight.mul_(keep[:, None])
    if linear.bias is not None:
        linear.bias.mul_(keep.to(linear.bias.dtype))


@torch.no_grad()
def _zero_columns(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight.mul_(keep.to(device=linear.weight.device, dtype=linear.weight.dtype)[None, :])


@torch.no_grad()
def mask_attention(block: DecoderBlock, keep_kv: torch.Tensor, mean: Optional[torch.Tensor] = None) -> None:
    """Zero the pruned key/value groups (keep_kv: (kv_groups,) bool) of the block's attention; with `mean`
    (o_proj's input mean, (kv_groups·G·d,)) compensate o_proj's bias first."""
    keep_kv = keep_kv.bool().cpu()
    columns = block.query_rows(keep_kv)
    if mean is not None:
        compensate_bias(block.o_proj, ~columns, mean)
    q_proj, k_proj, v_proj = block.qkv
    _zero_rows(q_proj, columns)
    _zero_rows(k_proj, block.kv_rows(keep_kv))
    _zero_rows(v_proj, block.kv_rows(keep_kv))
    _zero_columns(block.o_proj, columns)


@torch.no_grad()
def mask_mlp(block: DecoderBlock, keep_neurons: torch.Tensor, mean: Optional[torch.Tensor] = None) -> None:
    """Zero the pruned FFN neurons (keep_neurons: (neurons,) bool); with `mean` (down_proj's input mean,
    (neurons,)) compensate down_proj's bias first."""
    keep_neurons = keep_neurons.bool().cpu()
    if mean is not None:
        compensate_bias(block.down_proj, ~keep_neurons, mean)
    for linear in block.gate_up:
        _zero_rows(linear, keep_neurons)
    _zero_columns(block.down_proj, keep_neurons)
