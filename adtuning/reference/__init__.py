"""Pure-PyTorch reference twins of every hot operation, and the ``reference`` backend.

Written for clarity, not speed. They define the contracts that the ``native`` (``csrc/``)
and ``triton`` (``kernels/``) backends implement; tests and benchmarks import them from here
and nobody copies them. Importing this package registers the ``reference`` backend (any
device, no requirements).
"""
from adtuning.backend_contract import Backend, BackendProvider, register_backend
from adtuning.reference.adamw import adamw_update_
from adtuning.reference.gather import gather_ref
from adtuning.reference.layernorm_fisher import layernorm_fisher_ref_
from adtuning.reference.linear_fisher import linear_fisher_ref_
from adtuning.reference.sddmm import sddmm_ref
from adtuning.reference.sparse_adamw import sparse_adamw_ref_
from adtuning.reference.sparse_adamw_multi import sparse_adamw_multi_ref_

REFERENCE = Backend(
    name="reference",
    gather=gather_ref,
    sparse_adamw_=sparse_adamw_ref_,
    sparse_adamw_multi_=sparse_adamw_multi_ref_,
    linear_fisher_=linear_fisher_ref_,
    sddmm=sddmm_ref,
)
register_backend(BackendProvider("reference", lambda: REFERENCE, description="plain PyTorch, the oracle; any device"))

__all__ = [
    "REFERENCE",
    "adamw_update_",
    "gather_ref",
    "layernorm_fisher_ref_",
    "linear_fisher_ref_",
    "sddmm_ref",
    "sparse_adamw_multi_ref_",
    "sparse_adamw_ref_",
]
