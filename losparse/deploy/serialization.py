"""Save and load compact checkpoints: `save` writes the format `losparse.deploy.validation` defines, `load`
rebuilds the exact compact model from it, offline, materialising only the real tensors.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import struct
import sys
from typing import Any, Callable, Iterator, Optional, Union

import torch
from safetensors.torch import save_model
from torch import nn

from losparse._version import __version__
from losparse.core.decompose import get_config, losparse_layers
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import LoSparseLinear
from losparse.deploy.compact import compact, parameter_report
from losparse.deploy.dispatch import apply_forms
from losparse.deploy.dispatch import optimize as optimize_forms
from losparse.deploy.validation import (
    FORMAT_VERSION,
    LOSPARSE_CONFIG_FILE,
    MODEL_CONFIG_FILE,
    MODEL_DTYPES,
    WEIGHTS_FILE,
    CheckedCheckpoint,
    check_checkpoint,
    checkpoint_error,
    expected_tensors,
)


def _base_model_name(model: nn.Module, base_model: Optional[str]) -> Optional[str]:
    """The manifest's `base_model`: the one given, else the `compressed_from` of a loaded compact model, else
    the model config's `name_or_path` (None when neither names anything)."""
    if base_model is None:
        base_model = (model.compressed_from if hasattr(model, "compressed_from")
                      else getattr(model.config, "name_or_path", None)) or None
    return None if base_model is None else os.fspath(base_model)


def _save_model_configs(model: nn.Module, path: str) -> None:
    """config.json (naming the model's class) and, for a generating model, generation_config.json; from copies."""
    model_config = copy.deepcopy(model.config)
    model_config.architectures = [type(model).__name__]
    model_config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        copy.deepcopy(model.generation_config).save_pretrained(path)


def _manifest(model: nn.Module, config: Any, base_model: Optional[str]) -> dict[str, Any]:
    """The content of losparse_config.json for compact `model` compressed with `config`."""
    layer_names = {name for name, _ in losparse_layers(model)}
    forms = {name: form for name, form in (getattr(model, "losparse_forms", None) or {}).items() if name in layer_names}
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
    return meta


def save(model: nn.Module, path: str, tokenizer: Any = None, base_model: Optional[str] = None) -> str:
    """Write a compact checkpoint of `model` to directory `path` (created if needed); returns `path`.

    A model still in training form is compacted on a copy, and the model's config is written from a
    copy too, so the caller's model is left exactly as it is. Only the files named in the module
    docstring (and the tokenizer, if given) are written.

    base_model: where the dense model came from (hub name or path), recorded in the manifest; by
    default the `compressed_from` of a model that `load` returned (so a re-saved compact model keeps
    naming the dense model, not the compact checkpoint), else the model config's `name_or_path`.
    """
    config = get_config(model)
    base_model = _base_model_name(model, base_model)
    if any(isinstance(layer, LoSparseLinear) for _, layer in losparse_layers(model)):
        model = compact(copy.deepcopy(model))
    os.makedirs(path, exist_ok=True)
    _save_model_configs(model, path)
    meta = _manifest(model, config, base_model)
    with open(os.path.join(path, LOSPARSE_CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    save_model(model, os.path.join(path, WEIGHTS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


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
            raise checkpoint_error(path, WEIGHTS_FILE, f"changed while loading ({exc})") from None
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
            raise checkpoint_error(self.path, WEIGHTS_FILE, f"{name} changed while loading")
        tensor = torch.empty(tuple(expected.shape), dtype=dtype)
        begin, end = offsets
        nbytes = tensor.numel() * tensor.element_size()
        if end - begin != nbytes:
            raise checkpoint_error(self.path, WEIGHTS_FILE, f"{name} changed while loading")
        if nbytes:
            target = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            self.file.seek(self.data_start + begin)
            filled = 0
            while filled < nbytes:
                count = self.file.readinto(target[filled:])
                if not count:
                    raise checkpoint_error(self.path, WEIGHTS_FILE, f"{name} changed while loading (file too short)")
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
            raise checkpoint_error(path, WEIGHTS_FILE, f"{name} has non-finite values (NaN or inf)")
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


def _weightless_model(checked: CheckedCheckpoint, path: str) -> nn.Module:
    """The checkpoint's model class built from its config, parameters on the meta device (buffers real)."""
    try:
        with _parameters_on_meta():
            return checked.model_class(copy.deepcopy(checked.model_config))
    except Exception as exc:  # as in `_meta_skeleton`: the model code may reject the config with any error type
        raise checkpoint_error(path, MODEL_CONFIG_FILE, f"{checked.model_class.__name__} cannot be built from it "
                                              f"({type(exc).__name__}: {exc})") from None


def _read_weights(model: nn.Module, groups: list[list[tuple[str, torch.Tensor]]], path: str, dtype: torch.dtype,
                  device: Optional[torch.device]) -> None:
    """Fill `model` from the weights file, one tensor per group of tied names (`expected_tensors`)."""
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


def load(path: str, device: Optional[Union[str, torch.device]] = None,
         dtype: Union[None, str, torch.dtype] = None, optimize: Optional[bool] = None,
         example_inputs: Optional[dict[str, Any]] = None,
         reshape: Optional[Callable[[nn.Module], Any]] = None) -> nn.Module:
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

    reshape: for a model whose shapes config.json does not say (structurally pruned first), a function
    giving the freshly built model its real shapes; it runs on the validation skeleton and on the model.
    """
    if example_inputs is not None and optimize is False:
        raise LoSparseUsageError("load(optimize=False, example_inputs=...): example_inputs are for measuring; "
                                 "drop them or pass optimize=True")
    checked = check_checkpoint(path, reshape=reshape)
    if optimize is True and example_inputs is None and not checked.forms:
        raise LoSparseUsageError(f"load({path!r}, optimize=True): the checkpoint records no forms; pass "
                                 "example_inputs=... to measure them")
    dtype = _load_dtype(dtype, checked)
    device = torch.device(device) if device is not None else None
    if sys.byteorder != "little":  # safetensors stores little-endian bytes, which `_WeightsReader` copies as they are
        raise LoSparseUsageError("losparse.load reads safetensors files on little-endian machines only")
    model = _weightless_model(checked, path)
    if reshape is not None:
        reshape(model)
    groups = expected_tensors(model, checked.layers)  # also puts the (meta) compact layers in place
    _read_weights(model, groups, path, dtype, device)
    # What the file does not hold (non-persistent buffers) was computed by the constructor: give it the
    # dtype and device of the rest, as `model.to` did before (a no-op for the tensors loaded above).
    model.to(device=device, dtype=dtype)
    return _finish_loaded(model, checked, path, optimize, example_inputs)


def _finish_loaded(model: nn.Module, checked: CheckedCheckpoint, path: str, optimize: Optional[bool],
                   example_inputs: Optional[dict[str, Any]]) -> nn.Module:
    """`load`'s last steps: nothing left on meta, the recorded configs attached, eval mode, the forms applied."""
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
        model.losparse_optimize_report = optimize_forms(model, example_inputs)
    elif checked.forms and optimize is not False:
        apply_forms(model, checked.forms, strict=False)
    return model
