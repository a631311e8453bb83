"""How :class:`adtuning.search.AdaptiveSearch` ranks candidates and reports its comparisons:
the regret of the early pick (:func:`regret_report`) and the baselines (:func:`baseline_report`).

Pure functions of the candidates' recorded metrics; nothing here trains or evaluates.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from adtuning.search_candidate import Candidate


def rank_key(metrics: Mapping[str, float], metric: str, higher_is_better: bool) -> float:
    """The primary ``metric`` as a key where lower is better."""
    value = metrics[metric]
    return -value if higher_is_better else value


def order_key(cand: Candidate, metrics: Mapping[str, float], metric: str, higher_is_better: bool) -> tuple[float, float, int]:
    """Sort key of a candidate by ``metrics``: the primary metric (best first), then the dev
    NLL every task reports, then the candidate's position.

    Ties of a count-based metric (accuracy on a few hundred clips) are broken by the NLL, so
    that no tie is decided by position while the models differ.
    """
    return (rank_key(metrics, metric, higher_is_better), metrics.get("nll", 0.0), cand.index)


def regret_report(candidates: Sequence[Candidate], chosen: Candidate, metric: str, higher_is_better: bool, *,
                  steps_spent_search: int, steps_spent_regret: int) -> dict[str, Any]:
    """The regret of the search's pick ``chosen``, from every candidate's ``final`` metrics at T.

    Definitions (``m`` is the primary metric; "best" means highest when higher is better,
    lowest otherwise, ties going to the earlier candidate as in the search, see
    :func:`order_key`):

    - ``regret`` (the primary definition): ``|best final dev m over all candidates -
      final dev m of the chosen|``, i.e. ``best - chosen`` for higher-is-better metrics and
      ``chosen - best`` for lower-is-better ones (WER). 0: the early pick is the best
      candidate at T; positive: how much worse it is.
    - ``regret_test`` (only with a test split): the same on test, against the best test
      metric any candidate reaches at T (an oracle that picks by test, not by dev).
      ``None`` without a test split.

    Returns a dict with ``metric``, ``higher_is_better``, ``regret``, ``chosen_p``,
    ``chosen_dev``, ``best_p``, ``best_dev``, ``regret_test``, ``chosen_test``,
    ``best_test_p``, ``best_test``, ``steps_spent_search``, ``steps_spent_regret`` and
    ``candidates`` (per candidate: ``p``, ``status``, ``search_steps``, ``steps``,
    ``final_dev``, ``final_test``).
    """
    def best_by(split: str) -> Candidate:
        return min(candidates, key=lambda c: order_key(c, c.final[split], metric, higher_is_better))

    def regret(split: str, best: Candidate) -> float:
        return rank_key(chosen.final[split], metric, higher_is_better) - rank_key(best.final[split], metric, higher_is_better)

    best = best_by("dev")
    report: dict[str, Any] = {
        "metric": metric, "higher_is_better": higher_is_better,
        "regret": regret("dev", best), "chosen_p": chosen.p, "chosen_dev": chosen.final["dev"][metric],
        "best_p": best.p, "best_dev": best.final["dev"][metric],
        "regret_test": None, "chosen_test": None, "best_test_p": None, "best_test": None,
        "steps_spent_search": steps_spent_search, "steps_spent_regret": steps_spent_regret,
        "candidates": [
            {"p": c.p, "status": c.status, "search_steps": c.search_steps, "steps": c.step,
             "final_dev": c.final["dev"], "final_test": c.final.get("test")}
            for c in candidates
        ],
    }
    if all("test" in c.final for c in candidates):
        best_test = best_by("test")
        report.update(regret_test=regret("test", best_test), chosen_test=chosen.final["test"][metric],
                      best_test_p=best_test.p, best_test=best_test.final["test"][metric])
    return report


def baseline_report(baselines: Sequence[Candidate], head_entries: int) -> dict[str, dict[str, Any]]:
    """Per baseline kind: ``p``, trainable counts (``trainable_upstream``, ``trainable_head``,
    ``trainable_params``), ``steps``, ``final_dev``, ``final_test`` (``None`` without a test
    split or before it ran) and the dev ``curve``; ``head_entries`` is the size of the head."""
    return {
        str(c.baseline): {"p": c.p, "trainable_upstream": c.child.k, "trainable_head": head_entries,
                          "trainable_params": c.child.k + head_entries, "steps": c.step, "final_dev": c.final.get("dev"),
                          "final_test": c.final.get("test"), "curve": c.curve}
        for c in baselines
    }
