"""The regime study: does a smaller child network ever win, and if not, why?

Issue 24's question. In mini-SUPERB on the embedded upstream the largest child (P = 0.1) wins nearly
everywhere, so the adaptive search never makes a real choice. The paper (Sec. 3) says the best P
depends on the task, the data size (Sec. 4.4) and the learning rate; this script measures exactly
those three on one task, with single runs of the CLI (one child each, no search):

- the rows: Weighted-sum (head only, P = 0), CHILD-TUNING_D at each ``--p``, FT (``--method full``,
  P = 1);
- the learning rate of the upstream entries: ``--lr-scales`` times the task's embedded default
  (``--lr``; the head keeps the default rate unless ``--scale-head-lr``, so that the rows differ
  only in what the upstream may move);
- the training-set size: ``--hours`` (``full`` or ``--max-train-hours`` values; the paper's Fig. 5);
- the length of training: ``--steps-scales`` times the task's T.

Usage, from the repository root::

    python bench/regime.py --upstream adtuning-hubert-small              # ks, 1 seed (about 2 CPU-hours)
    python bench/regime.py --task pr --seeds 0,1 --hours full,0.05 --jobs 2 --threads 1
    python bench/regime.py --upstream adtuning-hubert-small --collect-only  # table what has finished

Every choice is made on the dev set (the espeak-only dev split of the embedded corpus): a row's
learning rate is the one with the best mean dev metric, and the winner of a setting is the row with
the best dev metric at its best rate; test figures are reported beside them, never used to choose.
For each setting (size x steps) the table gives every row at every rate (dev / test), then the
reading: the winning row, the best child P, whether the children's best dev metric rises with P,
and the head-only to FT gap on test (issue 24's target: within 0.10 on KS).

Runs are kept under ``--work`` (default ``regime-runs`` beside the corpus cache), reused when
finished and resumed when interrupted (as ``bench/mini_superb.py`` does, whose runner this is; with the
default ``--work`` finished runs' summaries are kept in ``bench/results/runs/regime/``, ``--keep``, and
restored from there on another machine);
runs made at different commits are refused unless ``--allow-mixed-commits``. Results:
``bench/results/<date>-regime-<task>[-<upstream>][-<grid>].{json,md}``, where ``<grid>`` names every
flag of the grid that differs from its default (:func:`grid_slug`), so a run of part of a grid never
overwrites the results of another grid made the same day.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mini_superb import (  # noqa: E402
    KEEP,
    cli_command,
    commits_of_runs,
    environment,
    kept_summaries,
    mixed_commits_error,
    restore_kept,
    run,
    upstream_slug,
    write_results,
)

from adtuning.embedded import EMBEDDED_CORPORA  # noqa: E402
from adtuning.speech.registry import TASK_NAMES  # noqa: E402

WEIGHTED_SUM, FT = "Weighted-sum", "FT"


def _floats(text: str, flag: str, parser: argparse.ArgumentParser, positive: bool = True) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated numbers, got {text!r}")
    if not values or (positive and any(not v > 0 for v in values)):
        parser.error(f"{flag}: expected one or more numbers > 0, got {text!r}")
    if len(set(values)) != len(values):
        parser.error(f"{flag}: duplicate values in {text!r}")
    return values


def row_name(p: float) -> str:
    """The table's name of the row of child ratio ``p`` (0: Weighted-sum, 1: FT)."""
    return WEIGHTED_SUM if p == 0 else FT if p == 1 else f"P={p:g}"


def rates(args: argparse.Namespace, p: float) -> list[float | None]:
    """The learning-rate scales a row is trained at: Weighted-sum has one run (``None``, the head's
    rate) unless ``--scale-head-lr``; every other row has one per ``--lr-scales``."""
    return [None] if p == 0 and not args.scale_head_lr else list(args.lr_scales)


