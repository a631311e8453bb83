"""Triton kernels of adtuning, installed as ``adtuning.kernels`` (one op per file).

=====================  ==============================================================
launcher               op
=====================  ==============================================================
:func:`gather`         ``float32(grad.flatten()[indices])`` into / onto a compact buffer
:func:`sparse_adamw`   fused AdamW over a compressed index set (gather, update, scatter)
:func:`linear_fisher`  per-sample Fisher of a Linear layer, tile by tile in backward
:func:`sddmm`          child entries of a Linear weight gradient, no dense ``dW``
=====================  ==============================================================

Each launcher checks its inputs and has the contract of its twin in :mod:`adtuning.reference`.
Kernels compile for CUDA, or run on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` is set *before* this package is first imported (Triton decides at
decoration time). Use them through ``adtuning.backends.get_backend("triton")``.
"""
from adtuning.kernels.gather import gather
from adtuning.kernels.linear_fisher import linear_fisher
from adtuning.kernels.sddmm import sddmm
from adtuning.kernels.sparse_adamw import sparse_adamw


def compiled_for_interpreter() -> bool:
    """True when the kernels were decorated under ``TRITON_INTERPRET=1`` (they run on CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    from adtuning.kernels.gather import _gather_kernel

    return isinstance(_gather_kernel, InterpretedFunction)


__all__ = ["compiled_for_interpreter", "gather", "linear_fisher", "sddmm", "sparse_adamw"]
