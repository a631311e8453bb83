"""Triton kernels of adtuning, installed as ``adtuning.kernels`` (one op per file).

==========================  ==============================================================
launcher                    op
==========================  ==============================================================
:func:`gather`              ``float32(grad.flatten()[indices])`` into / onto a compact buffer
:func:`sparse_adamw`        fused AdamW over a compressed index set (gather, update, scatter)
:func:`sparse_adamw_multi`  :func:`sparse_adamw` on a list of tensors (one launch each)
:func:`linear_fisher`       per-sample Fisher of a Linear layer, tile by tile in backward
:func:`sddmm`               child entries of a Linear weight gradient, no dense ``dW``
==========================  ==============================================================

Each launcher checks its inputs and implements the Protocol of its op in
:mod:`adtuning.backend_contract` (``linear_fisher`` and ``sddmm`` add keyword-only tuning
options, which the ``triton`` backend does not expose). Kernels compile for CUDA, or run on CPU
tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` is set *before* this package is
first imported (Triton decides at decoration time). Use them through
``adtuning.backends.get_backend("triton")``.

The imports inside this package are relative: setup.py installs ``kernels/`` as
``adtuning.kernels``, a mapping mypy cannot follow, so mypy checks this folder as the package
``kernels`` (pyproject.toml ``[tool.mypy] files``), including the contract check below.
"""
from typing import TYPE_CHECKING

from .gather import gather
from .linear_fisher import linear_fisher
from .sddmm import sddmm
from .sparse_adamw import sparse_adamw
from .sparse_adamw_multi import sparse_adamw_multi

if TYPE_CHECKING:  # mypy checks each launcher against its op's Protocol
    from adtuning.backend_contract import GatherOp, LinearFisherOp, SDDMMOp, SparseAdamWMultiOp, SparseAdamWOp

    _IMPLEMENTS: tuple[GatherOp, SparseAdamWOp, SparseAdamWMultiOp, LinearFisherOp, SDDMMOp] = (
        gather, sparse_adamw, sparse_adamw_multi, linear_fisher, sddmm)


def compiled_for_interpreter() -> bool:
    """True when the kernels were decorated under ``TRITON_INTERPRET=1`` (they run on CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .gather import _gather_kernel

    return isinstance(_gather_kernel, InterpretedFunction)


__all__ = ["compiled_for_interpreter", "gather", "linear_fisher", "sddmm", "sparse_adamw", "sparse_adamw_multi"]
