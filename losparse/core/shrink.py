"""`--shrink_sparse`: S physically shrinks to its kept neurons as pruning proceeds, so training memory falls.

Why. A masked S still holds every neuron: S, its gradient and its two AdamW moments cost the same at
p_t = 0.1 as at p_t = 1, although nine tenths of it are zeros that only get re-zeroed. Dropping the pruned
neurons (rows of S for prune_dim rows, columns for columns) makes S + ∂S + moments fall with the kept
fraction: at p_T ≈ 0.15 they cost about 0.15 of the unshrunk ones, the largest part of a LoSparse step's
memory once U·V is small (README memory section, `--shrink_fractions` of scripts/benchmark_memory.py).

The price: masks become monotone. Without shrinking, a neuron pruned at one mask update can be kept again at
a later one (its EMA score decays but stays comparable), so its row must be kept. Here a neuron pruned at a
mask update is dead for good: at later updates its score is −inf, so the one global threshold chooses among
the alive neurons only (`monotone_update_masks`). The run is then the same as an unshrunk run with those
monotone masks (tested to 1e-5: losses, masks and final outputs), except that gradient clipping's global
norm no longer counts the dead neurons' gradients (an unshrunk run computes them, then zeroes the rows).

Storage (`LoSparseLinear`): `sparse` is (alive, in) for rows / (out, alive) for columns, `sparse_alive_index`
(a long buffer, increasing) says which neurons it holds, and `sparse_mask` still covers all neurons (False for
dead ones), so reports and the pruner's global ranking are unchanged. The forward adds the alive rows with
`index_add` (or gathers the alive input columns), as `CompactLoSparseLinear` does (`losparse.core.functional`).

At a mask update (`shrink_pruned`, called by the Trainer callback after `LoSparsePruner.step`):
  every layer whose kept set shrank gets `sparse.data` (the same Parameter object, so the optimizer's
  param_groups stay valid), its `.grad`, every optimizer state tensor of the parameter's shape (torch AdamW's
  exp_avg / exp_avg_sq / max_exp_avg_sq, `LeanAdamW`'s bf16 moments) and the importance's per-entry states
  (β2 > 0) narrowed with one index. The per-neuron importance EMA keeps all neurons; dead ones score 0.
Checkpoints: the Trainer saves the shrunk S and its alive index; a resume narrows the freshly decomposed
model to the checkpoint's alive sets (`narrow_to_checkpoint`) before the Trainer loads weights and optimizer
state, so the resumed run continues the same trajectory. `compact` works from a shrunk layer; the final saved
model is the compact one, as without shrinking.

Single process only (`check_shrink_backend`): DDP, FSDP and DeepSpeed wrap the model once and fix every
parameter's shape (DDP's gradient buckets, FSDP's shards). Methods: those whose S is neuron-pruned by
`LoSparsePruner` (`config.SHRINK_METHODS`); LPAF (entry masks, then factorised) and the structured baseline
are refused by `LoSparseConfig`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from torch import nn

from losparse.core.decompose import losparse_layers
from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import LoSparseLinear

ALIVE_SUFFIX = ".sparse_alive_index"


def check_shrink_backend(args: Any) -> None:
    """Refuse --shrink_sparse where a wrapper fixes parameter shapes (DDP, FSDP, DeepSpeed), in one line."""
    world_size = int(getattr(args, "world_size", 1) or 1)
    wrapper = ("DeepSpeed" if getattr(args, "deepspeed", None) else "FSDP" if getattr(args, "fsdp", None)
               else f"DDP ({world_size} processes)" if world_size > 1 else None)
    if wrapper is not None:
        raise LoSparseUsageError(f"--shrink_sparse needs a single training process, not {wrapper}: the wrapper "
                                 "fixes every parameter's shape, so S cannot narrow; drop --shrink_sparse")


def base_optimizer(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer holding the state (accelerate's `AcceleratedOptimizer` wraps it as `.optimizer`)."""
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def monotone_update_masks(pruner: Any, kept_fraction: float) -> None:
    """`pruner.update_masks` among the alive neurons only: pruned neurons score −inf and stay pruned.

    Alive = kept by the current masks. The keep rule may still pick a −inf neuron when the budget exceeds
    the alive parameters (a stable sort puts them last; ties at the threshold); such picks are undone, so
    the new masks are a subset of the old ones. Marks the pruner for `shrink_pruned`.
    """
    if not pruner.layers:
        return
    alive = torch.cat([layer.sparse_mask.reshape(-1) for layer in pruner.layers])
    scores = pruner.importance.scores().masked_fill(~alive.to(pruner.importance.scores().device), float("-inf"))
    pruner.update_masks(kept_fraction, scores=scores)
    kept = torch.cat([layer.sparse_mask.reshape(-1) for layer in pruner.layers])
    if bool((kept & ~alive).any()):  # one host read per mask update
        for layer, was_alive in zip(pruner.layers, torch.split(alive, pruner.importance.num_neurons)):
            layer.set_sparse_mask(layer.sparse_mask & was_alive.view(layer.sparse_mask.shape))
    pruner.shrink_pending = True


