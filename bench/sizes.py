"""The size switch shared by the benchmarks: ``ADTUNING_BENCH_<NAME>=size,key=value,...``."""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch


def size_settings(variable: str, sizes: dict[str, dict], overridable: Iterable[str] | None = None,
                  **extra) -> dict:
    """The settings of this session from the environment variable ``variable``.

    The default size is ``full`` on CUDA and ``cpu`` otherwise; a bare word in the variable
    picks another size from ``sizes``, and ``key=value`` items override single settings (cast
    to the type of the default). The result also holds ``size``, ``device`` and ``extra``.
    Only keys in ``overridable`` (default: every key of the result) may be overridden.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = "full" if device == "cuda" else "cpu"
    overrides = {}
    for item in filter(None, (s.strip() for s in os.environ.get(variable, "").split(","))):
        if "=" in item:
            key, value = item.split("=", 1)
            overrides[key.strip()] = value.strip()
        else:
            size = item
    if size not in sizes:
        raise ValueError(f"{variable}: unknown size {size!r}; choose {', '.join(sizes)}")
    out = dict(sizes[size], size=size, device=device, **extra)
    allowed = set(out if overridable is None else overridable)
    for key, value in overrides.items():
        if key not in allowed:
            raise ValueError(f"{variable}: unknown key {key!r}")
        out[key] = type(out[key])(value) if not isinstance(out[key], str) else value
    return out
