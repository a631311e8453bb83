"""Peak memory of each phase of a run (DESIGN.md "Memory by phase").

A run is cut into phases -- load, Fisher pass, selection, each candidate's training segments,
final evaluation, write -- and each phase's high-water mark is measured on its own::

    tracker = PhaseMemory(device)
    with tracker.phase("load"):
        upstream = build_upstream(...)
    for segment in segments:
        with tracker.phase("train", label=f"train P={p} steps {a}-{b}"):
            ...
    summary["peak_memory"] = tracker.report()

**CPU**: the high-water resident set size of the process. At each phase start the kernel's
high-water mark is reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``
(Linux >= 4.0), and ``VmHWM`` of ``/proc/self/status`` is read at the end. Where that is not
possible (no ``/proc``, another OS, a sandbox refusing the write) the peak is
``getrusage(RUSAGE_SELF).ru_maxrss``, the peak since the process started, and the record says
``rss_peak_resettable: False`` -- such a peak bounds the phase's from above only.

**CUDA** (when ``device`` is a CUDA device): ``torch.cuda.max_memory_allocated`` and
``max_memory_reserved`` since the phase start (``reset_peak_memory_stats`` there).

Phases may nest (a "search" phase around "train" segments): a reset for an inner phase first
folds the high-water mark reached so far into every open phase, so an outer phase's peak is
still the peak over its whole duration. A phase name may occur several times; every
occurrence is kept with its label, and :meth:`PhaseMemory.report` gives per name the largest
peak and the list of occurrences. One log line (logger ``adtuning``) is printed per phase end.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

log = logging.getLogger("adtuning")

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
_STATUS_FIELD = re.compile(r"^(VmHWM|VmRSS):\s+(\d+)\s+kB", re.MULTILINE)


def _status_kib() -> dict[str, int] | None:
    """``{"VmHWM": kiB, "VmRSS": kiB}`` of this process, or None without ``/proc``."""
    try:
        with open(_STATUS) as handle:
            text = handle.read()
    except OSError:
        return None
    found = dict((key, int(value)) for key, value in _STATUS_FIELD.findall(text))
    return found if {"VmHWM", "VmRSS"} <= found.keys() else None


def _ru_maxrss_bytes() -> int:
    """Peak RSS since the process started (``ru_maxrss``: kiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where it cannot be read)."""
    status = _status_kib()
    if status is not None:
        return status["VmRSS"] * 1024
    try:
        import psutil  # optional
    except ImportError:
        return 0
    return int(psutil.Process(os.getpid()).memory_info().rss)


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False if impossible."""
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _status_kib() is not None


def rss_peak_bytes(resettable: bool) -> int:
    """The RSS high-water mark: VmHWM since the last reset, or ``ru_maxrss`` (since start)."""
    status = _status_kib() if resettable else None
    if status is not None:
        return status["VmHWM"] * 1024
    return max(_ru_maxrss_bytes(), current_rss_bytes())


