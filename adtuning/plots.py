"""The run's figures as PNG files (the paper's Fig. 2, 3 and 7)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from adtuning.atomic import atomic_write

LOG_FLOOR = 1e-30  # scores of exactly 0 are drawn at this value on the log axis


HISTOGRAM_BINS_PER_DECADE = 10
"""Bins per decade of :func:`log_score_histogram`: bin ``j`` holds scores with
``floor(10 * log10(score)) == j``, a grid fixed in advance, so that histograms of parts of a
score set (the groups of a grouped Fisher pass) add up to the histogram of the whole."""


class ScoreHistogram:
    """A log10 score histogram on a fixed grid, fed tensor by tensor (or group by group).

    Bin ``j`` covers ``[j / b, (j + 1) / b)`` in log10 (``b`` bins per decade), found as
    ``floor(b * log10(score))`` in float64 per entry; scores ``<= 0`` are counted apart as
    zeros. Counts are integers, so the order the tensors are fed in does not change the result.
    """

    def __init__(self, bins_per_decade: int = HISTOGRAM_BINS_PER_DECADE):
        if bins_per_decade < 1:
            raise ValueError(f"bins_per_decade must be >= 1, got {bins_per_decade}")
        self.bins_per_decade = int(bins_per_decade)
        self.counts: dict[int, int] = {}
        self.zeros = 0

    def add(self, value: torch.Tensor) -> None:
        """Count the entries of one score tensor."""
        positive = value.detach()[value > 0]
        self.zeros += value.numel() - positive.numel()
        if not positive.numel():
            return
        index = torch.floor(positive.double().log10() * self.bins_per_decade).long()
        lo = int(index.min())
        for offset, count in enumerate(torch.bincount((index - lo).cpu()).tolist()):
            if count:
                self.counts[lo + offset] = self.counts.get(lo + offset, 0) + count

    def add_all(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Count the entries of every tensor of ``scores``."""
        for value in scores.values():
            self.add(value)

    def result(self) -> dict:
        """``{"edges", "counts", "zeros", "bins_per_decade"}`` from the lowest to the highest
        non-empty bin (``edges`` has one more entry than ``counts``)."""
        if not self.counts:
            return {"edges": [0.0, 1.0], "counts": [0], "zeros": self.zeros, "bins_per_decade": self.bins_per_decade}
        lo, hi = min(self.counts), max(self.counts)
        return {"edges": [j / self.bins_per_decade for j in range(lo, hi + 2)],
                "counts": [self.counts.get(j, 0) for j in range(lo, hi + 1)],
                "zeros": self.zeros, "bins_per_decade": self.bins_per_decade}


def log_score_histogram(scores: Mapping[str, torch.Tensor], bins_per_decade: int = HISTOGRAM_BINS_PER_DECADE) -> dict:
    """Histogram of log10 Fisher scores over all entries, computed tensor by tensor on the
    fixed grid of :class:`ScoreHistogram` (so per-group histograms sum to it).

    Returns ``{"edges": [...], "counts": [...], "zeros": n, "bins_per_decade": b}``; zero
    scores are counted apart.
    """
    histogram = ScoreHistogram(bins_per_decade)
    histogram.add_all(scores)
    return histogram.result()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    _pyplot().close(fig)
    return path


def plot_fisher_distribution(histogram: dict, thresholds: Mapping[float, float], path: str | Path, title: str = "") -> Path:
    """Fig. 2: distribution of log10 Fisher scores with a line at each P's threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    edges, counts = histogram["edges"], histogram["counts"]
    ax.stairs(counts, edges, fill=True, alpha=0.6, label="entries")
    for p, threshold in sorted(thresholds.items()):
        if threshold is not None and threshold > 0:
            ax.axvline(math.log10(threshold), linestyle="--", linewidth=1.2, label=f"P={p:g}")
    ax.set_xlabel("log10 Fisher information")
    ax.set_ylabel("number of entries")
    if histogram.get("zeros"):
        ax.text(0.01, 0.95, f"{histogram['zeros']:,} entries with score 0 not shown", transform=ax.transAxes, fontsize=8, va="top")
    ax.set_title(title or "Fisher score distribution")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_candidate_curves(
    curves: Mapping[float, Sequence[Mapping[str, float]]], metric: str, path: str | Path, rung_steps: Sequence[int] = (), title: str = ""
) -> Path:
    """Fig. 3: dev metric against training step for each candidate P."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, curve in sorted(curves.items()):
        if curve:
            ax.plot([c["step"] for c in curve], [c[metric] for c in curve], marker="o", markersize=3, label=f"P={p:g}")
    for step in rung_steps:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(title or "Candidate child networks on dev")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_layer_ratios(ratios: Mapping[float, Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Fig. 7: fraction of entries updated in each transformer layer, per P."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, per_layer in sorted(ratios.items()):
        layers = [k for k in per_layer if k != "other"]
        ax.plot([int(k) for k in layers], [100 * per_layer[k] for k in layers], marker="s", markersize=3, label=f"P={p:g}")
    ax.set_xlabel("transformer layer")
    ax.set_ylabel("updated parameters (%)")
    ax.set_title(title or "Ratio of parameters updated per layer")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))
