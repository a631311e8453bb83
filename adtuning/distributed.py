"""Data-parallel AD-TUNING on torch.distributed (torchrun, c10d; NCCL on CUDA, gloo on CPU).

No DDP wrapper over the upstream: every rank holds the whole model and trains on a disjoint
part of every global batch (:func:`adtuning.speech.data.make_loader` with ``shard``). What
crosses the wire:

* **Fisher pass** — the per-sample Fisher *sums* of every scored entry and the sample count,
  in one flat buffer, all-reduced once (``estimate_fisher(..., data_parallel=...)``). Rank 0
  then selects the child networks and :meth:`DataParallel.broadcast_children` hands its index
  sets to every rank, so all ranks train bit-identical children by construction.
* **Training** — :class:`GradientReducer`: the optimizer's compact child gradients (bound as
  views of one flat fp32 buffer, see :meth:`adtuning.compact_grad.CompactGradStore.bind`),
  the dense head gradients (bound as views of the same buffer) and one entry for the step's
  loss: ``4 * (k + head + 1)`` bytes, all-reduced once per optimizer step, after the last
  micro-batch. Clipping and the SparseAdamW step then run on the reduced gradients on every
  rank, identically. Communication is *not* overlapped with backward (see the class).
* **Evaluation** — :meth:`DataParallel.merge_eval_states`: every rank evaluates its part of
  each global dev/test batch and the tasks' accumulators (correct counts, edit-distance
  hypotheses, error counts, NLL sums) are gathered and summed, so the metric is the
  single-process metric computed over the whole set, not a mean of per-rank rates.

Rank 0 reads and writes the run folder; whatever other ranks need from it (the children and
the search checkpoint on ``--resume``) is broadcast, so nodes need no shared file system.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from adtuning.child import ChildNetwork

if TYPE_CHECKING:
    from adtuning.optim import SparseAdamW

log = logging.getLogger("adtuning")

T = TypeVar("T")

#: Seconds a collective may wait for the other ranks before the job fails (``--dist-timeout``).
#: Rank 0 alone generates an embedded corpus while the others wait, so this must exceed that.
DEFAULT_TIMEOUT_S = 1800.0

#: Environment variables torchrun (and any c10d ``env://`` launcher) sets for every worker.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str, default: str | None = None, minimum: int = 0) -> int:
    """The integer environment variable ``name`` (``default`` when unset).

    Raises:
        ValueError: naming the variable and its value, when it is not an integer >= ``minimum``.
    """
    value = os.environ.get(name, default)
    if value is None:
        raise ValueError(f"environment variable {name} is not set: start the job with torchrun")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"environment variable {name}={value!r} must be >= {minimum}")
    return number


def launched_world_size() -> int:
    """The number of processes the launcher started: ``WORLD_SIZE`` from the environment, 1
    when it is unset (not started by torchrun). The one parser of ``WORLD_SIZE``: the CLI and
    :meth:`DataParallel.from_env` both call it.

    Raises:
        ValueError: ``WORLD_SIZE`` is set but not an integer >= 1 (the message names the
            variable and its value).
    """
    return _env_int("WORLD_SIZE", "1", minimum=1)


def resolve_device(requested: str | None, local_rank: int, local_world_size: int) -> torch.device:
    """The device of a rank: ``cuda:<LOCAL_RANK>`` when CUDA is asked for (or, with no request,
    available), else the CPU.

    Raises:
        ValueError: ``requested`` names one GPU while several processes run on this node
            (they would all use it).
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    if device.index is not None and local_world_size > 1:
        raise ValueError(f"--device {requested}: under torchrun with {local_world_size} processes per node every process "
                         "would use that one GPU; pass --device cuda (process i of a node takes cuda:i)")
    if device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"--device cuda: local rank {local_rank} needs GPU cuda:{local_rank}, "
                             f"but this node has {torch.cuda.device_count()} GPU(s); lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
    return device


