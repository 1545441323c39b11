"""A per-layer dispatcher: each compact layer runs in whichever exact form is fastest on this device.

The compact two-GEMM form is the smallest, but at small shapes (few tokens, a high kept ratio, a GPU
that prefers one big GEMM) one merged dense matrix can be faster. `optimize` measures, at the shape
each layer really sees (captured by a forward pre-hook during one forward of `example_inputs`):
  "compact"  `CompactLoSparseLinear.forward` (two GEMMs and a scatter/gather or slice),
  "dense"    one GEMM with the merged matrix U·V + S (`dense_weight()`, as a `make_dense` layer),
  "triton"   the fused kernel `losparse.deploy.kernels.triton_compact.fused_compact_forward` (CUDA only),
and puts the winner in place. A form that costs no extra memory wins ties: compact or triton is taken
unless dense is faster by `dense_margin` (default 5 %); between compact and triton the faster one,
compact within `tie_margin`. Every form is checked against the compact output before it may be chosen.

A non-compact choice becomes a `DispatchedCompactLinear`: a subclass of `CompactLoSparseLinear` that
keeps the compact tensors (so `losparse.save` writes the same checkpoint, `merge` and `parameter_report`
work unchanged) and runs the chosen form; a dense one also holds the merged (out, in) matrix as a
non-persistent buffer, its size cost. The choices are recorded as `model.losparse_forms` (layer name ->
form), which `losparse.save` writes to the manifest and `losparse.load` re-applies without measuring.
Inference only: the dense buffer is not updated if the compact tensors are trained further.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from losparse.core.decompose import losparse_layers, set_submodule
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import CompactLoSparseLinear, make_dense

#: The forms a compact layer can run in.
FORMS = ("compact", "dense", "triton")
#: Relative output difference above which a form is considered broken (and never chosen), by dtype.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_HALF_TOLERANCE = 5e-2


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the fused Triton kernel can run on `device`, else why not (one line)."""
    if device.type != "cuda":
        return f"the Triton kernel runs on CUDA only (layers are on {device.type})"
    try:
        from losparse.deploy.kernels import triton_available
    except ImportError as exc:
        return f"losparse.deploy.kernels cannot be imported ({exc})"
    if not triton_available():
        return "triton is not installed or cannot run here"
    return None


_FUSED_FORWARD: Optional[Callable[[CompactLoSparseLinear, torch.Tensor], torch.Tensor]] = None


def _fused_forward() -> Callable[[CompactLoSparseLinear, torch.Tensor], torch.Tensor]:
    """`fused_compact_forward`, imported on first use (triton is optional)."""
    global _FUSED_FORWARD
    if _FUSED_FORWARD is None:
        from losparse.deploy.kernels.triton_compact import fused_compact_forward  # optional dependency (triton)

        _FUSED_FORWARD = fused_compact_forward
    return _FUSED_FORWARD


