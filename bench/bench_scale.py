"""Memory of a whole AD-TUNING run at the scale it exists for, phase by phase, against full fine-tuning.

For wav2vec2-base, -large and the XLS-R-1B and -2B shapes (random init, saved once as bf16
safetensors; transformers ``Wav2Vec2Config``), it runs the CLI as a user would on a tiny KS layout::

    python -m adtuning.train --upstream DIR --data-dir KS --bf16 --gradient-checkpointing --fisher-groups auto \\
        --candidates 0.001,0.01 --steps 4 --fisher-samples 4 --batch-size 2 ...

and reads the per-phase CPU high-water RSS (and CUDA peaks on a GPU) from ``summary.json``
(:mod:`adtuning.phase_memory`). Every peak is also divided by the bf16 weight bytes.

The "full FT" column is a **plain full fine-tuning**, what a user would write with transformers
and torch (``kind: "plain-transformers-adamw"`` in the JSON): in a fresh process of its own (this
script with ``--plain-ft-worker``), ``Wav2Vec2Model.from_pretrained(DIR, dtype=torch.float32)`` on
the same upstream folder (fp32 weights: AdamW fine-tuning keeps fp32 weights), activation
(gradient) checkpointing, a 12-class linear head on the mean-pooled last hidden states,
``torch.optim.AdamW`` over every parameter (lr 1e-5, ``fused=True`` where the CPU has it, else
``foreach``), and a few steps on random 16 kHz audio with the CLI run's batch size (2) and the
KS layout's clip length (1 s). Its peak RSS is taken the same way as the CLI's (the largest
:class:`adtuning.phase_memory.PhaseMemory` phase peak: load, train), and its 16 B/param floor (fp32
weight, gradient, two Adam moments) is given beside it. It is measured where that floor fits in
``--ft-limit-gb``; elsewhere the floor alone is given (``kind: "floor"``).

adtuning's own ``--method full`` is **not** the fair baseline: it runs full fine-tuning through
AD-TUNING's machinery (index sets over every entry, kept base values): 11.89 GB, 18.8x the bf16
weights, at the large shape, where the plain run above peaks at 6.12 GB (9.7x; its floor is 8x),
so comparing against it flatters AD-TUNING. It is still measured with ``--adtuning-full`` (off by
default; ``kind: "adtuning-method-full"``, under ``adtuning_full`` in each row and its own table
column) so that earlier figures stay reproducible.

Writes ``<results-dir>/<date>-scale.json`` (with the environment), prints a Markdown table and
saves ``<results-dir>/<date>-scale.png`` (peak memory against parameters).

    python bench/bench_scale.py                       # every shape (hours on 2 CPU cores; ~16 GB RAM for 2B)
    python bench/bench_scale.py --shapes base,large   # a subset
    python bench/bench_scale.py --dry-run             # a 2-layer shape, to check the script
    python bench/bench_scale.py --threads 1           # one torch thread in every measured process

Memory, not time, is what this measures: the figures hold on a loaded machine, the walls do not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (hidden, layers, heads, feed-forward)
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "xls-r-1b": (1280, 48, 16, 5120),
    "xls-r-2b": (1920, 48, 16, 7680),
    "dry-run": (64, 2, 2, 128),
}
FLAGS = ["--bf16", "--gradient-checkpointing", "--fisher-groups", "auto", "--candidates", "0.001,0.01", "--steps", "4",
         "--fisher-samples", "4", "--batch-size", "2", "--eval-batch-size", "2", "--eval-interval", "0", "--checkpoint-interval",
         "0", "--no-plots", "--no-progress", "--log-level", "INFO", "--fused"]
FT_FLOOR_BYTES_PER_PARAM = 16  # fp32 master + gradient + two Adam moments, whatever the weights' dtype
# The plain full fine-tuning (--plain-ft-worker): the CLI run's batch size, the KS layout's clip
# length and classes, a few AdamW steps.
PLAIN_FT = {"steps": 3, "batch_size": int(FLAGS[FLAGS.index("--batch-size") + 1]), "clip_seconds": 1.0,
            "sample_rate": 16000, "classes": 12, "lr": 1e-5, "seed": 0}


def make_upstream(shape: str, folder: Path) -> int:
    """Save a random-init wav2vec2 of ``shape`` in bf16 (built in a child process, under bf16
    default dtype, so no fp32 copy is ever made); returns its parameter count."""
    if (folder / "params.json").is_file():
        return json.loads((folder / "params.json").read_text())["params"]
    hidden, layers, heads, ff = SHAPES[shape]
    code = f"""
