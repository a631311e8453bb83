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


def source_commit(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
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


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any = None) -> dict[str, Any]:
    """Machine, versions, commit and date (UTC) of a measurement.

    Keys: ``python``, ``platform``, ``machine``, ``cpu``, ``cpu_count``, ``cpu_capability``,
    ``threads``, the package versions (``torch``, ``triton``, ``transformers``, ``torchaudio``,
    ``peft``, ``numpy``; ``None`` when absent), ``cuda`` (torch's CUDA version), ``device``
    (``cpu``/``cuda``), ``gpu`` with ``gpu_sm_count``, ``gpu_memory_bytes``, ``gpu_capability`` and
    ``tf32_matmul`` on CUDA (else ``None``), ``commit`` (:func:`source_commit`) and ``date``.
    ``device``: the torch device measured (default: ``cuda`` when available, else ``cpu``)."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(),
    }
    for name in _PACKAGES:
        info[name] = _version(name)
    info.update(cuda=None, device="cpu", gpu=None, gpu_sm_count=None, gpu_memory_bytes=None, gpu_capability=None,
                tf32_matmul=None, cpu_capability=None, threads=None)
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["threads"] = torch.get_num_threads()
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        info["device"] = dev.type
        if dev.type == "cuda" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(dev)
            info.update(gpu=props.name, gpu_sm_count=props.multi_processor_count, gpu_memory_bytes=props.total_memory,
                        gpu_capability=f"{props.major}.{props.minor}", tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    except Exception:  # torch absent or broken: a record without it is still a record
        pass
    info["commit"] = source_commit()
    info["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return info


def versions() -> dict[str, str | None]:
    """The package versions alone (``python`` and :data:`_PACKAGES`)."""
    return {"python": platform.python_version(), **{name: _version(name) for name in _PACKAGES}}
