"""Resumable state of ``python -m adtuning.pretrain``: checkpoints (model, classifier and AdamW
state as safetensors tensors, progress as JSON metadata, one file written atomically through
:mod:`adtuning.atomic`), saved targets, and the per-step seeds that make a resumed run equal to
an uninterrupted one. Never pickle."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from adtuning.atomic import atomic_write_bytes

__all__ = ["STATE_FORMAT", "step_seed", "save_checkpoint", "load_checkpoint", "checkpoint_progress", "save_tensors",
           "load_tensors", "split_targets", "ITERATION1_ARGS", "load_iteration1"]

STATE_FORMAT = 1


def step_seed(*parts: object) -> int:
    """A 63-bit seed from printable parts (seeds each step's generators)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, progress: dict) -> None:
    """Write model, classifier and AdamW state (tensors) and ``progress`` (JSON metadata) into
    one safetensors file, atomically."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    index = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    for p, st in opt.state.items():
        for name, value in st.items():
            tensors[f"opt.{index[id(p)]}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    meta = {"adtuning_pretrain": json.dumps(dict(progress, format=STATE_FORMAT, param_groups=groups))}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore a :func:`save_checkpoint` file into ``model`` and ``opt``; returns its progress."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "adtuning_pretrain" not in meta:
        raise ValueError(f"{path} is not a pre-training checkpoint (no adtuning_pretrain metadata)")
    progress = json.loads(meta["adtuning_pretrain"])
    if progress.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: checkpoint format {progress.get('format')!r}, expected {STATE_FORMAT}")
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    groups, start = [], 0
    for saved, group in zip(progress.pop("param_groups"), opt.param_groups):
        groups.append(dict(saved, params=list(range(start, start + len(group["params"])))))
        start += len(group["params"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    return progress


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write named tensors (and ``meta`` as JSON metadata) to one safetensors file, atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()},
                                  metadata={"json": json.dumps(meta or {})}))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a :func:`save_tensors` file."""
    from safetensors.torch import load_file

    return load_file(str(path))


def split_targets(flat: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Per-utterance targets from their concatenation."""
    return list(flat.split(lengths))


def checkpoint_progress(path: Path) -> dict:
    """The progress (JSON metadata) of a :func:`save_checkpoint` file, without loading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "adtuning_pretrain" not in meta:
        raise ValueError(f"{path} is not a pre-training checkpoint (no adtuning_pretrain metadata)")
    return json.loads(meta["adtuning_pretrain"])


#: The arguments an exported iteration-1 upstream must share with a run that starts iteration 2 from it
#: (corpus, targets, model and the iteration-1 schedule: what made those weights).
ITERATION1_ARGS = ("corpus", "speakers", "sentences_per_speaker", "held_out_speakers", "max_seconds", "clusters", "kmeans_iterations",
                   "hidden_size", "layers", "heads", "steps", "batch_size", "crop_seconds", "lr", "warmup_steps", "weight_decay",
                   "mask_prob", "mask_length", "augment", "rooms", "seed")


def load_iteration1(directory: Path, hubert: nn.Module, run: dict) -> dict:
    """Load an exported upstream of this recipe at the end of iteration 1 (``config.json``,
    ``model.safetensors``, ``pretraining.json`` in ``directory``) into ``hubert`` (float32; the
    mask embedding, which exports drop, keeps its fresh initialisation) so that iteration 2 can
    start from it when the run's own state is gone. ``run`` holds this run's arguments; those of
    :data:`ITERATION1_ARGS` must equal the ones ``pretraining.json`` records, and the export must be
    iteration 1 at its last step. Returns what the record keeps of the source (path, SHA-256,
    CPU-hours, wall seconds, held-out accuracy, curve). Raises ``ValueError`` naming the file and
    what differs."""
    from safetensors.torch import load_file

    directory = Path(directory)
    record_file, weights = directory / "pretraining.json", directory / "model.safetensors"
    for f in (record_file, weights):
        if not f.is_file():
            raise ValueError(f"--iteration1-from: {f} does not exist (an exported upstream of adtuning.pretrain is needed)")
    record = json.loads(record_file.read_text())
    if (record.get("iteration"), record.get("step")) != (1, run["steps"]):
        raise ValueError(f"--iteration1-from: {record_file} records iteration {record.get('iteration')} step {record.get('step')}, "
                         f"not the end of iteration 1 (step --steps={run['steps']})")
    saved = record.get("args", {})
    changed = [k for k in ITERATION1_ARGS if saved.get(k) != run.get(k)]
    if changed:
        raise ValueError(f"--iteration1-from: {record_file} was made with other arguments: "
                         + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (this run: {run.get(k)!r})" for k in changed))
    tensors = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = hubert.load_state_dict(tensors, strict=False)
    if set(missing) - {"masked_spec_embed"} or unexpected:
        raise ValueError(f"--iteration1-from: {weights} does not fit the model of this run "
                         f"(missing {sorted(set(missing) - {'masked_spec_embed'})}, unexpected {sorted(unexpected)})")
    return {"path": str(directory), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "dtype": record.get("dtype"),
            "cpu_hours": record.get("cpu_hours", 0.0), "wall_seconds": record.get("wall_seconds", 0.0),
            "held_out_masked_accuracy": record.get("final_held_out_masked_accuracy"),
            "curve": record.get("curves", {}).get("1", [])}
