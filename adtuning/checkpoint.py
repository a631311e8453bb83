"""Sparse-delta artifacts: what a fine-tuned task *is*.

A delta directory holds

* ``delta.safetensors`` — for every upstream tensor with child entries, ``upstream.<name>.indices``
  (int32 flat indices, sorted and unique) and ``upstream.<name>.values`` (the fine-tuned values,
  weight dtype); and every dense head tensor as ``head.<name>``;
* ``delta.json`` — the format version, the base model (name or path, dtype, init seed for the
  tiny models), a fingerprint of the base upstream weights, the task and its options, P, k, N,
  the metrics of the run, and ``tensors_sha256``, the checksum of ``delta.safetensors``.

It is applied on top of the untouched base model; applying it to a different base model is
refused (the fingerprint of the base upstream must match) unless forced. Reading never uses
pickle: the tensors are parsed by safetensors from the bytes whose checksum was verified, and
every key and value is checked (names, shapes, index order and range, finiteness) before the
model is touched. Both files are written together (:func:`adtuning.atomic.atomic_write_files`):
a failed write (disk full) leaves the previous delta intact, and a pair torn by a crash between
the two renames fails the checksum.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from adtuning.atomic import (
    atomic_write_files,
    check_fields,
    file_sha256,
    read_json_object,
    remove_stale_temporaries,
    save_safetensors_file,
    sha256_hex,
    write_bytes,
)
from adtuning.child import ChildNetwork, index_set_problem

log = logging.getLogger("adtuning")

DELTA_FORMAT = "adtuning.delta"
DELTA_VERSION = 1
TENSORS_FILE = "delta.safetensors"
CONFIG_FILE = "delta.json"

_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")

# delta.json: key -> (allowed JSON types, required). Unlisted keys (run metadata) are allowed.
CONFIG_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "version": ((int,), True),
    "base_model": ((str,), True),
    "base_fingerprint": ((str,), True),
    "p": ((float,), True),
    "k": ((int,), True),
    "n": ((int,), True),
    "upstream_shapes": ((dict,), True),
    "child_method": ((str,), False),
    "tensors_sha256": ((str,), False),
    "base_dtype": ((str,), False),
    "base_seed": ((int,), False),
    "task": ((str,), False),
    "task_options": ((dict,), False),
    "task_kwargs": ((dict,), False),
    "metrics": ((dict,), False),
}


class DeltaError(ValueError):
    """A delta cannot be read, does not fit the model, or may not be written; the message names the file."""


# At most this many bytes of one tensor are copied at a time while fingerprinting (device or
# non-contiguous tensors); contiguous CPU tensors are hashed in place, without a copy.
_FINGERPRINT_CHUNK_BYTES = 1 << 26


def _hash_tensor_bytes(digest: Any, tensor: torch.Tensor) -> None:
    """Feed the row-major bytes of ``tensor`` to ``digest``, holding at most one chunk's copy."""
    if tensor.numel() == 0:
        return
    if tensor.device.type == "cpu" and tensor.is_contiguous():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # a view: no copy
        return
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    rows = max(1, _FINGERPRINT_CHUNK_BYTES // row_bytes)
    # Blocks of whole leading-dimension rows, in order: their bytes concatenate to the tensor's.
    for start in range(0, tensor.shape[0], rows):
        block = tensor[start:start + rows].contiguous().reshape(-1).cpu()
        digest.update(block.view(torch.uint8).numpy().data)


def weights_fingerprint(named_params: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of the tensors (in sorted name order).

    Streaming: each tensor is hashed in place (contiguous CPU tensors) or in row blocks of at
    most 64 MiB (device or non-contiguous tensors); nothing the size of the weights is copied.
    The value is the same as that of the earlier whole-tensor implementation, so deltas written
    before still match their base.
    """
    digest = hashlib.sha256()
    for name in sorted(named_params):
        tensor = named_params[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        _hash_tensor_bytes(digest, tensor)
    return "sha256:" + digest.hexdigest()


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many NaN/inf values ``tensor`` holds (0 for integer tensors): what every writer checks."""
    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def save_delta(
    directory: str | os.PathLike[str],
    upstream_params: Mapping[str, torch.Tensor],
    child: ChildNetwork,
    head_params: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
) -> Path:
    """Write a delta directory: both files complete on disk, or the previous delta untouched.

    Args:
        directory: output folder (created).
        upstream_params: the fine-tuned upstream's ``{name: tensor}``.
        child: the child network trained.
        head_params: ``{name: tensor}`` of the dense head (featurizer included).
        config: JSON-serialisable description; must hold ``base_model`` and
            ``base_fingerprint`` (:func:`weights_fingerprint` of the *untouched* base).

    Raises:
        DeltaError: the config lacks a required key, or a value to write is NaN/inf (a
            non-finite delta is never written; the tensor is named).
        adtuning.atomic.WriteError: the disk is full or another OS error (the previous delta
            stays valid and no temporary file is left).
    """
    directory = Path(directory)
    for key in ("base_model", "base_fingerprint"):
        if key not in config:
            raise DeltaError(f"save_delta: config needs {key!r}")
    if not isinstance(config["base_fingerprint"], str) or not _FINGERPRINT.match(config["base_fingerprint"]):
        raise DeltaError(f"save_delta: base_fingerprint must be 'sha256:<64 hex digits>', got {config['base_fingerprint']!r}")
    tensors: dict[str, torch.Tensor] = {}
    # Written at once below: FT's whole tensors go in as views, not copies.
    values = child.gather(upstream_params, alias=True)
    for name, idx in child.indices.items():
        tensors[f"upstream.{name}.indices"] = idx.cpu().contiguous()
        tensors[f"upstream.{name}.values"] = values[name].cpu().contiguous()
    for name, value in head_params.items():
        tensors[f"head.{name}"] = value.detach().cpu().contiguous()
    for key, tensor in tensors.items():
        bad = count_nonfinite(tensor)
        if bad:
            raise DeltaError(f"refusing to write {directory / TENSORS_FILE}: tensor {key} has {bad} NaN/inf values")
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

    # The tensor file is written straight from the tensors (no in-memory copy of the file: an FT
    # delta is as large as the upstream), then the JSON with its checksum; both or neither.
    def write_tensors(tmp: str) -> None:
        save_safetensors_file(tensors, tmp, metadata={"format": DELTA_FORMAT})
        meta["tensors_sha256"] = file_sha256(tmp)

    def write_config(tmp: str) -> None:
        write_bytes(tmp, json.dumps(meta, indent=2).encode())

    directory.mkdir(parents=True, exist_ok=True)
    for name in (TENSORS_FILE, CONFIG_FILE):
        remove_stale_temporaries(directory / name)  # left by a writer that was killed
    atomic_write_files({directory / TENSORS_FILE: write_tensors, directory / CONFIG_FILE: write_config})
    return directory


def _check_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def read_delta_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``delta.json`` of a delta directory, with every known key checked.

    Raises:
        DeltaError: the file is missing, not JSON, not an adtuning delta, of another version,
            or a key is missing or has the wrong type or an impossible value (named).
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise DeltaError(f"not a delta directory: {path} is missing")
    meta = read_json_object(path, DeltaError)
    if meta.get("format") != DELTA_FORMAT:
        raise DeltaError(f"{path} is not an adtuning delta (format={meta.get('format')!r:.80})")
    if meta.get("version") != DELTA_VERSION or isinstance(meta.get("version"), bool):
        raise DeltaError(f"{path}: unsupported delta version {meta.get('version')!r:.80} (this adtuning reads {DELTA_VERSION})")
    check_fields(meta, CONFIG_FIELDS, str(path), DeltaError)
    if not _FINGERPRINT.match(meta["base_fingerprint"]):
        raise DeltaError(f"{path}: base_fingerprint must be 'sha256:<64 hex digits>', got {meta['base_fingerprint'][:80]!r}")
    if "tensors_sha256" in meta and not _FINGERPRINT.match(meta["tensors_sha256"]):
        raise DeltaError(f"{path}: tensors_sha256 must be 'sha256:<64 hex digits>', got {meta['tensors_sha256'][:80]!r}")
    if not 0 <= meta["p"] <= 1:  # 0: a method that trains no upstream entry (head-only, LoRA, adapters, ...)
        raise DeltaError(f"{path}: p must be in [0, 1], got {meta['p']!r}")
    bad_shapes = [name for name, shape in meta["upstream_shapes"].items() if not _check_shape(shape)]
    if bad_shapes:
        raise DeltaError(f"{path}: upstream_shapes[{bad_shapes[0]!r}] must be a list of non-negative integers")
    n = sum(math.prod(shape) for shape in meta["upstream_shapes"].values())
    if meta["n"] != n:
        raise DeltaError(f"{path}: n={meta['n']} but upstream_shapes hold {n} entries")
    if not 0 <= meta["k"] <= n:
        raise DeltaError(f"{path}: k={meta['k']} is not between 0 and n={n}")
    return meta


def read_delta_tensors(directory: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a delta, parsed by safetensors from bytes whose checksum matches ``delta.json``.

    Every key is checked: ``upstream.<name>.indices`` (int32/int64, 1-D, strictly increasing,
    within the shape recorded in ``delta.json``) with ``upstream.<name>.values`` (float, 1-D,
    as many, finite) for names in ``upstream_shapes``, and ``head.<name>`` (float, finite);
    the indices add up to ``k``. Nothing else may be in the file.

    Raises:
        DeltaError: naming the file and the tensor at fault.
    """
    directory = Path(directory)
    meta = read_delta_config(directory) if meta is None else meta
    path = directory / TENSORS_FILE
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise DeltaError(f"delta tensors {path} cannot be read: {err.strerror or err}") from err
    expected = meta.get("tensors_sha256")
    if expected is not None and sha256_hex(blob) != expected:
        raise DeltaError(f"{path} does not match {directory / CONFIG_FILE} (checksum {sha256_hex(blob)[:19]}..., "
                         f"expected {expected[:19]}...): a write was torn or one of the files was replaced")
    try:
        tensors = load_safetensors(blob)
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise DeltaError(f"{path} is not a readable safetensors file: {err}") from err
    shapes = meta["upstream_shapes"]
    total = 0
    for key, tensor in tensors.items():
        if key.startswith("head."):
            if not tensor.is_floating_point():
                raise DeltaError(f"{path}: head tensor {key} has dtype {tensor.dtype}; expected a float tensor")
        elif key.startswith("upstream.") and key.endswith(".indices"):
            name = key[len("upstream."):-len(".indices")]
            if name not in shapes:
                raise DeltaError(f"{path}: tensor {key} is for {name!r}, which {CONFIG_FILE} has no shape for")
            values = tensors.get(f"upstream.{name}.values")
            if values is None:
                raise DeltaError(f"{path}: {key} has no matching upstream.{name}.values")
            problem = index_set_problem(tensor, math.prod(shapes[name]))
            if problem:
                raise DeltaError(f"{path}: {key} {problem} (tensor shape {tuple(shapes[name])})")
            if not values.is_floating_point() or values.dim() != 1 or values.numel() != tensor.numel():
                raise DeltaError(f"{path}: upstream.{name}.values must be a 1-D float tensor of {tensor.numel()} "
                                 f"values, got {values.dtype} of shape {tuple(values.shape)}")
            total += tensor.numel()
        elif key.startswith("upstream.") and key.endswith(".values"):
            if f"{key[:-len('.values')]}.indices" not in tensors:
                raise DeltaError(f"{path}: {key} has no matching indices tensor")
        else:
            raise DeltaError(f"{path}: unexpected tensor {key!r} (expected upstream.<name>.indices/.values or head.<name>)")
        bad = count_nonfinite(tensor)
        if bad:
            raise DeltaError(f"{path}: tensor {key} has {bad} NaN/inf values")
    if total != meta["k"]:
        raise DeltaError(f"{path} holds {total} child entries but {directory / CONFIG_FILE} says k={meta['k']}")
    return tensors


@torch.no_grad()
def apply_delta(
    directory: str | os.PathLike[str],
    upstream_params: Mapping[str, nn.Parameter],
    head_params: Mapping[str, nn.Parameter] | None = None,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Write a delta's values into an untouched base upstream (and its head); return its config.

    Args:
        directory: the delta folder.
        upstream_params: ``{name: parameter}`` of the base upstream.
        head_params: ``{name: parameter}`` of the task head (None: the head is not loaded).
        force: apply even when the upstream's weights fingerprint differs from the one the
            delta was trained on (a warning is logged). Shapes and names must still match.

    Raises:
        DeltaError: the files are unreadable or inconsistent (see :func:`read_delta_tensors`),
            the base model differs (fingerprint, without ``force``), or names or shapes do not
            match the model. Nothing is modified then.
    """
    directory = Path(directory)
    meta = read_delta_config(directory)
    tensor_path = directory / TENSORS_FILE
    if not tensor_path.is_file():
        raise DeltaError(f"delta tensors missing: {tensor_path}")
    found = weights_fingerprint(upstream_params)
    if found != meta["base_fingerprint"]:
        message = (f"{directory / CONFIG_FILE} was trained on base model {meta['base_model']!r:.120} "
                   f"({meta['base_fingerprint'][:23]}...), but the given upstream has fingerprint {found[:23]}...")
        if not force:
            raise DeltaError(message + ": refusing to apply a delta to a different base model (--force / force=True "
                             "applies it anyway)")
        log.warning("%s: applying it anyway (force)", message)
    tensors = read_delta_tensors(directory, meta)
    updates = []
    for name, shape in meta["upstream_shapes"].items():
        idx = tensors.get(f"upstream.{name}.indices")
        if idx is None:
            continue
        if name not in upstream_params:
            raise DeltaError(f"{tensor_path}: tensor {name!r} is not in the upstream")
        param = upstream_params[name]
        if tuple(param.shape) != tuple(shape):
            raise DeltaError(f"{tensor_path}: {name!r} has shape {tuple(shape)} in the delta but {tuple(param.shape)} "
                             "in the upstream")
        updates.append((param, idx, tensors[f"upstream.{name}.values"]))
    head_updates = []
    if head_params is not None:
        for name, param in head_params.items():
            value = tensors.get(f"head.{name}")
            if value is None or value.shape != param.shape:
                raise DeltaError(f"{tensor_path}: head tensor {name!r} is missing or has another shape")
            head_updates.append((param, value))
        extra = sorted(k[len("head."):] for k in tensors if k.startswith("head.") and k[len("head."):] not in head_params)
        if extra:
            raise DeltaError(f"{tensor_path}: head tensor {extra[0]!r} is not in the task head")
    for param, idx, values in updates:
        param.data.view(-1).index_copy_(0, idx.to(param.device).long(), values.to(param.device, param.dtype))
    for param, value in head_updates:
        param.data.copy_(value.to(param.device, param.dtype))
    return meta


def delta_bytes(directory: str | os.PathLike[str]) -> int:
    """Size on disk of a delta directory's files."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
