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

import contextlib
import copy
import itertools
import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
import transformers
from torch import nn

from .config import LoSparseConfig
from .decompose import get_config, losparse_layers, set_submodule
from .errors import LoSparseUsageError
from .layers import (PRUNE_DIM_TO_AXIS, CompactLoSparseLinear, LoSparseLinear, dense_features, dense_type_of,
                     make_dense)

WEIGHTS_FILE = "losparse_model.safetensors"
LOSPARSE_CONFIG_FILE = "losparse_config.json"
#: The on-disk format. It changes only when a reader of the previous format would load a new checkpoint
#: wrongly; fields added since format 1 was introduced (`OPTIONAL_FIELDS`) do not change it: older
#: readers ignore them and this reader treats a checkpoint without them as written before they existed.
FORMAT_VERSION = 1
#: The formats `load` reads (each older one through a documented migration in `_check_format_version`).
SUPPORTED_FORMAT_VERSIONS = (1,)
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


def save(model: nn.Module, path: str, tokenizer: Any = None, base_model: Optional[str] = None) -> str:
    """Write a compact checkpoint of `model` to directory `path` (created if needed); returns `path`.

    A model still in training form is compacted on a copy, and the model's config is written from a
    copy too, so the caller's model is left exactly as it is. Only the files named in the module
    docstring (and the tokenizer, if given) are written.

    base_model: where the dense model came from (hub name or path), recorded in the manifest; by
    default the `compressed_from` of a model that `load` returned (so a re-saved compact model keeps
    naming the dense model, not the compact checkpoint), else the model config's `name_or_path`.
    """
    from safetensors.torch import save_model

    from . import __version__

    config = get_config(model)
    if base_model is None:
        base_model = (model.compressed_from if hasattr(model, "compressed_from")
                      else getattr(model.config, "name_or_path", None)) or None
    base_model = None if base_model is None else os.fspath(base_model)
    if any(isinstance(layer, LoSparseLinear) for _, layer in losparse_layers(model)):
        model = compact(copy.deepcopy(model))
    os.makedirs(path, exist_ok=True)
    layer_names = {name for name, _ in losparse_layers(model)}
    forms = {name: form for name, form in (getattr(model, "losparse_forms", None) or {}).items() if name in layer_names}
    model_config = copy.deepcopy(model.config)
    model_config.architectures = [type(model).__name__]
    model_config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        copy.deepcopy(model.generation_config).save_pretrained(path)
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
    report = {k: v for k, v in parameter_report(model).items() if k != "layers"}
    meta = {
        "format_version": FORMAT_VERSION,
        "losparse_version": __version__,
        "base_model": base_model,
        "method": config.method,
        "remaining_ratio": config.remaining_ratio,
        "low_rank_ratio": config.low_rank_ratio,
        "achieved_remaining_ratio": report["remaining_ratio"],
        "model_class": type(model).__name__,
        "dtype": str(first_param.dtype).replace("torch.", ""),
        "losparse_config": config.to_dict(),
        "parameter_report": report,
        "layers": layers,
    }
    if forms:  # the per-layer forms `losparse.optimize` chose; `load` re-applies them
        meta["forms"] = forms
    with open(os.path.join(path, LOSPARSE_CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    save_model(model, os.path.join(path, WEIGHTS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# --- load: every field of a checkpoint is checked before a real tensor is allocated ---------------------

MODEL_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
#: The model dtypes a checkpoint may name (`save` writes one of these); anything else is refused.
MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
#: safetensors header dtype of each torch dtype a non-floating tensor of a model may have.
HEADER_DTYPES = {torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                 torch.bool: "BOOL"}
#: Header dtypes accepted for floating tensors (they are cast to the checkpoint's dtype on load).
FLOAT_HEADER_DTYPES = ("F16", "BF16", "F32", "F64")
#: The fields of one entry of `layers` in losparse_config.json, with their JSON types.
LAYER_FIELDS = {"in_features": int, "out_features": int, "rank": int, "num_kept": int, "prune_dim": str,
                "bias": bool}
#: A manifest lists a few numbers per layer (~100 KB for a 70B model); a bigger one is not ours.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass
class CheckedCheckpoint:
    """What `load` needs from a checkpoint directory, every field validated by `check_checkpoint`.

    Kept apart from model building, so any way of building the model (on CPU, on the meta device,
    sharded) can start from it and trust its fields.
    """

    path: str
    model_class: type
    model_config: Any
    generation_config: Any
    dtype: torch.dtype
    losparse_config: LoSparseConfig
    layers: dict[str, dict[str, Any]]
    #: Where the dense model came from (hub name or path); None for checkpoints written before it was recorded.
    base_model: Optional[str] = None
    #: The LoSparse version that wrote the checkpoint; None for checkpoints written before it was recorded.
    losparse_version: Optional[str] = None
    #: Layer name -> form chosen by `losparse.optimize` ("compact", "dense", "triton"); None if not optimized.
    forms: Optional[dict[str, str]] = None


class _ManifestSyntaxError(ValueError):
    """Valid JSON that a checkpoint must not contain (a repeated key, NaN or Infinity)."""


def _error(path: str, file: str, message: str) -> LoSparseUsageError:
    """The one error type of `load`, always naming the file (and in `message`, the field)."""
    return LoSparseUsageError(f"{os.path.join(path, file)}: {message}")


def _require_files(path: str) -> None:
    """Fail with one message listing what is missing, before anything is opened."""
    required = (MODEL_CONFIG_FILE, LOSPARSE_CONFIG_FILE, WEIGHTS_FILE)
    missing = [name for name in required if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise LoSparseUsageError(
            f"{path} is not a LoSparse checkpoint: {', '.join(missing)} missing (expected {', '.join(required)}); "
            "a dense model loads with transformers' from_pretrained"
        )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.load silently keeps the last of repeated keys: a repeated layer would hide another."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _ManifestSyntaxError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _reject_constant(name: str) -> None:
    raise _ManifestSyntaxError(f"{name} is not a JSON number")


def _read_manifest(path: str) -> dict[str, Any]:
    """losparse_config.json as a dict; size-capped so a crafted file cannot exhaust memory."""
    file = os.path.join(path, LOSPARSE_CONFIG_FILE)
    if os.path.getsize(file) > MAX_MANIFEST_BYTES:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"is larger than {MAX_MANIFEST_BYTES} bytes; not a LoSparse manifest")
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except _ManifestSyntaxError as exc:
        raise _error(path, LOSPARSE_CONFIG_FILE, str(exc)) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _error(path, LOSPARSE_CONFIG_FILE, f"is not valid JSON ({exc})") from None
    except OSError as exc:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"cannot be read ({exc})") from None
    if not isinstance(meta, dict):
        raise _error(path, LOSPARSE_CONFIG_FILE, f"must hold a JSON object, not {type(meta).__name__}")
    return meta


_JSON_TYPE_NAMES = {int: "an integer", str: "a string", dict: "an object", bool: "true or false"}


def _typed(value: Any, kind: type, where: str, path: str) -> Any:
    """`value` if it has JSON type `kind`; bool does not pass as an integer (True == 1 in Python)."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{where} must be {_JSON_TYPE_NAMES[kind]}, not {value!r}")
    return value


def _field(meta: dict[str, Any], name: str, kind: type, path: str) -> Any:
    """A required top-level manifest field of JSON type `kind`."""
    if name not in meta:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{name} is missing")
    return _typed(meta[name], kind, name, path)


def _check_format_version(meta: dict[str, Any], path: str) -> None:
    """Only formats this reader knows. Migration rule: a future format N+1 gets a step here that rewrites
    a format-N manifest (in memory) into N+1 before the fields are read, so everything below reads one
    format; format 1 needs none (its later, optional fields are read by `_check_provenance`)."""
    version = _field(meta, "format_version", int, path)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"format_version {version!r} is not supported (this LoSparse "
                                                 f"reads format {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))})")


#: Manifest fields added within format 1, with their JSON types: absent from checkpoints written before
#: (read as None); when present they are checked, and the ones repeating `losparse_config` must agree with it.
OPTIONAL_FIELDS = {"losparse_version": str, "base_model": str, "method": str, "remaining_ratio": float,
                   "low_rank_ratio": float, "achieved_remaining_ratio": float}


def _optional_field(meta: dict[str, Any], name: str, path: str) -> Any:
    value = meta.get(name)
    if value is None:
        return None
    kind = OPTIONAL_FIELDS[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind)
    if not ok:
        expected = "a number" if kind is float else _JSON_TYPE_NAMES[kind]
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{name} must be {expected} or null, not {value!r}")
    return value


def _check_provenance(meta: dict[str, Any], losparse_config: LoSparseConfig, path: str) -> dict[str, Any]:
    """The optional fields; method and ratios are summaries of `losparse_config` for readers of the file."""
    values = {name: _optional_field(meta, name, path) for name in OPTIONAL_FIELDS}
    for name in ("method", "remaining_ratio", "low_rank_ratio"):
        if values[name] is not None and values[name] != getattr(losparse_config, name):
            raise _error(path, LOSPARSE_CONFIG_FILE, f"{name} {values[name]!r} disagrees with losparse_config.{name} "
                                                     f"{getattr(losparse_config, name)!r}")
    return values


def _checkpoint_dtype(meta: dict[str, Any], path: str) -> torch.dtype:
    """The dtype from an allowlist: never `getattr(torch, <text from a file>)`."""
    name = _field(meta, "dtype", str, path)
    if name not in MODEL_DTYPES:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"dtype {name!r} is not one of {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


def _checkpoint_losparse_config(meta: dict[str, Any], path: str) -> LoSparseConfig:
    values = _field(meta, "losparse_config", dict, path)
    try:
        return LoSparseConfig.from_dict(values)
    except (LoSparseUsageError, TypeError, ValueError) as exc:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"losparse_config: {exc}") from None


def _read_model_config(path: str) -> Any:
    """config.json through transformers (no remote code: `trust_remote_code` stays off)."""
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _error(path, MODEL_CONFIG_FILE, f"is not a usable transformers config ({exc})") from None


def _read_generation_config(path: str) -> Any:
    if not os.path.isfile(os.path.join(path, GENERATION_CONFIG_FILE)):
        return None
    try:
        return transformers.GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _error(path, GENERATION_CONFIG_FILE, f"is not a usable generation config ({exc})") from None


def allowed_model_classes(model_type: str) -> set[str]:
    """Names of the transformers model classes the auto classes map `model_type` to.

    The allowlist for `model_class`: a checkpoint can only name a genuine transformers model for
    its own config type, never an arbitrary importable object.
    """
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        mapping = getattr(modeling_auto, attr)
        if attr.startswith("MODEL_") and attr.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            value = mapping.get(model_type, ())
            names.update([value] if isinstance(value, str) else value)
    return names


def _checkpoint_model_class(meta: dict[str, Any], model_config: Any, path: str) -> type:
    name = _field(meta, "model_class", str, path)
    model_type = getattr(model_config, "model_type", None)
    allowed = allowed_model_classes(model_type) if isinstance(model_type, str) else set()
    if name not in allowed:
        raise _error(path, LOSPARSE_CONFIG_FILE,
                     f"model_class {name!r} is not a transformers model class for model_type {model_type!r} "
                     f"of {MODEL_CONFIG_FILE} (allowed: {', '.join(sorted(allowed)) or 'none'})")
    try:
        model_class = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError) as exc:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"model_class {name!r} cannot be imported here ({exc})") from None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise _error(path, LOSPARSE_CONFIG_FILE, f"model_class {name!r} is not a transformers model class")
    return model_class


def _meta_skeleton(model_class: type, model_config: Any, path: str) -> nn.Module:
    """The model on the meta device: its module names and shapes, at no memory cost whatever config.json says."""
    try:
        with torch.device("meta"):
            return model_class(copy.deepcopy(model_config))
    except Exception as exc:  # a config transformers parsed but the model code rejects: any error type
        raise _error(path, MODEL_CONFIG_FILE,
                     f"{model_class.__name__} cannot be built from it ({type(exc).__name__}: {exc})") from None


def _check_layer_fields(name: str, spec: Any, path: str) -> dict[str, Any]:
    """Exactly the fields of LAYER_FIELDS, each of its JSON type (the entry becomes constructor arguments)."""
    where = f"layers[{name!r}]"
    _typed(spec, dict, where, path)
    missing = sorted(set(LAYER_FIELDS) - set(spec))
    unknown = sorted(set(spec) - set(LAYER_FIELDS))
    if missing:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{where} lacks {', '.join(missing)}")
    if unknown:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{where} has unknown field(s) {', '.join(unknown)}")
    return {field: _typed(spec[field], kind, f"{where}.{field}", path) for field, kind in LAYER_FIELDS.items()}


def _dense_shape(module: Optional[nn.Module]) -> Optional[tuple[int, int, bool]]:
    """(out_features, in_features, has a bias) of a layer LoSparse decomposes (`nn.Linear`, or GPT-2's
    `Conv1D`); None for anything else."""
    if module is None or dense_type_of(module) is None:
        return None
    return (*dense_features(module), module.bias is not None)


def _check_layer(name: str, spec: Any, linear: Optional[nn.Module], path: str) -> dict[str, Any]:
    """One manifest layer against the dense layer (`nn.Linear` or `Conv1D`) the model config puts at that name.

    Shapes must equal the config's (so no size in the manifest is ever trusted on its own); the rank
    and the kept count must fit in them.
    """
    where = f"layers[{name!r}]"
    dense = _dense_shape(linear)
    if dense is None:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{where}: the model of {MODEL_CONFIG_FILE} has no linear layer "
                                                 "of that name")
    spec = _check_layer_fields(name, spec, path)
    out_f, in_f = spec["out_features"], spec["in_features"]
    if (out_f, in_f) != dense[:2]:
        raise _error(path, LOSPARSE_CONFIG_FILE,
                     f"{where}.out_features x in_features is {out_f}x{in_f}, but {MODEL_CONFIG_FILE} makes this "
                     f"layer {dense[0]}x{dense[1]}")
    if spec["bias"] != dense[2]:
        has = "has a" if dense[2] else "has no"
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{where}.bias is {spec['bias']}, but the layer of "
                                                 f"{MODEL_CONFIG_FILE} {has} bias")
    if not 0 <= spec["rank"] <= min(out_f, in_f):
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{where}.rank {spec['rank']} is not in [0, {min(out_f, in_f)}]")
    if spec["prune_dim"] not in PRUNE_DIM_TO_AXIS:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{where}.prune_dim {spec['prune_dim']!r} is not one of "
                                                 f"{', '.join(PRUNE_DIM_TO_AXIS)}")
    neurons = _num_neurons(spec)
    if not 0 <= spec["num_kept"] <= neurons:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{where}.num_kept {spec['num_kept']} is not in [0, {neurons}]")
    # The layer type is the config's (not a manifest field): a compact layer made from a Conv1D merges back to one.
    return {**spec, "dense_type": dense_type_of(linear)}


def _num_neurons(spec: dict[str, Any]) -> int:
    """Prunable neurons of a layer: its rows (outputs) or columns (inputs)."""
    return spec["out_features"] if spec["prune_dim"] == "rows" else spec["in_features"]


def _check_layers(meta: dict[str, Any], skeleton: nn.Module, path: str) -> dict[str, dict[str, Any]]:
    layers = _field(meta, "layers", dict, path)
    modules = dict(skeleton.named_modules())
    return {name: _check_layer(name, spec, modules.get(name), path) for name, spec in layers.items()}


def _expected_tensors(skeleton: nn.Module, layers: dict[str, dict[str, Any]]) -> list[list[tuple[str, torch.Tensor]]]:
    """The state of the compact model as groups of names sharing one (meta) tensor, e.g. tied embeddings.

    Built by putting meta `CompactLoSparseLinear`s into the meta skeleton, so the expected names and
    shapes come from the layer code itself. safetensors stores one name per group.
    """
    for name, spec in layers.items():
        set_submodule(skeleton, name, CompactLoSparseLinear(**spec, device=torch.device("meta")))
    groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append((name, tensor))
    return list(groups.values())


def _read_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in the weights file, from its header only (memory-mapped,
    no tensor read); safetensors itself checks that every declared tensor lies inside the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: (tuple(part.get_shape()), part.get_dtype()) for name, part in slices.items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _error(path, WEIGHTS_FILE, f"is not a readable safetensors file ({exc})") from None


def _check_header_tensor(name: str, entry: tuple[tuple[int, ...], str], tensor: torch.Tensor, path: str) -> None:
    shape, dtype = entry
    if shape != tuple(tensor.shape):
        raise _error(path, WEIGHTS_FILE, f"{name} has shape {list(shape)}, but {LOSPARSE_CONFIG_FILE} and "
                                         f"{MODEL_CONFIG_FILE} make it {list(tensor.shape)}")
    allowed = FLOAT_HEADER_DTYPES if tensor.is_floating_point() else (HEADER_DTYPES.get(tensor.dtype),)
    if dtype not in allowed:
        raise _error(path, WEIGHTS_FILE, f"{name} has dtype {dtype}, expected {' or '.join(map(str, allowed))}")


def _check_header(header: dict[str, tuple[tuple[int, ...], str]],
                  expected: list[list[tuple[str, torch.Tensor]]], path: str) -> None:
    """Same tensor names as the model (one per tied group), each with the expected shape and dtype."""
    for group in expected:
        present = [(name, tensor) for name, tensor in group if name in header]
        if not present:
            raise _error(path, WEIGHTS_FILE, f"{group[0][0]} is missing")
        for name, tensor in present:
            _check_header_tensor(name, header[name], tensor, path)
    known = {name for group in expected for name, _ in group}
    extra = sorted(set(header) - known)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise _error(path, WEIGHTS_FILE, f"{extra[0]} is not a tensor of this model{more}")


def _check_forms(meta: dict[str, Any], layers: dict[str, dict[str, Any]], path: str) -> Optional[dict[str, str]]:
    """The optional `forms` field: an object mapping layers of `layers` to known form names."""
    from .dispatch import FORMS

    forms = meta.get("forms")
    if forms is None:
        return None
    _typed(forms, dict, "forms", path)
    for name, form in forms.items():
        if name not in layers:
            raise _error(path, LOSPARSE_CONFIG_FILE, f"forms names {name!r}, which is not in layers")
        if form not in FORMS:
            raise _error(path, LOSPARSE_CONFIG_FILE, f"forms[{name!r}] is {form!r}, not one of {', '.join(FORMS)}")
    return dict(forms)


def _check_kept_index(name: str, index: torch.Tensor, neurons: int, path: str) -> None:
    """Kept indices as `compact` writes them: in range, unique, increasing.

    A duplicate would make two stored neurons add into one output and silently compute a wrong
    layer; an index out of range would only fail at the first forward.
    """
    if index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= neurons:
        raise _error(path, WEIGHTS_FILE, f"{name} has entries outside [0, {neurons}) (min {low}, max {high})")
    if torch.unique(index).numel() != index.numel():
        raise _error(path, WEIGHTS_FILE, f"{name} has duplicate entries")
    if bool((index[1:] < index[:-1]).any()):
        raise _error(path, WEIGHTS_FILE, f"{name} is not in increasing order")


def _check_kept_indices(layers: dict[str, dict[str, Any]], path: str) -> None:
    """Reads only the kept_index tensors, whose sizes the header check has already bounded."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
        for name, spec in layers.items():
            _check_kept_index(f"{name}.kept_index", f.get_tensor(f"{name}.kept_index"), _num_neurons(spec), path)


def check_checkpoint(path: str) -> CheckedCheckpoint:
    """Validate a compact checkpoint directory completely, allocating no real tensor sized by it.

    Every manifest field is checked against allowlists and the model config (built on the meta
    device for its shapes), every tensor of the weights file against the header's shapes and dtypes
    and the kept indices against their layers. Any problem is one `LoSparseUsageError` naming the
    file and the field. Only the values of the weights are left unread: `load` refuses non-finite
    ones as it loads them, so a checkpoint that passes both computes what was saved.
    """
    _require_files(path)
    meta = _read_manifest(path)
    _check_format_version(meta, path)
    dtype = _checkpoint_dtype(meta, path)
    losparse_config = _checkpoint_losparse_config(meta, path)
    provenance = _check_provenance(meta, losparse_config, path)
    model_config = _read_model_config(path)
    model_class = _checkpoint_model_class(meta, model_config, path)
    generation_config = _read_generation_config(path)
    skeleton = _meta_skeleton(model_class, model_config, path)
    layers = _check_layers(meta, skeleton, path)
    forms = _check_forms(meta, layers, path)
    _check_header(_read_header(path), _expected_tensors(skeleton, layers), path)
    _check_kept_indices(layers, path)
    return CheckedCheckpoint(path, model_class, model_config, generation_config, dtype, losparse_config, layers,
                             base_model=provenance["base_model"], losparse_version=provenance["losparse_version"],
                             forms=forms)


# --- load: the compact model built at its checked shapes, only its real tensors materialised -------------

#: safetensors header dtype -> torch dtype, for the tensors `_WeightsReader` reads.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
#: safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get each parameter moved to the meta device as it is registered; buffers stay real.

    The model's own constructor thus computes its non-persistent buffers (position ids, rotary
    frequencies, ...) exactly as on CPU, while no weight is ever filled (`nn.Linear` and `nn.Embedding`
    allocate with `torch.empty`, which touches no page, and move to meta at once). The same trick as
    accelerate's `init_empty_weights(include_buffers=False)`; like it, it patches `nn.Module` for the
    duration, so build no other module in another thread meanwhile. A parameter already on meta (a tied
    one being re-registered) is kept as it is, so ties keep their identity.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _WeightsReader:
    """The tensors of a (checked) safetensors file, each read with plain file reads into a fresh tensor.

    No memory map: an mmap'd read makes every page of the file resident in this process next to the
    copy, so loading would peak at twice the weights. Plain reads go through the page cache instead,
    which the kernel can drop at will, and the process holds each tensor once.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = open(os.path.join(path, WEIGHTS_FILE), "rb")
        try:
            (length,) = struct.unpack("<Q", self._read_exactly(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header of {length} bytes")
            self.header = json.loads(self._read_exactly(length))
            if not isinstance(self.header, dict):
                raise ValueError("header is not an object")
        except (struct.error, ValueError, EOFError) as exc:
            self.file.close()
            raise _error(path, WEIGHTS_FILE, f"changed while loading ({exc})") from None
        self.data_start = 8 + length

    def _read_exactly(self, size: int) -> bytes:
        data = self.file.read(size)
        if len(data) != size:
            raise EOFError(f"{size - len(data)} bytes short")
        return data

    def read(self, name: str, expected: torch.Tensor) -> torch.Tensor:
        """Tensor `name`, whose shape `check_checkpoint` has matched to `expected` (checked again here)."""
        entry = self.header.get(name)
        entry = entry if isinstance(entry, dict) else {}
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        offsets = entry.get("data_offsets")
        if (dtype is None or entry.get("shape") != list(expected.shape) or not isinstance(offsets, list)
                or len(offsets) != 2 or not all(isinstance(x, int) and x >= 0 for x in offsets)):
            raise _error(self.path, WEIGHTS_FILE, f"{name} changed while loading")
        tensor = torch.empty(tuple(expected.shape), dtype=dtype)
        begin, end = offsets
        nbytes = tensor.numel() * tensor.element_size()
        if end - begin != nbytes:
            raise _error(self.path, WEIGHTS_FILE, f"{name} changed while loading")
        if nbytes:
            target = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            self.file.seek(self.data_start + begin)
            filled = 0
            while filled < nbytes:
                count = self.file.readinto(target[filled:])
                if not count:
                    raise _error(self.path, WEIGHTS_FILE, f"{name} changed while loading (file too short)")
                filled += count
        return tensor

    def close(self) -> None:
        self.file.close()


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no inf, in one reduction that allocates nothing tensor-sized (min and max propagate NaN;
    `isfinite(t).all()` would make a mask and temporaries as large as the tensor, which the allocator keeps)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _put(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter or buffer `name` of `model` to `value` (a `nn.Parameter` for a parameter)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def _load_tensor(reader: _WeightsReader, name: str, template: torch.Tensor, dtype: torch.dtype,
                 device: Optional[torch.device], path: str) -> torch.Tensor:
    """One tensor from the file: checked finite, cast (floating ones) to `dtype`, moved to `device`."""
    tensor = reader.read(name, template)
    if tensor.is_floating_point():
        if not _all_finite(tensor):
            raise _error(path, WEIGHTS_FILE, f"{name} has non-finite values (NaN or inf)")
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
            if not _all_finite(tensor):
                raise LoSparseUsageError(f"{name} of {os.path.join(path, WEIGHTS_FILE)} overflows {dtype}; "
                                         "load it in a wider dtype")
    else:
        tensor = tensor.to(template.dtype)  # the header check allows only the model's own integer dtype
    if device is not None:
        tensor = tensor.to(device)
    return tensor


def _load_dtype(dtype: Union[None, str, torch.dtype], checked: CheckedCheckpoint) -> torch.dtype:
    if dtype is None:
        return checked.dtype
    if isinstance(dtype, str) and dtype in MODEL_DTYPES:
        return MODEL_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in MODEL_DTYPES.values():
        return dtype
    raise LoSparseUsageError(f"load(dtype={dtype!r}): expected one of {', '.join(MODEL_DTYPES)}")


def load(path: str, device: Optional[Union[str, torch.device]] = None,
         dtype: Union[None, str, torch.dtype] = None, optimize: Optional[bool] = None,
         example_inputs: Optional[dict[str, Any]] = None) -> nn.Module:
    """Rebuild the compact model saved by `save` (offline), in eval mode, ready to use.

    `check_checkpoint` runs first, so a crafted or corrupt checkpoint fails with one
    `LoSparseUsageError` before any weight is allocated. The model is then built without its
    weights (parameters on the meta device, compact layers created directly at their checked
    shapes) and only the tensors of the file are materialised, one at a time, straight into the
    model: peak memory is about the compact weights themselves, never the dense model.

    dtype: the floating-point dtype to load in (`torch.float16`, `"bfloat16"`, ...); default the
    checkpoint's. device: where the tensors go (`"cuda:0"`, ...); each is moved as it is read, so
    CPU memory holds at most one tensor at a time.

    optimize / example_inputs: the per-layer forms of `losparse.optimize`. By default (None) the forms the
    manifest records are re-applied without measuring (a recorded "triton" falls back to compact where the
    kernel cannot run); False ignores them; True with `example_inputs` measures anew on this device
    (`model.losparse_optimize_report` holds the report), True without needs recorded forms.
    """
    if example_inputs is not None and optimize is False:
        raise LoSparseUsageError("load(optimize=False, example_inputs=...): example_inputs are for measuring; "
                                 "drop them or pass optimize=True")
    checked = check_checkpoint(path)
    if optimize is True and example_inputs is None and not checked.forms:
        raise LoSparseUsageError(f"load({path!r}, optimize=True): the checkpoint records no forms; pass "
                                 "example_inputs=... to measure them")
    dtype = _load_dtype(dtype, checked)
    device = torch.device(device) if device is not None else None
    if sys.byteorder != "little":  # safetensors stores little-endian bytes, which `_WeightsReader` copies as they are
        raise LoSparseUsageError("losparse.load reads safetensors files on little-endian machines only")
    try:
        with _parameters_on_meta():
            model = checked.model_class(copy.deepcopy(checked.model_config))
    except Exception as exc:  # as in `_meta_skeleton`: the model code may reject the config with any error type
        raise _error(path, MODEL_CONFIG_FILE, f"{checked.model_class.__name__} cannot be built from it "
                                              f"({type(exc).__name__}: {exc})") from None
    groups = _expected_tensors(model, checked.layers)  # also puts the (meta) compact layers in place
    reader = _WeightsReader(path)
    try:
        for group in groups:
            name, template = next((n, t) for n, t in group if n in reader.header)
            tensor = _load_tensor(reader, name, template, dtype, device, path)
            value = nn.Parameter(tensor, requires_grad=template.requires_grad) if isinstance(
                template, nn.Parameter) else tensor
            for member, _ in group:  # tied names share one tensor, as in the model that was saved
                _put(model, member, value)
    finally:
        reader.close()
    # What the file does not hold (non-persistent buffers) was computed by the constructor: give it the
    # dtype and device of the rest, as `model.to` did before (a no-op for the tensors loaded above).
    model.to(device=device, dtype=dtype)
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise LoSparseUsageError(f"{path}: {checked.model_class.__name__} leaves {left[0]} unset: it is neither in "
                                 f"{WEIGHTS_FILE} nor computed by the model")
    if checked.generation_config is not None:
        model.generation_config = checked.generation_config
    model.losparse_config = checked.losparse_config
    model.compressed_from = checked.base_model
    for _, layer in losparse_layers(model):
        layer.refresh_layout()  # kept_index was filled after the layers were built: find the contiguous ones
    model.eval()
    if example_inputs is not None:
        from .dispatch import optimize as optimize_forms

        model.losparse_optimize_report = optimize_forms(model, example_inputs)
    elif checked.forms and optimize is not False:
        from .dispatch import apply_forms

        apply_forms(model, checked.forms, strict=False)
    return model
