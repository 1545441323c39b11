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
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import transformers
from torch import nn

from .config import LoSparseConfig
from .decompose import get_config, losparse_layers, set_submodule
from .errors import LoSparseUsageError
from .layers import PRUNE_DIM_TO_AXIS, CompactLoSparseLinear, LoSparseLinear

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
    version = _field(meta, "format_version", int, path)
    if version != FORMAT_VERSION:
        raise _error(path, LOSPARSE_CONFIG_FILE, f"format_version {version!r} is not supported (this LoSparse "
                                                 f"reads format {FORMAT_VERSION})")


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


def _check_layer(name: str, spec: Any, linear: Optional[nn.Module], path: str) -> dict[str, Any]:
    """One manifest layer against the `nn.Linear` the model config puts at that name.

    Shapes must equal the config's (so no size in the manifest is ever trusted on its own); the rank
    and the kept count must fit in them.
    """
    where = f"layers[{name!r}]"
    if not isinstance(linear, nn.Linear):
        raise _error(path, LOSPARSE_CONFIG_FILE, f"{where}: the model of {MODEL_CONFIG_FILE} has no linear layer "
                                                 "of that name")
    spec = _check_layer_fields(name, spec, path)
    out_f, in_f = spec["out_features"], spec["in_features"]
    if (out_f, in_f) != (linear.out_features, linear.in_features):
        raise _error(path, LOSPARSE_CONFIG_FILE,
                     f"{where}.out_features x in_features is {out_f}x{in_f}, but {MODEL_CONFIG_FILE} makes this "
                     f"layer {linear.out_features}x{linear.in_features}")
    if spec["bias"] != (linear.bias is not None):
        has = "has a" if linear.bias is not None else "has no"
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
    return spec


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
    model_config = _read_model_config(path)
    model_class = _checkpoint_model_class(meta, model_config, path)
    generation_config = _read_generation_config(path)
    skeleton = _meta_skeleton(model_class, model_config, path)
    layers = _check_layers(meta, skeleton, path)
    _check_header(_read_header(path), _expected_tensors(skeleton, layers), path)
    _check_kept_indices(layers, path)
    return CheckedCheckpoint(path, model_class, model_config, generation_config, dtype, losparse_config, layers)


def _check_finite(model: nn.Module, path: str) -> None:
    """NaN or inf weights would load and compute garbage: refuse them (one pass over the loaded state)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _error(path, WEIGHTS_FILE, f"{name} has non-finite values (NaN or inf)")


def load(path: str, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Rebuild the compact model saved by `save` (offline), in eval mode, ready to use.

    `check_checkpoint` runs first, so a crafted or corrupt checkpoint fails with one
    `LoSparseUsageError` before the model is allocated.
    """
    from safetensors.torch import load_model

    checked = check_checkpoint(path)
    model = checked.model_class(checked.model_config)
    if checked.generation_config is not None:
        model.generation_config = checked.generation_config
    for name, spec in checked.layers.items():
        set_submodule(model, name, CompactLoSparseLinear(**spec))
    model.to(dtype=checked.dtype)
    load_model(model, os.path.join(path, WEIGHTS_FILE), strict=True)
    _check_finite(model, path)
    model.losparse_config = checked.losparse_config
    if device is not None:
        model.to(device)
    return model.eval()
