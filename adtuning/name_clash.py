"""The one import name this checkout shares with a PyPI package: ``kernels``.

The repository's top-level ``kernels/`` folder (the Triton kernels, installed as
``adtuning.kernels``) has the import name of Hugging Face's ``kernels`` distribution, which
transformers >= 5.25 requires and imports at start-up (``from kernels import CUDAProperties, ...``).
Run from the checkout's root (``python -m adtuning.train``, pytest, ``bench/`` scripts), the
working directory comes first on ``sys.path`` and ``import kernels`` would find the folder, so
importing transformers fails. :func:`prefer_installed_kernels` binds the name ``kernels`` to the
installed distribution's package before anything imports it; adtuning itself never imports the
folder under that name.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

__all__ = ["prefer_installed_kernels"]

_CHECKOUT_KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def prefer_installed_kernels() -> None:
    """Make ``import kernels`` give the installed ``kernels`` distribution (if there is one) even
    when this checkout's ``kernels/`` folder comes first on ``sys.path``. A no-op when the
    distribution is absent, when the name is already imported, or when it resolves elsewhere."""
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != _CHECKOUT_KERNELS:
        return
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    init = Path(str(dist.locate_file("kernels/__init__.py")))
    if not init.is_file():
        return
    installed = importlib.util.spec_from_file_location("kernels", init, submodule_search_locations=[str(init.parent)])
    if installed is None or installed.loader is None:
        return
    module = importlib.util.module_from_spec(installed)
    sys.modules["kernels"] = module
    try:
        installed.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
