"""Compact, merge and report: from a trained LoSparse model to its smallest exact form, or back to dense.

`compact` drops the pruned neurons of S (same outputs); `merge` folds U·V + S into plain dense layers;
`parameter_report` counts what is left, against the dense matrices the method targeted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from losparse.core.decompose import losparse_layers, set_submodule
from losparse.core.layers import CompactLoSparseLinear, LoSparseLinear, make_dense

RATIO_NOTE = (
    "ratios count the targeted weight matrices only (biases, embeddings, LayerNorm and heads excluded); "
    "ranks round up, k = ceil(r*out*in/(out+in)), so the low-rank share is slightly above r and the sparse "
    "part absorbs the difference"
)


@torch.no_grad()
def compact(model: nn.Module) -> nn.Module:
    """Replace every training `LoSparseLinear` by a `CompactLoSparseLinear` in place; returns `model`.

    Outputs are unchanged (same arithmetic, minus the zeroed neurons), the pruned neurons of S are
    gone from memory.
    """
    for name, layer in losparse_layers(model):
        if isinstance(layer, LoSparseLinear):
            set_submodule(model, name, CompactLoSparseLinear.from_losparse(layer))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold U·V + S back into plain dense layers in place: a dense model anyone can load.

    Each layer becomes the type it replaced (`layer.dense_type`): `nn.Linear`, or for GPT-2 a
    `Conv1D` holding Wᵀ, so `save_pretrained` writes what transformers' own model class loads.
    """
    for name, layer in losparse_layers(model):
        weight = layer.effective_weight() if isinstance(layer, LoSparseLinear) else layer.dense_weight()
        set_submodule(model, name, make_dense(layer.dense_type, weight, layer.bias))
    if hasattr(model, "losparse_config"):
        del model.losparse_config
    if hasattr(model, "losparse_forms"):
        del model.losparse_forms
    return model


def _layer_counts(layer: nn.Module) -> dict[str, Any]:
    out_f, in_f = layer.out_features, layer.in_features
    if isinstance(layer, CompactLoSparseLinear):
        neuron_size = in_f if layer.prune_dim == "rows" else out_f
        kept = layer.num_kept
        total_neurons = out_f if layer.prune_dim == "rows" else in_f
        rank = layer.rank
    else:
        neuron_size = layer.neuron_size
        total_neurons = layer.sparse_mask.numel()
        kept = int(layer.sparse_mask.sum()) if layer.uses_sparse else 0
        rank = layer.current_rank
    low_rank = rank * (in_f + out_f)
    sparse = kept * neuron_size
    return {
        "out_features": out_f,
        "in_features": in_f,
        "dense_params": out_f * in_f,
        "rank": rank,
        "low_rank_params": low_rank,
        "sparse_kept_neurons": kept,
        "sparse_neurons": total_neurons,
        "sparse_params": sparse,
        "params": low_rank + sparse,
        "remaining_ratio": (low_rank + sparse) / (out_f * in_f),
    }


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Per-layer and total parameter counts, dense vs now, and the achieved remaining ratio.

    Works on the training (masked) model and on the compact one alike; the numbers are counted from
    the tensors and masks themselves, not from the requested ratios.
    """
    layers = losparse_layers(model)
    per_layer = [{"name": name, **_layer_counts(layer)} for name, layer in layers]
    layer_weight_ids = set()
    for _, layer in layers:
        layer_weight_ids.update(id(p) for n, p in layer.named_parameters() if n != "bias")
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in layer_weight_ids)
    dense = sum(r["dense_params"] for r in per_layer)
    now = sum(r["params"] for r in per_layer)
    low_rank = sum(r["low_rank_params"] for r in per_layer)
    sparse = sum(r["sparse_params"] for r in per_layer)
    return {
        "num_layers": len(per_layer),
        "target_dense_params": dense,
        "target_params": now,
        "remaining_ratio": now / dense if dense else 1.0,
        "low_rank_share": low_rank / dense if dense else 0.0,
        "sparse_share": sparse / dense if dense else 0.0,
        "model_params_dense": other_params + dense,
        "model_params": other_params + now,
        "note": RATIO_NOTE,
        "layers": per_layer,
    }


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of `parameter_report`."""
    return (
        f"LoSparse layers: {report['num_layers']}; targeted matrices {report['target_dense_params']:,} -> "
        f"{report['target_params']:,} params (remaining ratio {report['remaining_ratio']:.4f} = low-rank "
        f"{report['low_rank_share']:.4f} + sparse {report['sparse_share']:.4f}); whole model "
        f"{report['model_params_dense']:,} -> {report['model_params']:,} params"
    )


