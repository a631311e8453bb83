"""Run the CPU benchmark suite, write ``bench/results/<date>-<device>.json``, print the table.

Usage, from the repository root::

    python bench/run_cpu_suite.py            # the whole suite (about 15 min on 2 cores)
    python bench/run_cpu_suite.py -k e2e     # a subset (pytest -k expression)
    python bench/run_cpu_suite.py --no-readme

It runs ``pytest bench/ --benchmark-only`` with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``,
so every benchmark takes its CPU size), reads pytest-benchmark's JSON, and writes one results
file with the environment (device, CPU, torch / triton / transformers versions, date), the
exact command, every benchmark's median time and extra figures, the ratios against the
baselines of the same session, the end-to-end and search summaries with their targets, and
the benchmarks that were skipped and why. The markdown table it prints is also written into
``bench/README.md`` between the ``results`` markers (unless ``--no-readme``). Exit status:
pytest's.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
START, END = "<!-- results:start -->", "<!-- results:end -->"
E2E_TARGETS = [  # (label, config, figure, limit)
    ("peak memory, P=0.01 fp32 weights", "child P=0.01 fp32", "memory", 0.5),
    ("peak memory, P=0.01 bf16 frozen weights", "child P=0.01 bf16", "memory", 0.35),
    ("step time, P=0.001 fp32", "child P=0.001 fp32", "time", 0.8),
]


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _seconds(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_pytest(args: argparse.Namespace, json_path: Path, log_path: Path) -> tuple[int, list[str], float]:
    cmd = [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-p", "no:cacheprovider", "-q", "-rs",
           "--benchmark-json", str(json_path), "--benchmark-columns=median,iqr,rounds"]
    if args.k:
        cmd += ["-k", args.k]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    print(f"run_cpu_suite: 1-min load average before the run: {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()
    lines = []
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            open(log_path, "w") as log:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            lines.append(line.rstrip("\n"))
    return proc.returncode, lines, time.perf_counter() - start


def collect(raw: dict, log_lines: list[str], command: str, wall: float, returncode: int) -> dict:
    env = raw.get("adtuning_environment") or raw.get("machine_info", {}).get("adtuning", {})
    benches = []
    for b in raw.get("benchmarks", []):
        benches.append({
            "group": b.get("group"), "name": b["name"], "implementation": b["extra_info"].get("implementation", b["name"]),
            "median_s": b["stats"]["median"], "iqr_s": b["stats"]["iqr"], "rounds": b["stats"]["rounds"],
            "extra_info": b["extra_info"],
        })
    skipped = [line for line in log_lines if line.startswith("SKIPPED")]
    e2e = [b for b in benches if b["group"] and b["group"].startswith("e2e")]
    search = [b for b in benches if b["group"] == "ad-tuning search cost"]
    targets = []
    by_impl = {b["implementation"]: b["extra_info"] for b in e2e}
    for label, config, figure, limit in E2E_TARGETS:
        value = by_impl.get(config, {}).get(f"{figure}_ratio_to_full")
        targets.append({"target": f"e2e {label} <= {limit}x full fine-tuning", "value": value, "limit": limit,
                        "met": None if value is None else value <= limit})
    search_row = next((b["extra_info"] for b in search if b["name"].endswith("[search]")), None)
    if search_row is not None:
        value = search_row.get("memory_ratio_to_largest_single")
        targets.append({"target": "search peak memory <= 1.05x the largest single candidate", "value": value,
                        "limit": 1.05, "met": None if value is None else value <= 1.05})
    return {
        "environment": env, "command": command, "suite_wall_seconds": wall, "pytest_returncode": returncode,
        "benchmarks": benches, "ratios": raw.get("adtuning_ratios", []), "notes": raw.get("adtuning_notes", {}),
        "targets": targets, "skipped": skipped,
    }


def table(results: dict) -> str:
    env = results["environment"]
    out = []
    out.append(f"Device: **{env.get('device')}** ({env.get('cpu')}, {env.get('threads')} threads, "
               f"{env.get('cpu_capability')}) | torch {env.get('torch')} | triton {env.get('triton')} | "
               f"transformers {env.get('transformers')} | {env.get('date')} | suite wall time "
               f"{results['suite_wall_seconds'] / 60:.1f} min | 1-min load average before / after: "
               + " / ".join(f"{x:.1f}" for x in results.get("loadavg_1min_before_after", [])))
    out.append("")
    out.append(f"Command: `{results['command']}`")
    out.append("")
    out.append("### Targets")
    out.append("")
    out.append("| target | measured | met |")
    out.append("|---|---|---|")
    for t in results["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3f}x"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**NO — missed**")
        out.append(f"| {t['target']} | {value} | {met} |")
    e2e = [b for b in results["benchmarks"] if b["group"] and b["group"].startswith("e2e")]
    if e2e:
        x = e2e[0]["extra_info"]
        out += ["", f"### End-to-end training step (wav2vec2-base widths, {x.get('layers')} layers, "
                    f"batch {x.get('batch')} x {x.get('seconds_of_audio')} s, size `{x.get('size')}`)", "",
                "| configuration | optimizer | median step | time / full | peak memory (MiB) | memory / full | optimizer state (MiB) | load avg before / after |",
                "|---|---|---|---|---|---|---|---|"]
        for b in e2e:
            x = b["extra_info"]
            tr, mr = x.get("time_ratio_to_full"), x.get("memory_ratio_to_full")
            flag = lambda fig, r: "" if x.get(f"{fig}_target_met") in (None, True) else " (missed)"  # noqa: E731
            out.append(
                f"| {b['implementation']} | {x.get('optimizer', '')} | {_seconds(x.get('worker_median_step_s') or b['median_s'])} | "
                f"{'-' if tr is None else f'{tr:.3f}x' + flag('time', tr)} | {_mib(x.get('peak_bytes'))} | "
                f"{'-' if mr is None else f'{mr:.3f}x' + flag('memory', mr)} | {_mib(x.get('optimizer_state_bytes'))} | "
                + " / ".join(f"{v:.1f}" for v in x.get("loadavg_1min_before_after", [])) + " |")
    search = [b for b in results["benchmarks"] if b["group"] == "ad-tuning search cost"]
    if search:
        x = search[0]["extra_info"]
        out += ["", f"### AD-TUNING search cost ({x.get('layers')} layers, batch {x.get('batch')} x "
                    f"{x.get('seconds_of_audio')} s, T = {x.get('total_steps')}, r = {x.get('rung')}, keep 1)", "",
                "| run | steps | wall time | peak memory (MiB) | chosen P | dev accuracy |", "|---|---|---|---|---|---|"]
        for b in search:
            x = b["extra_info"]
            out.append(f"| {b['implementation'] if 'implementation' in x else x.get('name')} | {x.get('steps')} | "
                       f"{_seconds(x.get('wall_seconds'))} | {_mib(x.get('peak_bytes'))} | {x.get('chosen_p')} | "
                       f"{x.get('metric', float('nan')):.3f} |")
        s = next((b["extra_info"] for b in search if "steps_ratio" in b["extra_info"]), None)
        if s:
            out += ["", f"Search / three separate runs: steps {s['steps_ratio']:.3f}x, wall time {s['wall_ratio']:.3f}x; "
                        f"peak memory / largest single ({s['largest_single']}): {s['memory_ratio_to_largest_single']:.3f}x"
                        + (f", / the chosen candidate's single run: {s['memory_ratio_to_chosen_single']:.3f}x"
                           if "memory_ratio_to_chosen_single" in s else "")]
    micro = [b for b in results["benchmarks"] if b not in e2e and b not in search]
    if micro:
        out += ["", "### Micro-benchmarks (median of the rounds; ratios against the baseline of the same session)", "",
                "| group | implementation | median | rounds | peak growth (MiB) |", "|---|---|---|---|---|"]
        for b in micro:
            x = b["extra_info"]
            growth = x.get("peak_growth_bytes", x.get("peak_rss_growth_bytes"))
            out.append(f"| {b['group']} | {b['implementation']} | {_seconds(b['median_s'])} | {b['rounds']} | {_mib(growth)} |")
    if results["ratios"]:
        out += ["", "| ratio | speed-up (baseline time / candidate time) |", "|---|---|"]
        for r in results["ratios"]:
            out.append(f"| {r['label']} | {r['speedup']:.2f}x |")
    if results["skipped"]:
        out += ["", "Skipped:", ""] + [f"- `{line}`" for line in results["skipped"]]
    return "\n".join(out) + "\n"


def update_readme(path: Path, text: str) -> None:
    readme = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in readme or END not in readme:
        readme += f"\n{START}\n{END}\n"
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--results-dir", type=Path, default=BENCH / "results")
    parser.add_argument("--readme", type=Path, default=BENCH / "README.md")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    parser.add_argument("--from-json", type=Path,
                        help="re-render the table (and README) from an existing results file; runs nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        text = table(results) + f"\nFull results: `{args.from_json}`\n"
        print(text)
        if not args.no_readme:
            update_readme(args.readme, text)
        return 0
    command = "python bench/run_cpu_suite.py" + (f" -k {shlex.quote(args.k)}" if args.k else "")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        json_path, log_path = Path(tmp) / "raw.json", Path(tmp) / "pytest.log"
        returncode, lines, wall = run_pytest(args, json_path, log_path)
        if not json_path.exists() or json_path.stat().st_size == 0:
            print("run_cpu_suite: pytest wrote no benchmark JSON", file=sys.stderr)
            return returncode or 1
        raw = json.loads(json_path.read_text())
    results = collect(raw, lines, command, wall, returncode)
    results["loadavg_1min_before_after"] = [load_before, os.getloadavg()[0]]
    results["pytest_benchmark_raw"] = raw
    env = results["environment"]
    date = (env.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat())[:10]
    device = env.get("device", "cpu")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out_path = args.results_dir / f"{date}-{device}.json"
    out_path.write_text(json.dumps(results, indent=1, default=str))
    text = table(results) + f"\nFull results: `{out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}`\n"
    print("\n" + text)
    if not args.no_readme:
        update_readme(args.readme, text)
        print(f"updated {args.readme}")
    print(f"wrote {out_path}")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
