"""The run's figures as PNG files (the paper's Fig. 2, 3 and 7)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from adtuning.atomic import atomic_write

LOG_FLOOR = 1e-30  # scores of exactly 0 are drawn at this value on the log axis


def log_score_histogram(scores: Mapping[str, torch.Tensor], bins: int = 120) -> dict:
    """Histogram of log10 Fisher scores over all entries, computed tensor by tensor.

    Returns ``{"edges": [...], "counts": [...], "zeros": n}``; zero scores are counted apart.
    """
    lo, hi, zeros = math.inf, -math.inf, 0
    for value in scores.values():
        positive = value[value > 0]
        zeros += value.numel() - positive.numel()
        if positive.numel():
            lo = min(lo, float(positive.min().log10()))
            hi = max(hi, float(positive.max().log10()))
    if lo == math.inf:
        return {"edges": [0.0, 1.0], "counts": [0], "zeros": zeros}
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.zeros(bins, dtype=torch.float64)
    for value in scores.values():
        positive = value[value > 0]
        if positive.numel():
            counts += torch.histc(positive.double().log10(), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1).tolist()
    return {"edges": edges, "counts": [int(c) for c in counts.tolist()], "zeros": zeros}


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
