"""Export a dense or LoSparse compact model to ONNX, and check it with onnxruntime (extra `losparse[onnx]`).

    path = export_onnx(model, "model.onnx", {"input_ids": ids, "attention_mask": mask})
    check = compare_with_onnxruntime(model, path, other_inputs)   # {"max_abs_diff": ..., ...}

Exporter: torch's TorchScript exporter (`torch.onnx.export(..., dynamo=False)`). It is still in
torch 2.13, needs nothing beyond torch (the dynamo exporter needs `onnxscript` and its own
dependencies) and gives dynamic batch and sequence axes through `dynamic_axes`; it traces the model,
so the Python control flow is fixed by the example inputs (for encoders it depends on no shape).

Compact layers: the layer's forward scatters the kept S rows with `index_add_`, which this exporter
turns into a ScatterElements whose update shape is frozen to the example's (a different batch or
sequence length then fails in onnxruntime), and it warns that it drops the in-place mutation. So
during export each `CompactLoSparseLinear` is swapped (then restored) for `OnnxCompactLinear`, which
computes the same y with export-friendly ops: for prune_dim rows the scatter becomes a gather,
y = (x·Vᵀ)·Uᵀ + b + (x·[S_kept; 0]ᵀ)[:, gather_index], gather_index[n] = the kept position of
neuron n, or m (the appended zero row's column) for a neuron without a kept S row; V and S_kept are
separate weights in the file because onnxruntime would copy every slice of a fused z. For prune_dim
columns the layer's own ops (a Gather of the kept inputs, Concat, MatMul) export. Both are computed transposed
(features first, tokens last): onnxruntime gathers whole rows at memory speed, while a Gather along
the last axis took as long as all the GEMMs (bert-base, 2 layers, 1 × 128 tokens, 1 thread: compact
74 → 46 ms, dense 104 ms). Tested on BERT-family encoders (sequence classification); a model
whose outputs hold a KV cache (decoders) is refused with a message.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import CompactLoSparseLinear

#: opsets the exporter takes: 14 has every op a BERT-family encoder needs (Trilu, dynamic Pad/Slice);
#: the TorchScript exporter stops at 20
MIN_OPSET = 14
MAX_OPSET = 20
DEFAULT_OPSET = 17  # LayerNormalization as one node


class OnnxCompactLinear(nn.Module):
    """`CompactLoSparseLinear`'s function, written with ops the TorchScript ONNX exporter handles at any shape.

    x (..., in) → y (..., out), the same y as the layer. Shares the layer's U, bias and (columns) all
    its parameters; for rows it holds V and [S_kept; 0] as their own tensors (a copy of fused_weight,
    alive only during the export).
    """

    def __init__(self, layer: CompactLoSparseLinear) -> None:
        super().__init__()
        self.prune_dim = layer.prune_dim
        self.rank = layer.rank
        self.num_kept = layer.num_kept
        self.bias = layer.bias
        reference = layer.fused_weight
        # only for a layer with neither rank nor kept neurons: y = x·0ᵀ + b keeps the batch shape symbolic
        self.register_buffer("zero_weight", reference.new_zeros(
            layer.out_features, layer.in_features) if layer.rank + layer.num_kept == 0 else None)
        if self.prune_dim == "columns":
            self.low_rank_v = layer.low_rank_v
            self.fused_weight = layer.fused_weight
            self.register_buffer("kept_index", layer.kept_index)
            return
        with torch.no_grad():
            # rows: V and S_kept as two weights (onnxruntime copies every Slice of z, so z is never sliced),
            # S_kept with one zero row appended: its product's last column is the zero the gather needs
            self.low_rank_u = layer.low_rank_u
            self.register_buffer("low_rank_v", layer.fused_weight[:layer.rank].detach().clone())
            zero_row = reference.new_zeros(1, layer.in_features)
            self.register_buffer("sparse_weight", torch.cat([layer.fused_weight[layer.rank:].detach(), zero_row]))
            gather = torch.full((layer.out_features,), layer.num_kept, dtype=torch.long, device=reference.device)
            gather[layer.kept_index] = torch.arange(layer.num_kept, device=reference.device)
        self.register_buffer("gather_index", gather)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.rank
        if self.rank + self.num_kept == 0:
            return F.linear(x, self.zero_weight, self.bias)
        # in the transposed space (features first) the scatter/gather is a Gather of whole rows, which
        # onnxruntime does at memory speed; a Gather along the last axis costs as much as the GEMMs
        rows = x.reshape(-1, x.shape[-1]).t()  # (in, M)
        if self.prune_dim == "columns":
            parts = [self.low_rank_v @ rows] if rank else []
            if self.num_kept:
                parts.append(rows.index_select(0, self.kept_index))
            y_t = self.fused_weight @ torch.cat(parts, dim=0)  # (out, M)
            if self.bias is not None:
                y_t = y_t + self.bias[:, None]
            return y_t.t().reshape(x.shape[:-1] + (y_t.shape[0],))
        y_t = self.low_rank_u @ (self.low_rank_v @ rows) if rank else None  # (out, M)
        if self.num_kept:
            scattered = (self.sparse_weight @ rows).index_select(0, self.gather_index)
            y_t = scattered if y_t is None else y_t + scattered
        if self.bias is not None:
            y_t = y_t + self.bias[:, None]
        return y_t.t().reshape(x.shape[:-1] + (y_t.shape[0],))


@contextlib.contextmanager
def export_friendly_compact_layers(model: nn.Module) -> Iterator[int]:
    """Swap every `CompactLoSparseLinear` of `model` for an `OnnxCompactLinear` inside the block; yields the count.

    The original layers are put back on exit, also after an error.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, CompactLoSparseLinear):
                    setattr(parent, name, OnnxCompactLinear(child))
                    swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def _check_arguments(path: str, example_inputs: Any, opset: Optional[int]) -> int:
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise LoSparseUsageError(f"export_onnx: example_inputs must be a non-empty dict of tensors "
                                 f"(name -> tensor), got {type(example_inputs).__name__}")
    for name, value in example_inputs.items():
        if not isinstance(value, torch.Tensor):
            raise LoSparseUsageError(f"export_onnx: example_inputs[{name!r}] is a {type(value).__name__}; "
                                     "give tensors only")
    if os.path.isdir(path):
        raise LoSparseUsageError(f"export_onnx: path {path!r} is a directory; give the .onnx file to write")
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise LoSparseUsageError(f"export_onnx: opset {opset!r}; allowed: an integer from {MIN_OPSET} to {MAX_OPSET}")
    return opset


