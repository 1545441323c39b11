"""The compact checkpoint format, and the checks `load` runs on every field before a tensor is allocated.

A compact checkpoint directory holds:
  config.json                  the transformers model config (architectures names the class)
  losparse_config.json         the LoSparseConfig plus the shape of every compact layer
  losparse_model.safetensors   the weights (safetensors only)
  generation_config.json       for generative models, their generation settings (beams, lengths, ...)
The weights file is deliberately not named model.safetensors: a plain `from_pretrained` on the
directory then fails loudly ("no file named model.safetensors") instead of silently building a
randomly initialised dense model. `check_checkpoint` turns a directory into a `CheckedCheckpoint`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import transformers
from torch import nn

from losparse.core.config import LoSparseConfig
from losparse.core.decompose import set_submodule
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import PRUNE_DIM_TO_AXIS, CompactLoSparseLinear, dense_features, dense_type_of
from losparse.deploy.dispatch import FORMS

WEIGHTS_FILE = "losparse_model.safetensors"
LOSPARSE_CONFIG_FILE = "losparse_config.json"
#: The on-disk format. It changes only when a reader of the previous format would load a new checkpoint
#: wrongly; fields added since format 1 was introduced (`OPTIONAL_FIELDS`) do not change it: older
#: readers ignore them and this reader treats a checkpoint without them as written before they existed.
FORMAT_VERSION = 1
#: The formats `load` reads (each older one through a documented migration in `_check_format_version`).
SUPPORTED_FORMAT_VERSIONS = (1,)

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


def checkpoint_error(path: str, file: str, message: str) -> LoSparseUsageError:
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
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"is larger than {MAX_MANIFEST_BYTES} bytes; not a LoSparse manifest")
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except _ManifestSyntaxError as exc:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, str(exc)) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"is not valid JSON ({exc})") from None
    except OSError as exc:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"cannot be read ({exc})") from None
    if not isinstance(meta, dict):
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"must hold a JSON object, not {type(meta).__name__}")
    return meta


_JSON_TYPE_NAMES = {int: "an integer", str: "a string", dict: "an object", bool: "true or false"}


def _typed(value: Any, kind: type, where: str, path: str) -> Any:
    """`value` if it has JSON type `kind`; bool does not pass as an integer (True == 1 in Python)."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{where} must be {_JSON_TYPE_NAMES[kind]}, not {value!r}")
    return value


def _field(meta: dict[str, Any], name: str, kind: type, path: str) -> Any:
    """A required top-level manifest field of JSON type `kind`."""
    if name not in meta:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{name} is missing")
    return _typed(meta[name], kind, name, path)


def _check_format_version(meta: dict[str, Any], path: str) -> None:
    """Only formats this reader knows. Migration rule: a future format N+1 gets a step here that rewrites
    a format-N manifest (in memory) into N+1 before the fields are read, so everything below reads one
    format; format 1 needs none (its later, optional fields are read by `_check_provenance`)."""
    version = _field(meta, "format_version", int, path)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"format_version {version!r} is not supported (this LoSparse "
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
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{name} must be {expected} or null, not {value!r}")
    return value


def _check_provenance(meta: dict[str, Any], losparse_config: LoSparseConfig, path: str) -> dict[str, Any]:
    """The optional fields; method and ratios are summaries of `losparse_config` for readers of the file."""
    values = {name: _optional_field(meta, name, path) for name in OPTIONAL_FIELDS}
    for name in ("method", "remaining_ratio", "low_rank_ratio"):
        if values[name] is not None and values[name] != getattr(losparse_config, name):
            raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{name} {values[name]!r} disagrees with losparse_config.{name} "
                                                     f"{getattr(losparse_config, name)!r}")
    return values


def _checkpoint_dtype(meta: dict[str, Any], path: str) -> torch.dtype:
    """The dtype from an allowlist: never `getattr(torch, <text from a file>)`."""
    name = _field(meta, "dtype", str, path)
    if name not in MODEL_DTYPES:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"dtype {name!r} is not one of {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


def _checkpoint_losparse_config(meta: dict[str, Any], path: str) -> LoSparseConfig:
    values = _field(meta, "losparse_config", dict, path)
    try:
        return LoSparseConfig.from_dict(values)
    except (LoSparseUsageError, TypeError, ValueError) as exc:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"losparse_config: {exc}") from None


