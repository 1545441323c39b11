"""Save and reload a CoFi-pruned model: `save_pretrained` plus its kept structure (`COFI_FILE`).

The config of a pruned model still names the dense sizes, so the manifest records what removal kept: the
hidden size, and per layer the heads, the FFN width and whether the MHA / FFN sub-layers are present.
`load_cofi` builds the dense model from config.json, removes the same number of units (`slice_units`),
and loads the weights strictly; a plain `from_pretrained` refuses the checkpoint (shape mismatch).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from losparse.core.errors import LoSparseUsageError
from losparse.methods.cofi.removal import Keep, cofi_structure, slice_units
from losparse.methods.structured.blocks import encoder_blocks
from losparse.methods.structured.serialization import load_weights_strictly, model_from_config, save_with_structure

#: written beside a CoFi-pruned model's config.json: the kept structure `load_cofi` rebuilds
COFI_FILE = "cofi_pruning.json"


def save_cofi(model: nn.Module, directory: str, tokenizer: Any = None) -> str:
    """`save_pretrained` plus `COFI_FILE`, so `load_cofi` can rebuild the smaller shapes."""
    return save_with_structure(model, directory, COFI_FILE, cofi_structure(model), tokenizer)


def keep_of_structure(structure: dict[str, Any], config: Any) -> Keep:
    """A `Keep` giving each layer the recorded counts (the first units: the weights are loaded over them)."""
    def first(count: int, size: int) -> torch.Tensor:
        return torch.arange(size) < count

    hidden = structure["hidden_size"]
    layers = structure["layers"]
    return Keep(torch.arange(hidden) if hidden < config.hidden_size else None,
                [first(layer["heads"], config.num_attention_heads) for layer in layers],
                [bool(layer["attention"]) for layer in layers],
                [first(layer["intermediate_size"], config.intermediate_size) for layer in layers],
                [bool(layer["ffn"]) for layer in layers])


def read_cofi_structure(path: str) -> dict[str, Any]:
    """The structure saved beside a CoFi-pruned model (`COFI_FILE`); a usage error if there is none."""
    manifest = os.path.join(path, COFI_FILE)
    if not os.path.isfile(manifest):
        raise LoSparseUsageError(f"{path!r} holds no {COFI_FILE}: not a CoFi-pruned model")
    with open(manifest) as f:
        return json.load(f)


def load_cofi(path: str, device: Any = None) -> nn.Module:
    """Rebuild a model saved by `save_cofi` (its class from config.json) and load its weights (eval mode)."""
    manifest = os.path.join(path, COFI_FILE)
    structure = read_cofi_structure(path)
    model = model_from_config(path)
    if len(encoder_blocks(model, decomposed_ok=True)) != len(structure["layers"]):
        raise LoSparseUsageError(f"{manifest}: {len(structure['layers'])} layers for a model of "
                                 f"{len(encoder_blocks(model, decomposed_ok=True))}")
    slice_units(model, keep_of_structure(structure, model.config))
    load_weights_strictly(model, path)
    model.structure = structure
    return model.to(device or "cpu").eval()
