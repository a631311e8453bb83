"""Use a trained sparse delta: load it onto its base model, evaluate it, or merge it.

Python::

    from adtuning.export import load_finetuned, merge_delta
    model = load_finetuned("outputs/adtuning/delta")            # SpeechModel, base + delta
    merge_delta("outputs/adtuning/delta", "merged-model/")       # plain transformers directory

Command line::

    python -m adtuning.export DELTA_DIR --evaluate [--data-dir DIR] [--split test]
    python -m adtuning.export DELTA_DIR --merge OUT_DIR

The base model is the one named in ``delta.json`` (``--base`` overrides it, e.g. a local copy of
the same weights); a delta is refused on any other base model (weights fingerprint) unless
``--force`` is given. A merged model is written to a temporary folder and moved into place
only when complete.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save as save_safetensors

from adtuning.atomic import WriteError, read_json_object, replace_dir, write_bytes
from adtuning.checkpoint import DeltaError, apply_delta, read_delta_config
from adtuning.cli_format import DefaultsOnceHelpFormatter

log = logging.getLogger("adtuning")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _model_config(delta_dir: str | Path) -> dict:
    """``delta.json``, checked for what building the model needs (task, dtype)."""
    meta = read_delta_config(delta_dir)
    where = Path(delta_dir) / "delta.json"
    if "task" not in meta:
        raise DeltaError(f"{where}: missing key 'task' (needed to build the task head)")
    if meta.get("base_dtype", "float32") not in _DTYPES:
        raise DeltaError(f"{where}: base_dtype must be one of {', '.join(_DTYPES)}, got {meta['base_dtype'][:80]!r}")
    return meta


def load_finetuned(delta_dir: str | Path, base: str | None = None, *, device: str | torch.device = "cpu",
                   force: bool = False, progress: bool = True):
    """Build the base upstream and the task head named by ``delta_dir`` and apply the delta.

    Args:
        delta_dir: a folder written by ``python -m adtuning.train`` (``delta.safetensors`` + ``delta.json``).
        base: the base upstream (hub id, local directory or tiny name); default: the one in ``delta.json``.
        device: where the model goes.
        force: apply the delta even if the base weights differ from those it was trained on
            (same names and shapes; a warning is logged).
        progress: show transformers' progress bar while the base weights load.

    Returns:
        A :class:`adtuning.speech.SpeechModel` in eval mode.

    Raises:
        DeltaError: unreadable or inconsistent delta, or (without ``force``) a base model other
            than the one it was trained on.
    """
    from adtuning.recipe.methods import adds_modules, prepare_task
    from adtuning.speech import SpeechModel, build_task, build_upstream

    meta = _model_config(delta_dir)
    method = meta.get("method", "ad-tuning")
    upstream = build_upstream(base or meta["base_model"], dtype=_DTYPES[meta.get("base_dtype", "float32")], seed=meta.get("base_seed", 0),
                              progress=progress)
    try:
        task = build_task(meta["task"], upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers,
                          **{**meta.get("task_kwargs", {}), **_split_options(meta)[1]})
        prepare_task(method, task)
    except (TypeError, ValueError, KeyError) as err:  # unknown task or options that do not fit it
        raise DeltaError(f"{Path(delta_dir) / 'delta.json'}: cannot build the task head {meta['task'][:40]!r} "
                         f"from task_kwargs/task_options: {err}") from err
    upstream_params = dict(upstream.named_parameters())
    head_params = dict(task.named_parameters())
    attached = None
    if adds_modules(method):
        from adtuning.methods import MethodAttachError, attach

        try:
            attached = attach(method, upstream, meta.get("method_options", {}))
        except (MethodAttachError, ValueError) as err:
            raise DeltaError(f"{Path(delta_dir) / 'delta.json'}: cannot attach method {method!r}: {err}") from err
        upstream_params = attached.base_named_parameters()
        head_params.update({f"method.{n}": p for n, p in attached.parameters().items()})
    model = SpeechModel(upstream, task)
    apply_delta(delta_dir, upstream_params, head_params, force=force)
    # The method's modules, for merge_delta (peft's merge folds LoRA's into the weights).
    object.__setattr__(model, "attached_method", attached)
    return model.to(device).eval()


def _split_options(meta: dict) -> tuple[dict, dict]:
    from adtuning.speech import split_task_options

    return split_task_options(meta["task"], meta.get("task_options", {}))


def merge_delta(delta_dir: str | Path, out_dir: str | Path, base: str | None = None, *, force: bool = False) -> Path:
    """Write base + delta as a plain transformers model directory (``save_pretrained``).

    The downstream head is written beside it as ``adtuning_head.safetensors`` with
    ``adtuning_head.json`` (task and options), since transformers has no class for it.
    Everything is written into a temporary folder beside ``out_dir`` that replaces ``out_dir``
    only when complete, so a failure (disk full) leaves no partial model and a previous merge
    intact.

    Raises:
        DeltaError: see :func:`load_finetuned`; or the merged weights are not finite.
        FileExistsError: ``out_dir`` exists, is not empty and is not a previous merge.
        adtuning.atomic.WriteError: the disk is full or another OS error while writing.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / "adtuning_head.json").is_file())):
        raise FileExistsError(f"--merge: {out_dir} exists and is not an empty folder or a previous merge; "
                              "choose another folder")
    meta = _model_config(delta_dir)
    from adtuning.recipe.methods import adds_modules

    method = meta.get("method", "ad-tuning")
    if adds_modules(method) and method != "lora":
        raise DeltaError(f"--merge: method {method!r} adds modules to the upstream, which a plain transformers checkpoint "
                         "cannot hold, so it cannot be merged (only lora can); use the delta with "
                         "adtuning.export.load_finetuned or --evaluate instead")
    model = load_finetuned(delta_dir, base, force=force)
    transformers_model = model.upstream.model
    if model.attached_method is not None:
        transformers_model = model.attached_method.merge()  # peft's merge: LoRA folded into the base Linear weights
    for name, tensor in [*transformers_model.named_parameters(), *model.task.named_parameters()]:
        if not bool(torch.isfinite(tensor).all()):
            raise DeltaError(f"refusing to write the merged model to {out_dir}: {name} has NaN/inf values")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        try:
            transformers_model.save_pretrained(str(staging))
            head = {name: p.detach().contiguous() for name, p in model.task.named_parameters()}
            write_bytes(staging / "adtuning_head.safetensors", save_safetensors(head))
            info = {"task": meta["task"], "task_kwargs": meta.get("task_kwargs", {}), "task_options": meta.get("task_options", {}),
                    "merged_from": str(delta_dir), "base_model": meta["base_model"], "p": meta["p"], "k": meta["k"],
                    "method": method}
            write_bytes(staging / "adtuning_head.json", json.dumps(info, indent=2).encode())
        except OSError as err:
            raise WriteError(err.errno, f"writing the merged model to {out_dir} failed: {err.strerror or err}; "
                             "nothing was replaced") from err
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def evaluate_delta(delta_dir: str | Path, data_dir: str | Path, split: str = "test", *, base: str | None = None,
                   batch_size: int = 16, device: str | torch.device = "cpu", progress: bool = True,
                   force: bool = False) -> dict[str, float]:
    """Metrics of base + delta on ``split`` of the corpus at ``data_dir`` (``force``: see :func:`load_finetuned`;
    ``progress``: the evaluation's bar and transformers' weight-loading bar)."""
    from adtuning.speech import build_dataset, make_loader

    meta = _model_config(delta_dir)
    model = load_finetuned(delta_dir, base, device=device, force=force, progress=progress)
    dataset = build_dataset(meta["task"], data_dir, split, **_split_options(meta)[0])
    return model.evaluate(make_loader(dataset, batch_size, shuffle=False), progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adtuning.export``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m adtuning.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsOnceHelpFormatter)
    parser.add_argument("delta_dir", type=Path, help="delta folder written by python -m adtuning.train (…/delta)")
    parser.add_argument("--base", default=None, help="base upstream to apply it to (default: the one recorded in delta.json)")
    parser.add_argument("--force", action="store_true",
                        help="apply the delta even if the base weights differ from those it was trained on (same shapes)")
    parser.add_argument("--merge", type=Path, default=None, metavar="OUT_DIR", help="write base + delta as a transformers model directory")
    parser.add_argument("--evaluate", action="store_true", help="evaluate base + delta on --split of --data-dir")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpus root (default: the one of the training run, from its config.json)")
    parser.add_argument("--split", default="test", choices=["dev", "test"], help="split to evaluate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if not args.merge and not args.evaluate:
        print("error: nothing to do: pass --merge OUT_DIR and/or --evaluate", file=sys.stderr)
        return 2
    try:
        meta = _model_config(args.delta_dir)
        print(f"delta: task {meta['task']}, base {meta['base_model']}, method {meta.get('method', 'ad-tuning')}, "
              f"P={meta['p']:g}, k={meta['k']:,} of {meta['n']:,} scored entries")
        if args.merge:
            out = merge_delta(args.delta_dir, args.merge, args.base, force=args.force)
            print(f"merged model written to {out}")
        if args.evaluate:
            data_dir = args.data_dir
            run_config = args.delta_dir.parent / "config.json"
            if data_dir is None and run_config.is_file():
                recorded = read_json_object(run_config, DeltaError).get("data_dir")
                if not isinstance(recorded, str):
                    raise DeltaError(f"{run_config}: no 'data_dir' string; pass --data-dir")
                data_dir = Path(recorded)
            if data_dir is None:
                print("error: --data-dir: needed (no run config.json next to the delta)", file=sys.stderr)
                return 2
            metrics = evaluate_delta(args.delta_dir, data_dir, args.split, base=args.base, batch_size=args.batch_size,
                                     device=args.device, force=args.force)
            print(f"{args.split}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    except DeltaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as err:  # OSError: WriteError (disk full), missing files
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
