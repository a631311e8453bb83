"""Method rows: a Table 2 method trained as a baseline beside the run's own method.

``--baselines weighted-sum,full`` (head-only and FT) train inside the run's search, as they always
did. Every other method (``frozen``, ``lora``, ``houlsby``, ...) is a row of its own on the SAME
upstream: its task head is built from the seed like the run's (the same initial head), its
modules are attached, it trains for T steps under the run's schedule, seed and data order (a
search of one empty child whose dense parameters are the head and the added modules), it is
evaluated, and its modules are detached again, leaving the upstream bit for bit as it was. Each row
checkpoints under ``baselines/<method>/``, so an interrupted run resumes inside a row.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adtuning.recipe.run import Recipe

log = logging.getLogger("adtuning")


def run_method_row(recipe: "Recipe", method: str) -> dict[str, Any]:
    """Train and evaluate ``method`` as a row of ``recipe``'s run; returns its report (the keys
    of :meth:`adtuning.search.AdaptiveSearch.baseline_report`, plus ``method`` and
    ``trainable_method``: the parameters its modules added)."""
    from adtuning.search import AdaptiveSearch
    from adtuning.search_candidate import baseline_child
    from adtuning.speech import SpeechModel

    recipe.searcher.restore_base()  # the base values back in the upstream (the chosen candidate swapped out)
    task = recipe._build_task(method)
    main_attached = recipe.attached
    extra = recipe._attach(method)  # {} for a method that adds no module
    attached = recipe.attached if recipe.attached is not main_attached else None
    try:
        model = SpeechModel(recipe.upstream, task).to(recipe.device)
        problem = recipe._problem(model, extra)
        shapes = {n: tuple(problem.upstream_params[n].shape) for n in recipe.scored_names}
        searcher = AdaptiveSearch(problem, [baseline_child("head-only", shapes)], recipe.search_config,
                                  checkpoint_dir=recipe.out / "baselines" / method / "checkpoint", progress=recipe.progress,
                                  on_event=recipe._event, baselines=("head-only",), data_parallel=recipe.dp,
                                  phases=recipe.phases)
        if recipe.resuming:
            searcher.load_checkpoint()
        log.info("method row %s: %s trainable (%s added to the upstream, %s head)", method,
                 f"{sum(p.numel() for p in problem.head_params.values()):,}", f"{sum(p.numel() for p in extra.values()):,}",
                 f"{sum(p.numel() for p in task.parameters()):,}")
        report = dict(searcher.run_baselines()["head-only"])
    finally:
        if attached is not None:
            attached.detach()
        recipe.attached = main_attached
    added = sum(p.numel() for p in extra.values())
    report.update(method=method, trainable_method=added, trainable_head=report["trainable_head"] - added)
    return report
