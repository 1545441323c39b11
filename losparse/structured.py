"""Structured pruning of whole attention heads and FFN neurons (`--method structured`), a baseline.

The model is not decomposed. Its prunable *groups* are, per encoder layer (BERT family):
  - a head h (head size d, hidden size H): rows h·d..(h+1)·d of query, key and value and the same
    columns of attention.output.dense — 4·H·d weights;
  - an FFN neuron j: row j of intermediate.dense and column j of output.dense — 2·H weights.
Together they cover exactly the matrices LoSparse targets, so the ratio means the same thing: kept
weights of the targeted matrices / their dense count (biases, embeddings, LayerNorm, head: not counted).

Importance is the project's sensitivity (or magnitude, `--importance`), per group: the sum of
|w·∂L/∂w| over the group's weights divided by its weight count (a per-parameter mean, so heads and
neurons compete on one scale), smoothed by an EMA with `beta1`. The schedule is `CubicSchedule`
(paper variant) from 1 to `remaining_ratio`; at each mask step the keep rule is the one of
`LoSparsePruner.update_masks`: rank all groups of all layers globally, keep the best ones whose
cumulative weights fit in p_t of the targeted weights.

Masking is by zeroing: after every optimizer step from t_i, the pruned groups' weights (and the biases
of their q/k/v/intermediate rows) are set to zero, so momentum or weight decay never revives them. The
zeroed output-side columns make a pruned group contribute exactly nothing, which is why
`remove_pruned_structures` (slicing the matrices) keeps the masked model's function exactly.

A layer whose heads are all pruned gets `NoSelfAttention` (returns a (B, L, 0) context; the output
dense of 0 inputs adds only its bias). The config of a pruned model still names the dense sizes, so a
pruned model is saved with `STRUCTURE_FILE` (kept heads and FFN width per layer) and reloaded with
`load_structured`; plain `from_pretrained` refuses it (shape mismatch), it never loads it wrongly.
MPNet (relative position bias per head, computed outside the layers) and DeBERTa are not supported.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint import PRUNER_META_FILE, PRUNER_STATE_FILE
from .config import LoSparseConfig
from .errors import LoSparseUsageError
from .families import family_of
from .pruner import keep_within_budget
from .schedule import CubicSchedule, resolve_steps
from .trainer import LoSparseCallback, check_training_backend, declare_loss_kwargs, refuse_positional

logger = logging.getLogger(__name__)

#: model types whose encoder layers have BERT's module names (attention.self.query, ..., output.dense)
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
#: written beside a pruned model's config.json: the kept structure load_structured rebuilds
STRUCTURE_FILE = "structured_pruning.json"


# ------------------------------------------------------------------------------------------ the groups


@dataclass
class EncoderBlock:
    """One encoder layer's prunable matrices; `heads` and `neurons` are its current (possibly pruned) counts."""

    name: str
    layer: nn.Module
    head_size: int

    @property
    def attention(self) -> nn.Module:
        return self.layer.attention.self

    @property
    def has_attention(self) -> bool:
        return not isinstance(self.attention, NoSelfAttention)

    @property
    def qkv(self) -> list[nn.Linear]:
        a = self.attention
        return [a.query, a.key, a.value] if self.has_attention else []

    @property
    def attention_output(self) -> nn.Linear:
        return self.layer.attention.output.dense

    @property
    def intermediate(self) -> nn.Linear:
        return self.layer.intermediate.dense

    @property
    def ffn_output(self) -> nn.Linear:
        return self.layer.output.dense

    @property
    def hidden_size(self) -> int:
        return self.attention_output.out_features

    @property
    def heads(self) -> int:
        return self.attention_output.in_features // self.head_size

    @property
    def neurons(self) -> int:
        return self.intermediate.out_features

    @property
    def head_params(self) -> int:
        return 4 * self.hidden_size * self.head_size

    @property
    def neuron_params(self) -> int:
        return 2 * self.hidden_size


