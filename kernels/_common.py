"""Input checks shared by the launchers (no kernels here)."""
from __future__ import annotations

import os
from typing import Any

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise unless all tensors share one device that Triton can launch on."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors on different devices: {sorted(map(str, devices))}")
    device = present[0].device
    # The interpreter runs on host memory; compiled kernels need CUDA tensors.
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: Triton kernels need CUDA tensors, got {device} "
            "(set TRITON_INTERPRET=1 to run them on the CPU interpreter)"
        )


def check_indices(op: str, indices: torch.Tensor, numel: int) -> None:
    """Raise unless ``indices`` is a contiguous 1-D int32/int64 vector able to address ``numel``."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1 or not indices.is_contiguous():
        raise ValueError(f"{op}: indices must be a contiguous 1-D vector, got {tuple(indices.shape)}")
    if indices.dtype == torch.int32 and numel > 2**31:
        raise ValueError(f"{op}: int32 indices cannot address a tensor of {numel} entries")


def check_compact(op: str, name: str, t: torch.Tensor, k: int) -> None:
    """Raise unless ``t`` is a contiguous fp32 vector of ``k`` entries."""
    if t.dtype != torch.float32 or t.numel() != k or not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be a contiguous fp32 vector of {k} entries, "
            f"got {t.dtype} {tuple(t.shape)}"
        )


_SM_COUNT: dict[int, int] = {}


def elementwise_block(k: int, device: torch.device, largest: int = 1024, smallest: int = 128) -> int:
    """Block size for a 1-D memory-bound kernel over ``k`` entries on ``device``.

    Big blocks keep many loads in flight per program, but a small ``k`` in big blocks leaves
    most multiprocessors idle; halve the block until the grid gives every SM a few programs.
    """
    if device.type != "cuda":
        return largest
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return block_for_sm_count(k, _SM_COUNT[index], largest, smallest)


def block_for_sm_count(k: int, sm_count: int, largest: int = 1024, smallest: int = 128) -> int:
    """:func:`elementwise_block` for a GPU with ``sm_count`` multiprocessors (no device needed)."""
    block = largest
    while block > smallest and -(-k // block) < 4 * sm_count:
        block //= 2
    return block


def _patch_old_interpreter_scalar_index() -> None:
    """Let Triton 3.6's interpreter run loops with run-time bounds under NumPy >= 2.4.

    Before Triton 3.7 the interpreter holds a scalar kernel argument as a shape-(1,) array and
    turns it into a loop bound with ``int(array)``, which NumPy 2.4 refuses for arrays with
    ndim > 0 ("only 0-dimensional arrays can be converted to Python scalars"). Later Triton
    squeezes the array first; this applies the same squeeze to older versions. Interpreter
    only: compiled kernels never see it.
    """
    if not interpreting():
        return
    import triton
    from triton.runtime import interpreter

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_adtuning_squeezes", False):
        return

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    setattr(patch_lang_tensor, "_adtuning_squeezes", True)  # a mark on the function: patched once
    interpreter._patch_lang_tensor = patch_lang_tensor


_patch_old_interpreter_scalar_index()
