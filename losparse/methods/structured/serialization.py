"""Save and reload a structurally pruned model: `save_pretrained` plus the kept structure per layer.

The config of a pruned model still names the dense sizes, so the model is saved with `STRUCTURE_FILE`
(kept heads and FFN width per layer) and reloaded with `load_structured`; a plain `from_pretrained`
refuses it (shape mismatch), it never loads it wrongly.
"""


from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from losparse.core.errors import LoSparseUsageError
from losparse.methods.structured.blocks import NoSelfAttention, encoder_blocks
from losparse.methods.structured.decoder_structure import (
    DECODER_KIND,
    apply_decoder_structure,
    decoder_structure_of,
    is_decoder_model,
)
from losparse.methods.structured.removal import empty_linear, structure_of

#: written beside a pruned model's config.json: the kept structure load_structured rebuilds
STRUCTURE_FILE = "structured_pruning.json"


def save_structured(model: nn.Module, directory: str, tokenizer: Any = None) -> str:
    """`save_pretrained` plus `STRUCTURE_FILE`, so `load_structured` can rebuild the smaller shapes (an encoder's
    heads and FFN widths, or a Llama-family decoder's key/value groups, FFN widths and output biases)."""
    structure = decoder_structure_of(model) if is_decoder_model(model) else structure_of(model)
    return save_with_structure(model, directory, STRUCTURE_FILE, structure, tokenizer)


def save_with_structure(model: nn.Module, directory: str, manifest: str, structure: dict[str, Any],
                        tokenizer: Any = None) -> str:
    """`save_pretrained`, the kept structure as `manifest` (JSON) beside it, and the tokenizer if given."""
    model.save_pretrained(directory)
    with open(os.path.join(directory, manifest), "w") as f:
        json.dump(structure, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_structured(path: str, device: Any = None) -> nn.Module:
    """Rebuild a model saved by `save_structured` (its class from config.json) and load its weights (eval mode)."""
    structure = read_structure(path)
    model = model_from_config(path)
    source = os.path.join(path, STRUCTURE_FILE)
    if structure.get("kind") == DECODER_KIND:
        apply_decoder_structure(model, structure, source)
    else:
        apply_structure(model, structure, source)
    load_weights_strictly(model, path)
    return model.to(device or "cpu").eval()


def model_from_config(path: str) -> nn.Module:
    """The (dense-shaped, randomly initialised) model of the architecture `path`/config.json names."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise LoSparseUsageError(f"{path}/config.json names no transformers architecture ({architecture!r})")
    return model_class(config)


def load_weights_strictly(model: nn.Module, path: str) -> None:
    """`path`/model.safetensors into the smaller `model`: every tensor must fit (tied copies may be absent)."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise LoSparseUsageError(f"{path}: weights do not match the structure (missing {sorted(set(missing) - tied)}"
                                 f", unexpected {sorted(unexpected)})")
    model.tie_weights()


def apply_structure(model: nn.Module, structure: dict[str, Any], source: str = STRUCTURE_FILE) -> nn.Module:
    """Give a freshly built (dense-shaped, possibly meta) model the kept heads and FFN widths of `structure`.

    The new matrices are empty (`empty_linear`, on the device of the ones they replace): what fills them is
    the caller's (`load_structured` reads the weights; `losparse.load` puts compact layers over them).
    """
    if structure.get("kind") == DECODER_KIND:
        raise LoSparseUsageError(f"{source}: a decoder structure; apply it with apply_decoder_structure")
    blocks = encoder_blocks(model)
    if len(blocks) != len(structure["layers"]):
        raise LoSparseUsageError(f"{source}: {len(structure['layers'])} layers for a model of {len(blocks)}")
    for block, kept in zip(blocks, structure["layers"]):
        width = kept["heads"] * block.head_size
        hidden = block.hidden_size
        if kept["heads"] == 0:
            block.layer.attention.self = NoSelfAttention()
        else:
            attention = block.attention
            for name in ("query", "key", "value"):
                setattr(attention, name, empty_linear(hidden, width, getattr(attention, name)))
            attention.num_attention_heads, attention.all_head_size = kept["heads"], width
        block.layer.attention.output.dense = empty_linear(width, hidden, block.attention_output)
        block.layer.intermediate.dense = empty_linear(hidden, kept["intermediate_size"], block.intermediate)
        block.layer.output.dense = empty_linear(kept["intermediate_size"], hidden, block.ffn_output)
    model.structure = structure
    return model


def read_structure(path: str) -> dict[str, Any]:
    """The kept structure saved beside a model (`STRUCTURE_FILE`); a usage error if there is none."""
    structure_path = os.path.join(path, STRUCTURE_FILE)
    if not os.path.isfile(structure_path):
        raise LoSparseUsageError(f"{path!r} holds no {STRUCTURE_FILE}: not a structurally pruned model")
    with open(structure_path) as f:
        return json.load(f)
