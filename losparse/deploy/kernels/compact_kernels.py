"""The Triton kernels behind `triton_compact.fused_compact_forward` (importing this module imports triton).

triton decides when a kernel is decorated whether it compiles or interprets, so TRITON_INTERPRET must
be set before this module is first imported. Shapes and what each kernel computes: triton_compact.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs() -> list:
    """Modest autotuning on a GPU (4 tile shapes); one small tile under the interpreter (each config costs seconds)."""
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1)]
    shapes = [(128, 128, 32, 4, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in shapes]


#: whether these kernels were decorated as interpreted (CPU tensors) or compiled (CUDA)
INTERPRETED = _interpreting()
_CONFIGS = _configs()


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the CPU interpreter's tl.dot returns garbage for bf16 operands (triton 3.9), so there
    # the operands go to fp32 first; compiled kernels always multiply in the input dtype
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row tiles share each column tile while it sits in L2
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % group_size)
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def gemm_nt(a_ptr, b_ptr, c_ptr, M, N, K,
            stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c (M, N) = a (M, K) · b (N, K)ᵀ, fp32 accumulation, stored in c's dtype."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None] * stride_bk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def rows_second(z_ptr, u_ptr, bias_ptr, pos_ptr, y_ptr, M, N, K,
                stride_zm, stride_zk, stride_un, stride_uk, stride_ym, stride_yn,
                HAS_BIAS: tl.constexpr, HAS_KEPT: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y (M, N) = z[:, :K]·Uᵀ + bias + z[:, K + pos[n]] (where pos[n] >= 0)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(z_ptr + rm[:, None] * stride_zm + kk[None, :] * stride_zk,
                    mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(u_ptr + rn[None, :] * stride_un + kk[:, None] * stride_uk,
                    mask=col_ok[None, :] & (kk[:, None] < K), other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_KEPT:
        pos = tl.load(pos_ptr + rn, mask=col_ok, other=-1).to(tl.int64)
        sparse = tl.load(z_ptr + rm[:, None] * stride_zm + (K + pos)[None, :] * stride_zk,
                         mask=row_ok[:, None] & (pos >= 0)[None, :], other=0.0)
        acc += sparse.to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_CONFIGS, key=["M", "N", "RANK", "KEPT"])
@triton.jit
def columns_second(z_ptr, x_ptr, kept_ptr, w_ptr, bias_ptr, y_ptr, M, N, RANK, KEPT,
                   stride_zm, stride_zk, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                   HAS_BIAS: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y (M, N) = [z, x[:, kept]]·Wᵀ + bias with W (N, RANK+KEPT); the A operand is read in place."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    total = RANK + KEPT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, total, BLOCK_K):
        kk = k0 + rk
        from_z = kk < RANK
        from_x = (kk >= RANK) & (kk < total)
        a_low = tl.load(z_ptr + rm[:, None] * stride_zm + kk[None, :] * stride_zk,
                        mask=row_ok[:, None] & from_z[None, :], other=0.0)
        source = tl.load(kept_ptr + (kk - RANK), mask=from_x, other=0).to(tl.int64)
        a_kept = tl.load(x_ptr + rm[:, None] * stride_xm + source[None, :] * stride_xk,
                         mask=row_ok[:, None] & from_x[None, :], other=0.0)
        a = tl.where(from_z[None, :], a_low, a_kept)
        b = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=col_ok[None, :] & (kk[:, None] < total), other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
