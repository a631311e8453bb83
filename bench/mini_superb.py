"""mini-SUPERB: the rows of the paper's Table 2 that make sense here, on the embedded corpora.

Usage, from the repository root::

    python bench/mini_superb.py --jobs 2 --threads 1 # every task, 2 seeds, low-resource sweep (hours on 2 cores)
    python bench/mini_superb.py --quick              # 1 seed, a third of each task's steps, no sweep
    python bench/mini_superb.py --tasks ks,pr --seeds 0,1,2
    python bench/mini_superb.py --collect-only       # table the runs made so far, start none

Cost: per task and seed, 6T optimizer steps (AD-TUNING's 1.4T, the two culled candidates continued
to T, both baselines, CHILD-TUNING_F) plus evaluations. With the embedded defaults (T = 300 for KS,
IC and SD, 400 for PR, 500 for SID, 1200 for ASR and SF) that is about 50,000 steps for two seeds,
and the sweep (3T per size and seed) adds about 10,000. The 36 runs of
``bench/results/2026-12-02-mini-superb.json`` (2 cores, one thread per run) record 4.5 run-hours
(``run_wall_seconds``), an ASR or SF AD-TUNING run about 20 minutes. ``--tasks`` selects, and runs
are reused and resumed.

For every task and seed it runs the CLI (``python -m adtuning.train``, ``--fused``, the task's
embedded corpus and run defaults) twice:

1. AD-TUNING (candidates P = 0.001, 0.01, 0.1; r = 0.2, c = 1) with ``--measure-regret`` (every
   culled candidate is then trained on to T: the CHILD-TUNING_D rows, each exactly the run of
   one candidate to T, because a continued candidate is indistinguishable from one never paused)
   and ``--baselines head-only,full`` (Weighted-sum, P = 0, and FT, P = 1);
2. CHILD-TUNING_F: ``--child-method bernoulli --candidates <P_F>`` (one candidate, T steps);
3. one run per method of :data:`METHOD_RUNS` (``--method frozen`` — the paper's Baseline, the head on
   the last layer —, ``houlsby``, ``adapterbias``, ``lora``, ``prefix``, ``cnn-adapter``, ``chapter``;
   T steps each; ``--methods`` selects which runs are made).

Rows, in Table 2's order: FT, Baseline, Houlsby, AdapterBias, LoRA, Prefix, CNN adapter, CHAPTER,
Weighted-sum, CHILD-TUNING_F (P_F), CHILD-TUNING_D (P = 0.001, 0.01, 0.1), AD-TUNING; the params
column is the trainable upstream parameters (a child's entries, or what a method's modules add). For
each task and row it reports the test metric (dev too in the JSON) as mean +- spread over the seeds
(spread = half the range), the trainable parameters (upstream entries + head), the optimizer
steps, and the training seconds. A row's seconds are its steps times the mean step time of the
run it belongs to (runs train several rows in one process; the CLI records the run's total
training time only), so rows of one run share a step cost; say so when comparing them. AD-TUNING's
regret is the best CHILD-TUNING_D row minus AD-TUNING's pick (positive: the pick is worse; dev and
test, per seed, from ``summary.json``).

The low-resource sweep (not with ``--quick``) repeats run 1 (without the baselines) on one task
(``--low-resource-task``, default pr) for every seed with ``--max-train-hours`` at several sizes
(``--hours``; the study's own run is the full-size point), to see whether smaller training sets
prefer smaller P (the paper's Fig. 5), and trains LoRA, Houlsby and FT at the same sizes (Fig. 6).

Provenance: every run's ``summary.json`` records the commit it ran at (``"commit": {"sha", "dirty"}``,
and for a resumed run ``"commits"``, one per segment); a run without it counts as commit ``unknown``,
a commit of its own. The script refuses to table runs of different commits (nor one run whose
segments ran at different commits), and refuses up front to add runs at the checkout's commit to
finished runs of another, unless ``--allow-mixed-commits`` is given: the tables then say which
rows came from which commit (a commit column and a per-run list).

Results: ``bench/results/<date>-mini-superb.json`` (environment, commands, every run's figures)
and ``.md`` (the tables); with ``--quick`` the stem ends in ``-quick``. Runs are kept under ``--work``
(default ``mini-superb-runs`` beside the corpus cache); a run whose ``summary.json`` exists is reused, an interrupted one is resumed, so
the script can be stopped and started again. Run folders do not outlast the machine: with the default
``--work``, every finished run's summary is also kept in ``bench/results/runs/mini-superb/`` (``--keep``),
committed with the results and restored into the run folders when the study starts again elsewhere.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adtuning.embedded import EMBEDDED_CORPORA  # noqa: E402
from adtuning.speech.registry import TASK_NAMES  # noqa: E402
from adtuning.speech.upstream import DEFAULT_UPSTREAM  # noqa: E402

TASKS = TASK_NAMES
CANDIDATES = (0.001, 0.01, 0.1)
#: The runs of one task and seed that train a method of their own (``--method M``) and the row each gives.
METHOD_RUNS = {"frozen": "Baseline", "houlsby": "Houlsby", "adapterbias": "AdapterBias", "lora": "LoRA", "prefix": "Prefix",
               "cnn-adapter": "CNN adapter", "chapter": "CHAPTER"}
#: What --methods selects from: the AD-TUNING run (its rows: AD-TUNING, CHILD-TUNING_D, FT, Weighted-sum),
#: the CHILD-TUNING_F run and the method runs.
RUN_KINDS = ("ad-tuning", "child-tuning-f", *METHOD_RUNS)
#: The paper's Table 2 rows, in its order.
ROWS = ("FT", "Baseline", "Houlsby", "AdapterBias", "LoRA", "Prefix", "CNN adapter", "CHAPTER", "Weighted-sum", "CHILD-TUNING_F",
        "CHILD-TUNING_D P=0.001", "CHILD-TUNING_D P=0.01", "CHILD-TUNING_D P=0.1", "AD-TUNING")
#: The methods of the low-resource sweep beside AD-TUNING's children (the paper's Fig. 6); FT is ``full``.
SWEEP_METHODS = ("lora", "houlsby", "full")


#: Where finished runs' ``summary.json`` files are kept inside the repository (``<study>/<run folder
#: relative to --work>/summary.json``, compact JSON), committed with the results: run folders live
#: outside the checkout and do not outlast a machine, so a study spread over sessions keeps here
#: what it has run. With the default ``--work`` a study restores them before planning.
KEEP = ROOT / "bench" / "results" / "runs"

#: The commit label of a run whose summary.json records none (runs made before provenance).
UNKNOWN_COMMIT = "unknown"


def _commit_label(record: object) -> str:
    """``<sha[:12]>`` (``+dirty`` when the tree had uncommitted changes) of one commit record."""
    if not isinstance(record, dict) or not isinstance(record.get("sha"), str) or not record["sha"]:
        return UNKNOWN_COMMIT
    return record["sha"][:12] + ("+dirty" if record.get("dirty") else "")


def run_commit(summary: dict) -> str:
    """The commit a run ran at, from its ``summary.json``: the label of ``"commits"`` (one
    record per segment of a resumed run; segments at different commits are joined with
    `` -> ``, which is then a commit of its own) or of ``"commit"``; ``unknown`` without either."""
    segments = summary.get("commits")
    if not isinstance(segments, list) or not segments:
        segments = [summary.get("commit")]
    labels: list[str] = []
    for record in segments:
        label = _commit_label(record)
        if label not in labels:
            labels.append(label)
    return " -> ".join(labels)


def checkout_commit() -> str | None:
    """The sha of the checkout this script runs in (``None`` outside a git work tree)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def commits_of_runs(runs: list[dict]) -> dict[str, list[str]]:
    """``{commit label: [run folders]}`` of the runs that did not fail (sorted)."""
    out: dict[str, list[str]] = {}
    for entry in runs:
        if not entry.get("failed") and "commit" in entry:
            out.setdefault(entry["commit"], []).append(entry["output_dir"])
    return {label: sorted(dirs) for label, dirs in sorted(out.items())}


