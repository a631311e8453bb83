"""Memory of a whole AD-TUNING run at the scale it exists for, phase by phase, against full fine-tuning.

For wav2vec2-base, -large and the XLS-R-1B and -2B shapes (random init, saved once as bf16
safetensors; transformers ``Wav2Vec2Config``), it runs the CLI as a user would on a tiny KS layout::

    python -m adtuning.train --upstream DIR --data-dir KS --bf16 --gradient-checkpointing --fisher-groups auto \\
        --candidates 0.001,0.01 --steps 4 --fisher-samples 4 --batch-size 2 ...

and reads the per-phase CPU high-water RSS (and CUDA peaks on a GPU) from ``summary.json``
(:mod:`adtuning.phase_memory`). Full fine-tuning (``--method full``) is measured the same way where
it fits in ``--ft-limit-gb`` (it holds fp32 masters, two Adam moments and a gradient per weight);
elsewhere its floor of 16 bytes per parameter is given instead. Every peak is also divided by the
bf16 weight bytes. Writes ``bench/results/<date>-scale.json`` (with the environment), prints a
Markdown table and saves ``bench/results/<date>-scale.png`` (peak memory against parameters).

    python bench/bench_scale.py                       # every shape (hours on 2 CPU cores; ~16 GB RAM for 2B)
    python bench/bench_scale.py --shapes base,large   # a subset
    python bench/bench_scale.py --dry-run             # a 2-layer shape, to check the script

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


def run_cli(upstream: Path, corpus: Path, out: Path, method: str = "ad-tuning") -> dict:
    flags = list(FLAGS)
    if method != "ad-tuning":  # no candidates to search
        i = flags.index("--candidates")
        del flags[i:i + 2]
    cmd = [sys.executable, "-m", "adtuning.train", "--upstream", str(upstream), "--data-dir", str(corpus), "--output-dir", str(out),
           "--overwrite", "--method", method, *flags]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"failed": proc.returncode, "log_tail": (proc.stdout + proc.stderr)[-3000:], "command": cmd}
    summary = json.loads((out / "summary.json").read_text())
    phases = summary["peak_memory"]["phases"]
    # The run's peak: the largest phase peak (each phase's high-water mark is reset at its start, so
    # the process-lifetime ru_maxrss, in KiB, only bounds it from above).
    run_peak = max(p["rss_peak_bytes"] for p in phases.values())
    return {"command": cmd, "wall_seconds": wall, "run_peak_rss_bytes": run_peak,
            "process_max_rss_bytes": summary["peak_memory"]["cpu_max_rss_bytes"],
            "phases": {name: {k: v for k, v in p.items() if k != "occurrences"} for name, p in phases.items()},
            "fisher_groups": summary["fisher"].get("groups")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="base,large,xls-r-1b,xls-r-2b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--dry-run", action="store_true", help="the 2-layer shape only (checks the script)")
    parser.add_argument("--ft-limit-gb", type=float, default=12.0,
                        help="measure full fine-tuning only where its 16 B/param floor is below this (else give the floor)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "adtuning-bench-scale",
                        help="where the random upstreams, the corpus and the runs go")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
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
        row["adtuning"] = run_cli(args.work / "upstreams" / shape, corpus, args.work / "runs" / f"{shape}-adtuning")
        if FT_FLOOR_BYTES_PER_PARAM * params <= args.ft_limit_gb * 1e9:
            row["full"] = run_cli(args.work / "upstreams" / shape, corpus, args.work / "runs" / f"{shape}-full", "full")
        rows.append(row)
        print(table_lines([row])[-1], flush=True)
    env = environment()
    doc = {"environment": env, "flags": FLAGS, "rows": rows, "method": "peak RSS per phase from summary.json "
           "(adtuning.phase_memory: VmHWM reset through /proc/self/clear_refs at each phase start)"}
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-dry-run" if args.dry_run else ""
    path = args.results_dir / f"{date}-scale{suffix}.json"
    path.write_text(json.dumps(doc, indent=2))
    print("\n".join(table_lines(rows)))
    print(f"bench_scale: wrote {path}")
    if not args.dry_run:
        plot(rows, args.results_dir / f"{date}-scale.png")
    return 0 if all("failed" not in r["adtuning"] for r in rows) else 1


def _gb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f} GB"


def table_lines(rows: list[dict]) -> list[str]:
    """The Markdown table: per shape, the run's and each phase's peak RSS (x bf16 weights), and FT."""
    lines = ["| shape | params | bf16 weights | whole run | load | Fisher | training (search) | final eval | full FT |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["adtuning"]
        w = r["bf16_weight_bytes"]
        if "failed" in a:
            lines.append(f"| {r['shape']} | {r['params'] / 1e6:,.0f}M | {_gb(w)} | failed ({a['failed']}) | | | | | |")
            continue

        def cell(value: float | None) -> str:
            return "" if value is None else f"{_gb(value)} ({value / w:.2f}x)"

        ph = a["phases"]
        full = r.get("full")
        ft = (cell(full["run_peak_rss_bytes"]) + " measured") if full and "failed" not in full else f"{_gb(r['ft_floor_bytes'])} floor"
        lines.append(f"| {r['shape']} | {r['params'] / 1e6:,.0f}M | {_gb(w)} | {cell(a['run_peak_rss_bytes'])} | "
                     f"{cell(ph.get('load', {}).get('rss_peak_bytes'))} | {cell(ph.get('fisher', {}).get('rss_peak_bytes'))} | "
                     f"{cell(ph.get('search', {}).get('rss_peak_bytes'))} | {cell(ph.get('evaluate', {}).get('rss_peak_bytes'))} | {ft} |")
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
    measured = [r for r in ok if r.get("full") and "failed" not in r["full"]]
    if measured:
        ax.plot([r["params"] / 1e9 for r in measured], [r["full"]["run_peak_rss_bytes"] / 1e9 for r in measured], "rs",
                label="full FT (measured)")
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