def release_freed_memory() -> int | None:
    """Hand memory the C allocator keeps after ``free`` back to the OS (glibc ``malloc_trim(0)``).

    glibc serves allocations below its dynamic mmap threshold (raised up to 32 MiB by every
    freed large block) from its heaps, and freed heap memory stays in the process's RSS. The
    Fisher pass frees 4 bytes per scored entry in blocks of one tensor each (16-26 MiB for the
    large and 1B shapes): without a trim the training phase after it keeps that memory resident.
    Returns the RSS released in bytes, or None where there is no glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    before = current_rss_bytes()
    trim(0)
    return max(0, before - current_rss_bytes())


@dataclass
class PhaseRecord:
    """One occurrence of a phase. Byte counts are absolute (the process's, not deltas).

    Attributes:
        name: the phase (``"load"``, ``"fisher"``, ``"train"``, ...).
        label: this occurrence (``"train P=0.01 steps 0-60"``); the name when none was given.
        seconds: wall time of the phase.
        rss_start_bytes / rss_end_bytes: the resident set size at its start and end.
        rss_peak_bytes: the high-water RSS during the phase.
        rss_peak_resettable: False when the peak is ``ru_maxrss`` (the peak since the process
            started: an upper bound of the phase's peak).
        cuda_max_allocated_bytes / cuda_max_reserved_bytes: the CUDA caching allocator's peaks
            during the phase (``None`` off CUDA).
        cuda_allocated_start_bytes / cuda_allocated_end_bytes: allocated CUDA memory at its
            start and end (``None`` off CUDA).
        released_bytes: RSS the allocator handed back at the phase start
            (:func:`release_freed_memory`; ``None`` when not done or not possible).
    """

    name: str
    label: str
    seconds: float = 0.0
    rss_start_bytes: int = 0
    rss_end_bytes: int = 0
    rss_peak_bytes: int = 0
    rss_peak_resettable: bool = True
    cuda_max_allocated_bytes: int | None = None
    cuda_max_reserved_bytes: int | None = None
    cuda_allocated_start_bytes: int | None = None
    cuda_allocated_end_bytes: int | None = None
    released_bytes: int | None = None
    _started: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict:
        """JSON-serialisable fields (no private state)."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.3f} GB"


class PhaseMemory:
    """Per-phase peak memory of this process (and of one CUDA device).

    Args:
        device: the run's device; CUDA peaks are measured when it is a CUDA device (the
            current one for ``"cuda"``). ``None`` or a CPU device: RSS only.
        logger: where the per-phase lines go (default: the ``adtuning`` logger).
        release_at_start: call :func:`release_freed_memory` when a phase starts, so that memory
            earlier phases freed is neither held by the process nor counted in the next peak.
    """

    def __init__(self, device: torch.device | str | None = None, logger: logging.Logger | None = None, *,
                 release_at_start: bool = True):
        self.release_at_start = release_at_start
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda_device: torch.device | None = None
        if device.type == "cuda" and torch.cuda.is_available():
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.cuda_device = torch.device("cuda", index)
        self.log = logger or log
        self.records: list[PhaseRecord] = []
        self._open: list[PhaseRecord] = []

    # -- measuring ------------------------------------------------------------------------
    def _fold(self) -> None:
        """Fold the high-water marks reached since the last reset into every open phase."""
        if not self._open:
            return
        resettable = all(r.rss_peak_resettable for r in self._open)
        rss = rss_peak_bytes(resettable)
        if self.cuda_device is not None:
            allocated = torch.cuda.max_memory_allocated(self.cuda_device)
            reserved = torch.cuda.max_memory_reserved(self.cuda_device)
        for record in self._open:
            record.rss_peak_bytes = max(record.rss_peak_bytes, rss)
            if self.cuda_device is not None:
                record.cuda_max_allocated_bytes = max(record.cuda_max_allocated_bytes or 0, allocated)
                record.cuda_max_reserved_bytes = max(record.cuda_max_reserved_bytes or 0, reserved)

    @contextlib.contextmanager
    def phase(self, name: str, label: str | None = None) -> Iterator[PhaseRecord]:
        """Measure the enclosed code as one occurrence of phase ``name``; yields its record
        (complete once the block has ended, also when it raised)."""
        self._fold()
        record = PhaseRecord(name=name, label=label or name)
        if self.release_at_start:
            record.released_bytes = release_freed_memory()
        record.rss_peak_resettable = reset_rss_peak()
        record.rss_start_bytes = current_rss_bytes()
        record.rss_peak_bytes = record.rss_start_bytes
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)
            torch.cuda.reset_peak_memory_stats(self.cuda_device)
            record.cuda_allocated_start_bytes = torch.cuda.memory_allocated(self.cuda_device)
            record.cuda_max_allocated_bytes = record.cuda_allocated_start_bytes
            record.cuda_max_reserved_bytes = torch.cuda.memory_reserved(self.cuda_device)
        if not record.rss_peak_resettable:
            for outer in self._open:
                outer.rss_peak_resettable = False  # the fallback cannot tell inner from outer either
        self._open.append(record)
        record._started = time.perf_counter()
        try:
            yield record
        finally:
            if self.cuda_device is not None:
                torch.cuda.synchronize(self.cuda_device)
            record.seconds = time.perf_counter() - record._started
            self._fold()
            self._open.remove(record)
            record.rss_end_bytes = current_rss_bytes()
            if self.cuda_device is not None:
                record.cuda_allocated_end_bytes = torch.cuda.memory_allocated(self.cuda_device)
            self.records.append(record)
            self._log(record)

    def _log(self, record: PhaseRecord) -> None:
        cuda = ""
        if self.cuda_device is not None:
            cuda = (f", CUDA max allocated {_gb(record.cuda_max_allocated_bytes)}, "
                    f"max reserved {_gb(record.cuda_max_reserved_bytes)}")
        since = "" if record.rss_peak_resettable else " (since process start: clear_refs unavailable)"
        self.log.info("memory %s: peak RSS %s%s (start %s, end %s)%s, %.1f s", record.label, _gb(record.rss_peak_bytes),
                      since, _gb(record.rss_start_bytes), _gb(record.rss_end_bytes), cuda, record.seconds)

    # -- reporting ------------------------------------------------------------------------
    def report(self) -> dict[str, dict]:
        """Per phase name (in order of first occurrence): the largest peaks over its
        occurrences, the total seconds, and ``occurrences``, the list of
        :meth:`PhaseRecord.as_dict` of each (with its label), in order. JSON-serialisable."""
        out: dict[str, dict] = {}
        for record in self.records:
            entry = out.setdefault(record.name, {"rss_peak_bytes": 0, "rss_peak_resettable": True, "seconds": 0.0,
                                                 "occurrences": []})
            entry["rss_peak_bytes"] = max(entry["rss_peak_bytes"], record.rss_peak_bytes)
            entry["rss_peak_resettable"] = entry["rss_peak_resettable"] and record.rss_peak_resettable
            entry["seconds"] += record.seconds
            for key in ("cuda_max_allocated_bytes", "cuda_max_reserved_bytes"):
                value = getattr(record, key)
                if value is not None:
                    entry[key] = max(entry.get(key, 0), value)
            entry["occurrences"].append(record.as_dict())
        return out