def mixed_commits_error(commits: dict[str, list[str]], what: str, who: str = "mini_superb") -> str | None:
    """The refusal message (its lines started by ``who``) when ``commits`` (label -> run folders)
    holds more than one commit, or a run resumed across commits; ``None`` when every run ran at one commit."""
    if len(commits) <= 1 and not any(" -> " in label for label in commits):
        return None
    lines = [f"{who}: {what} span {len(commits)} commit(s); refusing to table them together "
             "(re-run the rows at one commit, or pass --allow-mixed-commits to table them with their commits):"]
    for label, dirs in commits.items():
        lines.append(f"  {label}: {len(dirs)} run(s): " + ", ".join(dirs))
    return "\n".join(lines)


def environment() -> dict:
    """Device, CPU, versions, commit and date (:func:`adtuning.environment.environment`, the recorder
    of the CLI, bench/ and tools/), plus the core count, the versions as one mapping (the tables'
    keys) and the load at the start: stored with every figure."""
    from adtuning.environment import environment as record
    from adtuning.environment import versions

    return {**record(), "cores": os.cpu_count(), "versions": versions(), "load_average_1min_at_start": os.getloadavg()[0]}


def task_steps(task: str, quick: bool) -> int:
    """T of a task: its embedded run default, a third of it (at least 60) with --quick."""
    steps = EMBEDDED_CORPORA[task].run_defaults.steps
    return max(60, steps // 3) if quick else steps


def cli_command(task: str, out: Path, seed: int, steps: int, extra: list[str], args: argparse.Namespace) -> list[str]:
    """The CLI command of one run (the registry's reader/head options given explicitly)."""
    corpus = EMBEDDED_CORPORA[task]
    root = args.corpus_cache / corpus.folder
    options = [f"--task-option={k}={json.dumps(v)}" for k, v in corpus.resolved_task_options(root).items()]
    cmd = [sys.executable, "-m", "adtuning.train", "--task", task, "--fused", "--seed", str(seed), "--steps", str(steps),
           "--output-dir", str(out), "--corpus-cache", str(args.corpus_cache), "--no-progress", "--no-plots",
           "--log-level", "WARNING", *options, *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.upstream:
        cmd += ["--upstream", args.upstream]
    return cmd


def upstream_slug(upstream: str | None) -> str:
    """The suffix that keeps a study on another upstream apart ('' for the CLI's default upstream)."""
    if not upstream:
        return ""
    name = Path(upstream.rstrip("/")).name or upstream
    return "-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def kept_summaries(outs, work: Path, keep: Path | None) -> dict[Path, Path]:
    """Where each run folder of ``outs`` (under ``work``) keeps its summary in ``keep`` ({} without one)."""
    return {} if keep is None else {out: keep / out.relative_to(work) / "summary.json" for out in outs}


def restore_kept(kept: dict[Path, Path], who: str = "mini_superb") -> int:
    """Copy every kept summary into its run folder when the folder has none (a run finished on
    another machine or in an earlier session), so that it is reused; returns how many."""
    from adtuning.atomic import atomic_write_bytes

    restored = 0
    for out, kept_file in kept.items():
        if kept_file.is_file() and not (out / "summary.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / "summary.json", kept_file.read_bytes())
            restored += 1
    if restored:
        print(f"{who}: {restored} finished run(s) restored from {os.path.commonpath([str(k) for k in kept.values()])}", flush=True)
    return restored


def _keep(summary: dict, kept_file: Path | None) -> None:
    if kept_file is not None and not kept_file.is_file():
        from adtuning.atomic import atomic_write_bytes

        kept_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(kept_file, (json.dumps(summary, separators=(",", ":")) + "\n").encode())


def run(cmd: list[str], out: Path, log: list[dict], who: str = "mini_superb", keep: Path | None = None) -> dict | None:
    """Run (or reuse, or resume) one CLI run; return its summary (None if the run failed).

    The run's stdout and stderr go to ``out/run.log`` (appended, so a resumed run keeps both
    parts), which holds the CLI's printout of the search. ``who`` starts the lines it prints.
    ``keep``: where the finished run's summary is also kept (:data:`KEEP`; written once).
    """
    summary = out / "summary.json"
    entry = {"command": shlex.join(cmd), "output_dir": str(out)}
    if summary.is_file():
        entry["reused"] = True
    else:
        full = cmd + (["--resume"] if (out / "config.json").is_file() else [])
        print(f"{who}: start {shlex.join(full)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out / "run.log", "a") as sink:
            proc = subprocess.run(full, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        entry["wall_seconds"] = time.perf_counter() - start
        if proc.returncode != 0:
            # One failed run must not cost the others (or the results of those that finished).
            print(f"{who}: the run in {out} failed with exit status {proc.returncode} "
                  f"(its output: {out / 'run.log'}): {shlex.join(full)}", flush=True)
            entry["failed"] = proc.returncode
            log.append(entry)
            return None
        print(f"{who}: done in {entry['wall_seconds']:.0f} s: {out}", flush=True)
    result = json.loads(summary.read_text())
    _keep(result, keep)
    # When, how long and at which commit the run itself ran (a reused run ran before this invocation).
    entry.update(run_date=result.get("date"), run_wall_seconds=result.get("wall_seconds"), commit=run_commit(result))
    log.append(entry)
    return result


def write_results(stem: Path, result: dict, text: str, who: str = "mini_superb") -> None:
    """Write ``stem.json`` (``result``) and ``stem.md`` (``text``) together, all or nothing
    (:func:`adtuning.atomic.atomic_write_files`), print the tables and say where they went."""
    from adtuning.atomic import atomic_write_files

    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_files({stem.with_suffix(".json"): (json.dumps(result, indent=1) + "\n").encode(),
                        stem.with_suffix(".md"): text.encode()})
    print(text)
    print(f"{who}: wrote {stem}.json and {stem}.md")


def _per_step(summary: dict) -> float:
    """The run's mean seconds per optimizer step (all rows it trained, regret and baselines included)."""
    steps = sum(c["steps"] for c in summary["candidates"]) + sum(b["steps"] for b in summary.get("baselines", {}).values())
    return summary["train_seconds"] / max(1, steps)


def _empty_row(p: float | None, head: int | None) -> dict:
    return {"p": p, "trainable_upstream": None, "trainable_head": head, "steps": None, "seconds": None, "dev": None, "test": None}


def rows_of(adt: dict, f: dict | None, p_f: float, methods: dict[str, dict | None] | None = None) -> dict[str, dict]:
    """The Table-2 rows of one task and seed from the AD-TUNING, CHILD-TUNING_F and method-run
    summaries (``None`` for a run not made: its row is then empty). A method row's upstream
    parameters are those its modules add (LoRA, adapters, ...; 0 for the frozen Baseline)."""
    metric = adt["primary_metric"]
    head = adt["baselines"]["head-only"]["trainable_head"]
    per_step = _per_step(adt)
    out = {}
    for kind, row in (("head-only", "Weighted-sum"), ("full", "FT")):
        b = adt["baselines"][kind]
        out[row] = {"p": b["p"], "trainable_upstream": b["trainable_upstream"], "trainable_head": head, "steps": b["steps"],
                    "seconds": b["steps"] * per_step, "dev": b["final_dev"][metric],
                    "test": b["final_test"][metric] if b["final_test"] else None}
    for method, row in METHOD_RUNS.items():
        m = (methods or {}).get(method)
        if m is None:
            out[row] = _empty_row(0.0, None)
            continue
        t = m["trainable"]
        out[row] = {"p": 0.0, "trainable_upstream": t["method_params"] + t["upstream_entries"], "trainable_head": t["head_params"],
                    "steps": m["total_steps"], "seconds": m["train_seconds"], "dev": m["final"]["dev"][metric],
                    "test": m["final"].get("test", {}).get(metric)}
    if f is None:
        out["CHILD-TUNING_F"] = _empty_row(p_f, head)
    else:
        c = f["candidates"][0]
        out["CHILD-TUNING_F"] = {"p": p_f, "trainable_upstream": c["k"], "trainable_head": head, "steps": c["steps"],
                                 "seconds": c["steps"] * _per_step(f), "dev": f["final"]["dev"][metric],
                                 "test": f["final"].get("test", {}).get(metric)}
    for c in adt["candidates"]:
        out[f"CHILD-TUNING_D P={c['p']:g}"] = {
            "p": c["p"], "trainable_upstream": c["k"], "trainable_head": head, "steps": c["steps"],
            "seconds": c["steps"] * per_step, "dev": c["final_dev"][metric],
            "test": c["final_test"][metric] if c["final_test"] else None}
    chosen = next(c for c in adt["candidates"] if c["p"] == adt["chosen_p"])
    out["AD-TUNING"] = {"p": adt["chosen_p"], "trainable_upstream": chosen["k"], "trainable_head": head,
                        "steps": adt["steps_spent_search"], "seconds": adt["steps_spent_search"] * per_step,
                        "dev": adt["final"]["dev"][metric], "test": adt["final"].get("test", {}).get(metric),
                        "regret_dev": adt.get("regret"), "regret_test": adt.get("regret_test")}
    return out


def _stats(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "spread": None, "n": 0}
    return {"mean": sum(vals) / len(vals), "spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else None, "n": len(vals)}


def aggregate(per_seed: dict[int, dict[str, dict]], higher: bool) -> dict:
    """Mean +- spread per row, and what the issue asks of each task."""
    rows = {}
    for row in ROWS:
        runs = [per_seed[s][row] for s in sorted(per_seed)]
        made = next((r for r in runs if r["steps"] is not None), runs[0])
        rows[row] = {"p": made["p"], "trainable_upstream": made["trainable_upstream"],
                     "trainable_head": made["trainable_head"], "steps": made["steps"],
                     "seconds": _stats([r["seconds"] for r in runs]), "dev": _stats([r["dev"] for r in runs]),
                     "test": _stats([r["test"] for r in runs]),
                     "per_seed": {str(s): {k: per_seed[s][row][k] for k in ("dev", "test", "steps", "p")} for s in sorted(per_seed)}}
    split = "test" if rows["AD-TUNING"]["test"]["mean"] is not None else "dev"
    d_rows = [r for r in ROWS if r.startswith("CHILD-TUNING_D")]
    pick = max if higher else min
    best = pick(d_rows, key=lambda r: rows[r][split]["mean"])
    best_mean, ad = rows[best][split]["mean"], rows["AD-TUNING"][split]["mean"]
    regret = (best_mean - ad) if higher else (ad - best_mean)
    spread = rows[best][split]["spread"]
    d_at_pf = f"CHILD-TUNING_D P={rows['CHILD-TUNING_F']['p']:g}"
    d_vs_f = None
    if d_at_pf in rows and rows["CHILD-TUNING_F"][split]["mean"] is not None:
        d, f = rows[d_at_pf][split]["mean"], rows["CHILD-TUNING_F"][split]["mean"]
        d_vs_f = d >= f if higher else d <= f
    per_seed_regret = {str(s): {"dev": per_seed[s]["AD-TUNING"]["regret_dev"], "test": per_seed[s]["AD-TUNING"]["regret_test"]}
                       for s in sorted(per_seed)}
    return {"rows": rows, "split": split, "best_d_row": best, "ad_regret_vs_best_d": regret,
            "ad_within_best_d_spread": None if spread is None else regret <= spread,
            "d_at_pf_at_least_f": d_vs_f, "regret_per_seed": per_seed_regret,
            "ad_picks": {str(s): per_seed[s]["AD-TUNING"]["p"] for s in sorted(per_seed)}}


def low_resource(summaries: dict, task: str, seeds: list[int], hours: list[str]) -> dict | None:
    """The --max-train-hours sweep: per training-set size, each candidate's metric at T (mean +-
    spread over the seeds whose run of that size exists), the best P by that mean, the picks, and
    the metric of each of :data:`SWEEP_METHODS` (the paper's Fig. 6; the full-size point of FT is
    the study's FT row, of the others the study's method runs)."""
    sizes, metric = {}, None
    for size in hours + ["full"]:
        made = {seed: summaries.get((task, seed, "adtuning" if size == "full" else f"hours-{size}")) for seed in seeds}
        made = {seed: s for seed, s in made.items() if s is not None}
        if not made:
            continue
        first = next(iter(made.values()))
        metric, higher = first["primary_metric"], first["higher_is_better"]
        split = "final_test" if all(c["final_test"] for s in made.values() for c in s["candidates"]) else "final_dev"
        per_p = {f"{c['p']:g}": _stats([next(x for x in s["candidates"] if x["p"] == c["p"])[split][metric]
                                        for s in made.values()]) for c in first["candidates"]}
        best = (max if higher else min)(per_p, key=lambda p: per_p[p]["mean"])
        per_method = {}
        for method in SWEEP_METHODS:
            values = []
            for seed in seeds:
                if size == "full" and method == "full":
                    adt = summaries.get((task, seed, "adtuning"))
                    b = None if adt is None else adt.get("baselines", {}).get("full")
                    values.append(None if b is None or b.get(split) is None else b[split][metric])
                    continue
                m = summaries.get((task, seed, method if size == "full" else f"hours-{size}-{method}"))
                values.append(None if m is None else m["final"].get(split.removeprefix("final_"), {}).get(metric))
            per_method[method] = _stats(values)
        sizes[size] = {"per_p": per_p, "best_p": float(best), "seeds": sorted(made), "split": split,
                       "ad_picks": {str(seed): s["chosen_p"] for seed, s in made.items()}, "methods": per_method}
    return {"task": task, "seeds": seeds, "metric": metric, "sizes": sizes} if sizes else None


def _fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['spread']:.{digits}f}" if stat["spread"] is not None else "")


#: Which run of a task and seed trains each row (the rest come from the AD-TUNING run).
ROW_RUN = {"CHILD-TUNING_F": "child-tuning-f", **{row: method for method, row in METHOD_RUNS.items()}}


def row_commits(result: dict, row: str, letters: dict[str, str]) -> str:
    """The commits a row's figures came from: ``<letter> (<task> <seeds>)``, one per commit."""
    where: dict[str, list[str]] = {}
    for task in (t for t in TASKS if t in result["tasks"]):
        by_seed = result["tasks"][task].get("commits", {})
        for seed, runs in by_seed.items():
            label = runs.get(ROW_RUN.get(row, "adtuning"))
            if label is not None:
                where.setdefault(label, []).append(f"{task} {seed}")
    return "; ".join(f"{letters.get(label, label)} ({', '.join(places)})" for label, places in where.items()) or "-"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# mini-SUPERB ({result['date']})", "",
             f"{env['device']}, {env['cpu']}, {env['cores']} cores, torch {env['versions']['torch']}; 1-min load at start "
             f"{env['load_average_1min_at_start']:.2f}. Mode: {'quick' if result['quick'] else 'full'}; seeds "
             f"{', '.join(map(str, result['seeds']))}; CHILD-TUNING_F at P_F = {result['p_f']:g}. Upstream: "
             f"{result.get('upstream') or DEFAULT_UPSTREAM + ' (the CLI default)'}; corpora: the embedded generated "
             "ones (adtuning/embedded.py); '-': a row not run (see --methods).", ""]
    tasks = [t for t in TASKS if t in result["tasks"]]
    commits = result.get("commits", {})
    mixed = len(commits) > 1 or any(" -> " in label for label in commits)
    letters = {label: chr(ord("a") + i) if i < 26 else f"c{i}" for i, label in enumerate(commits)}
    if mixed:
        lines += [f"**Mixed commits** (--allow-mixed-commits): the runs span {len(commits)} commits; the column "
                  "'commit' says which rows came from which (letter: task and seeds), the list below names them:", ""]
        lines += [f"- {letters[label]} = {label}: {len(dirs)} run(s)" for label, dirs in commits.items()]
        lines.append("")
    elif commits:
        lines += [f"Commit: {next(iter(commits))} (every run).", ""]
    head = "| row | upstream params | " + " | ".join(
        f"{t} {result['tasks'][t]['metric']} {'↑' if result['tasks'][t]['higher_is_better'] else '↓'}" for t in tasks) + " |"
    head += " commit |" if mixed else ""
    lines += ["Test metric, mean ± half the range over the seeds:", "", head, "|" + "---|" * (len(tasks) + 2 + mixed)]
    for row in ROWS:
        params = next((result["tasks"][t]["summary"]["rows"][row]["trainable_upstream"] for t in tasks
                       if result["tasks"][t]["summary"]["rows"][row]["trainable_upstream"] is not None), None)
        # AD-TUNING trains its pick's child, which differs across tasks and seeds (see "AD picks").
        params = "-" if params is None else ("the pick's" if row == "AD-TUNING" else f"{params:,}")
        cells = [_fmt(result["tasks"][t]["summary"]["rows"][row][result["tasks"][t]["summary"]["split"]]) for t in tasks]
        line = f"| {row} | {params} | " + " | ".join(cells) + " |"
        if mixed:
            line += f" {row_commits(result, row, letters)} |"
        lines.append(line)
    lines += ["", "Per task: AD-TUNING's picks, its regret against the best CHILD-TUNING_D row (positive: worse), "
              "and CHILD-TUNING_D vs _F at the same P:", "",
              "| task | T | AD picks (per seed) | best D row | AD regret | within the best row's spread | D(P_F) ≥ F(P_F) | AD steps vs training all |",
              "|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        s = result["tasks"][t]["summary"]
        within = "-" if s["ad_within_best_d_spread"] is None else ("yes" if s["ad_within_best_d_spread"] else "no")
        dvf = "-" if s["d_at_pf_at_least_f"] is None else ("yes" if s["d_at_pf_at_least_f"] else "no")
        picks = ", ".join(f"{p:g}" for p in s["ad_picks"].values())
        steps = s["rows"]["AD-TUNING"]["steps"]
        lines.append(f"| {t} | {result['tasks'][t]['steps']} | {picks} | {s['best_d_row']} | {s['ad_regret_vs_best_d']:+.4f} | "
                     f"{within} | {dvf} | {steps} vs {3 * result['tasks'][t]['steps']} |")
    lines += ["", "Steps and training seconds per row (seconds: steps x the mean step time of the run the row was "
              "trained in; see bench/mini_superb.py):", "",
              "| task | " + " | ".join(ROWS) + " |", "|" + "---|" * (len(ROWS) + 1)]
    for t in tasks:
        rows = result["tasks"][t]["summary"]["rows"]
        lines.append(f"| {t} | " + " | ".join("not run" if rows[r]["steps"] is None else
                                             f"{rows[r]['steps']} / {_fmt(rows[r]['seconds'], 0)} s" for r in ROWS) + " |")
    if result.get("low_resource"):
        lr = result["low_resource"]
        lines += ["", f"Low-resource sweep on {lr['task']} (--max-train-hours; {lr['metric']} of each "
                  "CHILD-TUNING_D row trained to T, mean ± half the range over the seeds listed, the best P by "
                  "that mean, and AD-TUNING's pick per seed):", "",
                  "| hours | seeds | " + " | ".join(f"P={p:g}" for p in CANDIDATES) + " | best P | AD picks | "
                  + " | ".join("FT" if m == "full" else m for m in SWEEP_METHODS) + " |",
                  "|" + "---|" * (len(CANDIDATES) + 4 + len(SWEEP_METHODS))]
        for hours, entry in lr["sizes"].items():
            split = entry["split"].removeprefix("final_")
            lines.append(f"| {hours} | {', '.join(map(str, entry['seeds']))} ({split}) | "
                         + " | ".join(_fmt(entry["per_p"][f"{p:g}"]) for p in CANDIDATES)
                         + f" | {entry['best_p']:g} | {', '.join(f'{p:g}' for p in entry['ad_picks'].values())} | "
                         + " | ".join(_fmt(entry.get("methods", {}).get(m, {"mean": None})) for m in SWEEP_METHODS) + " |")
    if mixed:
        lines += ["", "Commit of every run (mixed commits):", ""]
        lines += [f"    {letters[label]} {label}: {d}" for label, dirs in commits.items() for d in dirs]
    if result.get("missing_runs"):
        lines += ["", f"Runs not made (yet): {len(result['missing_runs'])}; their rows are '-' or 'not run', and a task "
                  "lists only the seeds whose AD-TUNING run exists (see 'AD picks'):", ""]
        lines += [f"    {path}" for path in result["missing_runs"]]
    lines += ["", "Runs (date and wall time of each run; the 1-min load above is at this invocation's start):", ""]
    lines += [f"    {r['command']}  # {r['run_date']}, {r['run_wall_seconds']:.0f} s, commit {r.get('commit', UNKNOWN_COMMIT)}"
              for r in result["runs"] if not r.get("failed")]
    if result.get("failed_runs"):
        lines += ["", "Runs that failed (exit status; their output is run.log in the run's folder):", ""]
        lines += [f"    {r['command']}  # exit status {r['failed']}" for r in result["runs"] if r.get("failed")]
    return "\n".join(lines) + "\n"


def _mixed_before_running(jobs: dict, collect_only: bool) -> str | None:
    """Refuse before any run starts when the finished runs of the plan already span commits, or
    when runs still to be made (at the checkout's commit) would join finished runs of another."""
    done: dict[str, list[str]] = {}
    for _, out, _ in jobs.values():
        path = out / "summary.json"
        if path.is_file():
            try:
                label = run_commit(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # read (and reported) when tabled
            done.setdefault(label, []).append(str(out))
    done = {label: sorted(dirs) for label, dirs in sorted(done.items())}
    message = mixed_commits_error(done, "the finished runs")
    if message or collect_only or not done:
        return message
    todo = [str(out) for _, out, _ in jobs.values() if not (out / "summary.json").is_file()]
    head = checkout_commit()
    label = next(iter(done))
    if todo and (head is None or label == UNKNOWN_COMMIT or not head.startswith(label.removesuffix("+dirty"))):
        return (f"mini_superb: {len(todo)} run(s) to make at the checkout's commit {head or UNKNOWN_COMMIT} would be "
                f"tabled with {len(done[label])} finished run(s) of commit {label} ({', '.join(done[label])}); refusing "
                "(move those runs away, or pass --allow-mixed-commits)")
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the study (or the selected part of it); write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: all seven)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1; 0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one seed, a third of each task's steps, no low-resource sweep")
    parser.add_argument("--p-f", type=float, default=0.1, help="P_F of the CHILD-TUNING_F row")
    parser.add_argument("--low-resource-task", default="pr", help="task of the --max-train-hours sweep ('' to skip)")
    parser.add_argument("--hours", default="0.025,0.05,0.1,0.2", help="training-set sizes of the sweep, in hours (the full set is added)")
    parser.add_argument("--threads", type=int, default=None, help="--threads of every run (default: the CLI's)")
    parser.add_argument("--corpus-cache", type=Path, default=None, help="--corpus-cache of every run (default: the CLI's)")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: mini-superb-runs beside the corpus cache)")
    parser.add_argument("--collect-only", action="store_true",
                        help="start no run: table the runs that have finished (missing rows and runs are listed)")
    parser.add_argument("--allow-mixed-commits", action="store_true",
                        help="table runs made at different commits (the tables then say which rows came from which)")
    parser.add_argument("--methods", default=",".join(RUN_KINDS),
                        help="runs to make per task and seed (default: all): ad-tuning (AD-TUNING, CHILD-TUNING_D, FT, "
                             "Weighted-sum), child-tuning-f, " + ", ".join(METHOD_RUNS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads threads; 2 x --threads 1 suits 2 cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--keep", type=Path, default=None,
                        help="where finished runs' summaries are kept and restored from (default: bench/results/runs/mini-superb "
                             "with the default --work, none with a --work of your own)")
    parser.add_argument("--upstream", default=None,
                        help="--upstream of every run (a registered name such as adtuning-hubert-small, a directory "
                             "or a hub id; default: the CLI's). The runs go to their own folders and the results "
                             "file is named after it, so studies on two upstreams never mix")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    kinds = [m for m in args.methods.split(",") if m]
    if [m for m in kinds if m not in RUN_KINDS] or "ad-tuning" not in kinds:
        parser.error(f"--methods: choose from {', '.join(RUN_KINDS)}, ad-tuning included (its run holds FT and the "
                     f"CHILD-TUNING_D rows), got {args.methods!r}")
    if args.corpus_cache is None:
        from adtuning.embedded import DEFAULT_CORPUS_CACHE

        args.corpus_cache = DEFAULT_CORPUS_CACHE
    if args.work is None:
        args.work = args.corpus_cache.parent / "mini-superb-runs"
        args.keep = KEEP / "mini-superb" if args.keep is None else args.keep
    date = _dt.date.today().isoformat()
    mode = ("quick" if args.quick else "full") + upstream_slug(args.upstream)
    result = {"date": date, "quick": args.quick, "seeds": seeds, "p_f": args.p_f, "upstream": args.upstream, "environment": environment(),
              "command": shlex.join([sys.executable, *sys.argv]), "tasks": {}, "runs": []}
    started = time.perf_counter()
    # Every run is independent: plan them all, run the longest first on --jobs workers, then read them.
    jobs: dict[tuple, tuple[list[str], Path, int]] = {}
    for task in tasks:
        steps = task_steps(task, args.quick)
        for seed in seeds:
            base = args.work / mode / task / f"seed{seed}"
            jobs[(task, seed, "adtuning")] = (cli_command(task, base / "adtuning", seed, steps,
                                                          ["--measure-regret", "--baselines", "head-only,full"], args),
                                              base / "adtuning", 5 * steps)
            if "child-tuning-f" in kinds:
                jobs[(task, seed, "f")] = (cli_command(task, base / "child-tuning-f", seed, steps,
                                                       ["--child-method", "bernoulli", "--candidates", f"{args.p_f:g}"], args),
                                           base / "child-tuning-f", steps)
            for method in (m for m in METHOD_RUNS if m in kinds):
                jobs[(task, seed, method)] = (cli_command(task, base / method, seed, steps, ["--method", method], args),
                                              base / method, steps)
    sweep_task = args.low_resource_task if not args.quick else ""
    sweep_hours = [h for h in args.hours.split(",") if h] if sweep_task else []
    for seed in seeds if sweep_task else []:
        steps = task_steps(sweep_task, False)
        for hours in sweep_hours:
            out = args.work / mode / f"low-resource-{sweep_task}" / f"seed{seed}" / f"hours-{hours}"
            jobs[(sweep_task, seed, f"hours-{hours}")] = (
                cli_command(sweep_task, out, seed, steps, ["--measure-regret", "--max-train-hours", hours], args), out, 3 * steps)
            for method in (m for m in SWEEP_METHODS if m == "full" or m in kinds):
                mout = out.parent / f"hours-{hours}-{method}"
                jobs[(sweep_task, seed, f"hours-{hours}-{method}")] = (
                    cli_command(sweep_task, mout, seed, steps, ["--method", method, "--max-train-hours", hours], args), mout, steps)
        if (sweep_task, seed, "adtuning") not in jobs:
            # The full-size point of the sweep is the study's run of that task (all candidates trained to T).
            out = args.work / mode / sweep_task / f"seed{seed}" / "adtuning"
            jobs[(sweep_task, seed, "adtuning")] = (cli_command(sweep_task, out, seed, steps,
                                                                ["--measure-regret", "--baselines", "head-only,full"], args),
                                                    out, 5 * steps)
    # Runs already started first (finish what is paid for); then whole short tasks (T <= 500:
    # both runs of every seed), the sweep, and the long tasks last: those with runs already made
    # first, then longest first. A study stopped early has as many complete tasks as possible,
    # and --collect-only tables what exists.
    begun = {task for (task, _, _), (_, out, _) in jobs.items() if (out / "config.json").is_file()}

    def priority(key):
        task, seed, kind = key
        out, cost = jobs[key][1], jobs[key][2]
        if (out / "config.json").is_file():
            return (0, -cost, "", 0, "")
        steps = task_steps(task, args.quick)
        if kind.startswith("hours-"):
            return (2, cost, task, seed, kind)
        if steps <= 500:
            return (1, steps, task, seed, kind)
        return (3, task not in begun, -cost, task, seed, kind)

    kept = kept_summaries([out for _, out, _ in jobs.values()], args.work, args.keep)
    restore_kept(kept)
    order = sorted(jobs, key=priority)
    if not args.allow_mixed_commits:
        message = _mixed_before_running(jobs, args.collect_only)
        if message:
            print(message, file=sys.stderr)
            return 2
    if args.collect_only:
        summaries = {key: run(jobs[key][0], jobs[key][1], result["runs"], keep=kept.get(jobs[key][1]))
                     if (jobs[key][1] / "summary.json").is_file() else None for key in order}
    else:
        print(f"mini_superb: {len(order)} runs on {args.jobs} worker(s) under {args.work / mode}", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {key: pool.submit(run, jobs[key][0], jobs[key][1], result["runs"], keep=kept.get(jobs[key][1])) for key in order}
            summaries = {key: future.result() for key, future in futures.items()}
    result["commits"] = commits_of_runs(result["runs"])
    message = None if args.allow_mixed_commits else mixed_commits_error(result["commits"], "the runs to table")
    if message:
        # Nothing is written: a table of rows from different code would read as one experiment.
        print(message, file=sys.stderr)
        return 2
    result["missing_runs"] = sorted(str(jobs[key][1]) for key in order if summaries[key] is None)
    result["failed_runs"] = sorted(entry["output_dir"] for entry in result["runs"] if entry.get("failed"))
    for task in tasks:
        per_seed, commits = {}, {}
        for seed in seeds:
            adt, f = summaries[(task, seed, "adtuning")], summaries.get((task, seed, "f"))
            if adt is None:
                continue
            methods = {m: summaries.get((task, seed, m)) for m in METHOD_RUNS}
            per_seed[seed] = rows_of(adt, f, args.p_f, methods)
            commits[str(seed)] = {"adtuning": run_commit(adt), "child-tuning-f": None if f is None else run_commit(f),
                                  **{m: run_commit(x) for m, x in methods.items() if x is not None}}
            metric, higher = adt["primary_metric"], adt["higher_is_better"]
        if per_seed:
            result["tasks"][task] = {"metric": metric, "higher_is_better": higher, "steps": task_steps(task, args.quick),
                                     "seeds": sorted(per_seed), "summary": aggregate(per_seed, higher), "commits": commits}
    if sweep_task:
        result["low_resource"] = low_resource(summaries, sweep_task, seeds, sweep_hours)
    result["runs"].sort(key=lambda r: r["output_dir"])
    result["wall_seconds"] = time.perf_counter() - started
    stem = args.out / f"{date}-mini-superb{'-quick' if args.quick else ''}{upstream_slug(args.upstream)}"
    write_results(stem, result, markdown(result))
    if result["failed_runs"]:
        print(f"mini_superb: {len(result['failed_runs'])} run(s) failed (see their run.log): "
              + ", ".join(result["failed_runs"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
