"""Decomposition W → U·V + S (paper §3.2, eqs. 6–8) and the choice of which layers get it."""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import torch
from torch import nn

import logging

from .config import LoSparseConfig
from .errors import LoSparseUsageError
from .layers import CompactLoSparseLinear, LoSparseLinear
from .methods import rank_ratio

logger = logging.getLogger(__name__)

_BERT_LIKE = [
    r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
]

#: Backbone linear layers per `config.model_type`: attention q/k/v/output, FFN in/out, and
#: cross-attention for encoder-decoders. Embeddings, LayerNorm, pooler and task heads never match.
BUILTIN_TARGET_MODULES: dict[str, list[str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": [
        r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj)"
        r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
    ],
    "mpnet": [r"(.*\.)?encoder\.layer\.\d+\.(attention\.attn\.(q|k|v|o)|intermediate\.dense|output\.dense)"],
    "bart": [
        r"(.*\.)?(encoder|decoder)\.layers\.\d+\.((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"
    ],
    "t5": [
        r"(.*\.)?(encoder|decoder)\.block\.\d+\.layer\.\d+\."
        r"((SelfAttention|EncDecAttention)\.(q|k|v|o)|DenseReluDense\.(wi|wo|wi_0|wi_1))"
    ],
    "llama": [
        r"(.*\.)?layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    ],
}


def rank_for_ratio(out_features: int, in_features: int, low_rank_ratio: float) -> int:
    """k = ceil(r·out·in / (out+in)): the rank whose U, V hold a share r of the matrix's parameters.

    Rounds up (so the achieved low-rank share is slightly above r) and is capped at min(out, in).
    """
    rank = math.ceil(low_rank_ratio * out_features * in_features / (out_features + in_features))
    return max(1, min(rank, out_features, in_features))


def allocate_ranks(shapes: list[tuple[int, int]], share: float) -> list[int]:
    """Ranks that spend at most `share` of the matrices' parameters on U·V, as close to it as possible.

    For methods whose whole budget is the low-rank part, rounding every rank up (the paper's rule for
    r) would overshoot the ratio. Here each rank is rounded down, then the leftover budget buys one
    more rank for the layers with the largest rounding loss while it still fits.
    shapes: (out_features, in_features) per layer.
    """
    ideal = [share * o * i / (o + i) for o, i in shapes]
    ranks = [max(0, min(math.floor(x), o, i)) for x, (o, i) in zip(ideal, shapes)]
    leftover = share * sum(o * i for o, i in shapes) - sum(k * (o + i) for k, (o, i) in zip(ranks, shapes))
    for index in sorted(range(len(shapes)), key=lambda j: ideal[j] - ranks[j], reverse=True):
        out_features, in_features = shapes[index]
        cost = out_features + in_features
        if cost <= leftover + 1e-9 and ranks[index] < min(out_features, in_features):
            ranks[index] += 1
            leftover -= cost
    return ranks


@torch.no_grad()
def svd_split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD factors with √σ on both sides: U (out, k) = u·√σ, V (k, in) = √σ·vᵀ (eqs. 6–7).

    Computed in float32 (float64 stays float64) whatever the weight's dtype, returned in that dtype.
    (The remainder S = W − U·V of `decompose_linear` is formed in the same precision.)
    """
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    left, sigma, right_t = torch.linalg.svd(weight.to(work_dtype), full_matrices=False)
    root = sigma[:rank].sqrt()
    u = left[:, :rank] * root
    v = root.unsqueeze(1) * right_t[:rank]
    return u.to(weight.dtype), v.to(weight.dtype)


def _matches_any(name: str, patterns: Optional[Iterable[str]]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns or ())


def _compile_patterns(patterns: Optional[list[str]], flag: str) -> None:
    for pattern in patterns or ():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise LoSparseUsageError(f"--{flag} {pattern!r} is not a valid regular expression ({exc})") from None


def find_target_modules(model: nn.Module, config: LoSparseConfig) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` modules to decompose, as (qualified name, module) pairs.

    User patterns (`target_modules`, regexes matched against the *whole* module name) or module class
    names (`target_module_types`) win over the built-in list for the model type; `exclude_modules`
    removes names afterwards. Only `nn.Linear` is ever targeted.
    """
    _compile_patterns(config.target_modules, "target_modules")
    _compile_patterns(config.exclude_modules, "exclude_modules")
    patterns = config.target_modules
    types = set(config.target_module_types or ())
    if patterns is None and not types:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in BUILTIN_TARGET_MODULES:
            raise LoSparseUsageError(
                f"no built-in target list for model type {model_type!r} (built in: "
                f"{', '.join(sorted(BUILTIN_TARGET_MODULES))}); pass --target_modules REGEX... "
                "or --target_module_types Linear with --exclude_modules REGEX..."
            )
        patterns = BUILTIN_TARGET_MODULES[model_type]
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, (LoSparseLinear, CompactLoSparseLinear)):
            continue
        wanted = _matches_any(name, patterns) or type(module).__name__ in types
        if wanted and not _matches_any(name, config.exclude_modules):
            found.append((name, module))
    return found


