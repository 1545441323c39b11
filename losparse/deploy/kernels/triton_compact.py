"""Triton forward of `CompactLoSparseLinear`: two GEMM launches, the kept-neuron scatter/gather fused in.

The PyTorch forward of the compact layer (layers.py) is two GEMMs plus one `index_add_` (rows) or
`index_select` + `cat` (columns): an extra pass over y (or a copy of the gathered x) per call. Here
that index work moves into the second GEMM, so no extra pass and no extra buffer remain:

prune_dim="rows"   fused_weight = [V; S_kept] (k+m, in), low_rank_u = U (out, k), kept_index (m,)
  launch 1  z = x·fused_weightᵀ                                    (M, k+m), fp32 accumulation
  launch 2  y = z[:, :k]·Uᵀ + b + z[:, k + pos[n]]                 (M, out)
            pos = the inverse of kept_index (pos[kept_index[j]] = j, -1 elsewhere): the scatter is a
            masked load in the epilogue of launch 2, one column of z per output column at most.
prune_dim="columns" low_rank_v = V (k, in), fused_weight = [U | S_kept] (out, k+m)
  launch 1  z = x·Vᵀ                                               (M, k)
  launch 2  y = [z, x[:, kept_index]]·fused_weightᵀ + b            (M, out)
            the concatenated A operand is never built: each K step of launch 2 loads its block from z
            (reduction index < k) or gathers it from x through kept_index.

A single launch would need a tile of z over all k+m columns per row block before launch 2's product
could start (or recomputing z once per output tile); two launches keep each GEMM a plain tiled GEMM.
Any leading shape (flattened to 2-D), any strides (passed to the kernels, no copy of x unless its
2-D view needs one), fp32 / bf16 / fp16 inputs with fp32 accumulation; z is stored in the input
dtype, as the PyTorch path does. The layer's own forward stays the default: this path is for CUDA,
where a caller measures it faster (under TRITON_INTERPRET=1 it also runs on CPU tensors, slowly,
which is how the tests check it: set it before the first call, since triton fixes the mode when the
kernels are built; there bf16 operands are multiplied in fp32, since the interpreter's
tl.dot mishandles bf16, while compiled kernels multiply in the input dtype).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from losparse.core.errors import LoSparseUsageError
from losparse.core.layers import CompactLoSparseLinear

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_POSITION_CACHE = "_triton_kept_position"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when triton imports and can run here: a CUDA device, or TRITON_INTERPRET=1 (CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _interpreting()


def kept_position(layer: CompactLoSparseLinear) -> torch.Tensor:
    """pos (int32, length out_features for rows): pos[kept_index[j]] = j, -1 where no S row is kept.

    Cached on the layer (an attribute, not a buffer, so state_dict and checkpoints are unchanged) and
    rebuilt when kept_index changes (in place, by its version counter, or moves to another device).
    """
    index = layer.kept_index
    key = (index.data_ptr(), index._version, index.device, index.numel())
    cached = getattr(layer, _POSITION_CACHE, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    position = torch.full((layer.out_features,), -1, dtype=torch.int32, device=index.device)
    if index.numel():
        position[index] = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
    object.__setattr__(layer, _POSITION_CACHE, (key, position))
    return position


def _kernels() -> Any:
    """The jitted kernels (module `compact_kernels`), imported on first use: importing this module needs no triton."""
    from losparse.deploy.kernels import compact_kernels  # optional dependency: imports triton

    return compact_kernels


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee") unless torch itself allows TF32 matmuls, so both paths agree."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _grid(triton: Any, M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _check(layer: Any, x: torch.Tensor) -> None:
    if not isinstance(layer, CompactLoSparseLinear):
        raise LoSparseUsageError(f"fused_compact_forward: layer is a {type(layer).__name__}; "
                                 "only CompactLoSparseLinear (losparse.compact) is supported")
    if not triton_available():
        raise LoSparseUsageError("fused_compact_forward: triton is not usable here; install losparse[triton] and "
                                 "run on CUDA (or set TRITON_INTERPRET=1 before importing triton)")
    weight = layer.fused_weight
    if x.dtype not in _SUPPORTED_DTYPES:
        raise LoSparseUsageError(f"fused_compact_forward: input dtype {x.dtype}; allowed: float32, bfloat16, float16")
    if x.dtype != weight.dtype:
        raise LoSparseUsageError(f"fused_compact_forward: input dtype {x.dtype} differs from the layer's "
                                 f"{weight.dtype}; cast one of them")
    if x.device != weight.device:
        raise LoSparseUsageError(f"fused_compact_forward: input on {x.device}, layer on {weight.device}")
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        raise LoSparseUsageError(f"fused_compact_forward: input shape {tuple(x.shape)}; the last dimension "
                                 f"must be in_features={layer.in_features}")


def fused_compact_forward(layer: CompactLoSparseLinear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed by two Triton launches (see the module docstring); x (..., in) → y (..., out).

    Same result as the layer's forward up to summation order (fp32 accumulation). Inference only:
    the result carries no autograd graph.
    """
    _check(layer, x)
    kernels = _kernels()
    if (x.device.type == "cuda") == kernels.INTERPRETED:
        raise LoSparseUsageError(f"fused_compact_forward: tensors on {x.device}, kernels "
                                 f"{'interpreted (CPU only)' if kernels.INTERPRETED else 'compiled (CUDA only)'}; "
                                 "TRITON_INTERPRET=1 before the first call interprets, unset compiles")
    triton = kernels.triton
    leading = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    M = x2.shape[0]
    N = layer.out_features
    rank, kept = layer.rank, layer.num_kept
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*leading, N)
    bias = layer.bias
    precision = _dot_precision(x.dtype)
    upcast = x.dtype == torch.bfloat16 and kernels.INTERPRETED
    with torch.no_grad():
        if layer.prune_dim == "rows":
            weight = layer.fused_weight
            z = torch.empty(M, rank + kept, dtype=x.dtype, device=x.device)
            if rank + kept:
                kernels.gemm_nt[_grid(triton, M, rank + kept)](
                    x2, weight, z, M, rank + kept, layer.in_features,
                    x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), z.stride(0), z.stride(1),
                    PRECISION=precision, UPCAST=upcast)
            u = layer.low_rank_u
            position = kept_position(layer)
            kernels.rows_second[_grid(triton, M, N)](
                z, u, bias if bias is not None else y, position, y, M, N, rank,
                z.stride(0), z.stride(1), u.stride(0), u.stride(1), y.stride(0), y.stride(1),
                HAS_BIAS=bias is not None, HAS_KEPT=kept > 0, PRECISION=precision, UPCAST=upcast)
        else:
            v, weight = layer.low_rank_v, layer.fused_weight
            z = torch.empty(M, rank, dtype=x.dtype, device=x.device)
            if rank:
                kernels.gemm_nt[_grid(triton, M, rank)](
                    x2, v, z, M, rank, layer.in_features,
                    x2.stride(0), x2.stride(1), v.stride(0), v.stride(1), z.stride(0), z.stride(1),
                    PRECISION=precision, UPCAST=upcast)
            kernels.columns_second[_grid(triton, M, N)](
                z, x2, layer.kept_index, weight, bias if bias is not None else y, y, M, N, rank, kept,
                z.stride(0), z.stride(1), x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
                y.stride(0), y.stride(1), HAS_BIAS=bias is not None, PRECISION=precision, UPCAST=upcast)
    return y.reshape(*leading, N)
