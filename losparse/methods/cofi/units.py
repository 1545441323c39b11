"""CoFi's mask units, the shape of the model they gate, and the checks of the model and the flags.

Units (`--cofi_units`, a comma list; default all):
    hidden     one gate per hidden dimension, shared by the embeddings and every layer     (1, H)
    mha_layer  one gate per multi-head-attention sub-layer                                  (L, 1)
    head       one gate per attention head                                                  (L, heads)
    ffn_layer  one gate per feed-forward sub-layer                                          (L, 1)
    neuron     one gate per FFN neuron                                                      (L, n)
A unit left out is never gated (its keep value is 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from losparse.core.config import COFI_UNITS, LoSparseConfig
from losparse.core.errors import LoSparseUsageError
from losparse.core.families import family_of
from losparse.methods.structured.blocks import SUPPORTED_MODEL_TYPES, encoder_blocks

#: per head (class-name suffix), the modules that read the encoder's last hidden states, which lose the pruned
#: hidden dims as inputs; a head reading the pooler's output (full width) needs none; None: not supported
HIDDEN_READERS = {"ForSequenceClassification": ("classifier.dense",), "ForMultipleChoice": None,
                  "ForTokenClassification": ("classifier",), "ForQuestionAnswering": ("qa_outputs",), "Model": ()}
POOLED_HEADS = ("ForSequenceClassification", "ForMultipleChoice")


def parse_units(value: Optional[str]) -> tuple[str, ...]:
    """The units of `--cofi_units` (None: all), in `COFI_UNITS` order; a usage error naming a bad entry."""
    if value is None:
        return COFI_UNITS
    parts = [part.strip() for part in str(value).split(",")]
    bad = [part for part in parts if part not in COFI_UNITS]
    if bad or not parts or len(set(parts)) != len(parts):
        what = f"unknown unit {bad[0]!r}" if bad else "empty or repeated units"
        raise LoSparseUsageError(f"--cofi_units {value!r}: {what}; give a comma list of {','.join(COFI_UNITS)} "
                                 "(default: all)")
    return tuple(unit for unit in COFI_UNITS if unit in parts)


@dataclass(frozen=True)
class Shape:
    """The dense encoder CoFi gates: L layers of `heads` heads of size d, FFN width n, hidden size H."""

    layers: int
    heads: int
    head_size: int
    neurons: int
    hidden: int

    @property
    def dense_params(self) -> int:
        """Weights of q, k, v, attention output, intermediate and output over all layers (what ratios count)."""
        return self.layers * (4 * self.hidden * self.heads * self.head_size + 2 * self.hidden * self.neurons)

    def unit_shape(self, unit: str) -> tuple[int, int]:
        return {"hidden": (1, self.hidden), "mha_layer": (self.layers, 1), "head": (self.layers, self.heads),
                "ffn_layer": (self.layers, 1), "neuron": (self.layers, self.neurons)}[unit]


def check_family(model_or_config: Any) -> None:
    """A usage error unless it is a BERT-family encoder (the module names the hooks and the removal use)."""
    config = getattr(model_or_config, "config", model_or_config)
    family = family_of(model_or_config)
    if family is None or family.model_type not in SUPPORTED_MODEL_TYPES:
        raise LoSparseUsageError(f"--method cofi supports encoder models of type {', '.join(SUPPORTED_MODEL_TYPES)}; "
                                 f"got model type {getattr(config, 'model_type', None)!r}")
    if getattr(config, "embedding_size", config.hidden_size) != config.hidden_size:
        raise LoSparseUsageError(f"--method cofi: embedding_size {config.embedding_size} differs from hidden_size "
                                 f"{config.hidden_size} (an ELECTRA embeddings projection); not supported")


def hidden_readers(model: nn.Module) -> tuple[str, ...]:
    """Names of the head's modules that read the last hidden states; a usage error for a head not known."""
    name = type(model).__name__
    suffix = next((s for s in HIDDEN_READERS if name.endswith(s)), None)
    if suffix in POOLED_HEADS and getattr(model.base_model, "pooler", None) is not None:
        return ()
    readers = HIDDEN_READERS.get(suffix) if suffix else None
    if readers is not None and all(_has_module(model, r) for r in readers):
        return readers
    raise LoSparseUsageError(f"--method cofi prunes the hidden dimensions of sequence/token classification, question "
                             f"answering and bare encoder models, not of {name}; drop 'hidden' from --cofi_units")


def _has_module(model: nn.Module, name: str) -> bool:
    return isinstance(dict(model.named_modules()).get(name), nn.Linear)


def model_shape(model: nn.Module, decomposed_ok: bool = False) -> Shape:
    """The dense shape of a supported model; a usage error for an already pruned (or, unless `decomposed_ok`:
    the LoSparse hybrid's case, decomposed) one."""
    check_family(model)
    blocks = encoder_blocks(model, decomposed_ok=decomposed_ok)
    config = model.config
    shape = Shape(len(blocks), config.num_attention_heads, blocks[0].head_size, config.intermediate_size,
                  config.hidden_size)
    for block in blocks:
        if (block.heads, block.neurons, block.hidden_size) != (shape.heads, shape.neurons, shape.hidden):
            raise LoSparseUsageError(f"--method cofi: {block.name} is already pruned ({block.heads} heads, "
                                     f"{block.neurons} FFN neurons); start from a dense model")
    return shape


def check_cofi_config(config: LoSparseConfig) -> tuple[str, ...]:
    """The run's units; a usage error for a config that is not a CoFi one."""
    if not config.method.startswith("cofi"):
        raise LoSparseUsageError(f"the CoFi trainer needs a config with --method cofi, not {config.method!r}")
    return parse_units(config.cofi_units)