class NoSelfAttention(nn.Module):
    """Stands in for a self-attention whose heads are all pruned: a context of width 0, no weights."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def check_supported(model_or_config: Any) -> None:
    """A usage error unless it is a BERT-family encoder (model or config; the module names this file slices)."""
    family = family_of(model_or_config)
    model_type = getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)
    if family is None or family.model_type not in SUPPORTED_MODEL_TYPES:
        raise LoSparseUsageError(
            f"--method structured supports encoder models of type {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"got model type {model_type!r}"
        )


def encoder_blocks(model: nn.Module) -> list[EncoderBlock]:
    """The encoder layers of a BERT-family model, in module order (checked: supported type, layers found)."""
    check_supported(model)
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    blocks = []
    for name, module in model.named_modules():
        attention = getattr(module, "attention", None)
        if (attention is not None and hasattr(attention, "self") and hasattr(attention, "output")
                and hasattr(module, "intermediate") and hasattr(module, "output")):
            blocks.append(EncoderBlock(name, module, head_size))
    if not blocks:
        raise LoSparseUsageError(f"--method structured: no encoder layers found in {type(model).__name__}")
    for block in blocks:
        if not all(type(m) is nn.Linear for m in (*block.qkv, block.attention_output, block.intermediate,
                                                   block.ffn_output)):
            raise LoSparseUsageError(
                f"--method structured: {block.name} holds non-Linear (decomposed?) matrices; start from a plain model"
            )
    return blocks


def group_sizes(blocks: list[EncoderBlock], device: Any = None) -> torch.Tensor:
    """Weights per group, flat in layout order: [block 0 heads, block 0 neurons, block 1 heads, ...] (float64)."""
    sizes = []
    for block in blocks:
        sizes.append(torch.full((block.heads,), float(block.head_params), dtype=torch.float64))
        sizes.append(torch.full((block.neurons,), float(block.neuron_params), dtype=torch.float64))
    return torch.cat(sizes).to(device) if sizes else torch.zeros(0, dtype=torch.float64)


def target_params(blocks: list[EncoderBlock]) -> int:
    """Weights of the targeted matrices as they are now (q, k, v, attention output, intermediate, output)."""
    return sum(block.heads * block.head_params + block.neurons * block.neuron_params for block in blocks)


def select_groups(scores: torch.Tensor, sizes: torch.Tensor, kept_fraction: float) -> torch.Tensor:
    """Keep mask: the best-scoring groups whose cumulative weights fit in `kept_fraction` of all weights.

    The rule of `LoSparsePruner.update_masks` (paper variant); the kept weights fall short of the target
    by less than one group. Ties are broken by position (stable sort).
    """
    return keep_within_budget(scores, sizes, kept_fraction)


def split_keep(blocks: list[EncoderBlock], keep: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The flat keep mask as (head keep, neuron keep) per block."""
    parts = torch.split(keep, [n for b in blocks for n in (b.heads, b.neurons)])
    return [(parts[2 * i], parts[2 * i + 1]) for i in range(len(blocks))]