def plan(args: argparse.Namespace, task: str) -> dict[tuple, tuple[list[str], Path, int]]:
    """Every run of the study: ``(seed, size, steps scale, p, lr scale) -> (command, folder, steps)``.

    Weighted-sum trains the head alone, so with the head's rate fixed it has one run per setting
    (``lr scale`` None); with ``--scale-head-lr`` it has one per rate like the others."""
    defaults = EMBEDDED_CORPORA[task].run_defaults
    base = args.work / f"{task}{upstream_slug(args.upstream)}"
    jobs = {}
    for seed in args.seeds:
        for size in args.hours:
            for s_scale in args.steps_scales:
                steps = max(1, round(defaults.steps * s_scale))
                setting = base / f"seed{seed}" / f"hours-{size}" / f"steps-x{s_scale:g}"
                for p in [0.0, *args.p, 1.0]:
                    for scale in rates(args, p):
                        lr = args.lr * (1.0 if scale is None else scale)
                        extra = ["--lr", f"{lr:g}", "--head-lr", f"{lr if args.scale_head_lr else args.lr:g}"]
                        if p == 0:
                            extra += ["--method", "weighted-sum"]
                        elif p == 1:
                            extra += ["--method", "full"]
                        else:
                            extra += ["--method", "child-tuning-d", "--candidates", f"{p:g}"]
                        if size != "full":
                            extra += ["--max-train-hours", size]
                        folder = setting / (f"{row_name(p)}" + ("" if scale is None else f"-lr-x{scale:g}"))
                        jobs[(seed, size, s_scale, p, scale)] = (cli_command(task, folder, seed, steps, extra, args), folder, steps)
    return jobs


#: The grid's flags and their defaults, in the order :func:`grid_slug` names them.
GRID_DEFAULTS = {"seeds": [0], "p": [0.001, 0.01, 0.1], "lr_scales": [0.1, 0.3, 1.0, 3.0], "hours": ["full", "0.05"],
                 "steps_scales": [1.0]}