@dataclass
class DataParallel:
    """The process group of a data-parallel run and the few collectives the engine uses.

    Build it with :meth:`from_env` (under torchrun) or :meth:`initialize` (tests, other
    launchers). Every method is a collective unless said otherwise: all ranks must call it, in
    the same order.

    Attributes:
        rank, world_size, local_rank: this process's place in the job.
        device: this rank's device (``cuda:<local_rank>`` or CPU).
        backend: ``"nccl"`` or ``"gloo"``.
        timeout: the process group's timeout for collectives.
        collective_seconds: wall time spent in the collectives of this object, including the
            gradient all-reduces of :class:`GradientReducer`.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout: timedelta
    collective_seconds: float = 0.0
    _owns_group: bool = field(default=False, repr=False)

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def from_env(cls, device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> "DataParallel | None":
        """Join the job torchrun started (``env://`` rendezvous), or ``None`` when this process
        was not started by a launcher or the world has one process (nothing changes then).

        Raises:
            ValueError: a launcher variable is missing or malformed, a bad ``--device``, or a
                timeout that is not positive.
        """
        world_size = launched_world_size()
        if world_size <= 1:
            return None
        missing = [name for name in LAUNCHER_ENV if name not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start the job with torchrun")
        rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
        local_world = _env_int("LOCAL_WORLD_SIZE", str(world_size), minimum=1)
        return cls.initialize(rank=rank, world_size=world_size, local_rank=local_rank,
                              device=resolve_device(device, local_rank, local_world), timeout_s=timeout_s)

    @classmethod
    def initialize(cls, *, rank: int, world_size: int, local_rank: int, device: torch.device | str,
                   timeout_s: float = DEFAULT_TIMEOUT_S, init_method: str = "env://") -> "DataParallel":
        """Create the default process group (NCCL for a CUDA ``device``, gloo otherwise) and
        return the handle. ``init_method`` is any c10d URL (``env://``, ``tcp://host:port``,
        ``file:///path``)."""
        if not timeout_s > 0:
            raise ValueError(f"--dist-timeout: must be > 0 seconds, got {timeout_s}")
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            # Object collectives and NCCL communicators use the current device.
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timeout, device_id=device if device.type == "cuda" else None)
            owns = True
        else:
            owns = False
            if dist.get_rank() != rank or dist.get_world_size() != world_size:
                raise ValueError(f"a process group is already initialised as rank {dist.get_rank()} of "
                                 f"{dist.get_world_size()}, not {rank} of {world_size}")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend,
                   timeout=timeout, _owns_group=owns)

    def close(self) -> None:
        """Destroy the process group this object created (idempotent; not a collective)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes artifacts (not a collective)."""
        return self.rank == 0

    def describe(self) -> str:
        """One line for the log (not a collective)."""
        return (f"data parallel: rank {self.rank} of {self.world_size} (local rank {self.local_rank}), "
                f"{self.backend} on {self.device}, timeout {self.timeout.total_seconds():g}s")

    # ---- collectives --------------------------------------------------------------------

    def _timed(self, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.collective_seconds += time.perf_counter() - start

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (gloo has no AVG; callers scale)."""
        self._timed(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
        return tensor

    def barrier(self) -> None:
        """Wait for every rank."""
        self._timed(dist.barrier)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; other ranks' ``obj`` is ignored)."""
        box = [obj if self.is_main else None]
        self._timed(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        self._timed(lambda: dist.all_gather_object(out, obj))
        return out

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every rank; if it raises, the
        same exception is raised on every rank (so a bad ``--output-dir`` or ``--resume`` is
        reported once and every rank exits alike instead of waiting for rank 0)."""
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as err:  # handed to every rank, raised there
                outcome = ("error", err)
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise value
        result: T = value
        return result

    def staged(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank, first on rank 0, then on the first rank of every other node,
        then on the rest, so that a cache ``fn`` fills (a generated corpus) is written once per
        file system while the others wait. An exception on any rank is raised on all of them."""
        result: Any = None
        stages: tuple[Callable[[], bool], ...] = (lambda: self.rank == 0, lambda: self.rank != 0 and self.local_rank == 0,
                                                  lambda: self.local_rank != 0)
        for stage in stages:
            error: Exception | None = None
            if stage():
                try:
                    result = fn()
                except Exception as err:
                    error = err
            errors = [e for e in self.all_gather_object(error) if e is not None]
            if errors:
                raise errors[0]
        out: T = result
        return out

    # ---- what the engine exchanges ------------------------------------------------------

    def broadcast_children(self, children: Sequence[ChildNetwork] | None) -> list[ChildNetwork]:
        """Rank 0's child networks on every rank (other ranks' ``children`` are ignored and may
        be ``None``): every rank then trains exactly rank 0's index sets."""
        payload = None
        if self.is_main:
            if children is None:
                raise ValueError("broadcast_children: rank 0 must pass the children")
            payload = [
                {"indices": {n: i.cpu() for n, i in c.indices.items()}, "shapes": c.shapes, "p": c.p, "k": c.k,
                 "threshold": c.threshold, "method": c.method, "seed": c.seed, "extra": c.extra}
                for c in children
            ]
        payload = self.broadcast_object(payload)
        return [ChildNetwork(**fields) for fields in payload]

    def merge_eval_states(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The evaluation accumulator of the whole split from every rank's part of it.

        Values are combined with ``+=`` in rank order: counts and sums add, lists of
        hypotheses/references concatenate, count objects (``DiarizationCounts``) add field by
        field. Every rank gets the same merged state, so every rank computes the same metric.

        Raises:
            TypeError: a value that cannot be combined with ``+=``.
        """
        states = self.all_gather_object(dict(state))
        merged = copy.deepcopy(states[0])
        for other in states[1:]:
            for key, value in other.items():
                acc = merged[key]
                try:
                    acc += value
                except TypeError:
                    raise TypeError(f"merge_eval_states: cannot add the {type(value).__name__} of {key!r} across ranks") from None
                merged[key] = acc
        out: dict[str, Any] = merged
        return out

    def check_replicas(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        """Raise unless every rank holds the same ``tensors`` (compared by float64 sums and sums
        of squares, which differ for any replica that has drifted).

        Raises:
            RuntimeError: naming the first tensor and rank that differ from rank 0.
        """
        digest = [(float(t.detach().double().sum()), float(t.detach().double().square().sum())) for t in tensors.values()]
        names = list(tensors)
        gathered = self.all_gather_object(digest)
        for rank, other in enumerate(gathered[1:], start=1):
            if other != gathered[0]:
                where = next((names[i] for i, (a, b) in enumerate(zip(gathered[0], other)) if a != b), "(tensor count)")
                raise RuntimeError(f"data parallel: {what} on rank {rank} differ from rank 0 at {where!r}; the replicas "
                                   "have drifted apart (non-deterministic kernels or mixed hardware?)")


class GradientReducer:
    """One flat fp32 buffer for one optimizer: compact child gradients, dense head gradients and
    the step's loss, all-reduced (summed) once per optimizer step.

    Layout: ``[compact gradients of optimizer.grad_store.parameters() | dense parameters, in the
    given order | loss]`` — ``k + head + 1`` entries, ``4 * (k + head + 1)`` bytes per step: the
    one extra entry carries the step's loss so that every rank logs the global loss without a
    second collective; there is no other padding.

    The optimizer's :class:`~adtuning.compact_grad.CompactGradStore` keeps its compact gradients
    straight in the buffer (its gather hooks and the sparse weight-gradient path of
    :mod:`adtuning.sparse_grad` both write into the bound views),
    and the head gradients are views of it (``param.grad`` is set to its view before backward;
    autograd accumulates into an existing gradient in place). So the all-reduce runs on the
    very buffers clipping and the update read, with no copy in either direction.

    The reduction is a plain sum: each rank's loss must already be its share of the global
    batch's loss (``n_rank / n_global`` times its mean), so the sum is the gradient of the global
    batch. It is issued after the last micro-batch's backward, not overlapped with it: the
    compact buffers of one step are complete only when backward ends (several micro-batches add
    into them), and splitting them into buckets launched from hooks would add per-bucket
    latency on gloo for little gain at these sizes.

    Args:
        dp: the process group.
        optimizer: the :class:`~adtuning.optim.SparseAdamW` of the active candidate (only its
            ``grad_store`` is used).
        dense_params: the parameters of its dense groups (heads, layer weights), fp32.
    """

    def __init__(self, dp: DataParallel, optimizer: "SparseAdamW", dense_params: Sequence[torch.nn.Parameter]):
        self.dp = dp
        self.store = optimizer.grad_store
        params = self.store.parameters()
        device = params[0].device if params else (dense_params[0].device if dense_params else dp.device)
        for p in dense_params:
            if p.dtype != torch.float32:
                raise ValueError(f"GradientReducer: dense parameters must be float32 (gradients live in one fp32 buffer), got {p.dtype}")
            if p.device != device:
                raise ValueError(f"GradientReducer: dense parameter on {p.device}, the child parameters on {device}")
        self.k = self.store.numel()
        self.head_entries = sum(p.numel() for p in dense_params)
        self.flat = torch.zeros(self.k + self.head_entries + 1, dtype=torch.float32, device=device)
        self.store.bind(self.flat[: self.k])
        self._dense: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        offset = self.k
        for p in dense_params:
            self._dense.append((p, self.flat[offset:offset + p.numel()].view_as(p)))
            offset += p.numel()
        self.steps = 0
        self.seconds = 0.0

    @property
    def bytes_per_step(self) -> int:
        """Bytes all-reduced per optimizer step: ``4 * (k + head + 1)``."""
        return self.flat.numel() * self.flat.element_size()

    def prepare(self) -> None:
        """Point every dense gradient at its view (zeroed) before the step's first backward."""
        for p, view in self._dense:
            if p.grad is None:
                p.grad = view.zero_()
            elif p.grad is not view:
                view.copy_(p.grad)
                p.grad = view

    def reduce(self, loss: float) -> float:
        """Sum the step's gradients and ``loss`` (this rank's share) over the ranks, in place;
        returns the global loss. Call once per optimizer step, after the last micro-batch."""
        self.store.fill_missing()
        for p, view in self._dense:
            if p.grad is None:
                p.grad = view.zero_()
            elif p.grad is not view:  # something replaced the bound gradient: keep its values
                view.copy_(p.grad)
                p.grad = view
        self.flat[-1] = loss
        start = time.perf_counter()
        self.dp.all_reduce_sum_(self.flat)
        total = float(self.flat[-1])  # waits for the collective on CUDA too
        self.seconds += time.perf_counter() - start
        self.steps += 1
        return total

    def release(self) -> None:
        """Detach the buffer from the optimizer and the parameters."""
        self.store.release()
        for p, view in self._dense:
            if p.grad is view:
                p.grad = None
        self._dense = []