@torch.no_grad()
def zero_pruned(blocks: list[EncoderBlock], masks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Zero the weights of the pruned groups (q/k/v and intermediate rows with their biases, output columns)."""
    for block, (heads, neurons) in zip(blocks, masks):
        rows = heads.repeat_interleave(block.head_size)
        for linear in block.qkv:
            linear.weight.mul_(rows.to(linear.weight.dtype)[:, None])
            if linear.bias is not None:
                linear.bias.mul_(rows.to(linear.bias.dtype))
        block.attention_output.weight.mul_(rows.to(block.attention_output.weight.dtype)[None, :])
        block.intermediate.weight.mul_(neurons.to(block.intermediate.weight.dtype)[:, None])
        if block.intermediate.bias is not None:
            block.intermediate.bias.mul_(neurons.to(block.intermediate.bias.dtype))
        block.ffn_output.weight.mul_(neurons.to(block.ffn_output.weight.dtype)[None, :])


# ----------------------------------------------------------------------------------------- importance


class GroupImportance:
    """EMA of the per-weight mean |w·∂L/∂w| (or |w|) of every group, one flat float32 vector."""

    def __init__(self, blocks: list[EncoderBlock], metric: str = "sensitivity", beta1: float = 0.85) -> None:
        self.blocks, self.metric, self.beta1 = blocks, metric, beta1
        device = blocks[0].attention_output.weight.device
        self.sizes = group_sizes(blocks, device)
        self.ema = torch.zeros(self.sizes.numel(), dtype=torch.float32, device=device)
        self.num_updates = 0

    def _entry(self, linear: nn.Linear) -> torch.Tensor:
        weight = linear.weight.detach()
        if self.metric == "magnitude":
            return weight.abs().float()
        if linear.weight.grad is None:
            raise RuntimeError(
                "a targeted weight has no gradient at the optimizer step: the structured importance update must run "
                "after backward() and before the gradients are zeroed"
            )
        return (weight * linear.weight.grad).abs().float()

    def current(self) -> torch.Tensor:
        """This step's per-weight mean score of every group (flat, layout order)."""
        parts = []
        for block in self.blocks:
            d = block.head_size
            head_sum = sum(self._entry(q).view(block.heads, d, -1).sum(dim=(1, 2)) for q in block.qkv)
            head_sum = head_sum + self._entry(block.attention_output).view(-1, block.heads, d).sum(dim=(0, 2))
            neuron_sum = self._entry(block.intermediate).sum(dim=1) + self._entry(block.ffn_output).sum(dim=0)
            parts += [head_sum / block.head_params, neuron_sum / block.neuron_params]
        return torch.cat(parts)

    @torch.no_grad()
    def update(self) -> None:
        """Fold this step into the EMA; a step with non-finite scores (skipped fp16 step) changes nothing."""
        current = self.current()
        if self.metric == "magnitude":
            self.ema.copy_(current)
        else:
            updated = self.ema * self.beta1 + current * (1.0 - self.beta1)
            self.ema.copy_(torch.where(torch.isfinite(current).all(), updated, self.ema))
        self.num_updates += 1


# ------------------------------------------------------------------------------------------- the pruner


class StructuredPruner:
    """Group importance + cubic schedule + global head/neuron masks for one BERT-family model.

    `step(t)` after optimizer step t (1-based, before the gradients are zeroed). The current masks are
    also kept on the model (`model.structured_keep`), where `remove_pruned_structures` reads them.
    """

    def __init__(self, model: nn.Module, total_steps: int, config: LoSparseConfig) -> None:
        check_structured_config(config)
        self.model, self.config = model, config
        self.blocks = encoder_blocks(model)
        self.importance = GroupImportance(self.blocks, config.importance, config.beta1)
        self.sizes = self.importance.sizes
        self.total_params = float(self.sizes.sum())
        self.keep = torch.ones(self.sizes.numel(), dtype=torch.bool, device=self.sizes.device)
        self.schedule = CubicSchedule(
            total_steps=total_steps,
            warmup_steps=resolve_steps(config.pruning_warmup_steps, config.pruning_warmup_ratio, total_steps),
            final_steps=resolve_steps(config.pruning_final_steps, config.pruning_final_ratio, total_steps),
            final_fraction=config.remaining_ratio,
            interval=config.pruning_interval,
        )
        self.final_kept_fraction = config.remaining_ratio
        self.last_step = 0
        self.kept_fraction = 1.0
        self._publish()

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Run after optimizer step number `step`: update the scores, then recompute or re-apply the masks."""
        self.importance.update()
        self.last_step = step
        if not self.schedule.is_pruning(step):
            return
        self.kept_fraction = self.schedule.kept_fraction(step)
        if self.schedule.is_mask_update_step(step):
            self.update_masks(self.kept_fraction)
        else:
            self.apply_masks()

    @torch.no_grad()
    def update_masks(self, kept_fraction: float, scores: Optional[torch.Tensor] = None) -> None:
        """Keep the best groups fitting in `kept_fraction` of the targeted weights; `scores` replaces the EMA."""
        if scores is None:
            scores = self.importance.ema
        elif scores.shape != self.sizes.shape:
            raise ValueError(f"update_masks: {scores.numel()} scores given for {self.sizes.numel()} groups")
        self.keep = select_groups(scores, self.sizes, kept_fraction)
        self._publish()
        self.apply_masks()

    def _publish(self) -> None:
        self.model.structured_keep = split_keep(self.blocks, self.keep)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned groups again (after the optimizer moved them)."""
        zero_pruned(self.blocks, split_keep(self.blocks, self.keep))

    def achieved_kept_fraction(self) -> float:
        """Kept weights of the targeted matrices / all of them, counted from the masks."""
        return float((self.keep.to(torch.float64) * self.sizes).sum()) / self.total_params

    def save(self, directory: str) -> None:
        """Write the state (EMA, masks; safetensors) and a small JSON into a checkpoint directory."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({"group_ema": self.importance.ema.detach().cpu().contiguous(),
                   "keep": self.keep.to(torch.uint8).cpu().contiguous()},
                  os.path.join(directory, PRUNER_STATE_FILE))
        with open(os.path.join(directory, PRUNER_META_FILE), "w") as f:
            json.dump({"kind": "structured", "last_step": self.last_step, "kept_fraction": self.kept_fraction,
                       "num_updates": self.importance.num_updates, "config": self.config.to_dict()}, f, indent=2)

    def load(self, directory: str) -> bool:
        """Restore what `save` wrote (and re-zero the pruned groups); False if the directory holds none."""
        from safetensors.torch import load_file

        path = os.path.join(directory, PRUNER_STATE_FILE)
        if not os.path.isfile(path):
            return False
        state = load_file(path)
        if state.get("group_ema") is None or state["group_ema"].shape != self.importance.ema.shape:
            raise LoSparseUsageError(f"{path} is not the structured pruner state of this model")
        self.importance.ema.copy_(state["group_ema"].to(self.importance.ema.device))
        self.keep = state["keep"].to(device=self.sizes.device, dtype=torch.bool)
        with open(os.path.join(directory, PRUNER_META_FILE)) as f:
            meta = json.load(f)
        self.last_step, self.kept_fraction = int(meta["last_step"]), float(meta["kept_fraction"])
        self.importance.num_updates = int(meta.get("num_updates", 0))
        self._publish()
        self.apply_masks()
        return True


def check_structured_config(config: LoSparseConfig) -> None:
    """Usage errors for the settings --method structured does not implement."""
    if config.pruning_variant != "paper":
        raise LoSparseUsageError(
            f"--pruning_variant {config.pruning_variant!r}: --method structured implements only 'paper'"
        )
    if config.beta2 > 0.0:
        raise LoSparseUsageError(f"--beta2 {config.beta2}: --method structured has no uncertainty term; use 0")


# ------------------------------------------------------------------------------------ physical removal


def _new_linear(in_features: int, out_features: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    with warnings.catch_warnings():  # a layer with every head or neuron pruned has 0-element weights
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_features, out_features, bias=bias, device=like.device, dtype=like.dtype)


def _empty_linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return _new_linear(in_features, out_features, like.bias is not None, like.weight)


def _slice_linear(linear: nn.Linear, rows: Optional[torch.Tensor] = None,
                  columns: Optional[torch.Tensor] = None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    new = _new_linear(weight.shape[1], weight.shape[0], bias is not None, weight)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _inferred_keep(block: EncoderBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups whose output-side columns are all zero contribute nothing: pruned (exact to remove)."""
    heads = block.attention_output.weight.detach().view(block.hidden_size, block.heads, block.head_size)
    neurons = block.ffn_output.weight.detach()
    return heads.abs().amax(dim=(0, 2)) > 0, neurons.abs().amax(dim=0) > 0


def _shrink_block(block: EncoderBlock, heads: torch.Tensor, neurons: torch.Tensor) -> None:
    heads, neurons = heads.cpu().bool(), neurons.cpu().bool()
    rows = torch.nonzero(heads.repeat_interleave(block.head_size)).flatten()
    kept_heads = int(heads.sum())
    attention = block.attention
    if kept_heads == 0:
        block.layer.attention.self = NoSelfAttention()
    elif kept_heads < heads.numel():
        device = block.attention_output.weight.device
        for name in ("query", "key", "value"):
            setattr(attention, name, _slice_linear(getattr(attention, name), rows=rows.to(device)))
        attention.num_attention_heads = kept_heads
        attention.all_head_size = kept_heads * block.head_size
    if kept_heads < heads.numel():
        block.layer.attention.output.dense = _slice_linear(block.attention_output, columns=rows.to(
            block.attention_output.weight.device))
    if int(neurons.sum()) < neurons.numel():
        index = torch.nonzero(neurons).flatten().to(block.intermediate.weight.device)
        block.layer.intermediate.dense = _slice_linear(block.intermediate, rows=index)
        block.layer.output.dense = _slice_linear(block.ffn_output, columns=index)


def structure_of(model: nn.Module) -> dict[str, Any]:
    """The kept structure of a (pruned) model: heads and FFN width per encoder layer, and the head size."""
    blocks = encoder_blocks(model)
    return {"format": 1, "head_size": blocks[0].head_size,
            "layers": [{"name": b.name, "heads": b.heads if b.has_attention else 0, "intermediate_size": b.neurons}
                       for b in blocks]}


@torch.no_grad()
def remove_pruned_structures(model: nn.Module) -> nn.Module:
    """Slice the pruned heads and FFN neurons out of `model` (in place; returns it), function unchanged.

    Which groups are pruned: the pruner's masks (`model.structured_keep`) if it has them, else every group
    whose output-side columns are all zero. Records the result in `model.structure` (see `save_structured`).
    """
    blocks = encoder_blocks(model)
    masks = getattr(model, "structured_keep", None)
    if masks is None or len(masks) != len(blocks):
        masks = [_inferred_keep(block) for block in blocks]
    for block, (heads, neurons) in zip(blocks, masks):
        if heads.numel() != block.heads or neurons.numel() != block.neurons:
            raise ValueError(f"{block.name}: masks of {heads.numel()} heads / {neurons.numel()} neurons for a layer "
                             f"of {block.heads} / {block.neurons} (already removed?)")
        _shrink_block(block, heads, neurons)
    model.structured_keep = None
    model.structure = structure_of(model)
    return model


def structured_report(model: nn.Module, dense_target_params: int, dense_model_params: int) -> dict[str, Any]:
    """A compression report with `losparse.export.parameter_report`'s top-level fields (no per-layer list)."""
    blocks = encoder_blocks(model)
    now = target_params(blocks)
    total = sum(p.numel() for p in model.parameters())
    return {
        "num_layers": len(blocks), "target_dense_params": dense_target_params, "target_params": now,
        "remaining_ratio": now / dense_target_params if dense_target_params else 1.0,
        "low_rank_share": 0.0, "sparse_share": 0.0, "model_params_dense": dense_model_params, "model_params": total,
        "heads": [b.heads if b.has_attention else 0 for b in blocks], "intermediate_sizes": [b.neurons for b in blocks],
        "note": "structured: whole heads and FFN neurons removed; ratio = kept weights of q, k, v, attention output, "
                "intermediate and output matrices / their dense count",
    }


def save_structured(model: nn.Module, directory: str, tokenizer: Any = None) -> str:
    """`save_pretrained` plus `STRUCTURE_FILE`, so `load_structured` can rebuild the smaller shapes."""
    model.save_pretrained(directory)
    with open(os.path.join(directory, STRUCTURE_FILE), "w") as f:
        json.dump(structure_of(model), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_structured(path: str, device: Any = None) -> nn.Module:
    """Rebuild a model saved by `save_structured` (its class from config.json) and load its weights (eval mode)."""
    import transformers
    from safetensors.torch import load_file

    structure_path = os.path.join(path, STRUCTURE_FILE)
    if not os.path.isfile(structure_path):
        raise LoSparseUsageError(f"{path!r} holds no {STRUCTURE_FILE}: not a structurally pruned model")
    with open(structure_path) as f:
        structure = json.load(f)
    config = transformers.AutoConfig.from_pretrained(path)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise LoSparseUsageError(f"{path}/config.json names no transformers architecture ({architecture!r})")
    model = model_class(config)
    blocks = encoder_blocks(model)
    if len(blocks) != len(structure["layers"]):
        raise LoSparseUsageError(f"{structure_path}: {len(structure['layers'])} layers for a model of {len(blocks)}")
    for block, kept in zip(blocks, structure["layers"]):
        width = kept["heads"] * block.head_size
        hidden = block.hidden_size
        if kept["heads"] == 0:
            block.layer.attention.self = NoSelfAttention()
        else:
            attention = block.attention
            for name in ("query", "key", "value"):
                setattr(attention, name, _empty_linear(hidden, width, getattr(attention, name)))
            attention.num_attention_heads, attention.all_head_size = kept["heads"], width
        block.layer.attention.output.dense = _empty_linear(width, hidden, block.attention_output)
        block.layer.intermediate.dense = _empty_linear(hidden, kept["intermediate_size"], block.intermediate)
        block.layer.output.dense = _empty_linear(kept["intermediate_size"], hidden, block.ffn_output)
    state = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise LoSparseUsageError(f"{path}: weights do not match the structure (missing {sorted(set(missing) - tied)}"
                                 f", unexpected {sorted(unexpected)})")
    model.tie_weights()
    model.structure = structure
    return model.to(device or "cpu").eval()


def build_structured_peer(dense_model: nn.Module, kept_fraction: float, scores: Optional[torch.Tensor] = None,
                          seed: int = 0) -> nn.Module:
    """A copy of `dense_model` with whole heads and FFN neurons removed to `kept_fraction` of the targeted weights.

    For timing against a LoSparse model of the same ratio: the groups kept are the best by `scores` (one per
    group, layout of `group_sizes`) or by random scores (seeded), under the global parameter-weighted rule.
    """
    if not 0.0 < kept_fraction <= 1.0:
        raise LoSparseUsageError(f"kept_fraction {kept_fraction!r} is out of range; it must be in (0, 1]")
    peer = copy.deepcopy(dense_model)
    blocks = encoder_blocks(peer)
    sizes = group_sizes(blocks)
    if scores is None:
        scores = torch.rand(sizes.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    elif scores.shape != sizes.shape:
        raise ValueError(f"build_structured_peer: {scores.numel()} scores given for {sizes.numel()} groups")
    peer.structured_keep = split_keep(blocks, select_groups(scores, sizes, kept_fraction))
    return remove_pruned_structures(peer)


# --------------------------------------------------------------------------------------------- trainer


class StructuredCallback(LoSparseCallback):
    """`LoSparseCallback` (config check and pruner state on resume, one step per optimizer step) with the
    `StructuredPruner`."""

    pruner_name = "structured"

    def make_pruner(self, total_steps: int) -> "StructuredPruner":
        return StructuredPruner(self.model, total_steps=total_steps, config=self.config)

    def log_plan(self) -> None:
        s = self.pruner.schedule
        logger.info("structured: %d layers, %d groups, pruning heads and FFN neurons from step %d to %d "
                    "down to %.4f of the targeted weights", len(self.pruner.blocks),
                    self.pruner.sizes.numel(), s.warmup_steps, s.decay_end, self.config.remaining_ratio)


class StructuredTrainerMixin:
    """Adds structured head/FFN pruning to a `Trainer` subclass (keyword arguments only).

    Extra ones: `structured_config` (a `LoSparseConfig` with method 'structured'; the model itself is left
    undecomposed) and `allow_resume_config_change`. The pruner state goes into each checkpoint.
    """

    def __init__(self, *positional: Any, model: Any = None, args: Any = None,
                 structured_config: Optional[LoSparseConfig] = None, allow_resume_config_change: bool = False,
                 **kwargs: Any) -> None:
        refuse_positional(type(self), positional)
        if model is None or structured_config is None:
            raise LoSparseUsageError(f"{type(self).__name__} needs model= and structured_config=")
        check_structured_config(structured_config)
        encoder_blocks(model)
        check_training_backend(args)
        declare_loss_kwargs(model)
        super().__init__(model=model, args=args, **kwargs)
        self.structured_callback = StructuredCallback(model, structured_config, allow_resume_config_change)
        self.add_callback(self.structured_callback)
        self.dense_target_params = target_params(encoder_blocks(model))
        self.dense_model_params = sum(p.numel() for p in model.parameters())

    @property
    def pruner(self) -> Optional[StructuredPruner]:
        return self.structured_callback.pruner

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.pruner is not None and "loss" in logs:
            logs["structured_kept_fraction"] = round(self.pruner.kept_fraction, 6)
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any):
        from .checkpoint import resolve_resume_checkpoint

        resume_from_checkpoint = resolve_resume_checkpoint(
            resume_from_checkpoint, self.args.output_dir, needs_pruner=True,
            needs_optimizer=not self.args.save_only_model)
        self.structured_callback.resume_from = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        super().save_model(output_dir, _internal_call=_internal_call)
        if (_internal_call and output_dir and self.pruner is not None and self.args.should_save
                and os.path.basename(os.path.normpath(output_dir)).startswith(f"{PREFIX_CHECKPOINT_DIR}-")):
            self.pruner.save(output_dir)


_COMPOSED: dict[type, type] = {}


def structured_trainer(base: type) -> type:
    """`base` (a `transformers.Trainer` subclass) with structured pruning: `Structured<Base>`, cached."""
    from transformers import Trainer

    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise LoSparseUsageError(f"structured_trainer needs a transformers.Trainer subclass, not {base!r}")
    if base not in _COMPOSED:
        _COMPOSED[base] = type(f"Structured{base.__name__}", (StructuredTrainerMixin, base), {"__module__": __name__})
    return _COMPOSED[base]