def _output_items(output: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors the exporter will write, in its order: a ModelOutput's non-None fields, or a tuple's items."""
    if isinstance(output, torch.Tensor):
        return [("output", output)]
    if hasattr(output, "items"):
        items = [(k, v) for k, v in output.items() if v is not None]
    else:
        items = [(f"output_{i}", v) for i, v in enumerate(output)]
    if not all(isinstance(v, torch.Tensor) for _, v in items):
        kinds = sorted({type(v).__name__ for _, v in items if not isinstance(v, torch.Tensor)})
        raise LoSparseUsageError(f"export_onnx: the model returns {', '.join(kinds)} besides tensors (a KV cache?); "
                                 "only models whose outputs are tensors export (encoders; pass use_cache=False)")
    return items


def export_onnx(model: nn.Module, path: str, example_inputs: dict, opset: Optional[int] = None,
                dynamic_batch_and_seq: bool = True) -> str:
    """Write `model` (dense or compacted by `losparse.compact`) to the ONNX file `path`; returns `path`.

    example_inputs: the forward's keyword tensors, e.g. {"input_ids": (batch, seq), "attention_mask": ...};
    they name the ONNX inputs. Outputs are named after the model's output fields ("logits", ...).
    dynamic_batch_and_seq: axis 0 (batch) and axis 1 (sequence) of every input are symbolic, as are
    the output axes of the same size (axis 0, and axis 1 of outputs with 3+ dimensions), so any batch
    size and length runs; otherwise the graph is fixed to the example shapes. opset defaults to 17.
    The model is traced in eval mode and in fp32/bf16 as it is; its training flag is restored.
    """
    opset = _check_arguments(path, example_inputs, opset)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), export_friendly_compact_layers(model):
            outputs = _output_items(model(**example_inputs))
            input_names = list(example_inputs)
            output_names = [name for name, _ in outputs]
            dynamic_axes = None
            if dynamic_batch_and_seq:
                first = next(iter(example_inputs.values()))
                batch, seq = first.shape[0], (first.shape[1] if first.dim() > 1 else None)
                dynamic_axes = {name: {axis: ("batch", "sequence")[axis] for axis in range(min(2, value.dim()))}
                                for name, value in example_inputs.items()}
                for name, value in outputs:
                    axes = {0: "batch"} if value.dim() and value.shape[0] == batch else {}
                    if value.dim() >= 3 and value.shape[1] == seq:
                        axes[1] = "sequence"
                    dynamic_axes[name] = axes
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            with warnings.catch_warnings():
                # the tracer's notes on shape-dependent Python branches and the exporter's deprecation
                # notice: expected here, and the result is checked against onnxruntime instead
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (), path, kwargs=dict(example_inputs), dynamo=False, opset_version=opset,
                                  input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                                  do_constant_folding=True)
    finally:
        model.train(was_training)
    return path


def onnxruntime_session(path: str, threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session of `path`; `threads` sets intra_op_num_threads (None: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise LoSparseUsageError(f"onnxruntime_session: threads {threads!r}; allowed: a positive integer or None")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_feed(session: Any, inputs: dict) -> dict:
    """The numpy feed of a session: the inputs it declares, from torch tensors (the exporter may drop unused ones)."""
    names = [i.name for i in session.get_inputs()]
    return {name: inputs[name].detach().cpu().numpy() for name in names}


def compare_with_onnxruntime(model: nn.Module, path_or_session: Any, inputs: dict) -> dict[str, Any]:
    """Run torch and onnxruntime on `inputs`: {"max_abs_diff", "max_rel_diff", "output_scale", "compared"}.

    max_abs_diff is the largest |torch − onnxruntime| over every output the file declares (in fp32).
    """
    session = onnxruntime_session(path_or_session) if isinstance(path_or_session, (str, os.PathLike)) \
        else path_or_session
    with torch.no_grad():
        reference = dict(_output_items(model(**inputs)))
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, onnx_feed(session, inputs))
    worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "output_scale": 0.0, "compared": ",".join(names)}
    for name, value in zip(names, values):
        expected = reference[name].detach().float().cpu()
        got = torch.from_numpy(value).float()
        if got.shape != expected.shape:
            raise AssertionError(f"onnxruntime output {name!r} has shape {tuple(got.shape)}, "
                                 f"torch's {tuple(expected.shape)}")
        diff = float((got - expected).abs().max()) if got.numel() else 0.0
        scale = float(expected.abs().max()) if got.numel() else 0.0
        worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
        worst["max_rel_diff"] = max(worst["max_rel_diff"], diff / max(scale, 1e-12))
        worst["output_scale"] = max(worst["output_scale"], scale)
    return worst
