"""Fused AdamW over a compressed index set: gather, update, scatter in one pass.

Twin of :func:`adtuning.reference.sparse_adamw_ref_`. Per child entry the kernel reads the
index, the compact gradient and moments, the weight (the fp32 master copy when given, else
``param[idx]``), and writes the moments, the master and ``param[idx]``; nothing else of
``param`` is touched. The arithmetic follows ``torch.optim.AdamW``'s single-tensor path
operation by operation (decay, lerp, addcmul, sqrt / bias_correction2_sqrt + eps, addcdiv),
with the step-dependent scalars computed once per step on the host in Python float.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_compact, check_device, check_indices, elementwise_block

# Up to 1024 entries per program (fewer for small k, see elementwise_block): the update is
# bandwidth-bound and big blocks keep many loads in flight.
MAX_BLOCK_SIZE = 1024
# 4 warps: up to 8 entries per thread, enough memory-level parallelism without spilling.
NUM_WARPS = 4


@triton.jit
def _round_to_bf16(x):  # type: ignore[no-untyped-def]  # Triton reads kernel annotations: only tl.constexpr
    # fp32 -> bf16, round to nearest even, by integer arithmetic: the same bits as the
    # hardware conversion and torch's .bfloat16(), and also right in the interpreter, whose
    # cast truncates. NaN stays a quiet NaN.
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(x != x, tl.full(x.shape, 0x7FC00000, tl.uint32), bits)  # noqa: PLR0124 (NaN test)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _sparse_adamw_kernel(  # type: ignore[no-untyped-def]  # Triton reads kernel annotations: only tl.constexpr
    param_ptr,
    grad_ptr,
    idx_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    master_ptr,
    k,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    bias_correction2_sqrt,
    eps,
    neg_step_size,
    HAS_MASTER: tl.constexpr,
    PARAM_BF16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < k
    # int64 address math: a flat index may exceed 2^31 for the largest tensors.
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    if HAS_MASTER:
        w = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        w = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32)

    # Same operations, in the same order and with the same fused multiply-adds, as
    # torch.optim.AdamW's single-tensor path (mul_, lerp_, mul_ + addcmul_, sqrt / bc2_sqrt
    # + eps, addcdiv_), so that compiled results match it to the last bit or so.
    w = w * decay
    # ATen's lerp switches formula at weight 0.5 to stay exact at both ends.
    if one_minus_beta1 < 0.5:
        m = tl.fma(one_minus_beta1, g - m, m)
    else:
        m = tl.fma(-(1.0 - one_minus_beta1), g - m, g)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    denom = tl.sqrt_rn(v) / bias_correction2_sqrt + eps
    w = w + neg_step_size * m / denom

    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + offs, w, mask=mask)
    if PARAM_BF16:
        tl.store(param_ptr + idx, _round_to_bf16(w), mask=mask)
    else:
        tl.store(param_ptr + idx, w.to(param_ptr.dtype.element_ty), mask=mask)


def sparse_adamw(
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Triton :class:`~adtuning.backend_contract.SparseAdamWOp` (one launch).

    ``master`` is required for a bf16/fp16 ``param`` (the kernel keeps each entry in fp32
    registers, so it refuses rather than round after every operation); ``step`` must be >= 1.
    """
    if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"sparse_adamw: param must be fp32/bf16/fp16, got {param.dtype}")
    if not param.is_contiguous():
        raise ValueError("sparse_adamw: param must be contiguous")
    check_indices("sparse_adamw", indices, param.numel())
    k = indices.numel()
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_compact("sparse_adamw", name, t, k)
    if master is not None:
        check_compact("sparse_adamw", "master", master, k)
    elif param.dtype != torch.float32:
        # Without a master the reference would round after every AdamW operation; this kernel
        # keeps the entry in fp32 registers, so it refuses rather than differ.
        raise ValueError(f"sparse_adamw: {param.dtype} param needs an fp32 master copy of its child entries")
    check_device("sparse_adamw", param, grad, indices, exp_avg, exp_avg_sq, master)
    if step < 1:
        raise ValueError(f"sparse_adamw: step must be >= 1, got {step}")
    if k == 0:
        return
    # Step-dependent scalars: once per step, in Python float, exactly as torch.optim.AdamW.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    block = elementwise_block(k, indices.device, MAX_BLOCK_SIZE)
    grid = (triton.cdiv(k, block),)
    _sparse_adamw_kernel[grid](
        param, grad, indices, exp_avg, exp_avg_sq,
        # The kernel never reads master_ptr without HAS_MASTER; any fp32 buffer stands in.
        master if master is not None else grad,
        k,
        1 - lr * weight_decay,
        1 - beta1,
        beta2,
        1 - beta2,
        math.sqrt(bias_correction2),
        eps,
        -step_size,
        HAS_MASTER=master is not None,
        PARAM_BF16=param.dtype == torch.bfloat16,
        BLOCK_SIZE=block,
        num_warps=NUM_WARPS,
    )
