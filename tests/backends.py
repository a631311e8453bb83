"""Backend parametrisation shared by the contract tests.

The reference backend always runs. ``native`` must run in CI (CI=true turns "unavailable"
into a failure); elsewhere a test skips only when the backend reports itself unavailable,
and the skip says why. ``triton`` runs on CUDA or under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import pytest

from adtuning.backends import BackendUnavailableError, get_backend

ALL_BACKENDS = ("reference", "native", "triton")


def require_backend(name: str):
    """Return the backend object or skip (fail for ``native`` when CI=true) with the reason."""
    try:
        return get_backend(name)
    except BackendUnavailableError as err:
        if name == "native" and os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"native backend must be available in CI: {err}")
        pytest.skip(f"backend {name!r} unavailable: {err}")