def _read_model_config(path: str) -> Any:
    """config.json through transformers (no remote code: `trust_remote_code` stays off)."""
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise checkpoint_error(path, MODEL_CONFIG_FILE, f"is not a usable transformers config ({exc})") from None


def _read_generation_config(path: str) -> Any:
    if not os.path.isfile(os.path.join(path, GENERATION_CONFIG_FILE)):
        return None
    try:
        return transformers.GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise checkpoint_error(path, GENERATION_CONFIG_FILE, f"is not a usable generation config ({exc})") from None


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
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE,
                     f"model_class {name!r} is not a transformers model class for model_type {model_type!r} "
                     f"of {MODEL_CONFIG_FILE} (allowed: {', '.join(sorted(allowed)) or 'none'})")
    try:
        model_class = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError) as exc:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"model_class {name!r} cannot be imported here ({exc})") from None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"model_class {name!r} is not a transformers model class")
    return model_class


def _meta_skeleton(model_class: type, model_config: Any, path: str) -> nn.Module:
    """The model on the meta device: its module names and shapes, at no memory cost whatever config.json says."""
    try:
        with torch.device("meta"):
            return model_class(copy.deepcopy(model_config))
    except Exception as exc:  # a config transformers parsed but the model code rejects: any error type
        raise checkpoint_error(path, MODEL_CONFIG_FILE,
                     f"{model_class.__name__} cannot be built from it ({type(exc).__name__}: {exc})") from None


def _check_layer_fields(name: str, spec: Any, path: str) -> dict[str, Any]:
    """Exactly the fields of LAYER_FIELDS, each of its JSON type (the entry becomes constructor arguments)."""
    where = f"layers[{name!r}]"
    _typed(spec, dict, where, path)
    missing = sorted(set(LAYER_FIELDS) - set(spec))
    unknown = sorted(set(spec) - set(LAYER_FIELDS))
    if missing:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{where} lacks {', '.join(missing)}")
    if unknown:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{where} has unknown field(s) {', '.join(unknown)}")
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
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{where}: the model of {MODEL_CONFIG_FILE} has no linear layer "
                                                 "of that name")
    spec = _check_layer_fields(name, spec, path)
    out_f, in_f = spec["out_features"], spec["in_features"]
    if (out_f, in_f) != dense[:2]:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE,
                     f"{where}.out_features x in_features is {out_f}x{in_f}, but {MODEL_CONFIG_FILE} makes this "
                     f"layer {dense[0]}x{dense[1]}")
    if spec["bias"] != dense[2]:
        has = "has a" if dense[2] else "has no"
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{where}.bias is {spec['bias']}, but the layer of "
                                                 f"{MODEL_CONFIG_FILE} {has} bias")
    if not 0 <= spec["rank"] <= min(out_f, in_f):
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{where}.rank {spec['rank']} is not in [0, {min(out_f, in_f)}]")
    if spec["prune_dim"] not in PRUNE_DIM_TO_AXIS:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{where}.prune_dim {spec['prune_dim']!r} is not one of "
                                                 f"{', '.join(PRUNE_DIM_TO_AXIS)}")
    neurons = _num_neurons(spec)
    if not 0 <= spec["num_kept"] <= neurons:
        raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"{where}.num_kept {spec['num_kept']} is not in [0, {neurons}]")
    # The layer type is the config's (not a manifest field): a compact layer made from a Conv1D merges back to one.
    return {**spec, "dense_type": dense_type_of(linear)}


def _num_neurons(spec: dict[str, Any]) -> int:
    """Prunable neurons of a layer: its rows (outputs) or columns (inputs)."""
    return spec["out_features"] if spec["prune_dim"] == "rows" else spec["in_features"]


def _check_layers(meta: dict[str, Any], skeleton: nn.Module, path: str) -> dict[str, dict[str, Any]]:
    layers = _field(meta, "layers", dict, path)
    modules = dict(skeleton.named_modules())
    return {name: _check_layer(name, spec, modules.get(name), path) for name, spec in layers.items()}


def expected_tensors(skeleton: nn.Module, layers: dict[str, dict[str, Any]]) -> list[list[tuple[str, torch.Tensor]]]:
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
        raise checkpoint_error(path, WEIGHTS_FILE, f"is not a readable safetensors file ({exc})") from None


