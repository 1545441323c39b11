"""Neuron importance and masks when S is sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`).

FSDP2 turns every parameter into a DTensor sharded by rows (placement `Shard(0)` on a 1-D mesh of W
ranks): rank r holds rows [r·c, min((r+1)·c, out)) of S, c = ceil(out / W) (`torch.chunk`
semantics; the last ranks may hold fewer rows, or none — FSDP pads its storage, but `to_local()` is
the unpadded (rows, in) view). After the optimizer step `S.grad` is sharded the same way, so each
rank scores the entries of its own rows, and:

  prune_dim rows     a row's mean is local: each rank computes the means of its rows, and one
                     all-gather (c floats per rank and layer) assembles the full per-neuron vector;
  prune_dim columns  a column spans all ranks: each rank sums its rows per column, and one
                     all-reduce (in floats per layer) gives the column sums, divided by out;
  entries (LPAF)     the global top-k would need every entry score: refused (`check_shardable`).

Every rank then holds the same full score vector and runs the same global keep rule, so the masks
(`sparse_mask`, a buffer, which FSDP2 does not shard) agree everywhere; each rank zeroes only its
own rows (`local_rows_of`). Without a DTensor nothing here runs: the single-process and DDP paths
are untouched.

`unshard_model` ends the sharding after training (all ranks, collectively), so `losparse.compact`
and `losparse.save` see plain full tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from losparse.core.errors import LoSparseUsageError


def _dtensor_class() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no sharded tensors
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 parameter or gradient)."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view sharing its storage); any other tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class RowShard:
    """Which rows of a row-sharded (out, in) parameter this rank holds, and the group that holds the rest."""

    offset: int       #: first global row held here
    length: int       #: rows held here (0 ≤ length ≤ chunk)
    chunk: int        #: rows per rank, ceil(out / world_size): the padded size every rank gathers
    world_size: int
    group: Any        #: the process group of the 1-D mesh


def row_shard(param: torch.Tensor) -> RowShard:
    """The `RowShard` of an FSDP2 parameter; anything but `Shard(0)` on a 1-D mesh is refused."""
    from torch.distributed.tensor import Shard

    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise LoSparseUsageError(
            f"a sharded S has placements {placements} on a {mesh.ndim}-D mesh; LoSparse supports FSDP2's "
            "default row sharding (Shard(0)) on a 1-D mesh only (not HSDP or tensor parallelism)"
        )
    world_size = mesh.size()
    rows = param.shape[0]
    chunk = -(-rows // world_size)
    offset = min(rows, mesh.get_local_rank() * chunk)
    length = local_tensor(param).shape[0]
    if length != min(chunk, rows - offset):
        raise RuntimeError(f"unexpected FSDP2 shard: {length} local rows at offset {offset} of {rows} (chunk {chunk})")
    return RowShard(offset=offset, length=length, chunk=chunk, world_size=world_size, group=mesh.get_group())


def any_sharded(layers: Sequence[nn.Module]) -> bool:
    return any(layer.sparse is not None and is_sharded(layer.sparse) for layer in layers)


ENTRY_MASKS_REFUSED = (
    "entry-wise masks (LPAF's unstructured pruning) are not supported under FSDP: their global top-k needs every "
    "entry score on every rank; use a LoSparse method with --prune_dim rows or columns, or plain DDP"
)
UNCERTAINTY_REFUSED = (
    "--beta2 > 0 (the uncertainty term) is not supported under FSDP: it keeps per-entry state that would need a "
    "sharded pruner checkpoint; use --beta2 0, or plain DDP"
)


def check_fsdp_config(config: Any) -> None:
    """Refuse, before any loading, a `LoSparseConfig` whose importance has no sharded form here."""
    if config.method_spec.prune_then_factorize:
        raise LoSparseUsageError(f"--method {config.method}: {ENTRY_MASKS_REFUSED}")
    if config.beta2 > 0.0 and (config.method_spec.importance or config.importance) == "sensitivity":
        raise LoSparseUsageError(UNCERTAINTY_REFUSED)


def check_shardable(layers: Sequence[nn.Module], uses_uncertainty: bool) -> None:
    """The same refusals for layers already sharded by `fully_shard` (a loop without the Trainer)."""
    if not any_sharded(layers):
        return
    if any(layer.neuron_axis is None for layer in layers):
        raise LoSparseUsageError(ENTRY_MASKS_REFUSED)
    if uses_uncertainty:
        raise LoSparseUsageError(UNCERTAINTY_REFUSED)
    for layer in layers:
        row_shard(layer.sparse)  # refuses other placements


def sharded_neuron_means(entry_scores: Sequence[torch.Tensor], layers: Sequence[nn.Module]) -> torch.Tensor:
    """Eq. 4 per neuron for all `layers`, in layer order, when some S are row-sharded.

    `entry_scores[i]`: (rows held here, in) for a sharded layer, (out, in) for a plain one. Returns the
    full float vector (Σ neurons,), identical on every rank. One all-gather (the padded per-row means of
    all rows-layers) and one all-reduce (the column sums of all columns-layers), whatever the layer count.
    """
    pieces: list[Any] = []  # per layer: its means (plain S), or (kind, RowShard, out_features) to fill in
    gathered: list[torch.Tensor] = []
    column_sums: list[torch.Tensor] = []
    group = None
    for scores, layer in zip(entry_scores, layers):
        if not is_sharded(layer.sparse):
            pieces.append(scores.reshape(-1) if layer.neuron_axis is None else scores.mean(dim=1 - layer.neuron_axis))
            continue
        shard = row_shard(layer.sparse)
        group = shard.group
        if layer.neuron_axis == 0:
            padded = scores.new_zeros(shard.chunk)
            padded[: shard.length] = scores.mean(dim=1)
            gathered.append(padded)
            pieces.append(("rows", shard, layer.out_features))
        else:
            column_sums.append(scores.sum(dim=0))
            pieces.append(("columns", shard, layer.out_features))
    import torch.distributed as dist

    world_size = dist.get_world_size(group)
    rows_by_rank: list[torch.Tensor] = []
    if gathered:
        local = torch.cat(gathered)
        rows_by_rank = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(rows_by_rank, local, group=group)
    if column_sums:
        summed = torch.cat(column_sums)
        dist.all_reduce(summed, group=group)
        column_sums = list(torch.split(summed, [t.numel() for t in column_sums]))
    means: list[torch.Tensor] = []
    row_start = 0
    column_index = 0
    for piece in pieces:
        if isinstance(piece, torch.Tensor):
            means.append(piece)
            continue
        kind, shard, out_features = piece
        if kind == "rows":
            per_rank = [part[row_start: row_start + shard.chunk] for part in rows_by_rank]
            means.append(torch.cat(per_rank)[:out_features])
            row_start += shard.chunk
        else:
            means.append(column_sums[column_index] / out_features)
            column_index += 1
    return torch.cat(means)


def local_rows_of(param: torch.Tensor, mask: torch.Tensor, neuron_axis: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's S, the part of the full `mask` that applies to it) for a row-sharded S.

    A rows mask (out,) or an entries mask (out, in) is sliced to the local rows; a columns mask (in,)
    applies whole to every row.
    """
    local = local_tensor(param)
    if neuron_axis == 1:
        return local, mask
    shard = row_shard(param)
    return local, mask.narrow(0, shard.offset, shard.length)