def grid_slug(args: argparse.Namespace) -> str:
    """``""`` for the default grid, else ``-`` and each grid flag that differs from its default
    (``-hours-0.05-steps-x1_3``): the results file of one grid is never another's."""
    names = {"seeds": "seeds", "p": "p", "lr_scales": "lr-x", "hours": "hours", "steps_scales": "steps-x"}
    parts = []
    for field, default in GRID_DEFAULTS.items():
        value = getattr(args, field)
        if value != default:
            parts.append(names[field] + ("" if names[field].endswith("x") else "-") + "_".join(f"{v:g}" if isinstance(v, float)
                                                                                               else str(v) for v in value))
    parts += ["head-lr-scaled"] if args.scale_head_lr else []
    parts += [f"lr-{args.lr:g}"] if args.lr != EMBEDDED_CORPORA[args.task].run_defaults.lr else []
    return "".join("-" + part for part in parts)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def table(args: argparse.Namespace, summaries: dict) -> dict:
    """Per setting: each row's dev/test mean per rate, its best rate (by dev), the winner and the reading."""
    settings = {}
    metric = higher = None
    for size in args.hours:
        for s_scale in args.steps_scales:
            rows = {}
            for p in [0.0, *args.p, 1.0]:
                per_rate = {}
                for scale in rates(args, p):
                    made = [summaries[(seed, size, s_scale, p, scale)] for seed in args.seeds]
                    made = [m for m in made if m is not None]
                    if not made:
                        continue
                    metric, higher = made[0]["primary_metric"], made[0]["higher_is_better"]
                    dev = _mean([m["final"]["dev"][metric] for m in made])
                    tests = [m["final"]["test"][metric] for m in made if m["final"].get("test")]
                    per_rate["-" if scale is None else f"{scale:g}"] = {
                        "seeds": len(made), "dev": dev, "test": _mean(tests),
                        "lr": args.lr * (1.0 if scale is None else scale),
                        "trainable_upstream": made[0]["trainable"]["upstream_entries"] + made[0]["trainable"]["method_params"]}
                if not per_rate:
                    continue
                pick = max if higher else min
                best = pick(per_rate, key=lambda k: per_rate[k]["dev"])
                rows[row_name(p)] = {"p": p, "per_rate": per_rate, "best_rate": best, "dev": per_rate[best]["dev"],
                                     "test": per_rate[best]["test"]}
            if not rows:
                continue
            pick = max if higher else min
            winner = pick(rows, key=lambda r: rows[r]["dev"])
            children = [row_name(p) for p in args.p if row_name(p) in rows]
            best_child = pick(children, key=lambda r: rows[r]["dev"]) if children else None
            ordered = [rows[r]["dev"] for r in children]
            rises = all((b >= a) if higher else (b <= a) for a, b in zip(ordered, ordered[1:])) if len(ordered) > 1 else None
            gap = None
            if WEIGHTED_SUM in rows and FT in rows and rows[FT]["test"] is not None and rows[WEIGHTED_SUM]["test"] is not None:
                gap = (rows[FT]["test"] - rows[WEIGHTED_SUM]["test"]) * (1 if higher else -1)
            settings[f"hours={size}, steps=x{s_scale:g}"] = {
                "hours": size, "steps_scale": s_scale, "rows": rows, "winner": winner, "best_child": best_child,
                "children_rise_with_p": rises, "ft_minus_head_only_test": gap}
    return {"metric": metric, "higher_is_better": higher, "settings": settings}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(result: dict) -> str:
    """The study's tables (one per setting) and its reading."""
    t = result["table"]
    env = result["environment"]
    metric = (f"metric {t['metric']} ({'higher' if t['higher_is_better'] else 'lower'} is better), "
              if t["metric"] else "")
    lines = [f"# Regime study: {result['task']} on {result['upstream'] or 'the default upstream'} ({result['date']})", "",
             f"{env['device']}, {env['cores']} cores, torch {env['versions'].get('torch')}; seeds "
             f"{', '.join(map(str, result['seeds']))}; base learning rate {result['lr']:g} (head: "
             f"{'scaled with it' if result['scale_head_lr'] else 'fixed at it'}); {metric}dev / test, mean over the "
             "seeds; a row's rate and a setting's winner are chosen on dev.", ""]
    scales = result["lr_scales"]
    for name, s in t["settings"].items():
        lines += [f"## {name}", "", "| row | upstream params | " + " | ".join(f"lr x{x:g}" for x in scales) + " | best (dev) |",
                  "|---|---:|" + "---|" * len(scales) + "---|"]
        for row, r in s["rows"].items():
            cells = []
            for x in scales:
                cell = r["per_rate"].get(f"{x:g}")  # None for the head-only row's single run (its rate is the head's)
                short = "" if cell is None or cell["seeds"] == len(result["seeds"]) else f" ({cell['seeds']} seed(s))"
                cells.append("-" if cell is None else f"{_fmt(cell['dev'])} / {_fmt(cell['test'])}{short}")
            params = next(iter(r["per_rate"].values()))["trainable_upstream"]
            rate = "head only" if r["best_rate"] == "-" else f"x{r['best_rate']}"
            lines.append(f"| {row} | {params:,} | " + " | ".join(cells) + f" | {rate}: {_fmt(r['dev'])} / {_fmt(r['test'])} |")
        lines += ["", f"Winner on dev: **{s['winner']}**; best child: {s['best_child']}; the children's best dev "
                  f"{'rises' if s['children_rise_with_p'] else 'does not rise' if s['children_rise_with_p'] is False else '(n/a)'} "
                  f"with P; FT minus head-only on test: {_fmt(s['ft_minus_head_only_test'])}.", ""]
    if result["missing_runs"]:
        lines += [f"Missing runs: {len(result['missing_runs'])} (listed in the JSON's missing_runs).", ""]
    if len(result["commits"]) > 1:
        lines += ["Commits of the runs (--allow-mixed-commits):", ""] + [
            f"- {label}: {len(dirs)} run(s)" for label, dirs in result["commits"].items()] + [""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The study's flags, checked (a bad value exits with one line naming the flag)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="ks", choices=TASK_NAMES, help="the embedded task (default: ks)")
    parser.add_argument("--upstream", default=None, help="--upstream of every run (default: the CLI's)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--p", default="0.001,0.01,0.1", help="child ratios of the CHILD-TUNING_D rows")
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (default: the task's embedded default)")
    parser.add_argument("--lr-scales", default="0.1,0.3,1,3", help="multiples of --lr for the upstream entries")
    parser.add_argument("--scale-head-lr", action="store_true", help="scale the head's rate with the upstream's")
    parser.add_argument("--hours", default="full,0.05", help="training-set sizes: 'full' and/or --max-train-hours values")
    parser.add_argument("--steps-scales", default="1", help="multiples of the task's T")
    parser.add_argument("--threads", type=int, default=1, help="--threads of every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--corpus-cache", type=Path, default=None, help="--corpus-cache of every run (default: the CLI's)")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: regime-runs beside the corpus cache)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--keep", type=Path, default=None,
                        help="where finished runs' summaries are kept and restored from (default: bench/results/runs/regime "
                             "with the default --work, none with a --work of your own)")
    parser.add_argument("--collect-only", action="store_true", help="start no run; table what has finished")
    parser.add_argument("--allow-mixed-commits", action="store_true", help="table runs made at different commits")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in _floats(args.seeds, "--seeds", parser, positive=False)]
    args.p = _floats(args.p, "--p", parser)
    if any(not 0 < p < 1 for p in args.p):
        parser.error(f"--p: child ratios must lie in (0, 1) (0 and 1 are the Weighted-sum and FT rows), got {args.p}")
    args.lr_scales = _floats(args.lr_scales, "--lr-scales", parser)
    args.steps_scales = _floats(args.steps_scales, "--steps-scales", parser)
    args.hours = [h for h in args.hours.split(",") if h.strip()]
    for h in args.hours:
        if h != "full":
            _floats(h, "--hours", parser)
    if not args.hours:
        parser.error("--hours: give 'full' and/or sizes in hours")
    if args.jobs < 1:
        parser.error(f"--jobs: must be at least 1, got {args.jobs}")
    args.lr = EMBEDDED_CORPORA[args.task].run_defaults.lr if args.lr is None else args.lr
    if not args.lr > 0:
        parser.error(f"--lr: must be > 0, got {args.lr}")
    if args.corpus_cache is None:
        from adtuning.embedded import DEFAULT_CORPUS_CACHE

        args.corpus_cache = DEFAULT_CORPUS_CACHE
    if args.work is None:
        args.work = args.corpus_cache.parent / "regime-runs"
        args.keep = KEEP / "regime" if args.keep is None else args.keep
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the study's grid (or table what has finished); write the JSON and markdown results."""
    args = parse_args(argv)
    result = {"date": _dt.date.today().isoformat(), "task": args.task, "upstream": args.upstream, "seeds": args.seeds,
              "p": args.p, "lr": args.lr, "lr_scales": args.lr_scales, "scale_head_lr": args.scale_head_lr,
              "hours": args.hours, "steps_scales": args.steps_scales, "environment": environment(),
              "command": shlex.join([sys.executable, *sys.argv]), "runs": []}
    started = time.perf_counter()
    jobs = plan(args, args.task)
    # Longest first (FT, then the children, at the longest steps), so two workers end together.
    order = sorted(jobs, key=lambda k: (-jobs[k][2], -k[3], str(k)))
    kept = kept_summaries([out for _, out, _ in jobs.values()], args.work, args.keep)
    restore_kept(kept, who="regime")
    if args.collect_only:
        summaries = {k: run(*jobs[k][:2], result["runs"], who="regime", keep=kept.get(jobs[k][1]))
                     if (jobs[k][1] / "summary.json").is_file() else None for k in order}
    else:
        print(f"regime: {len(order)} runs on {args.jobs} worker(s) under {args.work}", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {k: pool.submit(run, jobs[k][0], jobs[k][1], result["runs"], who="regime", keep=kept.get(jobs[k][1]))
                       for k in order}
            summaries = {k: f.result() for k, f in futures.items()}
    result["commits"] = commits_of_runs(result["runs"])
    message = None if args.allow_mixed_commits else mixed_commits_error(result["commits"], "the runs to table", who="regime")
    if message:
        print(message, file=sys.stderr)
        return 2
    result["missing_runs"] = sorted(str(jobs[k][1]) for k in order if summaries[k] is None)
    result["table"] = table(args, summaries)
    result["runs"].sort(key=lambda r: r["output_dir"])
    result["wall_seconds"] = time.perf_counter() - started
    stem = args.out / f"{result['date']}-regime-{args.task}{upstream_slug(args.upstream)}{grid_slug(args)}"
    write_results(stem, result, markdown(result), who="regime")
    return 0


if __name__ == "__main__":
    sys.exit(main())
