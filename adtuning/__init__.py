"""adtuning: CHILD-TUNING and AD-TUNING for self-supervised speech models.

Core API:

* :func:`estimate_fisher` — per-sample empirical Fisher of the upstream weights (eq. 6).
* :class:`ChildNetwork` — the fixed child network as compressed index sets.
* :class:`SparseAdamW` — AdamW with state only for child entries.
* :func:`install_sparse_weight_grad` — Linear weight gradients computed only at the child
  entries (SDDMM), written straight into the optimizer's compact buffers.
* :func:`get_backend` — ``reference`` / ``native`` (C++ CPU) / ``triton`` (CUDA); ``fused``
  picks the fast one for the device.
"""
from adtuning.name_clash import prefer_installed_kernels

prefer_installed_kernels()  # before anything imports transformers (see adtuning.name_clash)

from adtuning.backends import BackendUnavailableError, get_backend  # noqa: E402
from adtuning.child import ChildNetwork  # noqa: E402
from adtuning.fisher import estimate_fisher  # noqa: E402
from adtuning.optim import SparseAdamW, get_linear_schedule_with_warmup, linear_warmup_decay  # noqa: E402
from adtuning.sparse_grad import WEIGHT_GRAD_MODES, SparseWeightGrad, install_sparse_weight_grad  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ChildNetwork",
    "SparseAdamW",
    "SparseWeightGrad",
    "WEIGHT_GRAD_MODES",
    "estimate_fisher",
    "get_backend",
    "get_linear_schedule_with_warmup",
    "install_sparse_weight_grad",
    "linear_warmup_decay",
]
