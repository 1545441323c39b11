"""The model families LoSparse knows by `config.model_type`: one `ModelFamily` entry each.

Everything that differs between families lives here and nowhere else:
  * `target_modules`: the regexes (matched against the *whole* module name) of the backbone's dense
    layers that `losparse.apply` decomposes when the user names no targets: attention q/k/v/output,
    FFN in/out, cross-attention for encoder-decoders; never embeddings, LayerNorm, pooler or heads;
  * `kind` ("encoder", "decoder", "encoder-decoder"), which fixes the hidden-state groups that layer
    distillation compares (`hidden_state_groups`, the names `losparse.training.distill.hidden_state_groups`
    returns for the model's outputs) and whether the family generates text;
  * `conv1d`: the family's dense layers are transformers' GPT-2 `Conv1D` (weight stored (in, out)), not
    `nn.Linear`; decomposition, `merge` and the `weight` stand-in follow that layout;

A model whose type is not registered can still be compressed with `target_modules` /
`target_module_types`. To add a family, see "Adding a model family" in the README: one `register`
call below plus one tiny config in tests/test_families.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from losparse.core.errors import LoSparseUsageError

KINDS = ("encoder", "decoder", "encoder-decoder")


@dataclass(frozen=True)
class ModelFamily:
    """What LoSparse needs to know about one transformers `model_type`."""

    model_type: str
    name: str  # how the README and error messages name the family
    kind: str  # one of KINDS
    target_modules: tuple[str, ...]
    conv1d: bool = False

    @property
    def hidden_state_groups(self) -> tuple[str, ...]:
        """Group names of the hidden states the model returns with `output_hidden_states=True`."""
        return ("encoder", "decoder") if self.kind == "encoder-decoder" else ("hidden",)

    @property
    def generates(self) -> bool:
        """Whether the family's LM head model generates text (`generate`, KV cache)."""
        return self.kind != "encoder"


#: model_type -> family, in registration order.
FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Add `family` to `FAMILIES` (checked: a new model_type, a known kind, valid regexes)."""
    if family.model_type in FAMILIES:
        raise ValueError(f"model type {family.model_type!r} is already registered")
    if family.kind not in KINDS:
        raise ValueError(f"{family.model_type}: kind {family.kind!r} is not one of {', '.join(KINDS)}")
    if not family.target_modules:
        raise ValueError(f"{family.model_type}: a family needs at least one target pattern")
    for pattern in family.target_modules:
        re.compile(pattern)
    FAMILIES[family.model_type] = family
    return family


def get_family(model_type: Optional[str]) -> Optional[ModelFamily]:
    """The registered family of a `config.model_type`, or None."""
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def family_of(model_or_config: Any) -> Optional[ModelFamily]:
    """The family of a transformers model or config (by `config.model_type`), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    return get_family(getattr(config, "model_type", None))


def builtin_target_modules(model_type: Optional[str]) -> list[str]:
    """The registered target patterns of `model_type`; a usage error naming the way out if there are none."""
    family = get_family(model_type)
    if family is None:
        raise LoSparseUsageError(
            f"no built-in target list for model type {model_type!r} (built in: "
            f"{', '.join(sorted(FAMILIES))}); pass --target_modules REGEX... "
            "or --target_module_types Linear with --exclude_modules REGEX..."
        )
    return list(family.target_modules)


# --- the registry -------------------------------------------------------------------------------------
# Patterns of the families that existed before the registry are kept character for character (a
# changed pattern would change which layers old configs decompose); tests/test_families.py pins them.

_BERT_LIKE = (
    r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)",
)
_LLAMA_LIKE = (
    r"(.*\.)?layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
)

register(ModelFamily("bert", "BERT", "encoder", _BERT_LIKE))
register(ModelFamily("roberta", "RoBERTa", "encoder", _BERT_LIKE))
register(ModelFamily("xlm-roberta", "XLM-R", "encoder", _BERT_LIKE))
register(ModelFamily("electra", "ELECTRA", "encoder", _BERT_LIKE))
register(ModelFamily(
    "deberta-v2", "DeBERTa-v2/v3", "encoder",
    (r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj)"
     r"|attention\.output\.dense|intermediate\.dense|output\.dense)",),
))
register(ModelFamily(
    "mpnet", "MPNet", "encoder",
    (r"(.*\.)?encoder\.layer\.\d+\.(attention\.attn\.(q|k|v|o)|intermediate\.dense|output\.dense)",),
))
register(ModelFamily(
    "bart", "BART", "encoder-decoder",
    (r"(.*\.)?(encoder|decoder)\.layers\.\d+\.((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)",),
))
register(ModelFamily(
    "t5", "T5", "encoder-decoder",
    (r"(.*\.)?(encoder|decoder)\.block\.\d+\.layer\.\d+\."
     r"((SelfAttention|EncDecAttention)\.(q|k|v|o)|DenseReluDense\.(wi|wo|wi_0|wi_1))",),
))
register(ModelFamily("llama", "Llama", "decoder", _LLAMA_LIKE))
register(ModelFamily("qwen2", "Qwen2", "decoder", _LLAMA_LIKE))
register(ModelFamily("mistral", "Mistral", "decoder", _LLAMA_LIKE))
# GPT-2's c_attn is one fused (3·hidden, hidden) q/k/v matrix: it gets one U·V and its rows are pruned
# together, like any other target. Cross-attention (add_cross_attention=True) adds q_attn.
register(ModelFamily(
    "gpt2", "GPT-2", "decoder",
    (r"(.*\.)?h\.\d+\.((attn|crossattention)\.(c_attn|q_attn|c_proj)|mlp\.(c_fc|c_proj))",),
    conv1d=True,
))
# OPT's project_in / project_out (only when word_embed_proj_dim != hidden_size) sit next to the
# embeddings and stay dense, like the LM head.
register(ModelFamily(
    "opt", "OPT", "decoder",
    (r"(.*\.)?decoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)",),
))
