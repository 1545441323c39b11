"""The two layer modules that replace a targeted `nn.Linear`.

`LoSparseLinear` is the training-time layer: W = U·V + S with a whole-neuron mask on S.
`CompactLoSparseLinear` is the inference layer made from it by `losparse.compact`: it stores only
U, V, the kept neurons of S and their indices, so it is really smaller and cheaper.

Shapes follow `nn.Linear`: weight is (out_features, in_features), y = x·Wᵀ + b. A layer made from
transformers' GPT-2 `Conv1D` (weight stored (in, out), y = x·W + b) computes the same function and
records `dense_type="conv1d"`, so `merge` gives a `Conv1D` back.

The dense layer types are handled here too (`dense_type_of`, `dense_features`, `dense_weight_of`,
`make_dense`), so decomposition, merge and checkpoint loading agree on them.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from losparse.core.functional import losparse_linear
from losparse.core.sharding import is_sharded, local_rows_of

PRUNE_DIM_TO_AXIS = {"rows": 0, "columns": 1}
#: Training layers may also mask S entry by entry (LPAF's unstructured pruning); such an S is never compacted:
#: LPAF factorises it away before the end of training (`losparse.methods.lpaf.pruner`).
TRAINING_PRUNE_DIMS = ("rows", "columns", "entries")
#: The dense layers a LoSparse layer can replace: `nn.Linear` and transformers' GPT-2 `Conv1D`.
DENSE_TYPES = ("linear", "conv1d")
_CONV1D_MODULE = "transformers.pytorch_utils"


def _conv1d_class() -> Optional[type]:
    """transformers' `Conv1D` if its module is imported (else no model can hold one; nothing is imported)."""
    return getattr(sys.modules.get(_CONV1D_MODULE), "Conv1D", None)


def dense_type_of(module: nn.Module) -> Optional[str]:
    """"linear" for an `nn.Linear`, "conv1d" for a GPT-2 `Conv1D`, None for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def dense_features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a dense layer of either type."""
    if dense_type_of(module) == "conv1d":
        return module.nf, module.nx
    return module.out_features, module.in_features


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a dense layer of either type (a transposed view for `Conv1D`)."""
    return module.weight.T if dense_type_of(module) == "conv1d" else module.weight


@torch.no_grad()
def make_dense(dense_type: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A dense layer of `dense_type` computing x·weightᵀ + bias, for the (out, in) matrix `weight`."""
    out_features, in_features = weight.shape
    if dense_type == "conv1d":
        from transformers.pytorch_utils import Conv1D

        with torch.device(weight.device):
            layer = Conv1D(out_features, in_features).to(weight.dtype)
        layer.weight.copy_(weight.T)
        if bias is None:  # Conv1D always has a bias; a zero one computes the same function
            layer.bias.zero_()
        else:
            layer.bias.copy_(bias)
        return layer
    if dense_type != "linear":
        raise ValueError(f"dense_type {dense_type!r} is not one of {', '.join(DENSE_TYPES)}")
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