import json, torch
from transformers import Wav2Vec2Config, Wav2Vec2Model
config = Wav2Vec2Config(hidden_size={hidden}, num_hidden_layers={layers}, num_attention_heads={heads}, intermediate_size={ff},
                        do_stable_layer_norm=True, feat_extract_norm="layer", layerdrop=0.0)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
model = Wav2Vec2Model(config)
model.save_pretrained({str(folder)!r}, safe_serialization=True)
json.dump({{"params": sum(p.numel() for p in model.parameters())}}, open({str(folder / 'params.json')!r}, "w"))
"""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return json.loads((folder / "params.json").read_text())["params"]


def _child_env(threads: int | None) -> dict | None:
    """The environment of a measured child process: one OpenMP pool of ``threads`` when given."""
    if threads is None:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_cli(upstream: Path, corpus: Path, out: Path, method: str = "ad-tuning", threads: int | None = None) -> dict:
    flags = list(FLAGS)
    if method != "ad-tuning":  # no candidates to search
        i = flags.index("--candidates")
        del flags[i:i + 2]
    if threads is not None:
        flags += ["--threads", str(threads)]
    cmd = [sys.executable, "-m", "adtuning.train", "--upstream", str(upstream), "--data-dir", str(corpus), "--output-dir", str(out),
           "--overwrite", "--method", method, *flags]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_child_env(threads))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"failed": proc.returncode, "log_tail": (proc.stdout + proc.stderr)[-3000:], "command": cmd}
    summary = json.loads((out / "summary.json").read_text())
    phases = summary["peak_memory"]["phases"]
    # The run's peak: the largest phase peak (each phase's high-water mark is reset at its start).
    # The process-lifetime ru_maxrss cannot be reset; it is kept beside it as a cross-check.
    run_peak = max(p["rss_peak_bytes"] for p in phases.values())
    return {"command": cmd, "wall_seconds": wall, "run_peak_rss_bytes": run_peak,
            "process_max_rss_bytes": summary["peak_memory"]["cpu_max_rss_bytes"],
            "phases": {name: {k: v for k, v in p.items() if k != "occurrences"} for name, p in phases.items()},
            "fisher_groups": summary["fisher"].get("groups")}


def plain_ft_worker(upstream: Path, out: Path, steps: int, threads: int | None) -> int:
    """The plain full fine-tuning, in this (fresh) process: what a user would write with
    transformers and torch. Writes its peaks and sizes to ``out`` (JSON)."""
    import torch
    import transformers
    from transformers import Wav2Vec2Model

    from adtuning.phase_memory import PhaseMemory, rss_peak_bytes

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(PLAIN_FT["seed"])
    tracker = PhaseMemory("cpu")
    with tracker.phase("load"):
        from packaging.version import Version

        dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"  # renamed in 4.56
        model = Wav2Vec2Model.from_pretrained(str(upstream), **{dtype_key: torch.float32})
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x (the other is its deprecated alias)
            model.activation_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable()
        head = torch.nn.Linear(model.config.hidden_size, PLAIN_FT["classes"])
        params = [*model.parameters(), *head.parameters()]
        try:
            optimizer, impl = torch.optim.AdamW(params, lr=PLAIN_FT["lr"], fused=True), "fused"
        except (RuntimeError, ValueError):  # no fused AdamW on this device
            optimizer, impl = torch.optim.AdamW(params, lr=PLAIN_FT["lr"], foreach=True), "foreach"
    model.train()
    samples = int(PLAIN_FT["clip_seconds"] * PLAIN_FT["sample_rate"])
    losses = []
    with tracker.phase("train", label=f"train {steps} steps"):
        for _ in range(steps):
            audio = 0.1 * torch.randn(PLAIN_FT["batch_size"], samples)
            labels = torch.randint(0, PLAIN_FT["classes"], (PLAIN_FT["batch_size"],))
            hidden = model(audio).last_hidden_state
            loss = torch.nn.functional.cross_entropy(head(hidden.mean(dim=1)), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    phases = tracker.report()
    dtypes = sorted({str(p.dtype) for p in params})
    result = {"run_peak_rss_bytes": max(ph["rss_peak_bytes"] for ph in phases.values()),
              "process_max_rss_bytes": rss_peak_bytes(False),
              "phases": {name: {k: v for k, v in ph.items() if k != "occurrences"} for name, ph in phases.items()},
              "params": sum(p.numel() for p in model.parameters()), "head_params": sum(p.numel() for p in head.parameters()),
              "param_dtypes": dtypes, "optimizer": f"torch.optim.AdamW({impl})", "gradient_checkpointing": True,
              "steps": steps, "losses": losses, "threads": torch.get_num_threads(), "transformers": transformers.__version__,
              **{k: v for k, v in PLAIN_FT.items() if k != "seed"}}
    out.write_text(json.dumps(result, indent=2))
    return 0


def run_plain_ft(upstream: Path, out: Path, bf16_weight_bytes: int, steps: int, threads: int | None) -> dict:
    """:func:`plain_ft_worker` in a fresh process (so that the peak is its own)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-ft-worker", str(upstream), "--worker-out", str(out),
           "--plain-ft-steps", str(steps)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_child_env(threads))
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        return {"kind": "plain-transformers-adamw", "failed": proc.returncode or -1,
                "log_tail": (proc.stdout + proc.stderr)[-3000:], "command": cmd}
    result = json.loads(out.read_text())
    trained = result["params"] + result["head_params"]
    return {"kind": "plain-transformers-adamw", "command": cmd, "wall_seconds": wall, **result,
            "ratio_to_bf16_weights": result["run_peak_rss_bytes"] / bf16_weight_bytes,
            "floor_bytes": FT_FLOOR_BYTES_PER_PARAM * trained}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="base,large,xls-r-1b,xls-r-2b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--dry-run", action="store_true", help="the 2-layer shape only (checks the script)")
    parser.add_argument("--ft-limit-gb", type=float, default=12.0,
                        help="measure full fine-tuning only where its 16 B/param floor is below this (else give the floor)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "adtuning-bench-scale",
                        help="where the random upstreams, the corpus and the runs go")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of every measured process (CLI --threads; default: torch's)")
    parser.add_argument("--adtuning-full", action="store_true",
                        help="also measure adtuning's own --method full where the floor fits (the earlier 'full FT' "
                             "figures; not a plain fine-tuning: see the module docstring)")
    parser.add_argument("--plain-ft-steps", type=int, default=PLAIN_FT["steps"], help="AdamW steps of the plain full FT")
    parser.add_argument("--plain-ft-worker", type=Path, default=None, metavar="UPSTREAM",
                        help="internal: run the plain full FT on UPSTREAM in this process, write --worker-out, exit")
    parser.add_argument("--worker-out", type=Path, default=None, help="internal: the JSON --plain-ft-worker writes")
    args = parser.parse_args(argv)
    if args.plain_ft_worker is not None:
        if args.worker_out is None:
            parser.error("--plain-ft-worker needs --worker-out")
        return plain_ft_worker(args.plain_ft_worker, args.worker_out, args.plain_ft_steps, args.threads)
    shapes = ["dry-run"] if args.dry_run else [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(unknown)} (choose from {', '.join(SHAPES)})")
    from adtuning.environment import environment
    from tests.speech.speech_fixtures import write_speech_commands

    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.work / "ks" / "speech_commands_v0.01"
    if not corpus.is_dir():
        corpus = write_speech_commands(args.work / "ks")
    rows = []
    for shape in shapes:
        params = make_upstream(shape, args.work / "upstreams" / shape)
        weights = 2 * params
        print(f"bench_scale: {shape}: {params:,} parameters ({weights / 1e9:.2f} GB bf16)", flush=True)
        row = {"shape": shape, "dims": dict(zip(("hidden", "layers", "heads", "ff"), SHAPES[shape])), "params": params,
               "bf16_weight_bytes": weights, "ft_floor_bytes": FT_FLOOR_BYTES_PER_PARAM * params}
        upstream = args.work / "upstreams" / shape
        row["adtuning"] = run_cli(upstream, corpus, args.work / "runs" / f"{shape}-adtuning", threads=args.threads)
        if FT_FLOOR_BYTES_PER_PARAM * params <= args.ft_limit_gb * 1e9:
            row["full"] = run_plain_ft(upstream, args.work / "runs" / f"{shape}-plain-ft.json", weights, args.plain_ft_steps,
                                       args.threads)
            if args.adtuning_full:
                full = run_cli(upstream, corpus, args.work / "runs" / f"{shape}-full", "full", threads=args.threads)
                row["adtuning_full"] = {"kind": "adtuning-method-full", **full}
        else:
            row["full"] = {"kind": "floor", "floor_bytes": row["ft_floor_bytes"],
                           "ratio_to_bf16_weights": row["ft_floor_bytes"] / weights}
        rows.append(row)
        print(table_lines([row])[-1], flush=True)
    env = environment()
    doc = {"environment": env, "flags": FLAGS, "threads": args.threads, "plain_ft": {**PLAIN_FT, "steps": args.plain_ft_steps},
           "rows": rows, "method": "peak RSS per phase from summary.json "
           "(adtuning.phase_memory: VmHWM reset through /proc/self/clear_refs at each phase start); the plain full FT "
           "(rows[].full, kind plain-transformers-adamw) measured the same way in a process of its own; "
           "full.kind floor: not measured, 16 B/param; rows[].adtuning_full (--adtuning-full): adtuning --method full"}
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-dry-run" if args.dry_run else ""
    path = args.results_dir / f"{date}-scale{suffix}.json"
    path.write_text(json.dumps(doc, indent=2))
    print("\n".join(table_lines(rows)))
    print(f"bench_scale: wrote {path}")
    if not args.dry_run:
        plot(rows, args.results_dir / f"{date}-scale.png")
    return 0 if all("failed" not in r["adtuning"] and "failed" not in r.get("full", {}) for r in rows) else 1


def _gb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f} GB"


