"""The ``triton`` backend: the Triton kernels of ``adtuning.kernels`` behind the backend contract.

:func:`backend` returns a :class:`adtuning.backend_contract.Backend` whose operations implement the
contract's Protocols with exactly their signatures (the launchers' tuning keywords are not
exposed; mypy checks the launchers in ``kernels/__init__.py``). Triton kernels run on CUDA
tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, which must be
set before ``adtuning.kernels`` is first imported; the tests do this). Anything else is a
:class:`~adtuning.backend_contract.BackendUnavailableError`, never a fallback to another backend.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from adtuning.backend_contract import Backend, BackendProvider, BackendUnavailableError, register_backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_kernels() -> ModuleType:
    """Import ``adtuning.kernels`` or raise :class:`BackendUnavailableError` saying why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing at import time
        raise BackendUnavailableError(
            f"backend 'triton' needs the triton package, which cannot be imported here "
            f"({type(exc).__name__}: {exc}); install triton or choose backend='reference'/'native'"
        ) from exc
    interpret = _interpreting()
    if not interpret and not torch.cuda.is_available():
        raise BackendUnavailableError(
            "backend 'triton' needs a CUDA device (torch.cuda.is_available() is False); "
            "set TRITON_INTERPRET=1 to run the kernels on Triton's CPU interpreter, "
            "or choose backend='native' (CPU) / 'reference'"
        )
    try:
        # import_module, not an import statement: mypy cannot follow setup.py's kernels/ ->
        # adtuning.kernels mapping (it checks kernels/ as the package ``kernels``).
        kernels = importlib.import_module("adtuning.kernels")
    except Exception as exc:
        raise BackendUnavailableError(
            f"backend 'triton': the kernels in adtuning.kernels failed to import "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if interpret and not torch.cuda.is_available() and not kernels.compiled_for_interpreter():
        raise BackendUnavailableError(
            "backend 'triton': adtuning.kernels was imported before TRITON_INTERPRET=1 was set, "
            "so its kernels were compiled for CUDA, which is not available; set TRITON_INTERPRET=1 "
            "before the first import of adtuning.kernels"
        )
    return kernels


def _make_ops(kernels: ModuleType) -> Backend:
    # The gather, sparse_adamw and sparse_adamw_multi launchers have exactly the contract's
    # signatures; linear_fisher and sddmm also take tuning keywords, which the backend contract
    # does not expose.
    def linear_fisher_(
        x: torch.Tensor,
        dy: torch.Tensor,
        fisher_w: torch.Tensor,
        fisher_b: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> None:
        """Triton :class:`~adtuning.backend_contract.LinearFisherOp` (:func:`adtuning.kernels.linear_fisher`, default tiling)."""
        kernels.linear_fisher(x, dy, fisher_w, fisher_b, lengths)

    def sddmm(
        dy: torch.Tensor,
        x: torch.Tensor,
        indices: torch.Tensor,
        out: torch.Tensor | None = None,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """Triton :class:`~adtuning.backend_contract.SDDMMOp` (:func:`adtuning.kernels.sddmm`, default layout)."""
        values: torch.Tensor = kernels.sddmm(dy, x, indices, out, accumulate)
        return values

    return Backend(
        name="triton", gather=kernels.gather, sparse_adamw_=kernels.sparse_adamw,
        sparse_adamw_multi_=kernels.sparse_adamw_multi, linear_fisher_=linear_fisher_, sddmm=sddmm,
    )


_BACKEND: Backend | None = None


def backend() -> Backend:
    """Return the ``triton`` :class:`~adtuning.backend_contract.Backend`.

    Raises:
        BackendUnavailableError: triton cannot be imported, or there is no CUDA device and
            ``TRITON_INTERPRET`` is not ``"1"`` (or was set only after the kernels were imported).
    """
    global _BACKEND
    kernels = _load_kernels()  # checked on every call: CUDA / TRITON_INTERPRET may change
    if _BACKEND is None:
        _BACKEND = _make_ops(kernels)
    return _BACKEND


register_backend(BackendProvider("triton", backend, fused_on=("cuda",), description="kernels/ Triton kernels; CUDA or TRITON_INTERPRET=1"))
