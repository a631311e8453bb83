"""Child selection over the scores of every wav2vec2-base parameter (94,370,944 entries).

The scores are random fp32 tensors shaped like the wav2vec2-base parameters
(``conftest.wav2vec2_base_shapes``), i.e. what a Fisher pass over the whole model would
return. Timed, in the same session:

* ``from_scores P=..``: :meth:`ChildNetwork.from_scores` (global top-k by a 4-pass radix
  select on the order-preserving int32 image of the scores, no sort; deterministic ties) at
  P = 0.001, 0.01, 0.1;
* ``nested 3 P``: :meth:`ChildNetwork.nested` for the three ratios from one ranking (what the
  AD-TUNING search uses; only with ``ADTUNING_BENCH_SELECTION=all``);
* ``torch topk P=..``: the obvious baseline — concatenate all scores and ``torch.topk`` —
  which also needs the per-tensor split of the winning flat indices (included).

Every selection runs once without warm-up (on two CPU cores one call takes about as long as
``torch.topk``, seconds), and ``from_scores`` only at P = 0.01 to keep the suite short
(``ADTUNING_BENCH_SELECTION=all``: every P and ``nested``). Next to each time: the growth of
the process's peak RSS during one call (``bench/memory.py``; in-process, so approximate),
against the 360 MiB of the scores themselves.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from adtuning import ChildNetwork

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory as bench_memory  # noqa: E402  (bench/memory.py)
from conftest import environment, wav2vec2_base_shapes  # noqa: E402

GROUP = "child selection wav2vec2-base (94M scores) cpu"
FRACTIONS = (0.001, 0.01, 0.1)


@pytest.fixture(scope="module")
def scores() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {name: torch.rand(shape, generator=gen) for name, shape in wav2vec2_base_shapes()}


def topk_select(scores: dict[str, torch.Tensor], p: float) -> dict[str, torch.Tensor]:
    """Baseline: global ``torch.topk`` over the concatenated scores, split back per tensor."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = max(1, round(p * flat.numel()))
    winners = torch.topk(flat, k, sorted=False).indices.sort().values
    del flat
    out, offset = {}, 0
    for name, s in scores.items():
        lo, hi = torch.searchsorted(winners, torch.tensor([offset, offset + s.numel()]))
        if hi > lo:
            out[name] = (winners[lo:hi] - offset).to(torch.int32)
        offset += s.numel()
    return out


def _one_shot(benchmark, ratios, name: str, fn, rounds: int, **extra) -> None:
    """Time ``fn`` with no warm-up (a call takes seconds to minutes on two cores) and record
    the peak-RSS growth of the first call, measured around that same call."""
    readings = []

    def call():
        if readings:
            return fn()
        with bench_memory.PeakMemory("cpu") as region:
            out = fn()
        readings.append(region.result)
        return out

    benchmark.group = GROUP
    benchmark.extra_info.update(environment())
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    growth = readings[0].growth
    benchmark.extra_info.update(implementation=name, peak_rss_growth_bytes=growth,
                                memory_method=bench_memory.CPU_METHOD + " (in-process: approximate)", **extra)
    ratios.record(GROUP, name, benchmark.stats.stats.median)
    ratios.note(f"child selection {name}: peak RSS growth", bench_memory.mib(growth))


def _fractions_for(impl: str) -> bool:
    return impl != "from_scores" or os.environ.get("ADTUNING_BENCH_SELECTION") == "all"


@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda p: f"P={p}")
@pytest.mark.parametrize("impl", ["from_scores", "torch topk"])
def test_select(benchmark, ratios, scores, impl, fraction):
    """Top-k child selection at one ratio (from_scores only at P=0.01 unless
    ADTUNING_BENCH_SELECTION=all: one call takes minutes on two cores)."""
    if fraction != 0.01 and not _fractions_for(impl):
        pytest.skip("from_scores is timed at P=0.01 only (set ADTUNING_BENCH_SELECTION=all for every P)")
    n = sum(s.numel() for s in scores.values())
    if impl == "from_scores":
        fn = lambda: ChildNetwork.from_scores(scores, fraction)  # noqa: E731
    else:
        fn = lambda: topk_select(scores, fraction)  # noqa: E731
    name = f"{impl} P={fraction}"
    _one_shot(benchmark, ratios, name, fn, rounds=1, entries=n, fraction=fraction)
    if impl == "torch topk":
        ratios.want(f"child selection from_scores vs torch topk P={fraction}", GROUP,
                    f"torch topk P={fraction}", f"from_scores P={fraction}")


def test_nested(benchmark, ratios, scores):
    """The three children of the search from one ranking (ADTUNING_BENCH_SELECTION=all only)."""
    if os.environ.get("ADTUNING_BENCH_SELECTION") != "all":
        pytest.skip("nested is timed with ADTUNING_BENCH_SELECTION=all only (keeps the suite short)")
    _one_shot(benchmark, ratios, "nested 3 P", lambda: ChildNetwork.nested(scores, FRACTIONS), rounds=1,
              fractions=list(FRACTIONS))


def test_selection_agrees_with_topk():
    """Sanity check (not timed): both select the same entries on a 1M-entry slice (random fp32
    scores have no ties there that would make them differ)."""
    gen = torch.Generator().manual_seed(4)
    scores = {f"t{i}": torch.rand(n, generator=gen) for i, n in enumerate((1, 4097, 278011, 786432))}
    child = ChildNetwork.from_scores(scores, 0.001)
    base = topk_select(scores, 0.001)
    assert child.k == sum(i.numel() for i in base.values())
    for name, idx in base.items():
        assert torch.equal(child.indices[name].long(), idx.long())
