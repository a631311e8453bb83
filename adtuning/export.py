"""Use a trained sparse delta: load it onto its base model, evaluate it, or merge it.

Python::

    from adtuning.export import load_finetuned, merge_delta
    model = load_finetuned("outputs/adtuning/delta")            # SpeechModel, base + delta
    merge_delta("outputs/adtuning/delta", "merged-model/")       # plain transformers directory

Command line::

    python -m adtuning.export DELTA_DIR --evaluate [--data-dir DIR] [--split test]
    python -m adtuning.export DELTA_DIR --merge OUT_DIR

The base model is the one named in ``delta.json`` (``--base`` overrides it, e.g. a local copy of
the same weights); a delta is refused on any other base model (weights fingerprint).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from adtuning.atomic import atomic_write
from adtuning.checkpoint import DeltaError, apply_delta, read_delta_config

log = logging.getLogger("adtuning")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_finetuned(delta_dir: str | Path, base: str | None = None, *, device: str | torch.device = "cpu"):
    """Build the base upstream and the task head named by ``delta_dir`` and apply the delta.

    Args:
        delta_dir: a folder written by ``python -m adtuning.train`` (``delta.safetensors`` + ``delta.json``).
        base: the base upstream (hub id, local directory or tiny name); default: the one in ``delta.json``.
        device: where the model goes.

    Returns:
        A :class:`adtuning.speech.SpeechModel` in eval mode.

    Raises:
        DeltaError: unreadable delta, or a base model other than the one it was trained on.
    """
    from adtuning.speech import SpeechModel, build_task, build_upstream

    meta = read_delta_config(delta_dir)
    upstream = build_upstream(base or meta["base_model"], dtype=_DTYPES[meta.get("base_dtype", "float32")], seed=meta.get("base_seed", 0))
    task = build_task(meta["task"], upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers,
                      **{**meta.get("task_kwargs", {}), **_split_options(meta)[1]})
    model = SpeechModel(upstream, task)
    apply_delta(delta_dir, dict(model.upstream.named_parameters()), dict(model.task.named_parameters()))
    return model.to(device).eval()


def _split_options(meta: dict) -> tuple[dict, dict]:
    from adtuning.train import split_task_options

    return split_task_options(meta["task"], meta.get("task_options", {}))


def merge_delta(delta_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Write base + delta as a plain transformers model directory (``save_pretrained``).

    The downstream head is written beside it as ``adtuning_head.safetensors`` with
    ``adtuning_head.json`` (task and options), since transformers has no class for it.
    """
    out_dir = Path(out_dir)
    model = load_finetuned(delta_dir, base)
    meta = read_delta_config(delta_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.upstream.model.save_pretrained(str(out_dir))
    head = {name: p.detach().contiguous() for name, p in model.task.named_parameters()}
    atomic_write(out_dir / "adtuning_head.safetensors", lambda tmp: save_file(head, tmp))
    info = {"task": meta["task"], "task_kwargs": meta.get("task_kwargs", {}), "task_options": meta.get("task_options", {}),
            "merged_from": str(delta_dir), "base_model": meta["base_model"], "p": meta["p"], "k": meta["k"]}
    atomic_write(out_dir / "adtuning_head.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    return out_dir


def evaluate_delta(delta_dir: str | Path, data_dir: str | Path, split: str = "test", *, base: str | None = None,
                   batch_size: int = 16, device: str | torch.device = "cpu", progress: bool = True) -> dict[str, float]:
    """Metrics of base + delta on ``split`` of the corpus at ``data_dir``."""
    from adtuning.speech import build_dataset, make_loader

    meta = read_delta_config(delta_dir)
    model = load_finetuned(delta_dir, base, device=device)
    dataset = build_dataset(meta["task"], data_dir, split, **_split_options(meta)[0])
    return model.evaluate(make_loader(dataset, batch_size, shuffle=False), progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adtuning.export``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m adtuning.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("delta_dir", type=Path, help="delta folder written by python -m adtuning.train (…/delta)")
    parser.add_argument("--base", default=None, help="base upstream to apply it to (default: the one recorded in delta.json)")
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
        meta = read_delta_config(args.delta_dir)
        print(f"delta: task {meta['task']}, base {meta['base_model']}, P={meta['p']:g}, k={meta['k']:,} of {meta['n']:,} scored entries")
        if args.merge:
            out = merge_delta(args.delta_dir, args.merge, args.base)
            print(f"merged model written to {out}")
        if args.evaluate:
            data_dir = args.data_dir
            run_config = args.delta_dir.parent / "config.json"
            if data_dir is None and run_config.is_file():
                data_dir = Path(json.loads(run_config.read_text())["data_dir"])
            if data_dir is None:
                print("error: --data-dir: needed (no run config.json next to the delta)", file=sys.stderr)
                return 2
            metrics = evaluate_delta(args.delta_dir, data_dir, args.split, base=args.base, batch_size=args.batch_size, device=args.device)
            print(f"{args.split}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    except DeltaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
