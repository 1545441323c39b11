"""The kept structure of a pruned decoder: per-layer widths, recorded for saving and re-imposed for loading.

A pruned decoder's config.json still names the dense sizes, so its widths travel in `STRUCTURE_FILE`
(written by `serialization.save_structured`, read by `serialization.load_structured`, which `losparse.load`
calls) as

    {"format": 1, "kind": "decoder", "head_dim": d, "queries_per_kv": G,
     "layers": [{"name", "kv_heads", "attention_heads", "intermediate_size",
                 "attention_output_bias", "mlp_output_bias"}, ...]}

The two bias flags say whether o_proj / down_proj carry a bias (one is created by the bias compensation
even where the architecture has none). `kind` tells it apart from the encoder structure of `removal.structure_of`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from losparse.core.errors import LoSparseUsageError
from losparse.methods.structured.decoder_blocks import SUPPORTED_DECODER_TYPES, EmptyAttention, decoder_blocks
from losparse.methods.structured.removal import empty_linear, new_linear

#: the `kind` of a decoder structure
DECODER_KIND = "decoder"


def is_decoder_model(model: nn.Module) -> bool:
    """Whether `model` is of a family this folder prunes as a decoder (Llama, Qwen2, Mistral)."""
    return getattr(getattr(model, "config", None), "model_type", None) in SUPPORTED_DECODER_TYPES


def decoder_structure_of(model: nn.Module) -> dict[str, Any]:
    """The kept structure of a (pruned) decoder: key/value heads, query heads, FFN width and bias flags per layer."""
    blocks = decoder_blocks(model)
    return {"format": 1, "kind": DECODER_KIND, "head_dim": blocks[0].head_dim,
            "queries_per_kv": blocks[0].queries_per_kv,
            "layers": [{"name": b.name, "kv_heads": b.kv_groups, "attention_heads": b.kv_groups * b.queries_per_kv,
                        "intermediate_size": b.neurons, "attention_output_bias": b.o_proj.bias is not None,
                        "mlp_output_bias": b.down_proj.bias is not None} for b in blocks]}


def apply_decoder_structure(model: nn.Module, structure: dict[str, Any], source: str = "structure") -> nn.Module:
    """Give a freshly built (dense-shaped) decoder the widths and biases of `structure`; returns it.

    The new matrices are uninitialised (`empty_linear` / `new_linear`, on the device and dtype of the ones they
    replace): the caller fills them (`load_structured` reads the weights strictly).
    """
    blocks = decoder_blocks(model)
    if len(blocks) != len(structure["layers"]) or structure.get("queries_per_kv") != blocks[0].queries_per_kv:
        raise LoSparseUsageError(f"{source}: {len(structure['layers'])} layers of {structure.get('queries_per_kv')} "
                                 f"query heads per key/value head for a model of {len(blocks)} layers of "
                                 f"{blocks[0].queries_per_kv}")
    for block, kept in zip(blocks, structure["layers"]):
        hidden, attention, mlp = block.hidden_size, block.attention, block.layer.mlp
        q_width, kv_width = kept["attention_heads"] * block.head_dim, kept["kv_heads"] * block.head_dim
        o_proj = new_linear(q_width, hidden, kept["attention_output_bias"], block.o_proj.weight)
        if kept["kv_heads"] == 0:
            block.layer.self_attn = EmptyAttention(o_proj, block.head_dim, getattr(attention, "layer_idx", None))
        else:
            attention.q_proj = empty_linear(hidden, q_width, attention.q_proj)
            attention.k_proj = empty_linear(hidden, kv_width, attention.k_proj)
            attention.v_proj = empty_linear(hidden, kv_width, attention.v_proj)
            attention.o_proj = o_proj
        size = kept["intermediate_size"]
        mlp.gate_proj = empty_linear(hidden, size, mlp.gate_proj)
        mlp.up_proj = empty_linear(hidden, size, mlp.up_proj)
        mlp.down_proj = new_linear(size, hidden, kept["mlp_output_bias"], mlp.down_proj.weight)
        block.record_widths()
    model.structure = structure
    return model
