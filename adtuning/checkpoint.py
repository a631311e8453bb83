"""Sparse-delta artifacts: what a fine-tuned task *is*.

A delta directory holds

* ``delta.safetensors`` — for every upstream tensor with child entries, ``upstream.<name>.indices``
  (int32 flat indices) and ``upstream.<name>.values`` (the fine-tuned values, weight dtype);
  and every dense head tensor as ``head.<name>``;
* ``delta.json`` — the format version, the base model (name or path, dtype, init seed for the
  tiny models), a fingerprint of the base upstream weights, the task and its options, P, k, N
  and the metrics of the run.

It is applied on top of the untouched base model; applying it to a different base model is
refused (the fingerprint of the base upstream must match). No pickle anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adtuning.atomic import atomic_write
from adtuning.child import ChildNetwork

DELTA_FORMAT = "adtuning.delta"
DELTA_VERSION = 1
TENSORS_FILE = "delta.safetensors"
CONFIG_FILE = "delta.json"


class DeltaError(ValueError):
    """A delta cannot be read or does not fit the model; the message names the file."""


def weights_fingerprint(named_params: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of the tensors (in sorted name order)."""
    digest = hashlib.sha256()
    for name in sorted(named_params):
        tensor = named_params[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        flat = tensor.contiguous().reshape(-1).cpu()
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return "sha256:" + digest.hexdigest()


def save_delta(
    directory: str | os.PathLike,
    upstream_params: Mapping[str, torch.Tensor],
    child: ChildNetwork,
    head_params: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
) -> Path:
    """Write a delta directory (atomically, file by file; the JSON is written last).

    Args:
        directory: output folder (created).
        upstream_params: the fine-tuned upstream's ``{name: tensor}``.
        child: the child network trained.
        head_params: ``{name: tensor}`` of the dense head (featurizer included).
        config: JSON-serialisable description; must hold ``base_model`` and
            ``base_fingerprint`` (:func:`weights_fingerprint` of the *untouched* base).
    """
    for key in ("base_model", "base_fingerprint"):
        if key not in config:
            raise ValueError(f"save_delta: config needs {key!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    values = child.gather(upstream_params)
    for name, idx in child.indices.items():
        tensors[f"upstream.{name}.indices"] = idx.cpu().contiguous()
        tensors[f"upstream.{name}.values"] = values[name].cpu().contiguous()
    for name, value in head_params.items():
        tensors[f"head.{name}"] = value.detach().cpu().contiguous()
    meta = {
        "format": DELTA_FORMAT,
        "version": DELTA_VERSION,
        **dict(config),
        "p": child.p,
        "k": child.k,
        "n": child.n,
        "child_method": child.method,
        "upstream_shapes": {name: list(shape) for name, shape in child.shapes.items()},
    }
    atomic_write(directory / TENSORS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": DELTA_FORMAT}))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return directory


def read_delta_config(directory: str | os.PathLike) -> dict:
    """The ``delta.json`` of a delta directory, validated."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise DeltaError(f"not a delta directory: {path} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeltaError(f"{path} is not valid JSON: {err}") from err
    if meta.get("format") != DELTA_FORMAT:
        raise DeltaError(f"{path} is not an adtuning delta (format={meta.get('format')!r})")
    if meta.get("version") != DELTA_VERSION:
        raise DeltaError(f"{path}: unsupported delta version {meta.get('version')}")
    return meta


@torch.no_grad()
def apply_delta(
    directory: str | os.PathLike,
    upstream_params: Mapping[str, nn.Parameter],
    head_params: Mapping[str, nn.Parameter] | None = None,
    *,
    check_fingerprint: bool = True,
) -> dict:
    """Write a delta's values into an untouched base upstream (and its head); return its config.

    Raises:
        DeltaError: the files are unreadable, the base model differs (fingerprint), names or
            shapes do not match, or indices are out of range. Nothing is modified then.
    """
    directory = Path(directory)
    meta = read_delta_config(directory)
    tensor_path = directory / TENSORS_FILE
    if not tensor_path.is_file():
        raise DeltaError(f"delta tensors missing: {tensor_path}")
    if check_fingerprint:
        found = weights_fingerprint(upstream_params)
        if found != meta["base_fingerprint"]:
            raise DeltaError(
                f"{directory / CONFIG_FILE} was trained on base model {meta['base_model']!r} "
                f"({meta['base_fingerprint'][:23]}...), but the given upstream has fingerprint {found[:23]}...: "
                "refusing to apply a delta to a different base model"
            )
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:  # safetensors raises its own error types
        raise DeltaError(f"{tensor_path} could not be read: {err}") from err
    updates = []
    for key, idx in tensors.items():
        if not (key.startswith("upstream.") and key.endswith(".indices")):
            continue
        name = key[len("upstream."):-len(".indices")]
        if name not in upstream_params:
            raise DeltaError(f"{tensor_path}: tensor {name!r} is not in the upstream")
        param = upstream_params[name]
        values = tensors.get(f"upstream.{name}.values")
        if values is None or values.numel() != idx.numel():
            raise DeltaError(f"{tensor_path}: values of {name!r} are missing or do not match its indices")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= param.numel()):
            raise DeltaError(f"{tensor_path}: indices of {name!r} are out of range for shape {tuple(param.shape)}")
        updates.append((param, idx, values))
    head_updates = []
    if head_params is not None:
        for name, param in head_params.items():
            value = tensors.get(f"head.{name}")
            if value is None or value.shape != param.shape:
                raise DeltaError(f"{tensor_path}: head tensor {name!r} is missing or has another shape")
            head_updates.append((param, value))
    for param, idx, values in updates:
        param.data.view(-1).index_copy_(0, idx.to(param.device).long(), values.to(param.device, param.dtype))
    for param, value in head_updates:
        param.data.copy_(value.to(param.device, param.dtype))
    return meta


def delta_bytes(directory: str | os.PathLike) -> int:
    """Size on disk of a delta directory's files."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