class _DecomposedLinear(nn.Module):
    """What both layer forms share: the dense layer's shape and type, the rank k of U·V and the pruned dimension."""

    def __init__(self, in_features: int, out_features: int, rank: int, prune_dim: str,
                 dense_type: str = "linear") -> None:
        super().__init__()
        allowed = TRAINING_PRUNE_DIMS if isinstance(self, LoSparseLinear) else tuple(PRUNE_DIM_TO_AXIS)
        if prune_dim not in allowed:
            raise ValueError(f"prune_dim {prune_dim!r} is not one of {', '.join(allowed)}")
        if dense_type not in DENSE_TYPES:
            raise ValueError(f"dense_type {dense_type!r} is not one of {', '.join(DENSE_TYPES)}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.prune_dim = prune_dim
        self.dense_type = dense_type

    @property
    def weight(self) -> torch.Tensor:
        """A read-only stand-in for the replaced layer's `weight`: its shape, dtype and device, no values.

        transformers' model code reads the weight of some layers it owns, e.g. T5's FFN does
        `hidden_states.to(self.wo.weight.dtype)`, GPT-2's and T5's `_init_weights` name `c_proj.weight`
        / `wo.weight`. As in PEFT's layers, `weight` is a property (never a parameter or buffer, so
        `state_dict()`, `named_parameters()` and checkpoints are unchanged). It is *not* the effective
        matrix U·V + S: materialising that on every read would cost an (out, in) matrix per forward in
        T5 and undo the memory saving of the compact form. Instead it is a zero-stride `expand` of one
        NaN scalar with the layer's dtype and device and the replaced layer's shape ((out, in) for
        `nn.Linear`, (in, out) for `Conv1D`): it costs nothing, `.dtype`/`.device`/`.shape` are right,
        code that wrongly computes with it gets NaN rather than plausible numbers, and writing into it
        fails (in-place ops on an expanded tensor raise). It is marked `_is_hf_initialized`, so
        transformers' init helpers skip it instead of failing. For the real matrix use
        `effective_weight()` (training layer) or `dense_weight()` (compact layer).
        """
        reference = next(self.parameters(recurse=False), None)
        if reference is None:  # no parameter at all: only the buffers tell the device
            reference = next(self.buffers(recurse=False))
            dtype = torch.get_default_dtype()
        else:
            dtype = reference.dtype
        shape = (self.out_features, self.in_features)
        if self.dense_type == "conv1d":
            shape = shape[::-1]
        stand_in = torch.full((), float("nan"), dtype=dtype, device=reference.device).expand(shape)
        stand_in._is_hf_initialized = True
        return stand_in


class LoSparseLinear(_DecomposedLinear):
    """y = x·(U·V + S)ᵀ + b, with S pruned by whole neurons.

    Parameters (any may be absent, so baselines reuse the layer):
      low_rank_u: (out, k)   low_rank_v: (k, in)   sparse: (out, in)   bias: (out,)
    Buffer:
      sparse_mask: bool, (out,) for prune_dim="rows", (in,) for "columns", (out, in) for "entries"
      (unstructured, LPAF); True = neuron (entry) kept. It is saved with Trainer checkpoints, so a
      resumed run continues with the same mask.
      sparse_alive_index: None, or (under --shrink_sparse, `losparse.core.shrink`) the long, increasing indices
      of the neurons S still stores: `sparse` is then (alive, in) for rows / (out, alive) for columns, the
      dropped neurons count as zero, and `sparse_mask` still covers all neurons (False for dropped ones).
    Plain attributes set by LPAF's pruner (`losparse.methods.lpaf.pruner`), None/True otherwise:
      active_rank: use only the leading k columns of U and rows of V (nested, mixed-rank training);
      sparse_active: False once S has been factorised away; the forward is then x·Vₖᵀ·Uₖᵀ + b.

    The forward pass builds the effective weight once (U·V costs out·k·in, far less than the
    x·Wᵀ product for any realistic token count) and runs one GEMM; autograd then gives S the full
    gradient that the sensitivity score needs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        has_sparse: bool = True,
        prune_dim: str = "rows",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        dense_type: str = "linear",
    ) -> None:
        super().__init__(in_features, out_features, rank, prune_dim, dense_type)
        factory = {"device": device, "dtype": dtype}
        self.low_rank_u = nn.Parameter(torch.zeros(out_features, rank, **factory)) if rank > 0 else None
        self.low_rank_v = nn.Parameter(torch.zeros(rank, in_features, **factory)) if rank > 0 else None
        self.sparse = nn.Parameter(torch.zeros(out_features, in_features, **factory)) if has_sparse else None
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        mask_shape = {"rows": (out_features,), "columns": (in_features,), "entries": (out_features, in_features)}
        self.register_buffer("sparse_mask", torch.ones(mask_shape[prune_dim], dtype=torch.bool, device=device))
        self.register_buffer("sparse_alive_index", None)  # set by losparse.core.shrink; None: S holds every neuron
        self.active_rank: Optional[int] = None
        self.sparse_active = True

    @property
    def neuron_axis(self) -> Optional[int]:
        """Axis of `sparse` that indexes the prunable neurons (0 for rows, 1 for columns, None for entries)."""
        return PRUNE_DIM_TO_AXIS.get(self.prune_dim)

    @property
    def neuron_size(self) -> int:
        """Parameters of S in one prunable neuron (1 for entries)."""
        return {"rows": self.in_features, "columns": self.out_features}.get(self.prune_dim, 1)

    @property
    def current_rank(self) -> int:
        """The rank the forward uses: `active_rank` if set, else all of U·V."""
        return self.rank if self.active_rank is None else self.active_rank

    @property
    def uses_sparse(self) -> bool:
        """Whether S takes part in the forward (it exists and has not been factorised away)."""
        return self.sparse is not None and self.sparse_active

    @property
    def shrunk(self) -> bool:
        """Whether S physically holds only its alive neurons (`sparse_alive_index`, see `losparse.core.shrink`)."""
        return self.sparse_alive_index is not None

    def sparse_positions(self, neurons: torch.Tensor) -> torch.Tensor:
        """Where neurons (indices over all neurons, all alive) sit along the neuron axis of the stored S."""
        if not self.shrunk:
            return neurons
        return torch.searchsorted(self.sparse_alive_index, neurons)

    def full_sparse(self) -> torch.Tensor:
        """S as the full (out, in) matrix: the stored S itself, or a shrunk S scattered with zeros elsewhere."""
        if not self.shrunk:
            return self.sparse
        full = self.sparse.new_zeros(self.out_features, self.in_features)
        return full.index_add_(self.neuron_axis, self.sparse_alive_index, self.sparse)

    def low_rank_factors(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(U[:, :k], V[:k]) for k = `current_rank` (views), or (None, None) without a low-rank part."""
        if self.low_rank_u is None:
            return None, None
        rank = self.current_rank
        if rank == self.rank:
            return self.low_rank_u, self.low_rank_v
        return self.low_rank_u[:, :rank], self.low_rank_v[:rank]

    def low_rank_weight(self) -> Optional[torch.Tensor]:
        u, v = self.low_rank_factors()
        if u is None:
            return None
        return u @ v

    def effective_weight(self) -> torch.Tensor:
        """U·V + S as one (out, in) matrix (S already carries its mask).

        One fused `addmm`: on CPU a plain `U @ V` with a small inner dimension k can take a slow
        path (measured ~13× slower than `addmm` for a 1536×16 @ 16×384 product).
        """
        if not self.uses_sparse:
            if self.low_rank_u is None:
                raise RuntimeError("LoSparseLinear has neither a low-rank nor a sparse part")
            return self.low_rank_weight()
        u, v = self.low_rank_factors()
        if u is None:
            return self.full_sparse()
        return torch.addmm(self.full_sparse(), u, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse is not None and not self.sparse_active:
            # LPAF after factorising: two thin GEMMs, cheaper than building U·V for a full one.
            u, v = self.low_rank_factors()
            return F.linear(F.linear(x, v), u, self.bias)
        if not self.uses_sparse and self.low_rank_u is None:
            raise RuntimeError("LoSparseLinear has neither a low-rank nor a sparse part")
        # Same values and gradients as F.linear(x, effective_weight(), bias), but no (out, in) matrix is
        # kept alive for the backward (losparse.core.functional).
        u, v = self.low_rank_factors()
        if self.shrunk:  # S holds only its alive neurons: they are scattered in (index_add) or gathered
            return losparse_linear(x, u, v, self.sparse, self.bias, alive_index=self.sparse_alive_index,
                                   neuron_axis=self.neuron_axis, out_features=self.out_features)
        return losparse_linear(x, u, v, self.sparse, self.bias)

    def _broadcast_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self.neuron_axis is None:
            return mask
        return mask.unsqueeze(1) if self.neuron_axis == 0 else mask.unsqueeze(0)

    @torch.no_grad()
    def set_sparse_mask(self, mask: torch.Tensor) -> None:
        """Store a new neuron mask and zero the pruned neurons of S."""
        self.sparse_mask.copy_(mask)
        self.apply_sparse_mask()

    @torch.no_grad()
    def apply_sparse_mask(self) -> None:
        """Zero the pruned neurons of S again (after an optimizer step could have moved them).

        Under FSDP2 (S a row-sharded DTensor, the mask a full buffer) each rank zeroes its own rows only.
        """
        if self.sparse is None:
            return
        if is_sharded(self.sparse):
            local, mask = local_rows_of(self.sparse, self.sparse_mask, self.neuron_axis)
            local.mul_(self._broadcast_mask(mask).to(local.dtype))
            return
        mask = self.sparse_mask if not self.shrunk else self.sparse_mask.index_select(0, self.sparse_alive_index)
        self.sparse.mul_(self._broadcast_mask(mask).to(self.sparse.dtype))

    def kept_neuron_index(self) -> torch.Tensor:
        if self.neuron_axis is None:
            raise ValueError("an entry-masked (unstructured) S has no kept neurons; LPAF factorises it away first")
        return torch.nonzero(self.sparse_mask, as_tuple=False).flatten()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            + (f"active_rank={self.active_rank}, " if self.active_rank is not None else "")
            + f"sparse={self.uses_sparse}, prune_dim={self.prune_dim}, bias={self.bias is not None}"
            + (f", alive={self.sparse_alive_index.numel()}" if self.shrunk else "")
            + (f", dense_type={self.dense_type}" if self.dense_type != "linear" else "")
        )


class CompactLoSparseLinear(_DecomposedLinear):
    """Inference form of `LoSparseLinear` with the pruned neurons of S physically removed.

    prune_dim="rows" (m kept output neurons, indices `kept_index`):
      fused_weight = [V; S_kept]  (k+m, in)     low_rank_u = U  (out, k)
      z = x·fused_weightᵀ;  y = z[:, :k]·Uᵀ + b;  y[:, kept_index] += z[:, k:]
    prune_dim="columns" (m kept input neurons):
      low_rank_v = V  (k, in)                   fused_weight = [U | S_kept]  (out, k+m)
      y = [x·Vᵀ, x[:, kept_index]]·fused_weightᵀ + b
    Either way the work is two GEMMs and one gather/scatter over only the kept neurons, with no
    dense S and no zero-filled buffer; any leading batch/sequence shape and any dtype works.

    When `kept_index` is one contiguous range [a, a+m) (what `losparse.deploy.permute.make_contiguous` arranges
    for FFN layers), the scatter is a slice add `y[..., a:a+m] += z[..., k:]` and the gather a slice
    `x[..., a:a+m]`. `kept_start` (a plain int attribute, a or None) records that; `refresh_layout()`
    recomputes it once whenever `kept_index` changes (`from_losparse`, `load_state_dict`, `losparse.load`,
    the permutation), so the forward never reads `kept_index` back to the host.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        num_kept: int,
        bias: bool = True,
        prune_dim: str = "rows",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        dense_type: str = "linear",
    ) -> None:
        super().__init__(in_features, out_features, rank, prune_dim, dense_type)
        factory = {"device": device, "dtype": dtype}
        self.num_kept = num_kept
        if prune_dim == "rows":
            self.fused_weight = nn.Parameter(torch.zeros(rank + num_kept, in_features, **factory))
            self.low_rank_u = nn.Parameter(torch.zeros(out_features, rank, **factory))
            self.low_rank_v = None
        else:
            self.low_rank_v = nn.Parameter(torch.zeros(rank, in_features, **factory))
            self.fused_weight = nn.Parameter(torch.zeros(out_features, rank + num_kept, **factory))
            self.low_rank_u = None
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer("kept_index", torch.zeros(num_kept, dtype=torch.long, device=device))
        self.kept_start: Optional[int] = None

    @torch.no_grad()
    def refresh_layout(self) -> Optional[int]:
        """Set `kept_start` to a if `kept_index` is exactly a, a+1, ..., a+m-1, else None; returns it.

        One host read of `kept_index`: call it after changing the indices, never per forward. A tensor on
        the meta device has no values yet, so it gives None (the indexed path, always correct).
        """
        index = self.kept_index
        self.kept_start = None
        if index.numel() and not index.is_meta:
            start = int(index[0])
            if bool((index == torch.arange(start, start + index.numel(), device=index.device)).all()):
                self.kept_start = start
        return self.kept_start

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_layout()  # new kept_index values: the slice path must not use a stale start

    @classmethod
    @torch.no_grad()
    def from_losparse(cls, layer: LoSparseLinear) -> "CompactLoSparseLinear":
        if layer.uses_sparse:
            kept_index = layer.kept_neuron_index()
        else:
            kept_index = torch.zeros(0, dtype=torch.long, device=layer.sparse_mask.device)
        ref = layer.sparse if layer.sparse is not None else layer.low_rank_u
        low_rank_u, low_rank_v = layer.low_rank_factors()
        # an S factorised away (LPAF) leaves pure U·V, stored in the rows form with no kept neuron
        prune_dim = layer.prune_dim if layer.neuron_axis is not None else "rows"
        compact = cls(
            layer.in_features,
            layer.out_features,
            layer.current_rank,
            int(kept_index.numel()),
            bias=layer.bias is not None,
            prune_dim=prune_dim,
            device=ref.device,
            dtype=ref.dtype,
            dense_type=layer.dense_type,
        )
        rank = layer.current_rank
        if prune_dim == "rows":
            if rank:
                compact.fused_weight[:rank].copy_(low_rank_v)
                compact.low_rank_u.copy_(low_rank_u)
            if compact.num_kept:
                compact.fused_weight[rank:].copy_(layer.sparse.index_select(0, layer.sparse_positions(kept_index)))
        else:
            if rank:
                compact.low_rank_v.copy_(low_rank_v)
                compact.fused_weight[:, :rank].copy_(low_rank_u)
            if compact.num_kept:
                compact.fused_weight[:, rank:].copy_(layer.sparse.index_select(1, layer.sparse_positions(kept_index)))
        compact.kept_index.copy_(kept_index)
        if layer.bias is not None:
            compact.bias.copy_(layer.bias)
        compact.refresh_layout()
        return compact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.rank
        if self.prune_dim == "rows":
            z = F.linear(x, self.fused_weight)
            if rank:
                y = F.linear(z[..., :rank], self.low_rank_u, self.bias)
            elif self.bias is not None:
                y = self.bias.expand(*x.shape[:-1], self.out_features).clone(memory_format=torch.contiguous_format)
            else:
                y = x.new_zeros(*x.shape[:-1], self.out_features)
            if self.num_kept:
                if self.kept_start is None:
                    y.index_add_(-1, self.kept_index, z[..., rank:])
                else:
                    y.narrow(-1, self.kept_start, self.num_kept).add_(z[..., rank:])
            return y
        parts = [F.linear(x, self.low_rank_v)] if rank else []
        if self.num_kept:
            if self.kept_start is None:
                parts.append(x.index_select(-1, self.kept_index))
            else:
                parts.append(x.narrow(-1, self.kept_start, self.num_kept))
        return F.linear(torch.cat(parts, dim=-1), self.fused_weight, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense (out, in) matrix U·V + S, for `merge`."""
        rank = self.rank
        if self.prune_dim == "rows":
            weight = self.low_rank_u @ self.fused_weight[:rank]
            weight.index_add_(0, self.kept_index, self.fused_weight[rank:])
        else:
            weight = self.fused_weight[:, :rank] @ self.low_rank_v
            weight.index_add_(1, self.kept_index, self.fused_weight[:, rank:])
        return weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"num_kept={self.num_kept} ({self.prune_dim}), bias={self.bias is not None}"
            + (f", dense_type={self.dense_type}" if self.dense_type != "linear" else "")
        )
