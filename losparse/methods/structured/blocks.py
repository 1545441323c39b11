"""The prunable groups of a BERT-family encoder: heads and FFN neurons, with their weight counts.

Per encoder layer, a head h (head size d, hidden size H) is rows h·d..(h+1)·d of query, key and value
and the same columns of attention.output.dense (4·H·d weights); an FFN neuron j is row j of
intermediate.dense and column j of output.dense (2·H weights). Together they cover exactly the matrices
LoSparse targets, so the ratio means the same thing: kept weights of the targeted matrices / their dense count.
"""


from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from losparse.core.errors import LoSparseUsageError
from losparse.core.families import family_of
from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear
from losparse.core.pruner import keep_within_budget

#: model types whose encoder layers have BERT's module names (attention.self.query, ..., output.dense)
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")


@dataclass
class EncoderBlock:
    """One encoder layer's prunable matrices; `heads` and `neurons` are its current (possibly pruned) counts."""

    name: str
    layer: nn.Module
    head_size: int

    @property
    def attention(self) -> nn.Module:
        return self.layer.attention.self

    @property
    def has_attention(self) -> bool:
        return not isinstance(self.attention, NoSelfAttention)

    @property
    def qkv(self) -> list[nn.Linear]:
        a = self.attention
        return [a.query, a.key, a.value] if self.has_attention else []

    @property
    def attention_output(self) -> nn.Linear:
        return self.layer.attention.output.dense

    @property
    def intermediate(self) -> nn.Linear:
        return self.layer.intermediate.dense

    @property
    def ffn_output(self) -> nn.Linear:
        return self.layer.output.dense

    @property
    def hidden_size(self) -> int:
        return self.attention_output.out_features

    @property
    def heads(self) -> int:
        return self.attention_output.in_features // self.head_size

    @property
    def neurons(self) -> int:
        return self.intermediate.out_features

    @property
    def head_params(self) -> int:
        return 4 * self.hidden_size * self.head_size

    @property
    def neuron_params(self) -> int:
        return 2 * self.hidden_size


class NoSelfAttention(nn.Module):
    """Stands in for a self-attention whose heads are all pruned: a context of width 0, no weights."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def check_supported(model_or_config: Any) -> None:
    """A usage error unless it is a BERT-family encoder (model or config; the module names this file slices)."""
    family = family_of(model_or_config)
    model_type = getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)
    if family is None or family.model_type not in SUPPORTED_MODEL_TYPES:
        raise LoSparseUsageError(
            f"--method structured supports encoder models of type {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"got model type {model_type!r}"
        )


def encoder_blocks(model: nn.Module, decomposed_ok: bool = False) -> list[EncoderBlock]:
    """The encoder layers of a BERT-family model, in module order (checked: supported type, layers found).

    `decomposed_ok`: the matrices may be LoSparse layers, training or compact form (the hybrids gate or slice
    decomposed layers); by default only plain `nn.Linear`s are accepted (the structured pruner reads `.weight`).
    """
    check_supported(model)
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    blocks = []
    for name, module in model.named_modules():
        attention = getattr(module, "attention", None)
        if (attention is not None and hasattr(attention, "self") and hasattr(attention, "output")
                and hasattr(module, "intermediate") and hasattr(module, "output")):
            blocks.append(EncoderBlock(name, module, head_size))
    if not blocks:
        raise LoSparseUsageError(f"--method structured: no encoder layers found in {type(model).__name__}")
    allowed = (nn.Linear, LoSparseLinear, CompactLoSparseLinear) if decomposed_ok else (nn.Linear,)
    for block in blocks:
        if not all(type(m) in allowed for m in (*block.qkv, block.attention_output, block.intermediate,
                                                 block.ffn_output)):
            raise LoSparseUsageError(
                f"--method structured: {block.name} holds non-Linear (decomposed?) matrices; start from a plain model"
            )
    return blocks


def group_sizes(blocks: list[EncoderBlock], device: Any = None) -> torch.Tensor:
    """Weights per group, flat in layout order: [block 0 heads, block 0 neurons, block 1 heads, ...] (float64)."""
    sizes = []
    for block in blocks:
        sizes.append(torch.full((block.heads,), float(block.head_params), dtype=torch.float64))
        sizes.append(torch.full((block.neurons,), float(block.neuron_params), dtype=torch.float64))
    return torch.cat(sizes).to(device) if sizes else torch.zeros(0, dtype=torch.float64)


def target_params(blocks: list[EncoderBlock]) -> int:
    """Weights of the targeted matrices as they are now (q, k, v, attention output, intermediate, output)."""
    return sum(block.heads * block.head_params + block.neurons * block.neuron_params for block in blocks)


def select_groups(scores: torch.Tensor, sizes: torch.Tensor, kept_fraction: float) -> torch.Tensor:
    """Keep mask: the best-scoring groups whose cumulative weights fit in `kept_fraction` of all weights.

    The rule of `LoSparsePruner.update_masks` (paper variant); the kept weights fall short of the target
    by less than one group. Ties are broken by position (stable sort).
    """
    return keep_within_budget(scores, sizes, kept_fraction)


def split_keep(blocks: list[EncoderBlock], keep: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The flat keep mask as (head keep, neuron keep) per block."""
    parts = torch.split(keep, [n for b in blocks for n in (b.heads, b.neurons)])
    return [(parts[2 * i], parts[2 * i + 1]) for i in range(len(blocks))]


@torch.no_grad()
def zero_pruned(blocks: list[EncoderBlock], masks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Zero the weights of the pruned groups (q/k/v and intermediate rows with their biases, output columns)."""
    for block, (heads, neurons) in zip(blocks, masks):
        rows = heads.repeat_interleave(block.head_size)
        for linear in block.qkv:
            linear.weight.mul_(rows.to(linear.weight.dtype)[:, None])
            if linear.bias is not None:
                linear.bias.mul_(rows.to(linear.bias.dtype))
        block.attention_output.weight.mul_(rows.to(block.attention_output.weight.dtype)[None, :])
        block.intermediate.weight.mul_(neurons.to(block.intermediate.weight.dtype)[:, None])
        if block.intermediate.bias is not None:
            block.intermediate.bias.mul_(neurons.to(block.intermediate.bias.dtype))
        block.ffn_output.weight.mul_(neurons.to(block.ffn_output.weight.dtype)[None, :])
