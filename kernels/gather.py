"""Gather of a dense gradient at a compressed index set: ``out = float32(grad.flatten()[indices])``.

Twin of :func:`adtuning.reference.gather_ref`. Runs in the per-parameter gradient hook, right
after autograd accumulates the dense gradient, so that the dense gradient can be freed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_indices, elementwise_block

# Up to 1024 indices per program (fewer for small k, see elementwise_block): a gather is
# latency-bound, so each program keeps many loads in flight.
MAX_BLOCK_SIZE = 1024
# 4 warps: up to 8 elements per thread, enough independent loads without spilling.
NUM_WARPS = 4


@triton.jit
def _gather_kernel(  # type: ignore[no-untyped-def]  # Triton reads kernel annotations: only tl.constexpr
    grad_ptr,
    idx_ptr,
    out_ptr,
    k,
    ACCUMULATE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < k
    # int64 address math: a flat index may exceed 2^31 for the largest tensors.
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    values = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if ACCUMULATE:
        values += tl.load(out_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, values, mask=mask)


def gather(
    grad: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Triton :class:`~adtuning.backend_contract.GatherOp` (one launch); ``accumulate=True`` needs ``out``."""
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"gather: grad must be fp32/bf16/fp16, got {grad.dtype}")
    check_indices("gather", indices, grad.numel())
    check_device("gather", grad, indices)
    k = indices.numel()
    if out is None:
        if accumulate:
            raise ValueError("gather: accumulate=True needs an out buffer")
        out = torch.empty(k, dtype=torch.float32, device=grad.device)
    else:
        if out.dtype != torch.float32 or out.numel() != k or not out.is_contiguous():
            raise ValueError(
                f"gather: out must be a contiguous fp32 buffer of {k} entries, "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        check_device("gather", grad, out)
    if k == 0:
        return out
    # reshape is a view for the (usual) contiguous gradient and a copy otherwise.
    flat = grad.reshape(-1)
    block = elementwise_block(k, indices.device, MAX_BLOCK_SIZE)
    grid = (triton.cdiv(k, block),)
    _gather_kernel[grid](
        flat, indices, out, k,
        ACCUMULATE=accumulate, BLOCK_SIZE=block, num_warps=NUM_WARPS,
    )
    return out
