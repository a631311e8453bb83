"""The backend layer: a leaf contract module, backends that register themselves, no import circle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from adtuning import backend_contract
from adtuning.backend_contract import Backend, BackendProvider, BackendUnavailableError, register_backend
from adtuning.backends import BACKENDS, get_backend, resolve_backend_name

PACKAGE = Path(__file__).resolve().parents[1] / "adtuning"


def _adtuning_imports(path: Path) -> set[str]:
    """Every ``adtuning.*`` module a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adtuning"):
            found.add(node.module if node.module != "adtuning" else f"adtuning.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("adtuning"))
    return found


def test_contract_is_a_leaf_and_backends_do_not_import_the_front_door():
    assert _adtuning_imports(PACKAGE / "backend_contract.py") == set()
    for backend_module in ("native.py", "triton_backend.py", "reference/__init__.py"):
        imports = _adtuning_imports(PACKAGE / backend_module)
        assert "adtuning.backends" not in imports, backend_module
        assert "adtuning.backend_contract" in imports, backend_module


@pytest.mark.parametrize("module", ["adtuning.native", "adtuning.triton_backend", "adtuning.backend_contract",
                                    "adtuning.reference", "adtuning.backends"])
def test_every_backend_module_imports_first_in_a_fresh_process(module):
    """No circle hidden by import order: each module can be the first one imported."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_registered_backends_and_fused_resolution():
    assert BACKENDS == ("reference", "native", "triton")
    assert resolve_backend_name("fused", "cpu") == "native"
    assert resolve_backend_name("fused", "cuda") == "triton"
    assert get_backend("reference").name == "reference"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        resolve_backend_name("nope")
    with pytest.raises(BackendUnavailableError, match="no fused backend for device type 'meta'"):
        resolve_backend_name("fused", "meta")


def test_a_name_or_a_fused_device_is_claimed_once(monkeypatch):
    monkeypatch.setattr(backend_contract, "_PROVIDERS", dict(backend_contract._PROVIDERS))
    reference = get_backend("reference")
    with pytest.raises(ValueError, match="'native' is already taken"):
        register_backend(BackendProvider("native", lambda: reference))
    with pytest.raises(ValueError, match="'fused' on cpu is already backend 'native'"):
        register_backend(BackendProvider("other", lambda: reference, fused_on=("cpu",)))
    register_backend(BackendProvider("other", lambda: Backend("other", *(
        getattr(reference, op) for op in backend_contract.OPERATIONS)), fused_on=("mps",)))
    assert backend_contract.fused_provider("mps").name == "other"
    assert backend_contract.providers()["other"].load().name == "other"
