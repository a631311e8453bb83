"""The search checkpoint on disk: what :class:`adtuning.search.AdaptiveSearch` writes to resume.

Layout of ``checkpoint_dir``:

* ``search-<serial>.safetensors``: every candidate's tensors, under the keys built by
  :func:`tensor_key` (``<prefix>.<part>.<name>``, the prefix being :func:`candidate_prefix`).
* ``search.json`` (the newest) and ``search.prev.json`` (the generation before): the search's
  progress, one record per candidate (:func:`candidate_record`), and the name and SHA-256 of the
  tensor file it goes with. Two generations are kept, so a torn or corrupt newest checkpoint
  falls back to the previous one (:func:`read_checkpoint`).

Writing is atomic (a temporary file, fsync, rename); no NaN/inf is ever written. This module
knows the format only; which candidate is active, data parallelism and the RNG streams are the
search's business.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

from adtuning.atomic import (
    atomic_write,
    atomic_write_bytes,
    check_fields,
    file_sha256,
    read_json_object,
    remove_stale_temporaries,
    save_safetensors_file,
)
from adtuning.checkpoint import count_nonfinite

log = logging.getLogger("adtuning")

CHECKPOINT_VERSION = 4
# Version 1 predates regret and baselines (it reads as "none run yet"); version 2 predates data
# parallelism (it reads as world size 1); version 3 predates the tensor checksum and the
# non-finite step counters.
READABLE_VERSIONS = (1, 2, 3, 4)

#: The checkpoint JSONs kept, newest first: a torn or corrupt newest one falls back to the other.
CHECKPOINT_FILES = ("search.json", "search.prev.json")

#: The parts of a candidate's tensors (the middle of :func:`tensor_key`).
VALUES, HEAD, RNG, OPTIMIZER = "values", "head", "rng", "opt"


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped training, or a non-finite tensor was about to be
    written to a checkpoint (nothing is written then; the previous checkpoint stays valid)."""


class CheckpointError(RuntimeError):
    """Checkpoints exist but none is usable: each is torn or fails its integrity check (named)."""


class _DamagedCheckpoint(Exception):
    """One checkpoint is torn or corrupt (another may still be usable)."""


# The keys (and types) a search checkpoint JSON must have; a JSON without them is damaged.
_CHECKPOINT_FIELDS = {
    "version": ((int,), True), "tensors": ((str,), True), "tensors_sha256": ((str,), False),
    "active": ((int, type(None)), True), "candidates": ((list,), True), "baselines": ((list,), False),
    "swap_seconds": ((float,), True), "train_seconds": ((float,), True), "eval_seconds": ((float,), True),
    "world_size": ((int,), False),
}
_RECORD_FIELDS = {
    "index": ((int,), True), "p": ((float,), True), "k": ((int,), True), "step": ((int,), True),
    "epoch": ((int,), True), "batch_in_epoch": ((int,), True), "status": ((str,), True),
    "curve": ((list,), True), "train_losses": ((list,), True), "rung_metrics": ((dict,), True),
}


def candidate_prefix(index: int, baseline: str | None) -> str:
    """Where a candidate's tensors live: ``c<index>`` for a searched one, ``baseline.<kind>``."""
    return f"c{index}" if baseline is None else f"baseline.{baseline}"


def tensor_key(prefix: str, part: str, *names: object) -> str:
    """``<prefix>.<part>[.<name>...]``: e.g. ``c0.values.encoder.layers.0.fc1.weight``,
    ``c0.opt.3.exp_avg``, ``c0.rng`` (rank 0) and ``c0.rng.rank2``."""
    return ".".join([prefix, part, *map(str, names)])


def rng_key(prefix: str, rank: int) -> str:
    """The key of a candidate's RNG state on ``rank`` (rank 0's has no suffix)."""
    return tensor_key(prefix, RNG) if rank == 0 else tensor_key(prefix, RNG, f"rank{rank}")


