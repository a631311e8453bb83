"""What a result was measured on: one recorder for the CLI, bench/ and tools/.

:func:`environment` returns the same keys everywhere (``python``, ``platform``, ``machine``,
``cpu_count``, ``torch``, ``triton``, ``transformers``, ``torchaudio``, ``peft``, ``numpy``, ``cuda``,
``device_name``, ``commit``, ``date``), so results files of different scripts compare.
:func:`source_commit` is the commit of the adtuning source that runs (and whether its tracked
files differ from it), recorded in every run's ``summary.json``.
"""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_PACKAGES = ("torch", "triton", "transformers", "torchaudio", "peft", "numpy")
_SOURCE = Path(__file__).resolve().parent.parent


def _version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:  # not installed, or broken on this machine: recorded as absent
        return None
    return str(getattr(module, "__version__", None))


def source_commit(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"sha": ..., "dirty": bool}`` of the git checkout holding the running adtuning source
    (``dirty``: a tracked file differs from the commit; untracked files do not count), or
    ``{"sha": None, "dirty": None}`` when it does not run from a checkout (an installed wheel) or
    git is absent."""
    where = Path(root) if root is not None else _SOURCE
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def environment(device: Any = None) -> dict[str, Any]:
    """Machine, versions, commit and date (UTC) of a measurement. ``device``: a torch device whose
    name to record (a CUDA device's name; ``cpu`` otherwise)."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for name in _PACKAGES:
        info[name] = _version(name)
    info["cuda"] = None
    info["device_name"] = "cpu"
    try:
        import torch

        info["cuda"] = torch.version.cuda
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(dev)
    except Exception:  # torch absent: a record without it is still a record
        pass
    info["commit"] = source_commit()
    info["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return info


def versions() -> dict[str, str | None]:
    """The package versions alone (``python`` and :data:`_PACKAGES`)."""
    return {"python": platform.python_version(), **{name: _version(name) for name in _PACKAGES}}
