"""Child entries of a Linear weight gradient (SDDMM): ``out = float32((dy^T @ x).flatten()[indices])``.

Twin of :func:`adtuning.reference.sddmm_ref`. For the flat index ``e = i * in + j`` the entry
is ``sum_n dy[n, i] * x[n, j]``. Each program owns ``BLOCK_E`` consecutive child entries and
walks the frames ``BLOCK_T`` at a time, multiplying the gathered ``dy`` column and ``x`` column
of every entry element-wise into an fp32 ``[BLOCK_T, BLOCK_E]`` accumulator that is reduced
once at the end. Nothing of the size of ``dW`` exists; each entry is summed by one program in a
fixed order (deterministic, no atomics). Sorted indices make neighbouring entries share their
``dy`` column (one row i) and read nearby ``x`` columns, so a frame's loads of a block hit few
cache lines.

With ``transpose_operands=True`` the launcher first copies ``dy`` and ``x`` into frame-contiguous
layouts (one read and write of each, as the CPU kernel does), so that an entry's loads over a
frame step are contiguous instead of one 4-byte word per 32-byte sector; the kernel is the same
(it takes strides). Which is faster is for ``bench/gpu_check.py`` to measure.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_compact, check_device, check_indices

# 128 entries per program x 16 frames per step, 4 warps. Compiled offline for sm_90 and sm_80
# (Triton 3.8, tools.triton_compile.compile_one, wav2vec2-base's 768x3072 layer over 8 x 4 s,
# every dtype / index type / ACCUMULATE): 64-72 registers, no spills. 32-frame steps needed
# 124-128 registers (the two [BLOCK_T, BLOCK_E] 64-bit pointer tiles) and spilled for fp16.
# Not yet timed on a GPU.
BLOCK_E = 128
BLOCK_T = 16
NUM_WARPS = 4
# Default of ``transpose_operands``: off until a GPU timing says otherwise.
TRANSPOSE_OPERANDS = False


@triton.jit
def _sddmm_kernel(  # type: ignore[no-untyped-def]  # Triton reads kernel annotations: only tl.constexpr
    dy_ptr,
    x_ptr,
    idx_ptr,
    out_ptr,
    k,
    frames,
    in_features,
    stride_dn,
    stride_do,
    stride_xn,
    stride_xi,
    ACCUMULATE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_e = pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < k
    # int64 address math: the flat index, and frame offsets, may exceed 2^31.
    idx = tl.load(idx_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
    row = idx // in_features
    col = idx % in_features
    dy_cols = dy_ptr + row[None, :] * stride_do
    x_cols = x_ptr + col[None, :] * stride_xi
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for t0 in range(0, frames, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = (t < frames)[:, None] & mask_e[None, :]
        a = tl.load(dy_cols + t[:, None] * stride_dn, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_cols + t[:, None] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        acc += a * b
    values = tl.sum(acc, axis=0)
    if ACCUMULATE:
        values += tl.load(out_ptr + offs_e, mask=mask_e, other=0.0)
    tl.store(out_ptr + offs_e, values, mask=mask_e)


def sddmm(
    dy: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    *,
    transpose_operands: bool | None = None,
) -> torch.Tensor:
    """Triton :class:`~adtuning.backend_contract.SDDMMOp` (one launch), plus a layout keyword.

    ``dy`` and ``x`` may have any strides; ``accumulate=True`` needs ``out``.

    Args:
        transpose_operands: copy ``dy`` and ``x`` to frame-contiguous layouts first (see the
            module docstring; default :data:`TRANSPOSE_OPERANDS`). For benchmarks.
    """
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"sddmm: dy [N, out] and x [N, in] must share N, got {tuple(dy.shape)} and {tuple(x.shape)}"
        )
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if dy.dtype not in floats or x.dtype not in floats:
        raise TypeError(f"sddmm: dy/x must be fp32/bf16/fp16, got {dy.dtype}/{x.dtype}")
    frames, out_features = dy.shape
    in_features = x.shape[1]
    check_indices("sddmm", indices, out_features * in_features)
    check_device("sddmm", dy, x, indices)
    k = indices.numel()
    if out is None:
        if accumulate:
            raise ValueError("sddmm: accumulate=True needs an out buffer")
        out = torch.empty(k, dtype=torch.float32, device=dy.device)
    else:
        check_compact("sddmm", "out", out, k)
        check_device("sddmm", dy, out)
    if k == 0:
        return out
    if out_features * in_features == 0:
        raise ValueError(f"sddmm: {k} indices given for a weight with no entries")
    if TRANSPOSE_OPERANDS if transpose_operands is None else transpose_operands:
        # [N, features] views with strides (1, N): the frames of one feature are contiguous.
        dy, x = dy.t().contiguous().t(), x.t().contiguous().t()
    grid = (triton.cdiv(k, BLOCK_E),)
    _sddmm_kernel[grid](
        dy, x, indices, out, k, frames, in_features,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        ACCUMULATE=accumulate, BLOCK_E=BLOCK_E, BLOCK_T=BLOCK_T, num_warps=NUM_WARPS,
    )
    return out
