"""Knowledge distillation for LoSparse (paper §4.5, Appendix E): a fine-tuned teacher guides the student.

    loss = task loss + alpha_output · KL(p_teacher ‖ p_student at temperature T) · T²
                     + alpha_layer  · Σ_(s,t) in layer_map MSE(student hidden_states[s], teacher hidden_states[t])

The student is the model being compressed; the teacher is any fine-tuned checkpoint with the same
hidden size (`load_teacher` reads a plain transformers checkpoint or a LoSparse compact one). Two
stages, selected by `DistillationArguments.distill_stage`:

  during  distil while LoSparse prunes: `compose_trainer(base, prune=True, distill=True)`.
  after   a second stage on an already compressed checkpoint (what the public reference code does:
          Appendix E.2 "we first prune the model ... then conduct layer-wise distillation"): the student
          is a compact model from `losparse.load`, trained without the pruner:
          `compose_trainer(base, prune=False, distill=True)`.

`losparse.compose_trainer` (losparse/training/trainer.py) puts `DistillationTrainerMixin` in front of any task
trainer (`Trainer`, `Seq2SeqTrainer`, the QA trainer), after `LoSparseTrainerMixin` when it also prunes.
`DistillationTrainerMixin.compute_loss` adds `distillation_loss(...)["total"]` to the task loss, and
only while the model trains: evaluation losses stay the plain task loss, comparable with runs without
a teacher.

Reduction rules (`output_distillation_loss`, `layer_distillation_loss`):
  * Logits: the last dimension is the class dimension. A tuple of logits (extractive QA start/end)
    averages the KL over its members. Every other dimension is a "position"; the KL is summed over
    classes and averaged over positions (`batchmean` for (batch, classes) logits). With more than one
    leading dimension (token classification, seq2seq decoder logits) positions whose label is -100 are
    ignored when `labels` has the logits' leading shape; otherwise, padding is ignored when
    `attention_mask` has that shape; otherwise every position counts. A class dimension of size 1
    (regression, e.g. STS-B) has no distribution to match: the MSE between the logits is used instead.
  * Hidden states: for each mapped pair, the squared difference is averaged over the hidden dimension
    and over the non-padding tokens (`attention_mask`), or over all tokens without a mask; the pairs'
    terms are summed. Encoder-decoder models give an encoder and a decoder stack, each with its own
    padding mask (`hidden_state_masks`); their terms are summed too. Hidden sizes must match: there is
    no learned projection yet.
  * A term whose alpha is 0 is not computed (reported as 0): the teacher's hidden states are not even
    requested then.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import LoSparseLinear
from losparse.deploy.serialization import load
from losparse.deploy.validation import LOSPARSE_CONFIG_FILE
from losparse.training.pickles import check_model_weights, unsafe_pickle_error
from losparse.training.trainer import LoSparseTrainerMixin, declare_loss_kwargs, refuse_positional

logger = logging.getLogger(__name__)

DISTILL_STAGES = ("during", "after")
IGNORE_INDEX = -100
_LAYER_MAP_ENTRY = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]
#: One stack of hidden states (embeddings, layer 1, ...) or named stacks ({"encoder": ..., "decoder": ...}).
HiddenStates = Union[Sequence[torch.Tensor], Mapping[str, Sequence[torch.Tensor]]]


@dataclass
class DistillationArguments:
    """Knowledge distillation from a fine-tuned teacher (paper §4.5, Appendix E; Tables 12–13)."""

    teacher_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Fine-tuned teacher: hub id or local directory (a transformers checkpoint or a LoSparse "
                          "compact one). Needed when --alpha_output or --alpha_layer is > 0."},
    )
    alpha_output: float = field(
        default=0.0,
        metadata={"help": "Weight of the output distillation loss KL(teacher || student logits at "
                          "--distill_temperature) x T^2 (paper: alpha_output). 0 disables it."},
    )
    alpha_layer: float = field(
        default=0.0,
        metadata={"help": "Weight of the layer-wise distillation loss, the sum over mapped layers of the MSE "
                          "between hidden states (paper: alpha_layer). 0 disables it."},
    )
    distill_temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of the output distillation loss (> 0)."}
    )
    layer_map: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Hidden-state pairs 'student_layer:teacher_layer' (0 = embeddings, i = output of "
                          "layer i), e.g. --layer_map 0:0 1:2 2:4. Default: identity for equal depths, else "
                          "student layer i -> teacher layer round(i*T/S). In YAML, quote the entries."},
    )
    distill_stage: str = field(
        default="during",
        metadata={"help": f"One of: {', '.join(DISTILL_STAGES)}. 'during': distil while pruning; 'after': a "
                          "second stage on an already compressed checkpoint (--model_name_or_path a LoSparse "
                          "compact checkpoint; no pruning)."},
    )

    def __post_init__(self) -> None:
        for name in ("alpha_output", "alpha_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise LoSparseUsageError(
                    f"--{name} {value!r} is not allowed; it must be a finite float >= 0 (0 disables that term)"
                )
            setattr(self, name, float(value))
        temperature = self.distill_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise LoSparseUsageError(f"--distill_temperature {temperature!r} is not allowed; it must be a float > 0")
        self.distill_temperature = float(temperature)
        if self.distill_stage not in DISTILL_STAGES:
            raise LoSparseUsageError(
                f"--distill_stage {self.distill_stage!r} is not allowed; use 'during' (distil while pruning) or "
                "'after' (second stage on an already compressed checkpoint)"
            )
        if self.layer_map is not None:
            self.layer_map = [_normalise_layer_map_entry(entry) for entry in self.layer_map]
            if not self.layer_map:
                raise LoSparseUsageError("--layer_map is empty; give 'student_layer:teacher_layer' entries or omit it")
        has_alpha = self.alpha_output > 0 or self.alpha_layer > 0
        if has_alpha and not self.teacher_model_name_or_path:
            raise LoSparseUsageError(
                f"--alpha_output {self.alpha_output:g} / --alpha_layer {self.alpha_layer:g} need a teacher: pass "
                "--teacher_model_name_or_path (a checkpoint fine-tuned on the task), or set both alphas to 0"
            )
        if self.teacher_model_name_or_path and not has_alpha:
            raise LoSparseUsageError(
                f"--teacher_model_name_or_path {self.teacher_model_name_or_path!r} is set but --alpha_output and "
                "--alpha_layer are both 0, so it would be ignored; set at least one of them > 0, or drop the teacher"
            )
        if self.layer_map is not None and self.alpha_layer == 0:
            raise LoSparseUsageError(
                "--layer_map is set but --alpha_layer is 0; the map only applies to the layer-wise loss: set "
                "--alpha_layer > 0 or drop --layer_map"
            )
        if self.distill_stage == "after" and not has_alpha:
            raise LoSparseUsageError(
                "--distill_stage after (a distillation stage on an already compressed checkpoint) needs "
                "--teacher_model_name_or_path and --alpha_output and/or --alpha_layer > 0"
            )

    @property
    def enabled(self) -> bool:
        """True when a teacher is set and at least one alpha is > 0 (validation makes these go together)."""
        return bool(self.teacher_model_name_or_path) and (self.alpha_output > 0 or self.alpha_layer > 0)

    def parsed_layer_map(self) -> Optional[list[tuple[int, int]]]:
        """`layer_map` as (student, teacher) index pairs, or None for the default map."""
        if self.layer_map is None:
            return None
        return [tuple(int(x) for x in entry.split(":")) for entry in self.layer_map]  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normalise_layer_map_entry(entry: Any) -> str:
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in entry):
        return f"{entry[0]}:{entry[1]}"
    match = _LAYER_MAP_ENTRY.match(entry) if isinstance(entry, str) else None
    if match is None:
        hint = ""
        if isinstance(entry, int) or (isinstance(entry, str) and entry.strip().isdigit()):
            hint = " (in YAML quote the entries: an unquoted 2:4 is read as the base-60 number 124)"
        raise LoSparseUsageError(
            f"--layer_map entry {entry!r} is not allowed; each entry must be 'student_layer:teacher_layer' with two "
            f"integers >= 0, hidden-state indices where 0 is the embeddings{hint}"
        )
    return f"{int(match.group(1))}:{int(match.group(2))}"


def default_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) pairs of `hidden_states` indices for models with this many transformer layers.

    Index 0 is the embedding output and index i the output of layer i, so each list has
    `student_layers + 1` pairs and the embeddings always map to the embeddings.
      * equal depths: the identity, (0, 0), (1, 1), ..., (S, S);
      * different depths: student layer i -> teacher layer round(i·T/S), rounding halves up
        (floor(i·T/S + 1/2), not Python's round-half-to-even), and never below 1 for i >= 1 so a
        transformer layer is never matched to the embeddings. The last layers always match
        (S -> T). E.g. a 6-layer student of a 12-layer teacher: i -> 2i; 4 vs 2: 0→0, 1→1, 2→1, 3→2, 4→2.
    """
    for name, value in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
        if not isinstance(value, int) or value < 0:
            raise LoSparseUsageError(f"{name} {value!r} must be an integer >= 0 (number of transformer layers)")
    if student_layers == teacher_layers:
        return [(i, i) for i in range(student_layers + 1)]
    pairs = [(0, 0)]
    for i in range(1, student_layers + 1):
        pairs.append((i, max(1, math.floor(i * teacher_layers / student_layers + 0.5)) if teacher_layers else 0))
    return pairs

# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------


def _position_mask(leading_shape: torch.Size, labels: Optional[torch.Tensor],
                   attention_mask: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """Which positions of per-position losses count (see the module docstring); None = all of them."""
    if len(leading_shape) < 2:
        return None
    if labels is not None and tuple(labels.shape) == tuple(leading_shape):
        return (labels != IGNORE_INDEX).to(device)
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(leading_shape):
        return (attention_mask > 0).to(device)
    return None


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _kd_single(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
               labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if student.shape != teacher.shape:
        raise LoSparseUsageError(
            f"teacher logits have shape {tuple(teacher.shape)} but the student's have {tuple(student.shape)}; the "
            "teacher must be fine-tuned on the same task with the same labels"
        )
    student, teacher = student.float(), teacher.float()
    if student.dim() == 0:
        raise LoSparseUsageError("logits must have a class dimension")
    if student.dim() == 1:
        student, teacher = student.unsqueeze(0), teacher.unsqueeze(0)
    mask = _position_mask(student.shape[:-1], labels, attention_mask, student.device)
    if student.shape[-1] == 1:  # regression: no distribution to match
        return _masked_mean((student - teacher).squeeze(-1) ** 2, mask)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    per_position = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return _masked_mean(per_position, mask) * (temperature ** 2)


def output_distillation_loss(student_logits: Logits, teacher_logits: Logits, temperature: float,
                             labels: Optional[torch.Tensor] = None,
                             attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², averaged over positions (and tuple members)."""
    if temperature <= 0:
        raise LoSparseUsageError(f"temperature {temperature!r} must be > 0")
    if isinstance(student_logits, torch.Tensor) != isinstance(teacher_logits, torch.Tensor):
        raise LoSparseUsageError("student and teacher logits must both be tensors or both tuples of tensors")
    if isinstance(student_logits, torch.Tensor):
        return _kd_single(student_logits, teacher_logits, temperature, labels, attention_mask)  # type: ignore[arg-type]
    if len(student_logits) != len(teacher_logits) or not student_logits:
        raise LoSparseUsageError(
            f"the student returns {len(student_logits)} logits tensors and the teacher {len(teacher_logits)}; the "
            "teacher must have the same kind of head"
        )
    terms = [_kd_single(s, t, temperature, labels, attention_mask) for s, t in zip(student_logits, teacher_logits)]
    return torch.stack(terms).mean()


def layer_distillation_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                            layer_map: Optional[Sequence[tuple[int, int]]] = None,
                            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ over (s, t) in `layer_map` of the MSE between student_hidden[s] and teacher_hidden[t].

    Each MSE averages over the hidden dimension and the non-padding tokens (`attention_mask` of shape
    (batch, seq)), or over every token without a mask. `layer_map=None` uses `default_layer_map`.
    """
    if not student_hidden or not teacher_hidden:
        raise LoSparseUsageError("layer distillation needs the hidden states of both models (output_hidden_states)")
    if layer_map is None:
        layer_map = default_layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for s, t in layer_map:
        if not 0 <= s < len(student_hidden) or not 0 <= t < len(teacher_hidden):
            raise LoSparseUsageError(
                f"--layer_map entry '{s}:{t}' is out of range: the student has hidden states "
                f"0..{len(student_hidden) - 1} and the teacher 0..{len(teacher_hidden) - 1} (0 = embeddings)"
            )
        hs, ht = student_hidden[s], teacher_hidden[t]
        if hs.shape[-1] != ht.shape[-1]:
            raise LoSparseUsageError(
                f"hidden sizes differ (student {hs.shape[-1]}, teacher {ht.shape[-1]} at layer map '{s}:{t}'); "
                "layer-wise distillation needs equal hidden sizes: there is no learned projection yet. Use a "
                "teacher of the student's width or --alpha_layer 0"
            )
        if hs.shape != ht.shape:
            raise LoSparseUsageError(
                f"hidden states at layer map '{s}:{t}' have shapes {tuple(hs.shape)} (student) and {tuple(ht.shape)} "
                "(teacher); both models must see the same inputs"
            )
        squared = (hs.float() - ht.float().to(hs.device)).pow(2).mean(-1)
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(squared.shape):
                raise LoSparseUsageError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the hidden states have "
                    f"{tuple(squared.shape)} tokens"
                )
            mask = attention_mask.to(squared.device) > 0
        total = total + _masked_mean(squared, mask)
    return total


def distillation_loss(student_logits: Optional[Logits], teacher_logits: Optional[Logits],
                      student_hidden: Optional[HiddenStates], teacher_hidden: Optional[HiddenStates],
                      alpha_output: float, alpha_layer: float, temperature: float,
                      layer_map: Optional[Sequence[tuple[int, int]]] = None,
                      attention_mask: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None,
                      hidden_masks: Optional[Mapping[str, Optional[torch.Tensor]]] = None) -> dict[str, torch.Tensor]:
    """{"output", "layer", "total"}: the two distillation terms and alpha_output·output + alpha_layer·layer.

    This is what `DistillationTrainerMixin.compute_loss` adds to the task loss, on the models' outputs.
    For token-level logits, `labels == -100` (else the attention mask, when it has the logits' leading
    shape) marks positions to ignore. Hidden states are either one stack (embeddings, layer 1, ...),
    weighted by `attention_mask` (batch, seq), or named stacks as `hidden_state_groups` gives them
    ({"encoder": ..., "decoder": ...}), each weighted by `hidden_masks[name]` (absent or None: every
    token) and summed; both models must return the same stacks. A term whose alpha is 0 is not computed
    and is reported as 0.
    """
    terms: dict[str, torch.Tensor] = {}
    if alpha_output > 0:
        if student_logits is None or teacher_logits is None:
            raise LoSparseUsageError("alpha_output > 0 needs the logits of both models (logits, or "
                                     "start_logits/end_logits)")
        terms["output"] = output_distillation_loss(student_logits, teacher_logits, temperature, labels,
                                                   attention_mask)
    if alpha_layer > 0:
        terms["layer"] = _layer_term(student_hidden, teacher_hidden, layer_map, attention_mask, hidden_masks)
    reference = next(iter(terms.values())) if terms else _first_tensor(student_logits, student_hidden)
    zero = reference.new_zeros((), dtype=torch.float32)
    output, layer = terms.get("output", zero), terms.get("layer", zero)
    return {"output": output, "layer": layer, "total": alpha_output * output + alpha_layer * layer}


def _layer_term(student_hidden: Optional[HiddenStates], teacher_hidden: Optional[HiddenStates],
                layer_map: Optional[Sequence[tuple[int, int]]], attention_mask: Optional[torch.Tensor],
                hidden_masks: Optional[Mapping[str, Optional[torch.Tensor]]]) -> torch.Tensor:
    if not student_hidden or not teacher_hidden:
        raise LoSparseUsageError("alpha_layer > 0 needs the hidden states of both models")
    if not isinstance(student_hidden, Mapping) and not isinstance(teacher_hidden, Mapping):
        return layer_distillation_loss(student_hidden, teacher_hidden, layer_map, attention_mask)
    if not isinstance(student_hidden, Mapping) or not isinstance(teacher_hidden, Mapping) \
            or set(student_hidden) != set(teacher_hidden):
        names = [sorted(h) if isinstance(h, Mapping) else "one stack" for h in (student_hidden, teacher_hidden)]
        raise LoSparseUsageError(
            f"layer distillation needs the same hidden states from both models; the student returned {names[0]} "
            f"and the teacher {names[1]}"
        )
    masks = hidden_masks or {}
    terms = [layer_distillation_loss(student_hidden[name], teacher_hidden[name], layer_map, masks.get(name))
             for name in student_hidden]
    return torch.stack(terms).sum()


def hidden_state_masks(hidden: Mapping[str, Sequence[torch.Tensor]],
                       inputs: Mapping[str, Any]) -> dict[str, Optional[torch.Tensor]]:
    """The padding mask of each named hidden-state stack (see `hidden_state_groups`) for a batch of `inputs`.

    The decoder's is `decoder_attention_mask`, else `labels != -100`; the others' is `attention_mask`.
    A mask whose shape is not the stack's (batch, seq) is dropped (None: every token counts).
    """
    labels = inputs.get("labels")
    masks: dict[str, Optional[torch.Tensor]] = {}
    for name, states in hidden.items():
        tokens = tuple(states[0].shape[:-1])
        if name == "decoder":
            mask = inputs.get("decoder_attention_mask")
            if mask is None and labels is not None and tuple(labels.shape) == tokens:
                mask = labels != IGNORE_INDEX
        else:
            mask = inputs.get("attention_mask")
        masks[name] = mask if mask is not None and tuple(mask.shape) == tokens else None
    return masks


def _first_tensor(logits: Optional[Logits], hidden: Optional[HiddenStates]) -> torch.Tensor:
    if isinstance(logits, torch.Tensor):
        return logits
    if logits:
        return logits[0]
    if isinstance(hidden, Mapping):
        hidden = next(iter(hidden.values()), None)
    if hidden:
        return hidden[0]
    raise LoSparseUsageError("distillation needs logits or hidden states")

# ---------------------------------------------------------------------------------------------
# Model outputs -> loss inputs
# ---------------------------------------------------------------------------------------------


def _get(outputs: Any, key: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(key)
    return getattr(outputs, key, None)


def logits_of(outputs: Any) -> Optional[Logits]:
    """`logits`, or (start_logits, end_logits) for extractive QA heads; None if the model returns neither."""
    logits = _get(outputs, "logits")
    if logits is not None:
        return logits
    start, end = _get(outputs, "start_logits"), _get(outputs, "end_logits")
    if start is not None and end is not None:
        return (start, end)
    return None


def hidden_state_groups(outputs: Any) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """[(name, hidden states)]: ("hidden", ...) for encoders/decoders, ("encoder", ...), ("decoder", ...)
    for encoder-decoder models; empty if the model returned no hidden states."""
    hidden = _get(outputs, "hidden_states")
    if hidden is not None:
        return [("hidden", tuple(hidden))]
    groups = []
    for name in ("encoder", "decoder"):
        states = _get(outputs, f"{name}_hidden_states")
        if states is not None:
            groups.append((name, tuple(states)))
    return groups


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: what a teacher needs. Returns `model`."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_teacher(path: str, auto_class: Any, **kwargs: Any) -> nn.Module:
    """Load a teacher, frozen and in eval mode.

    A directory holding `losparse_config.json` is a LoSparse compact checkpoint and is rebuilt with
    `losparse.load` (kwargs are ignored then); anything else goes to `auto_class.from_pretrained(path,
    **kwargs)` (e.g. `AutoModelForSequenceClassification`, cache_dir=...).
    """
    if not path:
        raise LoSparseUsageError("--teacher_model_name_or_path is required to load a teacher")
    check_model_weights(path, "--teacher_model_name_or_path")  # pickled weights: refused in one line, never run
    try:
        if os.path.isfile(os.path.join(path, LOSPARSE_CONFIG_FILE)):
            model = load(path)
        else:
            model = auto_class.from_pretrained(path, **kwargs)
    except LoSparseUsageError as exc:
        raise LoSparseUsageError(f"--teacher_model_name_or_path {path!r}: {exc}") from None
    except (pickle.UnpicklingError, RuntimeError) as exc:  # a hub model's pickle, refused by torch itself
        error = unsafe_pickle_error(exc, "--teacher_model_name_or_path", path)
        if error is None:
            raise
        raise error from None
    except (OSError, ValueError, KeyError) as exc:
        raise LoSparseUsageError(
            f"--teacher_model_name_or_path {path!r} could not be loaded: {str(exc).strip().splitlines()[0]}"
        ) from None
    return freeze(model)

# ---------------------------------------------------------------------------------------------
# Trainer mixin
# ---------------------------------------------------------------------------------------------


class DistillationTrainerMixin:
    """Adds knowledge distillation from a frozen teacher to a `Trainer` subclass; build the class with
    `losparse.compose_trainer(base, prune=..., distill=True)`.

    Keyword arguments only. Extra ones:
      teacher_model: the teacher (an nn.Module; e.g. from `load_teacher`); frozen and put in eval mode
        here, moved to the student's device on first use.
      distill_args: a `DistillationArguments`; without one (or with no alpha > 0) the trainer behaves
        exactly like its base class.
    While training, `compute_loss` returns task loss + `distillation_loss(...)["total"]`; the task loss is
    the base class's own (`super().compute_loss`, with `output_hidden_states=True` added to the inputs when
    alpha_layer > 0, so label smoothing and `compute_loss_func` keep their meaning).

    Gradient accumulation: the distillation terms are per-micro-batch means, and the loss declares its
    scaling through the Trainer's public switch `loss_is_scaled_for_ga` (transformers >= 5.19) rather than
    relying on how the Trainer would guess it. Unless the base class declares the switch itself, the task
    loss is computed without `num_items_in_batch` (a per-micro-batch mean too) and the trainer sets
    `loss_is_scaled_for_ga = False`, so `training_step` divides the whole loss by the accumulation steps:
    k micro-batches of b examples weigh both terms like one batch of k·b. A base class that declares
    `loss_is_scaled_for_ga = True` gets `num_items_in_batch` and the distillation total divided by the
    accumulation steps; one that declares False gets `num_items_in_batch` and the total as is.

    `self.last_distill_losses` holds the last micro-batch's detached {"task" (as the base class returned
    it), "output", "layer", "total" (unweighted by accumulation)}; each logged training step adds
    `task_loss`, `distill_output_loss` and `distill_layer_loss` (means since the previous log, on this
    process). Evaluation (model not in training mode) runs neither the teacher nor the extra terms.
    """

    def __init__(self, *positional: Any, model: Optional[nn.Module] = None, args: Any = None,
                 teacher_model: Optional[nn.Module] = None, distill_args: Optional[DistillationArguments] = None,
                 **kwargs: Any) -> None:
        refuse_positional(type(self), positional)
        distill_args = distill_args if distill_args is not None else DistillationArguments()
        if not isinstance(distill_args, DistillationArguments):
            raise LoSparseUsageError(f"distill_args must be a DistillationArguments, not {type(distill_args).__name__}")
        if distill_args.enabled and teacher_model is None:
            raise LoSparseUsageError(
                "distillation is enabled (alpha_output/alpha_layer > 0) but no teacher_model was given; pass "
                f"teacher_model=load_teacher({distill_args.teacher_model_name_or_path!r}, AutoModelFor...)"
            )
        if teacher_model is not None and not distill_args.enabled:
            raise LoSparseUsageError(
                "a teacher_model was given but distill_args has no alpha > 0 (or no teacher_model_name_or_path); "
                "set alpha_output and/or alpha_layer, or drop the teacher"
            )
        prunes = isinstance(self, LoSparseTrainerMixin)
        if distill_args.enabled and distill_args.distill_stage == "after":
            if prunes:
                raise LoSparseUsageError(
                    "--distill_stage after trains an already compressed checkpoint without pruning; use a trainer "
                    "that does not prune (compose_trainer(base, prune=False, distill=True)), or --distill_stage "
                    "during to prune while distilling"
                )
            if model is not None and any(isinstance(m, LoSparseLinear) for m in model.modules()):
                raise LoSparseUsageError(
                    "--distill_stage after needs a compressed model, but this one still holds LoSparse layers in "
                    "training form, whose pruned neurons would grow back without the pruner; load the compressed "
                    "checkpoint with losparse.load(path) or call losparse.compact(model) first"
                )
        elif distill_args.enabled and not prunes:
            logger.warning("distill_stage='during' but this trainer does not prune (no LoSparseTrainerMixin): "
                           "distilling into the model as it is")
        if model is not None:
            declare_loss_kwargs(model)
        super().__init__(model=model, args=args, **kwargs)
        self.distill_args = distill_args
        self.teacher_model = freeze(teacher_model) if teacher_model is not None else None
        self._distill_layer_map = distill_args.parsed_layer_map()
        # What the base class declares about its own loss (None: it leaves the Trainer to decide).
        self._task_loss_scaling: Optional[bool] = getattr(self, "loss_is_scaled_for_ga", None)
        if self.teacher_model is not None and self._task_loss_scaling is None:
            if not hasattr(Trainer, "loss_is_scaled_for_ga") and self.args.gradient_accumulation_steps > 1:
                raise LoSparseUsageError(
                    "distillation with --gradient_accumulation_steps > 1 needs transformers >= 5.19 "
                    "(Trainer.loss_is_scaled_for_ga); upgrade transformers or use --gradient_accumulation_steps 1"
                )
            self.loss_is_scaled_for_ga = False
        self.last_distill_losses: dict[str, torch.Tensor] = {}
        self._distill_sums: dict[str, torch.Tensor] = {}
        self._distill_count = 0

    def _teacher_on(self, device: torch.device) -> nn.Module:
        teacher = self.teacher_model
        first = next(teacher.parameters(), None)
        if first is not None and first.device != device:
            teacher.to(device)
        if teacher.training:
            teacher.eval()
        return teacher

    # -- Trainer overrides -----------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        args = self.distill_args
        if self.teacher_model is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # How the returned loss is scaled for gradient accumulation (see the class docstring).
        steps = 1
        if self._task_loss_scaling is None:
            num_items_in_batch = None
        elif self._task_loss_scaling:
            steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        want_hidden = args.alpha_layer > 0
        extra = {"output_hidden_states": True} if want_hidden else {}
        task_loss, student_out = super().compute_loss(model, {**inputs, **extra}, return_outputs=True,
                                                      num_items_in_batch=num_items_in_batch)
        teacher = self._teacher_on(next(model.parameters()).device)
        with torch.no_grad():
            teacher_out = teacher(**inputs, **extra)
        student_hidden = dict(hidden_state_groups(student_out)) if want_hidden else None
        teacher_hidden = dict(hidden_state_groups(teacher_out)) if want_hidden else None
        parts = distillation_loss(
            logits_of(student_out), logits_of(teacher_out), student_hidden, teacher_hidden,
            args.alpha_output, args.alpha_layer, args.distill_temperature, self._distill_layer_map,
            attention_mask=inputs.get("attention_mask"), labels=inputs.get("labels"),
            hidden_masks=hidden_state_masks(student_hidden, inputs) if student_hidden else None,
        )
        loss = task_loss + (parts["total"] / steps).to(task_loss.dtype)

        record = {"task": task_loss.detach(), **{key: value.detach() for key, value in parts.items()}}
        self.last_distill_losses = record
        # Logged means are per micro-batch, so undo an accumulation scaling of the task loss for the log.
        for log_key, value in (("task_loss", record["task"] * steps), ("distill_output_loss", record["output"]),
                               ("distill_layer_loss", record["layer"])):
            value = value.float()
            previous = self._distill_sums.get(log_key)
            self._distill_sums[log_key] = value if previous is None else previous + value
        self._distill_count += 1
        return (loss, student_out) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._distill_count:
            for key, value in self._distill_sums.items():
                logs[key] = round(float(value) / self._distill_count, 6)
            self._distill_sums, self._distill_count = {}, 0
        super().log(logs, *args, **kwargs)
