"""What the LoSparse stage needs from a structurally pruned BERT: its dense size, and no zero-width matrices.

A layer whose heads (or FFN neurons) were all removed keeps a matrix with 0 inputs or 0 outputs; there is
nothing to decompose in it (its output is its bias), and the SVD of an empty matrix is undefined. Such a
matrix becomes a `ZeroWidthLinear`, which computes the same and is not a decomposition target.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from losparse.core.decompose import set_submodule
from losparse.methods.structured.blocks import encoder_blocks


class ZeroWidthLinear(nn.Module):
    """`nn.Linear` with 0 input or 0 output features (same parameter names; not an `nn.Linear`, so never targeted)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def protect_empty_layers(model: nn.Module) -> list[str]:
    """Replace every zero-width matrix of the encoder by a `ZeroWidthLinear` (in place); their names."""
    names = []
    for block in encoder_blocks(model):
        for suffix in ("attention.output.dense", "intermediate.dense", "output.dense"):
            name = f"{block.name}.{suffix}"
            linear = model.get_submodule(name)
            if isinstance(linear, nn.Linear) and 0 in (linear.in_features, linear.out_features):
                set_submodule(model, name, ZeroWidthLinear(linear))
                names.append(name)
    return names


def dense_target_params(model_config: Any) -> int:
    """Weights of the targeted matrices of the unpruned architecture: L · (4·H² + 2·H·I) for a BERT-family encoder."""
    hidden, inner = model_config.hidden_size, model_config.intermediate_size
    return model_config.num_hidden_layers * (4 * hidden * hidden + 2 * hidden * inner)
