"""Peak-memory measurement shared by the benchmarks.

Two measures, one per device kind, both reported in bytes:

**CUDA** — ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``:
the largest number of bytes held by live tensors at any moment (the caching allocator's
reserved-but-free blocks and the CUDA context are not counted). Model weights that are
resident when the measurement starts are counted, so a peak is "everything the training
configuration needs on the device".

**CPU** — the process's peak resident set size (``VmHWM`` in ``/proc/self/status``), with
its high-water mark reset right before the measured region by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0; the kernel then sets ``VmHWM`` to the current
``VmRSS``). PyTorch's CPU allocator does not cache: tensors come from ``malloc`` /
``posix_memalign`` and large ones (above glibc's mmap threshold, at most 32 MiB) are
``mmap``-ed and unmapped on free, so RSS follows live tensor bytes closely. What RSS also
sees, and CUDA's measure does not: the interpreter, imported libraries and thread pools
(subtracted, see below), glibc heap fragmentation and freed small chunks that glibc keeps
(bounded; :func:`release_free_memory` trims them before each measurement).

Because RSS is process-wide, a configuration whose peak matters is measured in a **fresh
subprocess** (see ``bench_e2e.py`` and ``bench_search.py``): the worker records its RSS after
importing torch/transformers (the *baseline*), builds the model, trims freed memory, resets
the high-water mark, runs the workload and reports ``peak = VmHWM - baseline``. Like the CUDA
figure, this counts the resident weights plus everything the workload allocates, and not the
Python/torch runtime itself. Within one long-lived process (the pytest micro-benchmarks),
:class:`PeakMemory` gives the growth of the peak over the RSS at the start of the region,
which is exact only up to allocator reuse; those figures are marked ``approximate``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"

CPU_METHOD = (
    "peak RSS: VmHWM of /proc/self/status, high-water mark reset via /proc/self/clear_refs=5 "
    "right before the measured region, minus the RSS after imports (fresh subprocess per configuration)"
)
CUDA_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats (live tensor bytes)"


def _status_bytes(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{field} not found in {_STATUS}")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size since process start or the last :func:`reset_peak_rss`."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS; False where not supported."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss_bytes() <= rss_bytes() + 64 * 1024


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap memory back to the kernel (``malloc_trim``)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def method(device: torch.device | str) -> str:
    """One line saying how peak memory is measured on ``device``."""
    return CUDA_METHOD if torch.device(device).type == "cuda" else CPU_METHOD


@dataclass
class Peak:
    """A peak-memory reading, in bytes.

    ``start`` is the memory in use when the region began, ``peak`` the largest value seen in
    it, ``growth = peak - start``. ``approximate`` is True for in-process CPU readings
    (allocator reuse can hide growth) and when the high-water mark could not be reset.
    """

    device: str
    start: int = 0
    peak: int = 0
    approximate: bool = False
    method: str = ""

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "growth": self.growth}


class PeakMemory:
    """Context manager measuring the peak memory of a region on ``device``.

    >>> with PeakMemory("cpu") as m:
    ...     x = torch.ones(10_000_000)
    >>> m.result.growth > 30_000_000
    True
    """

    def __init__(self, device: torch.device | str = "cpu", *, in_process: bool = True):
        self.device = torch.device(device)
        self.in_process = in_process
        self.result = Peak(device=str(self.device), method=method(self.device))

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.result.start = torch.cuda.memory_allocated(self.device)
        else:
            release_free_memory()
            ok = reset_peak_rss()
            self.result.start = rss_bytes()
            self.result.approximate = self.in_process or not ok
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.result.peak = peak_rss_bytes()


def measure_peak(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, Peak]:
    """Run ``fn()`` once inside :class:`PeakMemory`; return its result and the reading."""
    with PeakMemory(device) as m:
        out = fn()
    return out, m.result


def mib(n: int | float | None) -> str:
    """Bytes as a short MiB string (``-`` for None)."""
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


# ------------------------------------------------------------------ fresh-process workers
#
# A benchmark that needs an honest process-wide peak runs its workload in a child Python
# process: ``Worker(script, config)`` starts ``python script --worker '<json config>'``; the
# script calls ``serve(handler)``, which answers one JSON request per line. Library output
# cannot corrupt the protocol: ``serve`` moves the real stdout to a private descriptor and
# points file descriptor 1 at stderr.

_PREFIX = "@@ "


def serve(handler: Callable[[dict], dict], ready: dict | None = None) -> None:
    """Answer requests ``{"cmd": ...}`` read from stdin with ``handler(request)`` until ``quit``.

    ``ready`` is sent first (after the caller has built its workload). Exceptions are sent
    back as ``{"error": ...}`` and end the worker.
    """
    import json
    import sys
    import traceback

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(_PREFIX + json.dumps(ready or {}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("cmd") == "quit":
            break
        try:
            reply = handler(request)
        except Exception:  # report, then stop: the state of the workload is unknown
            out.write(_PREFIX + json.dumps({"error": traceback.format_exc()}) + "\n")
            break
        out.write(_PREFIX + json.dumps(reply) + "\n")
    out.flush()


class WorkerError(RuntimeError):
    """The worker process failed; the message carries the tail of its stderr."""


class Worker:
    """A fresh Python process running ``script --worker <config>`` (see :func:`serve`).

    >>> w = Worker("bench/bench_e2e.py", {"kind": "full"})  # doctest: +SKIP
    >>> w.ready, w.call({"cmd": "step"}), w.close()          # doctest: +SKIP
    """

    def __init__(self, script: str, config: dict, *, env: dict | None = None, timeout: float = 900.0):
        import json
        import subprocess
        import sys
        import tempfile

        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1,
            env={**os.environ, **(env or {})},
        )
        self.timeout = timeout
        self.ready = self._read()

    def _read(self) -> dict:
        import json

        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                raise WorkerError(f"worker exited with status {self.proc.returncode}:\n{self._tail()}")
            if line.startswith(_PREFIX):
                reply = json.loads(line[len(_PREFIX):])
                if "error" in reply:
                    raise WorkerError(reply["error"])
                return reply

    def _tail(self, chars: int = 4000) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-chars:]

    def call(self, request: dict) -> dict:
        """Send one request and wait for its reply."""
        import json

        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Ask the worker to quit (kill it if it does not)."""
        import subprocess

        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # a self-check: python bench/memory.py
    print("clear_refs reset supported:", reset_peak_rss())
    _, reading = measure_peak(lambda: torch.ones(50_000_000).sum())
    print(f"200 MB temporary: growth {mib(reading.growth)} ({reading.method})")
