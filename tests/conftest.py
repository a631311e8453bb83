"""Test-wide settings. Triton kernels run under the interpreter on machines without CUDA:
TRITON_INTERPRET must be set before any kernel module is imported, so it is set here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _patch_old_interpreter_scalar_index() -> None:
    """Let Triton 3.6's interpreter run loops with run-time bounds under NumPy >= 2.4.

    Before Triton 3.7 the interpreter holds a scalar kernel argument as a shape-(1,) array and
    turns it into a loop bound with ``int(array)``, which NumPy 2.4 refuses for arrays with
    ndim > 0 ("only 0-dimensional arrays can be converted to Python scalars"). Later Triton
    squeezes the array first; this applies the same squeeze to older versions, in tests only.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:  # no Triton: the triton backend tests skip themselves
        return
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_adtuning_squeezes", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._adtuning_squeezes = True
    interpreter._patch_lang_tensor = patch_lang_tensor


_patch_old_interpreter_scalar_index()