def _check_header_tensor(name: str, entry: tuple[tuple[int, ...], str], tensor: torch.Tensor, path: str) -> None:
    shape, dtype = entry
    if shape != tuple(tensor.shape):
        raise checkpoint_error(path, WEIGHTS_FILE, f"{name} has shape {list(shape)}, but {LOSPARSE_CONFIG_FILE} and "
                                         f"{MODEL_CONFIG_FILE} make it {list(tensor.shape)}")
    allowed = FLOAT_HEADER_DTYPES if tensor.is_floating_point() else (HEADER_DTYPES.get(tensor.dtype),)
    if dtype not in allowed:
        raise checkpoint_error(path, WEIGHTS_FILE, f"{name} has dtype {dtype}, expected {' or '.join(map(str, allowed))}")


def _check_header(header: dict[str, tuple[tuple[int, ...], str]],
                  expected: list[list[tuple[str, torch.Tensor]]], path: str) -> None:
    """Same tensor names as the model (one per tied group), each with the expected shape and dtype."""
    for group in expected:
        present = [(name, tensor) for name, tensor in group if name in header]
        if not present:
            raise checkpoint_error(path, WEIGHTS_FILE, f"{group[0][0]} is missing")
        for name, tensor in present:
            _check_header_tensor(name, header[name], tensor, path)
    known = {name for group in expected for name, _ in group}
    extra = sorted(set(header) - known)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise checkpoint_error(path, WEIGHTS_FILE, f"{extra[0]} is not a tensor of this model{more}")


def _check_forms(meta: dict[str, Any], layers: dict[str, dict[str, Any]], path: str) -> Optional[dict[str, str]]:
    """The optional `forms` field: an object mapping layers of `layers` to known form names."""
    forms = meta.get("forms")
    if forms is None:
        return None
    _typed(forms, dict, "forms", path)
    for name, form in forms.items():
        if name not in layers:
            raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"forms names {name!r}, which is not in layers")
        if form not in FORMS:
            raise checkpoint_error(path, LOSPARSE_CONFIG_FILE, f"forms[{name!r}] is {form!r}, not one of {', '.join(FORMS)}")
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
        raise checkpoint_error(path, WEIGHTS_FILE, f"{name} has entries outside [0, {neurons}) (min {low}, max {high})")
    if torch.unique(index).numel() != index.numel():
        raise checkpoint_error(path, WEIGHTS_FILE, f"{name} has duplicate entries")
    if bool((index[1:] < index[:-1]).any()):
        raise checkpoint_error(path, WEIGHTS_FILE, f"{name} is not in increasing order")


def _check_kept_indices(layers: dict[str, dict[str, Any]], path: str) -> None:
    """Reads only the kept_index tensors, whose sizes the header check has already bounded."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
        for name, spec in layers.items():
            _check_kept_index(f"{name}.kept_index", f.get_tensor(f"{name}.kept_index"), _num_neurons(spec), path)


def check_checkpoint(path: str, reshape: Optional[Callable[[nn.Module], Any]] = None) -> CheckedCheckpoint:
    """Validate a compact checkpoint directory completely, allocating no real tensor sized by it.

    Every manifest field is checked against allowlists and the model config (built on the meta
    device for its shapes), every tensor of the weights file against the header's shapes and dtypes
    and the kept indices against their layers. Any problem is one `LoSparseUsageError` naming the
    file and the field. Only the values of the weights are left unread: `load` refuses non-finite
    ones as it loads them, so a checkpoint that passes both computes what was saved.

    `reshape(skeleton)`: called on the model config.json builds before its layers are compared with the
    manifest, for checkpoints whose shapes config.json does not say (a structurally pruned model's kept heads
    and FFN widths, applied by its loader).
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
    if reshape is not None:
        reshape(skeleton)
    layers = _check_layers(meta, skeleton, path)
    forms = _check_forms(meta, layers, path)
    _check_header(_read_header(path), expected_tensors(skeleton, layers), path)
    _check_kept_indices(layers, path)
    return CheckedCheckpoint(path, model_class, model_config, generation_config, dtype, losparse_config, layers,
                             base_model=provenance["base_model"], losparse_version=provenance["losparse_version"],
                             forms=forms)

# --- load: the compact model built at its checked shapes, only its real tensors materialised -------------