def require_targets(model: nn.Module, config: LoSparseConfig) -> list[tuple[str, nn.Linear]]:
    """`find_target_modules`, but an empty result is a usage error that lists some linear layer names."""
    targets = find_target_modules(model, config)
    if not targets:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        sample = ", ".join(linear_names[:6]) + (", ..." if len(linear_names) > 6 else "")
        raise LoSparseUsageError(
            f"no module matches the targets (target_modules={config.target_modules}, "
            f"target_module_types={config.target_module_types}, exclude_modules={config.exclude_modules}); "
            f"the model's linear layers are named like: {sample or 'none'}"
        )
    return targets


def set_submodule(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


@torch.no_grad()
def decompose_linear(linear: nn.Linear, low_rank_ratio: Optional[float], prune_dim: str = "rows",
                     has_sparse: bool = True, rank: Optional[int] = None) -> LoSparseLinear:
    """Replace-ready `LoSparseLinear` with U·V + S == linear.weight (to float rounding).

    The rank is `rank` if given, else k = ceil(r·out·in/(out+in)) for r = `low_rank_ratio`, else 0:
    no low-rank part (S = W, for pruning baselines). `has_sparse=False` keeps only U·V (the SVD
    truncation, for low-rank baselines).
    """
    weight = linear.weight
    out_features, in_features = weight.shape
    if rank is None:
        rank = rank_for_ratio(out_features, in_features, low_rank_ratio) if low_rank_ratio is not None else 0
    layer = LoSparseLinear(
        in_features,
        out_features,
        rank,
        bias=linear.bias is not None,
        has_sparse=has_sparse,
        prune_dim=prune_dim,
        device=weight.device,
        dtype=weight.dtype,
    )
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    remainder = weight.to(work_dtype)
    if rank:
        u, v = svd_split(weight, rank)
        layer.low_rank_u.copy_(u)
        layer.low_rank_v.copy_(v)
        remainder = remainder - u.to(work_dtype) @ v.to(work_dtype)
    if has_sparse:
        layer.sparse.copy_(remainder)
        layer.sparse.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)
    return layer


def losparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All LoSparse layers (training or compact form) of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoSparseLinear, CompactLoSparseLinear))]


def get_config(model: nn.Module) -> LoSparseConfig:
    config = getattr(model, "losparse_config", None)
    if config is None:
        raise LoSparseUsageError("this model has not been decomposed: call losparse.apply(model, config) first")
    return config


def apply(model: nn.Module, config: LoSparseConfig) -> nn.Module:
    """Decompose every targeted linear layer of `model` in place; returns `model`.

    The model's outputs are unchanged (S holds the SVD remainder); `model.losparse_config` records
    the config for the trainer, `compact`, `save` and `parameter_report`.
    """
    if losparse_layers(model):
        raise LoSparseUsageError("this model already has LoSparse layers; apply() runs once per model")
    spec = config.method_spec
    if not spec.decomposes:
        raise LoSparseUsageError(f"method {config.method!r} does not decompose the model; apply() is not needed")
    if not spec.uses_low_rank_ratio:
        logger.warning("method %s puts %s into U·V: --low_rank_ratio %s is ignored", config.method,
                       "nothing" if spec.rank_from is None else "the whole --remaining_ratio", config.low_rank_ratio)
    share = rank_ratio(spec, config.remaining_ratio, config.low_rank_ratio)
    targets = require_targets(model, config)
    ranks: list[Optional[int]] = [None] * len(targets)
    if spec.rank_from == "remaining_ratio":
        ranks = allocate_ranks([tuple(linear.weight.shape) for _, linear in targets], share)
    for (name, linear), rank in zip(targets, ranks):
        set_submodule(model, name, decompose_linear(linear, share, config.prune_dim, has_sparse=spec.has_sparse,
                                                    rank=rank))
    model.losparse_config = config
    return model