def is_fsdp_model(model: nn.Module) -> bool:
    """Whether any parameter of `model` is an FSDP2 DTensor."""
    return any(is_sharded(p) for p in model.parameters())


@torch.no_grad()
def unshard_model(model: nn.Module) -> nn.Module:
    """Turn an FSDP2-sharded `model` back into a plain module with full tensors, in place; returns it.

    Collective: every rank must call it, at the same point. Each DTensor parameter becomes a plain
    `nn.Parameter` holding the full tensor (`full_tensor()`, an all-gather; a parameter shared by
    several modules stays shared), FSDP's forward hooks are removed and each module gets its own class
    back, so `losparse.compact`, `losparse.save` and evaluation see an ordinary model on every rank.
    Training cannot continue with FSDP afterwards.
    """
    from torch.distributed.fsdp import FSDPModule

    full: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not is_sharded(param):
                continue
            if id(param) not in full:
                full[id(param)] = nn.Parameter(param.full_tensor().detach().clone(),
                                               requires_grad=param.requires_grad)
            module._parameters[name] = full[id(param)]
    for module in model.modules():
        # transformers marks FSDP2 modules so that `generate` syncs every rank each step (`synced_gpus`);
        # a plain model generating on one rank must not wait for the others
        module.__dict__.pop("_is_fsdp_managed_module", None)
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for handle in {id(h): h for h in (getattr(state, "_pre_forward_hook_handle", None),
                                          getattr(state, "_post_forward_hook_handle", None)) if h is not None}.values():
            handle.remove()
        for name in [name for name, value in vars(module).items() if _is_fsdp_method_patch(value)]:
            delattr(module, name)  # `register_fsdp_forward_method` (accelerate does it for `generate`)
        module.__class__ = next(base for base in type(module).__mro__[1:] if not issubclass(base, FSDPModule))
    return model


def _is_fsdp_method_patch(value: Any) -> bool:
    """Whether an instance attribute is FSDP2's wrapper of a method (it runs the unshard hooks around it)."""
    code = getattr(getattr(value, "__func__", None), "__code__", None)
    return code is not None and code.co_name == "wrapped_method" and "fsdp" in code.co_filename.replace("\\", "/")