def _narrow_state(state: dict[str, Any], old_shape: torch.Size, axis: int, positions: torch.Tensor,
                  where: str) -> None:
    for key, value in list(state.items()):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue  # step counters
        if value.shape != old_shape:
            raise LoSparseUsageError(
                f"--shrink_sparse: {where} holds state {key!r} of shape {tuple(value.shape)}, not the parameter's "
                f"{tuple(old_shape)}, so it cannot be narrowed; use an elementwise optimizer (AdamW, LeanAdamW)"
            )
        state[key] = value.index_select(axis, positions.to(value.device))


@torch.no_grad()
def narrow_layer(layer: LoSparseLinear, alive_index: torch.Tensor, optimizer: Any = None,
                 importance: Any = None) -> None:
    """Keep only the neurons `alive_index` (indices over all neurons, a subset of those S stores) in `layer`'s S.

    S: (out, in) or (stored, in) → (len(alive_index), in) for rows, likewise for columns. Narrowed with the same
    index: `sparse.data` (same Parameter object), its gradient, the optimizer state of that parameter and the
    per-entry states of `importance` (a `NeuronImportance`) for this layer.
    """
    axis = layer.neuron_axis
    if axis is None or layer.sparse is None:
        raise LoSparseUsageError("--shrink_sparse: only a row- or column-pruned S can shrink (this layer has "
                                 + ("no S)" if layer.sparse is None else "an entry mask, LPAF)"))
    alive_index = alive_index.to(device=layer.sparse_mask.device, dtype=torch.long).flatten().contiguous()
    stored = layer.sparse.shape[axis]
    neurons = layer.sparse_mask.numel()
    if alive_index.numel() and (int(alive_index.min()) < 0 or int(alive_index.max()) >= neurons
                                or bool((alive_index[1:] <= alive_index[:-1]).any())):
        raise LoSparseUsageError(f"--shrink_sparse: alive indices must be increasing and in [0, {neurons})")
    positions = layer.sparse_positions(alive_index)
    if layer.shrunk and (bool((positions >= stored).any())
                         or not torch.equal(layer.sparse_alive_index[positions.clamp(max=max(stored - 1, 0))],
                                            alive_index)):
        raise LoSparseUsageError("--shrink_sparse: a dropped neuron cannot come back (alive indices are not a "
                                 "subset of the neurons S stores)")
    param = layer.sparse
    old_shape = param.shape
    param.data = param.data.index_select(axis, positions)
    if param.grad is not None:
        param.grad = param.grad.index_select(axis, positions)
    layer.sparse_alive_index = alive_index.clone()
    optimizer = base_optimizer(optimizer)
    if optimizer is not None and param in optimizer.state:
        _narrow_state(optimizer.state[param], old_shape, axis, positions, type(optimizer).__name__)
    if importance is not None:
        i = next((i for i, other in enumerate(importance.layers) if other is layer), None)
        if i is not None:
            for states in (importance.entry_ema, importance.entry_uncertainty, importance.entry_window_mean):
                if states:
                    states[i] = states[i].index_select(axis, positions)


