"""Per-phase peak memory: a known allocation inside a phase shows in that phase's peak only.

The oracle is the size of a buffer the test allocates and touches itself (numpy, 200 MB): the
peak of its phase rises by about that much above the phase's start, and the next phase (after
the buffer is freed) does not reach it again.
"""
import json
import logging

import numpy as np
import pytest

from adtuning import phase_memory
from adtuning.phase_memory import PhaseMemory

SIZE = 200_000_000
MB = 1_000_000


def _touched(nbytes: int) -> np.ndarray:
    buffer = np.empty(nbytes, dtype=np.uint8)
    buffer.fill(1)  # every page resident
    return buffer


needs_reset = pytest.mark.skipif(not phase_memory.reset_rss_peak(), reason="cannot reset VmHWM here (no /proc/self/clear_refs)")


@needs_reset
def test_allocation_shows_in_its_phase_only(caplog):
    tracker = PhaseMemory("cpu")
    with caplog.at_level(logging.INFO, logger="adtuning"):
        with tracker.phase("alloc", label="alloc 200 MB") as first:
            buffer = _touched(SIZE)
            del buffer
        with tracker.phase("after") as second:
            small = _touched(1 * MB)
            del small
    assert first.rss_peak_resettable and second.rss_peak_resettable
    rise = first.rss_peak_bytes - first.rss_start_bytes
    assert SIZE - 20 * MB <= rise <= SIZE + 60 * MB
    # The buffer was freed before the second phase: its peak stays well below the first one's.
    assert second.rss_peak_bytes < first.rss_peak_bytes - SIZE // 2
    assert second.rss_peak_bytes - second.rss_start_bytes < 60 * MB
    # (Whether the freed buffer has left the RSS by the end of the first phase is the allocator's
    # business: after other tests glibc may serve it from the heap, which the next phase's start trims.)
    assert first.seconds >= 0 and first.cuda_max_allocated_bytes is None
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory ")]
    assert len(lines) == 2 and lines[0].startswith("memory alloc 200 MB: peak RSS")


@needs_reset
def test_repeated_phases_keep_every_occurrence_and_report_is_json():
    tracker = PhaseMemory()
    with tracker.phase("train", label="train P=0.01 steps 0-2"):
        buffer = _touched(SIZE)
        del buffer
    with tracker.phase("train", label="train P=0.01 steps 2-4"):
        pass
    report = json.loads(json.dumps(tracker.report()))
    assert list(report) == ["train"]
    occurrences = report["train"]["occurrences"]
    assert [o["label"] for o in occurrences] == ["train P=0.01 steps 0-2", "train P=0.01 steps 2-4"]
    assert report["train"]["rss_peak_bytes"] == occurrences[0]["rss_peak_bytes"]
    assert occurrences[1]["rss_peak_bytes"] < occurrences[0]["rss_peak_bytes"] - SIZE // 2
    assert report["train"]["rss_peak_resettable"] is True
    assert "cuda_max_allocated_bytes" not in report["train"]


@needs_reset
def test_nested_phase_does_not_hide_the_outer_peak():
    tracker = PhaseMemory()
    with tracker.phase("search") as outer:
        start = outer.rss_start_bytes
        buffer = _touched(SIZE)
        del buffer
        with tracker.phase("train") as inner:  # its reset must not lose the outer's peak
            pass
    assert outer.rss_peak_bytes - start >= SIZE - 20 * MB
    assert inner.rss_peak_bytes < outer.rss_peak_bytes - SIZE // 2
    assert [r.name for r in tracker.records] == ["train", "search"]


def test_fallback_without_proc_is_flagged(monkeypatch):
    monkeypatch.setattr(phase_memory, "_CLEAR_REFS", "/nonexistent/clear_refs")
    monkeypatch.setattr(phase_memory, "_STATUS", "/nonexistent/status")
    tracker = PhaseMemory()
    with tracker.phase("load") as record:
        pass
    assert record.rss_peak_resettable is False
    assert record.rss_peak_bytes > 0  # ru_maxrss: the peak since the process started
    assert tracker.report()["load"]["rss_peak_resettable"] is False


def test_phase_is_recorded_when_it_raises():
    tracker = PhaseMemory()
    with pytest.raises(RuntimeError):
        with tracker.phase("fisher"):
            raise RuntimeError("boom")
    assert [r.name for r in tracker.records] == ["fisher"]


@needs_reset
def test_freed_heap_blocks_are_released_at_a_phase_start():
    import torch

    before = phase_memory.current_rss_bytes()
    big = torch.ones(5_000_000)  # a freed 20 MB mmapped block raises glibc's mmap threshold to 20 MB
    del big
    live, blocks = [], []
    for _ in range(24):  # 8 MB heap blocks between small live ones: free, but not all trimmed by glibc itself
        blocks.append(torch.ones(2_000_000))
        live.append(torch.ones(1000))
    del blocks
    tracker = PhaseMemory()
    with tracker.phase("train") as record:
        pass
    if record.released_bytes is None:
        pytest.skip("no glibc malloc_trim here")
    assert phase_memory.current_rss_bytes() < before + 8 * MB
    assert record.rss_start_bytes < before + 8 * MB
    assert len(live) == 24
