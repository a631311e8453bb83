"""What a run leaves behind: the delta, ``summary.json``, the plots, and the printout."""
from __future__ import annotations

import json
import logging
import resource
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adtuning.atomic import atomic_write
from adtuning.checkpoint import save_delta
from adtuning.environment import source_commit, versions
from adtuning.recipe.config import jsonable
from adtuning.recipe.methods import METHODS

if TYPE_CHECKING:
    from adtuning.recipe.run import Recipe

log = logging.getLogger("adtuning")


def peak_memory(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's high-water marks: the process's CPU max RSS (``ru_maxrss``, never reset) and, on
    CUDA, the largest allocator peak of any phase (each phase resets the CUDA peak at its start, so
    the allocator's own counter only covers the last phase); ``phases``: the per-phase report of
    :class:`adtuning.phase_memory.PhaseMemory`, kept beside them."""
    info: dict[str, Any] = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    cuda = [p["cuda_max_allocated_bytes"] for p in phases.values() if "cuda_max_allocated_bytes" in p]
    if cuda:
        info["cuda_max_allocated_bytes"] = max(cuda)
    info["phases"] = phases
    return info


def write_outputs(recipe: "Recipe") -> dict[str, Any]:
    """Write the chosen candidate's delta, ``summary.json`` and the plots; returns the summary."""
    cfg, best = recipe.config, recipe.best
    method = METHODS[recipe.method]
    meta: dict[str, Any] = {
        "base_model": cfg.upstream.upstream, "base_fingerprint": recipe.base_fingerprint,
        "base_dtype": "bfloat16" if cfg.upstream.bf16 else "float32", "base_seed": cfg.engine.seed, "task": cfg.data.task,
        "task_options": recipe.task_options, "task_kwargs": jsonable(getattr(recipe.train_set, "task_kwargs", {})),
        "metrics": recipe.final, "method": recipe.method,
    }
    if recipe.attached is not None:
        meta["method_options"] = recipe.attached.options
    with recipe.phases.phase("write"):
        delta_dir = save_delta(recipe.out / "delta", recipe.problem.upstream_params, best.child, recipe.problem.head_params, meta)
    searcher = recipe.searcher
    rung_steps = recipe.search_config.rung_steps()
    candidates = []
    for cand in searcher.candidates:
        entry = {
            "p": cand.p, "k": cand.child.k, "trainable_percent": 100.0 * cand.child.k / recipe.upstream_entries,
            "threshold": cand.child.threshold, "steps": cand.step, "search_steps": cand.search_steps, "status": cand.status,
            "dev_at_rungs": {str(rung_steps[i]): m for i, m in sorted(cand.rung_metrics.items())},
            "curve": cand.curve, "train_loss": cand.train_losses,
            "layer_ratios": cand.child.layer_ratios(),
            "allreduce_bytes_per_step": searcher.allreduce_bytes_per_step(cand),
            "skipped_nonfinite_steps": cand.skipped_steps,
        }
        if recipe.regret is not None:
            entry.update(final_dev=cand.final["dev"], final_test=cand.final.get("test"))
        candidates.append(entry)
    head_entries = sum(p.numel() for n, p in recipe.problem.head_params.items() if not n.startswith("method."))
    method_entries = sum(p.numel() for n, p in recipe.problem.head_params.items() if n.startswith("method."))
    summary: dict[str, Any] = {
        "task": cfg.data.task, "upstream": cfg.upstream.upstream, "method": recipe.method, "method_row": method.row,
        "base_fingerprint": recipe.base_fingerprint,
        "primary_metric": recipe.problem.primary_metric, "higher_is_better": recipe.problem.higher_is_better,
        "trainable": {"upstream_entries": best.child.k, "method_params": method_entries, "head_params": head_entries,
                      "total": best.child.k + method_entries + head_entries, "upstream_total": recipe.upstream_entries},
        "candidates": candidates, "chosen_p": best.p, "chosen_k": best.child.k, "final": recipe.final,
        "steps_spent": searcher.steps_spent(), "steps_exhaustive": searcher.steps_exhaustive(),
        "steps_spent_search": searcher.steps_spent(), "steps_spent_regret": searcher.steps_regret(),
        "rungs": list(recipe.search_config.rungs), "keep": list(recipe.search_config.keep),
        "total_steps": recipe.search_config.total_steps,
        "swap_seconds": searcher.swap_seconds, "train_seconds": searcher.train_seconds,
        "eval_seconds": searcher.eval_seconds, "wall_seconds": time.time() - recipe.started,
        "peak_memory": peak_memory(recipe.phases.report()), "backend": recipe.backend, "device": str(recipe.device),
        "fisher": {k: v for k, v in recipe.fisher_info.items() if k != "histogram"},
        "delta_dir": str(delta_dir), "delta_bytes": sum(f.stat().st_size for f in delta_dir.iterdir()),
        "versions": versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # The commit the code ran at: that of the last segment, read when it started (HEAD may move
        # while a run trains); "commits": every segment's.
        "commit": _last_commit(getattr(recipe, "segments", [])), "commits": getattr(recipe, "segments", []),
        "world_size": recipe.world_size, "data_parallel": _data_parallel_summary(recipe),
    }
    if recipe.regret is not None:
        # regret (dev) is the headline; regret_test only when the task has a test split.
        summary["regret"] = recipe.regret["regret"]
        if recipe.regret["regret_test"] is not None:
            summary["regret_test"] = recipe.regret["regret_test"]
        summary["regret_detail"] = {k: v for k, v in recipe.regret.items() if k not in ("candidates", "regret", "regret_test")}
    if recipe.baselines is not None:
        summary["baselines"] = {kind: {**info, "trainable_percent": 100.0 * info["trainable_upstream"] / recipe.upstream_entries}
                                for kind, info in recipe.baselines.items()}
    if not cfg.output.no_plots:
        summary["plots"] = _plots(recipe)
    atomic_write(recipe.out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return summary


def _last_commit(segments: list[dict[str, Any]]) -> dict[str, Any]:
    if segments:
        return {"sha": segments[-1].get("sha"), "dirty": segments[-1].get("dirty")}
    return source_commit()


def _data_parallel_summary(recipe: "Recipe") -> dict | None:
    """What data parallelism cost: bytes all-reduced per step (per candidate), next to what
    torch DDP all-reduces for the same trainable tensors (the dense gradient of every scored
    upstream entry plus the head, ``4 * (N + head)``: full fine-tuning, and CHILD-TUNING's
    masked dense gradient alike), and time in the gradient all-reduces and in all collectives."""
    if recipe.dp is None:
        return None
    searcher = recipe.searcher
    head = sum(p.numel() for p in recipe.problem.head_params.values())
    scored = recipe.children[0].n
    return {
        "backend": recipe.dp.backend, "world_size": recipe.world_size,
        "global_batch_size": recipe.config.optim.batch_size * recipe.world_size * recipe.config.optim.grad_accum,
        "head_entries": head,
        "allreduce_bytes_per_step": {f"{c.p:g}": searcher.allreduce_bytes_per_step(c) for c in searcher.candidates},
        "scored_entries": scored, "ddp_dense_bytes_per_step": 4 * (scored + head),
        "allreduce_steps": searcher.allreduce_steps, "allreduce_seconds": searcher.allreduce_seconds,
        "collective_seconds": recipe.dp.collective_seconds,
    }


def _plots(recipe: "Recipe") -> list[str]:
    from adtuning import plots

    files = []
    metric = recipe.problem.primary_metric
    task = recipe.config.data.task
    if "histogram" in recipe.fisher_info:
        thresholds = {c.p: c.threshold for c in recipe.children}
        files.append(plots.plot_fisher_distribution(recipe.fisher_info["histogram"], thresholds, recipe.out / "fisher_distribution.png",
                                                    title=f"Fisher scores ({task})"))
    curves = {c.p: c.curve for c in recipe.searcher.candidates}
    files.append(plots.plot_candidate_curves(curves, metric, recipe.out / "candidate_curves.png", recipe.search_config.rung_steps()[:-1],
                                             title=f"{task}: dev {metric} per candidate"))
    files.append(plots.plot_layer_ratios({c.p: c.layer_ratios() for c in recipe.children}, recipe.out / "layer_ratios.png"))
    return [str(f) for f in files]


def print_summary(summary: dict) -> None:
    """The end-of-run printout: one row per candidate, the pick, the baselines, the delta."""
    metric = summary["primary_metric"]
    measured = "regret" in summary
    has_test = measured and all(c["final_test"] is not None for c in summary["candidates"])
    method = summary.get("method", "ad-tuning")
    at_t = (f"  {'at T: dev':>10}" + (f" {'test':>7}" if has_test else "")) if measured else ""
    title = "AD-TUNING" if method == "ad-tuning" else f"{METHODS[method].row if method in METHODS else method} (--method {method})"
    print(f"\n{title} on {summary['task']} with {summary['upstream']} (backend {summary['backend']})")
    final = ", ".join(f"{split} {metric}={m[metric]:.4f}" for split, m in summary["final"].items())
    if method == "ad-tuning" or METHODS.get(method) is None or METHODS[method].kind in ("search", "child"):
        print(f"{'P':>8} {'k':>10} {'% upstream':>11} {'steps':>6}{at_t}  dev {metric} at rungs")
        for c in summary["candidates"]:
            rungs = ", ".join(f"{step}: {m[metric]:.4f}" for step, m in c["dev_at_rungs"].items())
            row_final = ""
            if measured:
                row_final = f"  {c['final_dev'][metric]:>10.4f}" + (f" {c['final_test'][metric]:>7.4f}" if has_test else "")
            print(f"{c['p']:>8g} {c['k']:>10,} {c['trainable_percent']:>10.3f}% {c['search_steps']:>6}{row_final}  {rungs}")
        print(f"chosen P={summary['chosen_p']:g}: {final}")
    else:
        t = summary["trainable"]
        print(f"trained {t['upstream_entries']:,} upstream entries + {t['method_params']:,} added + {t['head_params']:,} head "
              f"parameters for {summary['total_steps']} steps: {final}")
    print(f"steps spent {summary['steps_spent']} vs {summary['steps_exhaustive']} for training every candidate; "
          f"swap time {summary['swap_seconds']:.2f}s; wall {summary['wall_seconds']:.0f}s")
    if measured:
        print(regret_line(summary))
    for kind, b in summary.get("baselines", {}).items():
        scores = ", ".join(f"{split} {metric}={b[f'final_{split}'][metric]:.4f}" for split in ("dev", "test") if b[f"final_{split}"] is not None)
        added = f" + {b['trainable_method']:,} added" if b.get("trainable_method") else ""
        print(f"baseline {kind} (P={b['p']:g}: {b['trainable_upstream']:,} upstream{added} + {b['trainable_head']:,} head parameters "
              f"trained, {b['steps']} steps): {scores}")
    print(f"sparse delta: {summary['delta_dir']} ({summary['delta_bytes'] / 1024:.1f} KiB)")


def regret_line(summary: dict) -> str:
    """One line: the regret on dev (and test), who was best at T, and what the comparison cost."""
    d = summary["regret_detail"]
    line = (f"regret {summary['regret']:.4f} (dev {d['metric']}; best at T: P={d['best_p']:g} {d['best_dev']:.4f}, "
            f"chosen P={d['chosen_p']:g} {d['chosen_dev']:.4f})")
    if "regret_test" in summary:
        line += (f"; on test {summary['regret_test']:.4f} (best at T: P={d['best_test_p']:g} {d['best_test']:.4f}, "
                 f"chosen {d['chosen_test']:.4f})")
    return line + f"; comparison cost {summary['steps_spent_regret']} extra steps"