def shrink_pruned(pruner: Any, optimizer: Any = None, force: bool = False) -> int:
    """Narrow every layer of `pruner` whose kept set is smaller than what its S stores; returns how many.

    Runs only after a mask update (`pruner.shrink_pending`, set by `monotone_update_masks`) unless `force`
    (the start of training: a model that arrives with pruned neurons drops them at once). One host read of the
    kept counts; the layers that shrank each narrow S, ∂S, the optimizer state and the importance's entry states.
    """
    if not (force or getattr(pruner, "shrink_pending", False)) or not pruner.layers:
        return 0
    pruner.shrink_pending = False
    kept = torch.stack([layer.sparse_mask.sum() for layer in pruner.layers]).tolist()
    narrowed = 0
    for layer, count in zip(pruner.layers, kept):
        if count < layer.sparse.shape[layer.neuron_axis]:
            narrow_layer(layer, layer.kept_neuron_index(), optimizer, pruner.importance)
            narrowed += 1
    return narrowed


def sparse_state_numel(layers: list[LoSparseLinear], optimizer: Any = None) -> dict[str, int]:
    """Entries of S and of its optimizer state tensors (non-scalar) over `layers`, for reports and tests."""
    optimizer = base_optimizer(optimizer)
    params = sum(layer.sparse.numel() for layer in layers if layer.sparse is not None)
    states = 0
    if optimizer is not None:
        for layer in layers:
            if layer.sparse is not None:
                states += sum(t.numel() for t in optimizer.state.get(layer.sparse, {}).values()
                              if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"sparse_params": params, "sparse_optimizer_state": states}

# --- resume ------------------------------------------------------------------------------------------------


def _weight_files(checkpoint: str) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(checkpoint, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                return sorted({os.path.join(checkpoint, name) for name in json.load(f)["weight_map"].values()})
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(checkpoint, name)):
            return [os.path.join(checkpoint, name)]
    return []


def checkpoint_alive_indices(checkpoint: str) -> dict[str, torch.Tensor]:
    """{layer name: alive index} of the shrunk layers a Trainer checkpoint holds (only those tensors are read)."""
    found: dict[str, torch.Tensor] = {}
    for path in _weight_files(checkpoint):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key.endswith(ALIVE_SUFFIX):
                        found[key[: -len(ALIVE_SUFFIX)]] = f.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found.update({k[: -len(ALIVE_SUFFIX)]: v for k, v in state.items() if k.endswith(ALIVE_SUFFIX)})
    return found


def narrow_to_checkpoint(model: nn.Module, checkpoint: str, config: Any = None) -> int:
    """Narrow the freshly decomposed `model` to the alive sets saved in `checkpoint`; returns the layers narrowed.

    Call before the weights and the optimizer state are loaded (`LoSparseTrainerMixin.train` does): both were
    saved at the shrunk shapes. A checkpoint written with --shrink_sparse resumes only with it (`config`).
    """
    alive = checkpoint_alive_indices(checkpoint)
    if not alive:
        return 0
    if config is not None and not config.shrink_sparse:
        raise LoSparseUsageError(f"{checkpoint} was written with --shrink_sparse (S holds only its kept neurons); "
                                 "resume it with --shrink_sparse")
    layers = {name: layer for name, layer in losparse_layers(model) if isinstance(layer, LoSparseLinear)}
    for name, index in alive.items():
        layer = layers.get(name)
        if layer is None:
            raise LoSparseUsageError(f"{checkpoint}: shrunk layer {name!r} is not a LoSparse layer of this model")
        if layer.shrunk:
            if torch.equal(layer.sparse_alive_index.cpu(), index):
                continue
            raise LoSparseUsageError(f"{checkpoint}: layer {name!r} is already shrunk to other neurons")
        narrow_layer(layer, index)
    return len(alive)
