"""Per-sample Fisher of a Linear layer, accumulated tile by tile inside backward.

Twin of :func:`adtuning.reference.linear_fisher_ref_`:
``fisher_w += sum_n (dy_n^T x_n)^2`` and ``fisher_b += sum_n (sum_t dy_n,t)^2``.

Each program owns one ``[BLOCK_M, BLOCK_N]`` tile of ``fisher_w`` (rows = output features,
columns = input features). For every sample it accumulates that sample's weight-gradient tile
over its valid frames with ``tl.dot`` in fp32 registers, squares it and adds it to a register
Fisher tile; the tile is read-modified-written in global memory once at the end. No
per-sample gradient is ever materialised, the FLOPs equal those of the ordinary
weight-gradient GEMM, padded frames are never loaded, and the result is deterministic
(each Fisher entry is summed by one program in a fixed order; no atomics).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting

# tl.dot needs every tile dimension >= 16; smaller layers are handled by masking.
MIN_BLOCK = 16
# 64x64 Fisher tiles: the 768/3072-wide layers of speech SSL models give >= 144 tiles.
MAX_BLOCK_MN = 64
# Frames per tl.dot: 16 when an operand is fp32 (each dot runs as three TF32 products),
# 32 for 16-bit operands.
MAX_BLOCK_K_FP32 = 16
MAX_BLOCK_K_16BIT = 32
# fp32 inputs: three TF32 tensor-core products recover fp32 accuracy (rel. error ~1e-6);
# plain TF32 (~1e-3) would not meet the reference's 1e-5. bf16/fp16 values are exact in TF32,
# so upcast 16-bit tiles need one pass (and native 16-bit dots ignore the setting).
FP32_INPUT_PRECISION = "tf32x3"
LOW_INPUT_PRECISION = "tf32"
# 4 warps per 64x64 tile. Compiled for sm_80 and sm_90 by Triton 3.6 and 3.8
# (``python -m tools.triton_compile``) these tilings use at most 255 registers per thread
# (196-249 for a wav2vec2-base fp32 launch) and spill nothing on sm_90, so two programs fit
# one SM and wav2vec2-base's 144-tile 768x768 layers run in one wave on 132 SMs. 32-frame fp32
# tiles spill on sm_80 with Triton 3.8; 8 warps hold one program per SM. Not yet timed on a GPU.
NUM_WARPS = 4
# 3 stages pipeline the frame loop's loads behind the dots.
NUM_STAGES = 3
# Tilings worth timing on a new GPU (bench/gpu_check.py times each against the defaults):
# (block_m, block_n, block_k, num_warps, num_stages, input_precision).
TUNING_CANDIDATES = (
    (64, 64, 32, 4, 3, "tf32x3"),
    (64, 64, 32, 8, 3, "tf32x3"),
    (128, 64, 16, 8, 3, "tf32x3"),
    (64, 128, 16, 8, 3, "tf32x3"),
    (32, 32, 32, 4, 3, "tf32x3"),
    (64, 64, 16, 4, 3, "ieee"),
)


@triton.jit
def _linear_fisher_kernel(  # type: ignore[no-untyped-def]  # Triton reads kernel annotations: only tl.constexpr
    x_ptr,
    dy_ptr,
    fisher_w_ptr,
    fisher_b_ptr,
    lengths_ptr,
    batch,
    frames,
    in_features,
    out_features,
    stride_xb,
    stride_xt,
    stride_xi,
    stride_db,
    stride_dt,
    stride_do,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < out_features
    mask_n = offs_n < in_features

    fisher = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    fisher_b = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Sample base pointers advance by one batch stride per sample: 64-bit pointer arithmetic,
    # so B * T * features may exceed 2^31 elements.
    dy_base = dy_ptr
    x_base = x_ptr
    for n in range(batch):
        if HAS_LENGTHS:
            valid = tl.minimum(tl.maximum(tl.load(lengths_ptr + n).to(tl.int32), 0), frames)
        else:
            valid = frames
        grad_w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # Bias gradient summed element-wise over frame tiles and reduced once per sample: no
        # cross-thread reduction inside the frame loop (Triton 3.6 fails to compile a
        # loop-carried tl.sum whose result is squared).
        grad_b_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        # The loop stops at the sample's length: padded frames cost no loads and no FLOPs.
        for t0 in range(0, valid, BLOCK_K):
            t = t0 + offs_k
            mask_t = t < valid
            # dy_n^T tile [BLOCK_M, BLOCK_K] and x_n tile [BLOCK_K, BLOCK_N]; masked entries are 0.
            dyt = tl.load(
                dy_base + offs_m[:, None] * stride_do + t[None, :] * stride_dt,
                mask=mask_m[:, None] & mask_t[None, :],
                other=0.0,
            )
            xt = tl.load(
                x_base + t[:, None] * stride_xt + offs_n[None, :] * stride_xi,
                mask=mask_t[:, None] & mask_n[None, :],
                other=0.0,
            )
            if UPCAST:
                # Mixed input dtypes (fp32 activations, bf16 gradients) or the interpreter.
                dyt = dyt.to(tl.float32)
                xt = xt.to(tl.float32)
            grad_w = tl.dot(dyt, xt, grad_w, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                grad_b_tile += dyt.to(tl.float32)
        fisher += grad_w * grad_w
        if HAS_BIAS:
            grad_b = tl.sum(grad_b_tile, axis=1)
            fisher_b += grad_b * grad_b
        dy_base += stride_db
        x_base += stride_xb

    w_ptrs = fisher_w_ptr + offs_m[:, None].to(tl.int64) * in_features + offs_n[None, :]
    w_mask = mask_m[:, None] & mask_n[None, :]
    tl.store(w_ptrs, tl.load(w_ptrs, mask=w_mask, other=0.0) + fisher, mask=w_mask)
    if HAS_BIAS:  # noqa: SIM102 (a compile-time and a run-time condition)
        # Every column tile computed the same bias sums; the first one writes them.
        if pid_n == 0:
            b_ptrs = fisher_b_ptr + offs_m
            tl.store(b_ptrs, tl.load(b_ptrs, mask=mask_m, other=0.0) + fisher_b, mask=mask_m)


def _block(size: int, cap: int) -> int:
    """Smallest power of two >= ``size``, clamped to [MIN_BLOCK, cap]."""
    return max(MIN_BLOCK, min(cap, int(triton.next_power_of_2(max(1, size)))))


def linear_fisher(
    x: torch.Tensor,
    dy: torch.Tensor,
    fisher_w: torch.Tensor,
    fisher_b: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    input_precision: str | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Triton :class:`~adtuning.backend_contract.LinearFisherOp` (one tiled launch), plus tuning keywords.

    ``x`` and ``dy`` may have any strides.

    Args:
        block_m, block_n, block_k, input_precision, num_warps, num_stages: tiling overrides
            for benchmarks (block sizes are powers of two >= 16). The defaults are chosen
            to compile without register spills; they have not been timed on a GPU yet.
    """
    if x.dim() != 3 or dy.dim() != 3 or x.shape[:2] != dy.shape[:2]:
        raise ValueError(
            f"linear_fisher: x [B, T, in] and dy [B, T, out] must share B and T, "
            f"got {tuple(x.shape)} and {tuple(dy.shape)}"
        )
    low = (torch.float32, torch.bfloat16, torch.float16)
    if x.dtype not in low or dy.dtype not in low:
        raise TypeError(f"linear_fisher: x/dy must be fp32/bf16/fp16, got {x.dtype}/{dy.dtype}")
    batch, frames, in_features = x.shape
    out_features = dy.shape[2]
    if fisher_w.dtype != torch.float32 or tuple(fisher_w.shape) != (out_features, in_features) \
            or not fisher_w.is_contiguous():
        raise ValueError(
            f"linear_fisher: fisher_w must be a contiguous fp32 [{out_features}, {in_features}] "
            f"tensor, got {fisher_w.dtype} {tuple(fisher_w.shape)}"
        )
    if fisher_b is not None and (
        fisher_b.dtype != torch.float32 or tuple(fisher_b.shape) != (out_features,)
        or not fisher_b.is_contiguous()
    ):
        raise ValueError(
            f"linear_fisher: fisher_b must be a contiguous fp32 [{out_features}] tensor, "
            f"got {fisher_b.dtype} {tuple(fisher_b.shape)}"
        )
    if lengths is not None:
        if lengths.dtype not in (torch.int32, torch.int64) or tuple(lengths.shape) != (batch,):
            raise ValueError(
                f"linear_fisher: lengths must be an int32/int64 [{batch}] tensor, "
                f"got {lengths.dtype} {tuple(lengths.shape)}"
            )
        lengths = lengths.to(x.device).contiguous()
    check_device("linear_fisher", x, dy, fisher_w, fisher_b, lengths)
    if batch == 0 or frames == 0 or in_features == 0 or out_features == 0:
        return
    # Offsets inside one sample are 32-bit in the kernel (sample bases advance in 64-bit
    # pointer arithmetic); speech inputs are far below this, but refuse rather than misread.
    for name, t in (("x", x), ("dy", dy)):
        span = (frames - 1) * abs(t.stride(1)) + (t.shape[2] - 1) * abs(t.stride(2))
        if span >= 2**31:
            raise ValueError(
                f"linear_fisher: one sample of {name} {tuple(t.shape)} with strides {t.stride()} "
                f"spans {span} elements; at most 2^31 - 1 are supported (split the frames)"
            )

    config = kernel_config(
        x.dtype, dy.dtype, out_features, in_features, frames, interpreted=interpreting(),
        block_m=block_m, block_n=block_n, block_k=block_k, input_precision=input_precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    grid = (triton.cdiv(out_features, config["BLOCK_M"]), triton.cdiv(in_features, config["BLOCK_N"]))
    _linear_fisher_kernel[grid](
        x, dy, fisher_w,
        # Never read without HAS_BIAS / HAS_LENGTHS; any tensor stands in for the pointer.
        fisher_b if fisher_b is not None else fisher_w,
        lengths if lengths is not None else fisher_w,
        batch, frames, in_features, out_features,
        x.stride(0), x.stride(1), x.stride(2),
        dy.stride(0), dy.stride(1), dy.stride(2),
        HAS_BIAS=fisher_b is not None,
        HAS_LENGTHS=lengths is not None,
        **config,
    )


def kernel_config(
    x_dtype: torch.dtype,
    dy_dtype: torch.dtype,
    out_features: int,
    in_features: int,
    frames: int,
    *,
    interpreted: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    input_precision: str | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> dict[str, Any]:
    """The compile-time constants and launch options :func:`linear_fisher` uses for a layer.

    ``HAS_BIAS`` and ``HAS_LENGTHS`` are left out (they follow the arguments).
    :mod:`tools.triton_compile` uses this too, to compile exactly the specialisations the
    launcher makes.
    """
    is_fp32 = torch.float32 in (x_dtype, dy_dtype)
    block_m = block_m or _block(out_features, MAX_BLOCK_MN)
    block_n = block_n or _block(in_features, MAX_BLOCK_MN)
    block_k = block_k or _block(frames, MAX_BLOCK_K_FP32 if is_fp32 else MAX_BLOCK_K_16BIT)
    if input_precision is None:
        input_precision = FP32_INPUT_PRECISION if is_fp32 else LOW_INPUT_PRECISION
    return {
        # The interpreter's tl.dot (numpy matmul) cannot multiply bf16/fp16 tiles; upcasting is
        # exact and keeps the fp32 accumulation, so interpreted results stay comparable.
        "UPCAST": x_dtype != dy_dtype or (interpreted and not is_fp32),
        "INPUT_PRECISION": input_precision,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "num_warps": NUM_WARPS if num_warps is None else num_warps,
        "num_stages": NUM_STAGES if num_stages is None else num_stages,
    }
