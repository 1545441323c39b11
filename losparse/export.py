"""From a trained LoSparse model to something to ship: compact, merge, save, load, report.

A compact checkpoint directory holds:
  config.json                  the transformers model config (architectures names the class)
  losparse_config.json         the LoSparseConfig plus the shape of every compact layer
  losparse_model.safetensors   the weights (safetensors only)
  generation_config.json       for generative models, their generation settings (beams, lengths, ...)
The weights file is deliberately not named model.safetensors: a plain `from_pretrained` on the
directory then fails loudly ("no file named model.safetensors") instead of silently building a
randomly initialised dense model. `losparse.load` rebuilds the exact compact model, offline.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional, Union

import torch
import transformers
from torch import nn

from .config import LoSparseConfig
from .decompose import get_config, losparse_layers, set_submodule
from .errors import LoSparseUsageError
from .layers import CompactLoSparseLinear, LoSparseLinear

WEIGHTS_FILE = "losparse_model.safetensors"
LOSPARSE_CONFIG_FILE = "losparse_config.json"
FORMAT_VERSION = 1
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
    """Fold U·V + S back into plain `nn.Linear` layers in place: a dense model anyone can load."""
    for name, layer in losparse_layers(model):
        weight = layer.effective_weight() if isinstance(layer, LoSparseLinear) else layer.dense_weight()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        set_submodule(model, name, linear)
    if hasattr(model, "losparse_config"):
        del model.losparse_config
    return model


def _layer_counts(layer: nn.Module) -> dict[str, Any]:
    out_f, in_f = layer.out_features, layer.in_features
    neuron_size = in_f if layer.prune_dim == "rows" else out_f
    if isinstance(layer, CompactLoSparseLinear):
        kept = layer.num_kept
        total_neurons = out_f if layer.prune_dim == "rows" else in_f
    else:
        total_neurons = layer.sparse_mask.numel()
        kept = int(layer.sparse_mask.sum()) if layer.sparse is not None else 0
    low_rank = layer.rank * (in_f + out_f)
    sparse = kept * neuron_size
    return {
        "out_features": out_f,
        "in_features": in_f,
        "dense_params": out_f * in_f,
        "rank": layer.rank,
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


def save(model: nn.Module, path: str, tokenizer: Any = None) -> str:
    """Write a compact checkpoint of `model` to directory `path` (created if needed); returns `path`.

    A model still in training form is compacted on a copy, so the caller's model is left as it is.
    Only the three files named in the module docstring (and the tokenizer, if given) are written.
    """
    from safetensors.torch import save_model

    config = get_config(model)
    if any(isinstance(layer, LoSparseLinear) for _, layer in losparse_layers(model)):
        model = compact(copy.deepcopy(model))
    os.makedirs(path, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(path)
    first_param = next(model.parameters())
    layers = {
        name: {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank": layer.rank,
            "num_kept": layer.num_kept,
            "prune_dim": layer.prune_dim,
            "bias": layer.bias is not None,
        }
        for name, layer in losparse_layers(model)
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(first_param.dtype).replace("torch.", ""),
        "losparse_config": config.to_dict(),
        "parameter_report": {k: v for k, v in parameter_report(model).items() if k != "layers"},
        "layers": layers,
    }
    with open(os.path.join(path, LOSPARSE_CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    save_model(model, os.path.join(path, WEIGHTS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load(path: str, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Rebuild the compact model saved by `save` (offline), in eval mode, ready to use."""
    from safetensors.torch import load_model

    meta_path = os.path.join(path, LOSPARSE_CONFIG_FILE)
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        raise LoSparseUsageError(
            f"{path} is not a LoSparse checkpoint (expected {LOSPARSE_CONFIG_FILE} and {WEIGHTS_FILE}); "
            "a dense model loads with transformers' from_pretrained"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise LoSparseUsageError(f"{path}: unsupported LoSparse checkpoint format {meta.get('format_version')!r}")
    model_class = getattr(transformers, meta["model_class"], None)
    if model_class is None:
        raise LoSparseUsageError(f"{path}: model class {meta['model_class']!r} is not in this transformers version")
    model_config = transformers.AutoConfig.from_pretrained(path)
    model = model_class(model_config)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    dtype = getattr(torch, meta["dtype"])
    for name, shape in meta["layers"].items():
        set_submodule(model, name, CompactLoSparseLinear(**shape))
    model.to(dtype=dtype)
    load_model(model, os.path.join(path, WEIGHTS_FILE), strict=True)
    model.losparse_config = LoSparseConfig.from_dict(meta["losparse_config"])
    if device is not None:
        model.to(device)
    return model.eval()