def candidate_record(cand: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The JSON record of a candidate; its tensors go into ``tensors`` under ``prefix``.

    ``cand`` is a :class:`adtuning.search.Candidate` (paused: its values, head, optimizer state
    and RNG state captured).
    """
    for name, value in cand.values.items():
        tensors[tensor_key(prefix, VALUES, name)] = value.detach().cpu().contiguous()
    for name, value in cand.head.items():
        tensors[tensor_key(prefix, HEAD, name)] = value.detach().cpu().contiguous()
    tensors[rng_key(prefix, 0)] = cand.rng_state.contiguous()
    opt_meta = None
    if cand.optimizer_state is not None:
        opt_meta = {"param_groups": cand.optimizer_state["param_groups"], "state": {}}
        for pid, state in cand.optimizer_state["state"].items():
            opt_meta["state"][str(pid)] = sorted(state)
            for key, value in state.items():
                tensors[tensor_key(prefix, OPTIMIZER, pid, key)] = value.detach().cpu().contiguous().reshape(value.shape)
    return {
        "index": cand.index, "p": cand.p, "k": cand.child.k, "baseline": cand.baseline, "step": cand.step, "epoch": cand.epoch,
        "batch_in_epoch": cand.batch_in_epoch, "status": cand.status, "stopped_at": cand.stopped_at, "final": cand.final,
        "curve": cand.curve, "train_losses": cand.train_losses, "rung_metrics": {str(k): v for k, v in cand.rung_metrics.items()},
        "scheduler_state": cand.scheduler_state, "optimizer": opt_meta,
        "skipped_steps": cand.skipped_steps, "nonfinite_streak": cand.nonfinite_streak,
    }


def restore_candidate(rec: dict[str, Any], cand: Any, prefix: str, tensors: Mapping[str, torch.Tensor], *, rank: int,
                      value_devices: Mapping[str, torch.device | str], head_devices: Mapping[str, torch.device | str],
                      where: Path) -> None:
    """Put a record (and its tensors) back into ``cand``.

    Args:
        value_devices, head_devices: where each upstream tensor's child values and each head
            tensor go (``{name: device}``).
        where: the JSON file, for messages.

    Raises:
        ValueError: the record belongs to another candidate (other P or k).
    """
    if abs(rec["p"] - cand.p) > 1e-12 or rec["k"] != cand.child.k:
        raise ValueError(f"{where}: candidate {cand.index} was P={rec['p']} k={rec['k']}, now P={cand.p} k={cand.child.k}")
    cand.values = {n: tensors[tensor_key(prefix, VALUES, n)].to(value_devices[n])
                   for n in cand.child.indices if tensor_key(prefix, VALUES, n) in tensors}
    cand.head = {n: tensors[tensor_key(prefix, HEAD, n)].to(device)
                 for n, device in head_devices.items() if tensor_key(prefix, HEAD, n) in tensors}
    cand.rng_state = tensors[rng_key(prefix, rank)]
    opt_meta = rec["optimizer"]
    if opt_meta is None:
        cand.optimizer_state = None
    else:
        state = {int(pid): {key: tensors[tensor_key(prefix, OPTIMIZER, pid, key)] for key in keys}
                 for pid, keys in opt_meta["state"].items()}
        cand.optimizer_state = {"state": state, "param_groups": opt_meta["param_groups"]}
    cand.scheduler_state = rec["scheduler_state"]
    cand.step, cand.epoch, cand.batch_in_epoch = rec["step"], rec["epoch"], rec["batch_in_epoch"]
    cand.status, cand.curve = rec["status"], rec["curve"]
    # Version 1 knew no regret training: a culled candidate stopped at its current step.
    cand.stopped_at = rec.get("stopped_at", cand.step if cand.status == "stopped" else None)
    cand.final = rec.get("final", {})
    cand.train_losses = [tuple(x) for x in rec["train_losses"]]
    cand.rung_metrics = {int(k): v for k, v in rec["rung_metrics"].items()}
    cand.skipped_steps, cand.nonfinite_streak = rec.get("skipped_steps", 0), rec.get("nonfinite_streak", 0)


def write_checkpoint(directory: Path, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write one checkpoint generation: the tensors, then the JSON (``meta`` plus the version,
    the tensor file's name and its SHA-256); the newest JSON before it becomes the previous
    generation, and tensor files neither generation names are removed. Returns the JSON's path.

    Raises:
        NonFiniteError: a floating-point tensor holds NaN/inf (named); nothing is written.
        adtuning.atomic.WriteError: the disk is full or another OS error; the generations on
            disk stay usable.
    """
    for key, tensor in tensors.items():
        bad = count_nonfinite(tensor)
        if bad:
            raise NonFiniteError(f"refusing to write a checkpoint to {directory}: {key} holds "
                                 f"{bad} NaN/inf values (the previous checkpoint is kept)")
    directory.mkdir(parents=True, exist_ok=True)
    tensor_name = f"search-{int(time.time() * 1e6)}.safetensors"
    digest: dict[str, str] = {}

    def write_tensors(tmp: str) -> None:
        save_safetensors_file(tensors, tmp)
        digest["sha256"] = file_sha256(tmp)

    # Temporaries left by a writer that was killed (its tensor file had another serial).
    for name in (*CHECKPOINT_FILES, "search-*.safetensors"):
        remove_stale_temporaries(directory / name)
    atomic_write(directory / tensor_name, write_tensors)
    meta = {"version": CHECKPOINT_VERSION, "tensors": tensor_name, "tensors_sha256": digest["sha256"], **meta}
    # The newest becomes the previous generation (an atomic rename), then the new JSON goes in.
    # A kill between the two leaves only the previous one, which resumes.
    newest, previous = (directory / name for name in CHECKPOINT_FILES)
    if newest.is_file():
        os.replace(newest, previous)
    path = atomic_write_bytes(newest, json.dumps(meta).encode())
    keep = {tensor_name, _named_tensors(previous)}
    for old in directory.glob("search-*.safetensors"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return path


def read_checkpoint(directory: Path, world_size: int) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """``(path of the JSON, its JSON, its tensors)`` of the newest usable checkpoint in
    ``directory``, or ``None`` when there is none.

    The newest is used unless it is torn or fails its checks (JSON keys and types, the tensor
    file's presence and checksum, safetensors parsing); then the previous one is, with a
    warning that says why.

    Raises:
        CheckpointError: checkpoints exist but none is usable (each reason named).
        ValueError: a usable checkpoint does not fit this job (version, world size).
    """
    problems = []
    for meta_path in (directory / name for name in CHECKPOINT_FILES):
        if not meta_path.is_file():
            continue
        try:
            meta, tensors = _read_generation(meta_path, world_size)
        except _DamagedCheckpoint as damage:  # its message names the file
            log.warning("unusable checkpoint: %s", damage)
            problems.append(str(damage))
            continue
        if meta_path.name != CHECKPOINT_FILES[0]:
            reason = "; ".join(problems) or f"{CHECKPOINT_FILES[0]} was not written (the job stopped while replacing it)"
            log.warning("resuming from the previous checkpoint %s (%s)", meta_path, reason)
        return meta_path, meta, tensors
    if problems:
        raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(problems)
                              + ". Start afresh with --overwrite (or delete the folder)")
    return None


def _read_generation(meta_path: Path, world_size: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One generation's JSON and tensors, checked; :class:`_DamagedCheckpoint` (naming
    ``meta_path``) if torn or corrupt."""
    meta = read_json_object(meta_path, _DamagedCheckpoint)
    if "version" in meta and meta["version"] not in READABLE_VERSIONS:
        raise ValueError(f"{meta_path}: unsupported checkpoint version {meta['version']!r:.40}")
    check_fields(meta, _CHECKPOINT_FIELDS, str(meta_path), _DamagedCheckpoint)
    for rec in meta["candidates"] + meta.get("baselines", []):
        if not isinstance(rec, dict):
            raise _DamagedCheckpoint(f"{meta_path}: a candidate record is not a JSON object")
        check_fields(rec, _RECORD_FIELDS, f"{meta_path}: candidate record {rec.get('index')!r}", _DamagedCheckpoint)
    saved_world = int(meta.get("world_size", 1))
    if saved_world != world_size:
        raise ValueError(f"{meta_path}: the run was checkpointed by {saved_world} process(es) and this job has "
                         f"{world_size}; resume with the same world size (torchrun --nnodes x --nproc_per_node = "
                         f"{saved_world}): each rank's data shard and random stream depend on it")
    tensor_path = meta_path.parent / Path(meta["tensors"]).name
    if not tensor_path.is_file():
        raise _DamagedCheckpoint(f"{meta_path} names {tensor_path.name}, which is missing")
    expected = meta.get("tensors_sha256")
    if expected is not None and file_sha256(tensor_path) != expected:
        raise _DamagedCheckpoint(f"{meta_path}: {tensor_path.name} does not match its checksum (torn or corrupt)")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise _DamagedCheckpoint(f"{meta_path}: {tensor_path.name} is not a readable safetensors file ({err})") from None
    return meta, tensors


def _named_tensors(meta_path: Path) -> str | None:
    """The tensor file a checkpoint JSON names (``None`` if it is missing or unreadable)."""
    try:
        return Path(json.loads(meta_path.read_text())["tensors"]).name
    except (OSError, ValueError, KeyError, TypeError):
        return None