def _full_kind(full: dict) -> str:
    """A row's ``full`` entry's kind (rows written before the plain FT was measured: adtuning's)."""
    return full.get("kind", "adtuning-method-full")


def _measured_full(row: dict) -> dict | None:
    """The row's plain full FT measurement, or None (floor only, failed, or an older row)."""
    full = row.get("full")
    return full if full and _full_kind(full) == "plain-transformers-adamw" and "failed" not in full else None


def _adtuning_full(row: dict) -> dict | None:
    """The row's adtuning ``--method full`` measurement (``--adtuning-full``, or an older row's ``full``)."""
    full = row.get("adtuning_full") or (row.get("full") if row.get("full") and _full_kind(row["full"]) == "adtuning-method-full"
                                        else None)
    return full if full and "failed" not in full else None


def table_lines(rows: list[dict]) -> list[str]:
    """The Markdown table: per shape, the run's and each phase's peak RSS (x bf16 weights), and
    the plain full FT's (its 16 B/param floor where it was not measured); adtuning's ``--method
    full`` in a last column where any row has it."""
    with_adtuning_full = any(_adtuning_full(r) for r in rows)
    head = ["shape", "params", "bf16 weights", "whole run", "load", "Fisher", "training (search)", "final eval",
            "full FT (plain, fp32 AdamW)", "full FT floor (16 B/param)"]
    if with_adtuning_full:
        head.append("adtuning --method full")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a = r["adtuning"]
        w = r["bf16_weight_bytes"]

        def cell(value: float | None) -> str:
            return "" if value is None else f"{_gb(value)} ({value / w:.2f}x)"

        full, old = r.get("full") or {}, _adtuning_full(r)
        measured = _measured_full(r)
        if measured:
            ft = cell(measured["run_peak_rss_bytes"])
        elif "failed" in full:
            ft = f"failed ({full['failed']})"
        else:
            ft = "not measured"
        tail = [ft, cell(r["ft_floor_bytes"])] + ([cell(old["run_peak_rss_bytes"]) if old else ""] if with_adtuning_full else [])
        if "failed" in a:
            cells = [f"failed ({a['failed']})", "", "", "", ""]
        else:
            ph = a["phases"]
            cells = [cell(a["run_peak_rss_bytes"])] + [cell(ph.get(name, {}).get("rss_peak_bytes"))
                                                        for name in ("load", "fisher", "search", "evaluate")]
        lines.append("| " + " | ".join([r["shape"], f"{r['params'] / 1e6:,.0f}M", _gb(w), *cells, *tail]) + " |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "failed" not in r["adtuning"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["params"] / 1e9 for r in ok]
    ax.plot(x, [r["adtuning"]["run_peak_rss_bytes"] / 1e9 for r in ok], "o-", label="AD-TUNING run (peak RSS)")
    ax.plot(x, [r["bf16_weight_bytes"] / 1e9 for r in ok], "k--", label="bf16 weights")
    ax.plot(x, [r["ft_floor_bytes"] / 1e9 for r in ok], "r:", label="full FT floor (16 B/param)")
    measured = [r for r in ok if _measured_full(r)]
    if measured:
        ax.plot([r["params"] / 1e9 for r in measured], [r["full"]["run_peak_rss_bytes"] / 1e9 for r in measured], "rs",
                label="plain full FT, fp32 AdamW (measured)")
    old = [r for r in ok if _adtuning_full(r)]
    if old:
        ax.plot([r["params"] / 1e9 for r in old], [_adtuning_full(r)["run_peak_rss_bytes"] / 1e9 for r in old], "x",
                color="grey", label="adtuning --method full (measured)")
    ax.set_xlabel("upstream parameters (billions)")
    ax.set_ylabel("peak memory (GB)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
