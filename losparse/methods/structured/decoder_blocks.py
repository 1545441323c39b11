"""The prunable groups of a Llama-family decoder (Llama, Qwen2, Mistral), with their weight counts.

Per decoder layer (hidden size H, head size d, G = num_attention_heads / num_key_value_heads query heads
per key/value head), the groups are:
  - a key/value group g: rows g·d..(g+1)·d of k_proj and v_proj, the rows of q_proj of its G query heads
    (query head h reads key/value head h // G, as `repeat_kv` lays them out) and the same G·d columns
    of o_proj — (2·G + 2)·d·H weights. Pruning whole key/value groups keeps G, so the attention's
    `num_key_value_groups` (all that transformers' attention forward reads besides `head_dim`) holds;
  - an FFN neuron j: row j of gate_proj and up_proj and column j of down_proj — 3·H weights.
Together they cover exactly the 7 matrices LoSparse targets, so the remaining ratio means the same thing:
kept weights of q, k, v, o, gate, up, down / their dense count (biases, embeddings, norms, head: not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from losparse.core.errors import LoSparseUsageError

#: model types whose decoder layers have Llama's module names (self_attn.q_proj, ..., mlp.down_proj)
SUPPORTED_DECODER_TYPES = ("llama", "qwen2", "mistral")


class EmptyAttention(nn.Module):
    """Stands in for a self-attention whose key/value groups are all pruned: it returns o_proj's bias.

    o_proj is kept as a (0 → H) linear, so the output is zeros + bias (the bias compensation of the removed
    heads). With a KV cache, empty (B, 0, L, d) keys and values are appended, so the cache still counts
    this layer's tokens (`get_seq_length` reads layer 0).
    """

    def __init__(self, o_proj: nn.Linear, head_dim: int, layer_idx: Optional[int]) -> None:
        super().__init__()
        self.o_proj, self.head_dim, self.layer_idx = o_proj, head_dim, layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return self.o_proj(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


@dataclass
class DecoderBlock:
    """One decoder layer's prunable matrices; `kv_groups` and `neurons` are its current (possibly pruned) counts."""

    name: str
    layer: nn.Module
    head_dim: int
    queries_per_kv: int

    @property
    def attention(self) -> nn.Module:
        return self.layer.self_attn

    @property
    def has_attention(self) -> bool:
        return not isinstance(self.attention, EmptyAttention)

    @property
    def qkv(self) -> list[nn.Linear]:
        a = self.attention
        return [a.q_proj, a.k_proj, a.v_proj] if self.has_attention else []

    @property
    def o_proj(self) -> nn.Linear:
        return self.attention.o_proj

    @property
    def gate_up(self) -> list[nn.Linear]:
        return [self.layer.mlp.gate_proj, self.layer.mlp.up_proj]

    @property
    def down_proj(self) -> nn.Linear:
        return self.layer.mlp.down_proj

    @property
    def hidden_size(self) -> int:
        return self.o_proj.out_features

    @property
    def kv_groups(self) -> int:
        return self.o_proj.in_features // self.group_width

    @property
    def group_width(self) -> int:
        """o_proj input channels (= q_proj rows) per key/value group: G·d."""
        return self.queries_per_kv * self.head_dim

    @property
    def neurons(self) -> int:
        return self.down_proj.in_features

    @property
    def group_params(self) -> int:
        return (2 * self.queries_per_kv + 2) * self.head_dim * self.hidden_size

    @property
    def neuron_params(self) -> int:
        return 3 * self.hidden_size

    def record_widths(self) -> None:
        """Write the current widths on the modules: the attention's `num_key_value_heads` and `num_heads`, the
        MLP's `intermediate_size`. For code that reads them: transformers 5.x's attention forward infers the head
        count from the shapes and reads only `head_dim` and `num_key_value_groups` (= G, unchanged)."""
        self.attention.num_key_value_heads = self.kv_groups
        self.attention.num_heads = self.kv_groups * self.queries_per_kv
        self.layer.mlp.intermediate_size = self.neurons

    def query_rows(self, keep_kv: torch.Tensor) -> torch.Tensor:
        """(kv_groups,) keep → (kv_groups·G·d,) keep of q_proj's rows = o_proj's columns."""
        return keep_kv.repeat_interleave(self.group_width)

    def kv_rows(self, keep_kv: torch.Tensor) -> torch.Tensor:
        """(kv_groups,) keep → (kv_groups·d,) keep of k_proj's and v_proj's rows."""
        return keep_kv.repeat_interleave(self.head_dim)


def check_decoder_supported(model_or_config: Any) -> None:
    """A usage error unless it is a Llama-family decoder (model or config; the module names this folder slices)."""
    model_type = getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)
    if model_type not in SUPPORTED_DECODER_TYPES:
        raise LoSparseUsageError(f"structured decoder pruning supports model types "
                                 f"{', '.join(SUPPORTED_DECODER_TYPES)}; got model type {model_type!r}")


def decoder_blocks(model: nn.Module) -> list[DecoderBlock]:
    """The decoder layers (`model.model.layers`) of a Llama-family model, checked to hold plain `nn.Linear`s."""
    check_decoder_supported(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    queries_per_kv = config.num_attention_heads // (config.num_key_value_heads or config.num_attention_heads)
    layers = model.get_submodule("model.layers")
    blocks = [DecoderBlock(f"model.layers.{i}", layer, head_dim, queries_per_kv) for i, layer in enumerate(layers)]
    for block in blocks:
        if not all(type(m) is nn.Linear for m in (*block.qkv, block.o_proj, *block.gate_up, block.down_proj)):
            raise LoSparseUsageError(f"structured decoder pruning: {block.name} holds non-Linear (decomposed?) "
                                     "matrices; start from a plain model")
    return blocks


def decoder_group_sizes(blocks: list[DecoderBlock], device: Any = None) -> torch.Tensor:
    """Weights per group, flat in layout order: [block 0 kv groups, block 0 neurons, block 1 ...] (float64)."""
    sizes = []
    for block in blocks:
        sizes.append(torch.full((block.kv_groups,), float(block.group_params), dtype=torch.float64))
        sizes.append(torch.full((block.neurons,), float(block.neuron_params), dtype=torch.float64))
    return torch.cat(sizes).to(device) if sizes else torch.zeros(0, dtype=torch.float64)


def decoder_target_params(blocks: list[DecoderBlock]) -> int:
    """Weights of the 7 targeted matrices as they are now (q, k, v, o, gate, up, down)."""
    return sum(block.kv_groups * block.group_params + block.neurons * block.neuron_params for block in blocks)


def split_decoder_keep(blocks: list[DecoderBlock], flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A flat per-group vector (layout of `decoder_group_sizes`) as (kv groups, neurons) per block."""
    parts = torch.split(flat, [n for b in blocks for n in (b.kv_groups, b.neurons)])
    return [(parts[2 * i], parts[2 * i + 1]) for i in range(len(blocks))]