class DispatchedCompactLinear(CompactLoSparseLinear):
    """A compact layer that runs as `form` ("dense" or "triton"); same tensors and state_dict as the compact one.

    form "dense": y = x·Wᵀ + b with W = `dense_weight()` (out, in), held in the non-persistent buffer
    `merged_weight` (not saved: `losparse.save` writes the compact tensors, `load` rebuilds W).
    form "triton": y = `fused_compact_forward(self, x)`.
    """

    @classmethod
    @torch.no_grad()
    def from_compact(cls, layer: CompactLoSparseLinear, form: str) -> "DispatchedCompactLinear":
        """A dispatched layer sharing `layer`'s parameters and buffers (nothing is copied but W for dense)."""
        if form not in ("dense", "triton"):
            raise LoSparseUsageError(f"form {form!r} is not one of dense, triton (compact layers are used as they are)")
        if isinstance(layer, DispatchedCompactLinear):
            layer = layer.as_compact()
        meta = torch.device("meta")
        dispatched = cls(layer.in_features, layer.out_features, layer.rank, layer.num_kept,
                         bias=layer.bias is not None, prune_dim=layer.prune_dim, device=meta,
                         dense_type=layer.dense_type)
        dispatched._parameters = dict(layer._parameters)
        dispatched._buffers = dict(layer._buffers)
        dispatched.kept_start = layer.kept_start
        dispatched.form = form
        dispatched.train(layer.training)
        if form == "dense":
            dispatched.register_buffer("merged_weight", layer.dense_weight().contiguous(), persistent=False)
        return dispatched

    def as_compact(self) -> CompactLoSparseLinear:
        """The plain compact layer (sharing this one's tensors), e.g. to dispatch it anew."""
        meta = torch.device("meta")
        compact = CompactLoSparseLinear(self.in_features, self.out_features, self.rank, self.num_kept,
                                        bias=self.bias is not None, prune_dim=self.prune_dim, device=meta,
                                        dense_type=self.dense_type)
        compact._parameters = dict(self._parameters)
        compact._buffers = {name: value for name, value in self._buffers.items() if name != "merged_weight"}
        compact.kept_start = self.kept_start
        compact.train(self.training)
        return compact

    @torch.no_grad()
    def refresh_layout(self) -> Optional[int]:
        """As the compact layer's, and a dense form rebuilds its merged matrix: this runs whenever the compact
        tensors were changed in place (`load_state_dict`, `losparse.make_contiguous`)."""
        start = super().refresh_layout()
        if getattr(self, "form", None) == "dense" and not self.fused_weight.is_meta:
            self.merged_weight = self.dense_weight().contiguous()
        return start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "dense":
            return F.linear(x, self.merged_weight, self.bias)
        return _fused_forward()(self, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, form={self.form}"


def form_of(layer: nn.Module) -> str:
    """The form a LoSparse compact layer runs in."""
    return layer.form if isinstance(layer, DispatchedCompactLinear) else "compact"


def check_forms(forms: Any, where: str = "forms") -> tuple[str, ...]:
    """`forms` as a tuple of known form names; a usage error naming a bad one and the allowed ones."""
    if isinstance(forms, str) or not isinstance(forms, Sequence) or not forms:
        raise LoSparseUsageError(f"{where} must be a non-empty sequence of form names from {', '.join(FORMS)}, "
                                 f"not {forms!r}")
    for form in forms:
        if form not in FORMS:
            raise LoSparseUsageError(f"{where}: form {form!r} is not one of {', '.join(FORMS)}")
    return tuple(dict.fromkeys(forms))


def _form_callable(layer: CompactLoSparseLinear, form: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """(x -> y in that form, extra parameters it holds beyond the compact tensors). Module `forward`s are
    called directly, so the measuring hook on the compact layer is not part of its time."""
    if form == "compact":
        return layer.forward, 0
    if form == "dense":
        dense = make_dense("linear", layer.dense_weight(), layer.bias)
        return dense.forward, layer.out_features * layer.in_features
    fused = _fused_forward()
    return (lambda x: fused(layer, x)), 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Seconds per call of `repeats` back-to-back calls (one synchronisation at each end)."""
    _synchronize(x.device)
    start = time.perf_counter()
    for _ in range(repeats):
        run(x)
    _synchronize(x.device)
    return (time.perf_counter() - start) / repeats


def _relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.float(), other.float()
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    diff = float((reference - other).abs().max()) if reference.numel() else 0.0
    return diff / max(scale, 1e-12)


@torch.no_grad()
def _measure_layer(layer: CompactLoSparseLinear, x: torch.Tensor, forms: tuple[str, ...], repeats: int,
                   warmup: int, rounds: int) -> dict[str, Any]:
    """Time every usable form on input x (rounds interleaved across forms, the best round kept)."""
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    extra: dict[str, int] = {}
    rejected: dict[str, str] = {}
    reference = layer.forward(x)
    tolerance = _TOLERANCE.get(x.dtype, _HALF_TOLERANCE)
    for form in forms:
        try:
            run, extra[form] = _form_callable(layer, form)
            difference = _relative_difference(reference, run(x))
        except Exception as exc:  # a kernel refusing a shape or dtype is a measurement result, not a failure
            rejected[form] = f"{type(exc).__name__}: {exc}"
            continue
        if difference > tolerance:
            rejected[form] = f"output differs from compact by {difference:.2e} (relative) > {tolerance:.0e}"
            continue
        runs[form] = run
    for run in runs.values():
        for _ in range(warmup):
            run(x)
    samples: dict[str, list[float]] = {form: [] for form in runs}
    for _ in range(rounds):
        for form, run in runs.items():
            samples[form].append(_time_calls(run, x, repeats))
    times_ms = {form: 1e3 * min(values) for form, values in samples.items()}
    spread = {form: (statistics.pstdev(values) / statistics.mean(values) if len(values) > 1 else 0.0)
              for form, values in samples.items()}
    return {"times_ms": times_ms, "spread": spread, "extra_params": extra, "rejected": rejected}


def choose_form(times_ms: dict[str, float], dense_margin: float = 0.05, tie_margin: float = 0.02) -> str:
    """The form to run: the faster of compact/triton (compact within `tie_margin`), dense only if it beats
    that by more than `dense_margin`; with only one form measured, that one."""
    small = [form for form in ("compact", "triton") if form in times_ms]
    if not small:
        return "dense"
    best = small[0]
    if len(small) == 2 and times_ms["triton"] < times_ms["compact"] * (1 - tie_margin):
        best = "triton"
    if "dense" in times_ms and times_ms["dense"] < times_ms[best] * (1 - dense_margin):
        return "dense"
    return best


def _capture_and_measure(model: nn.Module, layers: list[tuple[str, CompactLoSparseLinear]],
                         example_inputs: dict[str, Any], measure: Callable[[str, CompactLoSparseLinear,
                                                                              torch.Tensor], None]) -> None:
    """One forward of `example_inputs`; each layer is measured in its pre-hook, on its live input (first call),
    so no activation is kept beyond the layer that is being timed."""
    done: set[str] = set()

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in done:
                done.add(name)
                measure(name, module, args[0])
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers]
    try:
        with torch.no_grad():
            model(**example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, _ in layers if name not in done]
    if missing:
        raise LoSparseUsageError(f"example_inputs never reach {missing[0]} (and {len(missing) - 1} more layers); "
                                 "pass inputs that run the whole model (e.g. decoder_input_ids for seq2seq)")


def apply_forms(model: nn.Module, forms: dict[str, str], strict: bool = True) -> dict[str, str]:
    """Put each named compact layer into its recorded form (no measuring); returns the forms applied.

    A "triton" form where the kernel cannot run falls back to "compact" (the result is the same function)
    unless `strict`. Sets `model.losparse_forms`.
    """
    layers = dict(losparse_layers(model))
    for name, form in forms.items():
        if name not in layers or not isinstance(layers[name], CompactLoSparseLinear):
            raise LoSparseUsageError(f"forms: {name!r} is not a compact LoSparse layer of this model")
        if form not in FORMS:
            raise LoSparseUsageError(f"forms[{name!r}]: form {form!r} is not one of {', '.join(FORMS)}")
    applied: dict[str, str] = {}
    for name, layer in layers.items():
        form = forms.get(name, form_of(layer))
        if form == "triton":
            reason = triton_unavailable_reason(layer.kept_index.device)
            if reason is not None:
                if strict:
                    raise LoSparseUsageError(f"forms[{name!r}] is 'triton', but {reason}")
                form = "compact"
        if form != form_of(layer):
            base = layer.as_compact() if isinstance(layer, DispatchedCompactLinear) else layer
            set_submodule(model, name, base if form == "compact" else DispatchedCompactLinear.from_compact(base, form))
        applied[name] = form
    model.losparse_forms = applied
    return applied


def optimize(model: nn.Module, example_inputs: dict[str, Any], forms: Sequence[str] = FORMS, repeats: int = 20,
             warmup: int = 3, rounds: int = 3, dense_margin: float = 0.05) -> dict[str, Any]:
    """Measure every compact layer of `model` in each of `forms` at its real input shape, keep the fastest.

    example_inputs: keyword arguments of one forward (`model(**example_inputs)`), on the model's device,
    shaped like the intended workload (the timing is only as representative as they are).
    forms: any of FORMS; "triton" is skipped (noted in the report) where the kernel cannot run.
    repeats/warmup/rounds: calls per timing, untimed calls first, interleaved timings per form (best kept).
    dense_margin: dense must be this much faster than the best memory-free form to be chosen.

    Replaces layers in place (see the module docstring), records `model.losparse_forms`, and returns a
    report: `device`, `forms` (those measured), `skipped_forms` (form -> why), per layer in `layers`
    (name, shape (out, in), input shape, num_kept, rank, chosen `form`, `times_ms` per form, `rejected`
    forms with the reason, `extra_params` of the choice) and totals (`total_extra_params`, `compact_params`,
    `chosen` counts, `total_time_ms` per form and for the choices).
    """
    forms = check_forms(forms)
    _check_measure_arguments(example_inputs, repeats, warmup, rounds, dense_margin)
    layers = _compact_layers(model)
    device = layers[0][1].kept_index.device
    usable, skipped = _usable_forms(forms, device)
    for name, layer in layers:  # measure and re-dispatch from the compact form
        set_submodule(model, name, layer)
    results = _measure_all(model, layers, example_inputs, usable, repeats, warmup, rounds)
    rows, chosen = _choose_forms(layers, results, forms, dense_margin)
    apply_forms(model, chosen)
    return _optimize_report(device, usable, skipped, rows)


def _check_measure_arguments(example_inputs: Any, repeats: Any, warmup: Any, rounds: Any, dense_margin: Any) -> None:
    """`optimize`'s argument errors (as usage errors naming the argument), before anything is measured."""
    for value, name in ((repeats, "repeats"), (rounds, "rounds")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LoSparseUsageError(f"optimize({name}={value!r}): expected a positive integer")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise LoSparseUsageError(f"optimize(warmup={warmup!r}): expected an integer >= 0")
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise LoSparseUsageError("optimize(example_inputs=...) must be a non-empty dict of forward keyword arguments")
    if not 0 <= dense_margin < 1:
        raise LoSparseUsageError(f"optimize(dense_margin={dense_margin!r}): expected a fraction in [0, 1)")


def _compact_layers(model: nn.Module) -> list[tuple[str, CompactLoSparseLinear]]:
    """(name, plain compact layer) for every LoSparse layer of a compact model; a dispatched layer comes back
    as the compact layer sharing its tensors (not yet put in the model), so every form is measured anew."""
    found = losparse_layers(model)
    layers = [(name, layer) for name, layer in found if isinstance(layer, CompactLoSparseLinear)]
    if not layers or len(layers) != len(found):
        raise LoSparseUsageError("optimize needs a compact model: call losparse.compact(model) first")
    return [(name, layer.as_compact() if isinstance(layer, DispatchedCompactLinear) else layer)
            for name, layer in layers]


def _usable_forms(forms: tuple[str, ...], device: torch.device) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the forms that can run on `device`, form -> why not for the others); none usable is a usage error.

    Only "triton" can be unavailable (CUDA and an importable triton); compact and dense always run."""
    skipped: dict[str, str] = {}
    if "triton" in forms:
        reason = triton_unavailable_reason(device)
        if reason is not None:
            skipped["triton"] = reason
    usable = tuple(form for form in forms if form not in skipped)
    if not usable:
        raise LoSparseUsageError(f"optimize(forms={forms!r}): no form can run here ({'; '.join(skipped.values())})")
    return usable, skipped


def _measure_all(model: nn.Module, layers: list[tuple[str, CompactLoSparseLinear]], example_inputs: dict[str, Any],
                 usable: tuple[str, ...], repeats: int, warmup: int, rounds: int) -> dict[str, dict[str, Any]]:
    """name -> `_measure_layer`'s result plus `input_shape`, each layer timed on its live input during one
    forward of `example_inputs` in eval mode (the model's training flag is restored afterwards)."""
    results: dict[str, dict[str, Any]] = {}

    def measure(name: str, layer: CompactLoSparseLinear, x: torch.Tensor) -> None:
        results[name] = {"input_shape": list(x.shape), **_measure_layer(layer, x, usable, repeats, warmup, rounds)}

    was_training = model.training
    model.eval()
    try:
        _capture_and_measure(model, layers, example_inputs, measure)
    finally:
        model.train(was_training)
    return results


def _choose_forms(layers: list[tuple[str, CompactLoSparseLinear]], results: dict[str, dict[str, Any]],
                  forms: tuple[str, ...], dense_margin: float) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(one report row per layer, name -> chosen form); a layer with no correct form is a usage error."""
    rows = []
    chosen: dict[str, str] = {}
    for name, layer in layers:
        result = results[name]
        if not result["times_ms"]:
            raise LoSparseUsageError(f"optimize: no form of {forms!r} computes {name} correctly here "
                                     f"({'; '.join(f'{k}: {v}' for k, v in result['rejected'].items())})")
        form = choose_form(result["times_ms"], dense_margin)
        chosen[name] = form
        rows.append({"name": name, "shape": [layer.out_features, layer.in_features],
                     "input_shape": result["input_shape"], "rank": layer.rank, "num_kept": layer.num_kept,
                     "prune_dim": layer.prune_dim, "form": form, "times_ms": result["times_ms"],
                     "rejected": result["rejected"], "extra_params": result["extra_params"][form],
                     "compact_params": sum(p.numel() for n, p in layer.named_parameters() if n != "bias")})
    return rows, chosen


def _optimize_report(device: torch.device, usable: tuple[str, ...], skipped: dict[str, str],
                     rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`optimize`'s report from the per-layer rows: counts and totals (a form's total time only where every
    layer measured it)."""
    measured = [form for form in usable if all(form in row["times_ms"] for row in rows)]
    return {
        "device": str(device),
        "forms": list(usable),
        "skipped_forms": skipped,
        "layers": rows,
        "num_layers": len(rows),
        "chosen": {form: sum(row["form"] == form for row in rows) for form in FORMS},
        "total_extra_params": sum(row["extra_params"] for row in rows),
        "compact_params": sum(row["compact_params"] for row in rows),
        "total_time_ms": {**{form: sum(row["times_ms"][form] for row in rows) for form in measured},
                          "chosen": sum(row["times_ms"][row["form"]] for row in rows)},
    }


def format_optimize_report(report: dict[str, Any]) -> str:
    """`optimize`'s report as a fixed-width table (one row per layer, then the totals), for logs."""
    forms = report["forms"]
    name_width = max([len("layer")] + [len(row["name"]) for row in report["layers"]])
    header = (f"{'layer':<{name_width}}  {'out x in':>11}  {'kept':>6}  {'form':>7}  "
              + "  ".join(f"{form + ' ms':>10}" for form in forms) + f"  {'extra params':>12}")
    lines = [f"per-layer forms on {report['device']}", header, "-" * len(header)]
    for row in report["layers"]:
        times = "  ".join(f"{row['times_ms'][form]:>10.4f}" if form in row["times_ms"] else f"{'-':>10}"
                          for form in forms)
        shape = f"{row['shape'][0]}x{row['shape'][1]}"
        lines.append(f"{row['name']:<{name_width}}  {shape:>11}  {row['num_kept']:>6}  {row['form']:>7}  {times}"
                     f"  {row['extra_params']:>12,}")
    lines.append("-" * len(header))
    totals = "  ".join(f"{report['total_time_ms'][form]:>10.4f}" if form in report["total_time_ms"] else f"{'-':>10}"
                       for form in forms)
    lines.append(f"{'total':<{name_width}}  {'':>11}  {'':>6}  {'':>7}  {totals}  {report['total_extra_params']:>12,}")
    counts = ", ".join(f"{form} {count}" for form, count in report["chosen"].items() if count)
    lines.append(f"chosen: {counts}; sum of chosen layer times {report['total_time_ms']['chosen']:.4f} ms; extra "
                 f"params {report['total_extra_params']:,} beside {report['compact_params']:,} compact")
    for form, reason in report["skipped_forms"].items():
        lines.append(f"skipped {form}: {reason}")
    return "\n".join(lines)

