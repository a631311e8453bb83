"""The per-op correctness cases of every backend, shared by tests/test_ops.py and bench/gpu_check.py.

Each :class:`OpCase` names one op (``gather``, ``sparse_adamw``, ``linear_fisher``, ``sddmm``),
one set of inputs (awkward sizes: 1, primes, 2^k +- 1; every input dtype; both index dtypes;
the optional arguments: ``out``/``accumulate``, master weights, bias, lengths, strided
operands) and a tier saying where it is affordable. :func:`run_case` runs a backend's op on
those inputs and compares it with an oracle that shares no code with any backend: plain Python
indexing of the values as a list for gather; per-sample weight and bias gradients from dense
autograd in fp64, squared and summed, for the linear Fisher; ``torch.optim.AdamW`` on the
gathered child entries for sparse AdamW; the fp64 product and dense autograd's gathered weight
gradient for SDDMM. So the reference backend is tested like every other one. A backend other
than the reference is also compared with its reference twin in :mod:`adtuning.reference` (the
twin is not compared with itself). The result lists every comparison, so a test can assert on
it and gpu_check can record it.

One error metric is used everywhere: :func:`rel_err`, ``max |actual - expected| / scale``, with
the scale of an accumulator (``max |expected|``) by default or a per-entry scale (SDDMM's
``sum_n |dy[n, i]| |x[n, j]|``, the size of an entry's rounding error). Exact checks are the
same metric with tolerance 0.

The module imports only torch and :mod:`adtuning.reference` (no pytest): gpu_check imports it
on a bare GPU machine.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from adtuning import reference

OPS = ("gather", "sparse_adamw", "linear_fisher", "sddmm")

# Where a case runs. The Triton interpreter executes every program in Python, so the larger
# cases run there only compiled; wav2vec2-base-sized ones take minutes on a shared CPU.
TIER_ALL = "all"
TIER_COMPILED = "compiled"  # not under the Triton interpreter
TIER_CUDA = "cuda"  # CUDA devices only


def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | float | None = None) -> float:
    """``max |actual - expected| / scale``, computed in fp64; 0 for empty tensors.

    ``scale`` defaults to ``max |expected|`` (1 when that is 0): errors are measured against the
    size of the accumulator, not entry by entry. A tensor gives each entry its own scale.
    A shape mismatch or a NaN is an infinite error.
    """
    if actual.shape != expected.shape:
        return math.inf
    if actual.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs()
    if scale is None:
        largest = expected.double().abs().max().item()
        scale = largest if largest > 0 else 1.0
    elif isinstance(scale, torch.Tensor):
        scale = scale.double()
    err = (diff / scale).max().item()
    return math.inf if math.isnan(err) else err


@dataclass(frozen=True)
class Comparison:
    """One comparison of a case: its :func:`rel_err` against a tolerance (0 means exact)."""

    name: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass
class CaseResult:
    """Every comparison of one case on one backend and device."""

    comparisons: list[Comparison] = field(default_factory=list)

    def close(self, name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float,
              scale: torch.Tensor | float | None = None) -> None:
        self.comparisons.append(Comparison(name, rel_err(actual, expected, scale), tolerance))

    def equal(self, name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        """Bit-exact values (and the same dtype): the metric with tolerance 0."""
        same_dtype = actual.dtype == expected.dtype
        self.comparisons.append(Comparison(name, rel_err(actual, expected) if same_dtype else math.inf, 0.0))

    def holds(self, name: str, condition: bool) -> None:
        self.comparisons.append(Comparison(name, 0.0 if condition else math.inf, 0.0))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    @property
    def worst(self) -> Comparison:
        """The comparison furthest over (or closest to) its tolerance."""
        def badness(c: Comparison) -> float:
            if c.tolerance > 0:
                return c.error / c.tolerance
            return math.inf if c.error > 0 else 0.0
        return max(self.comparisons, key=badness)

    def describe(self) -> str:
        return "; ".join(f"{'ok' if c.ok else 'FAIL'} {c.name}: {c.error:.3e} (tol {c.tolerance:.0e})"
                         for c in self.comparisons)


@dataclass(frozen=True)
class OpCase:
    """One op on one set of inputs; ``params`` are the keyword arguments of the op's check."""

    op: str
    name: str
    params: dict = field(hash=False, compare=False)
    tier: str = TIER_ALL

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}"


# ---- shared input helpers -----------------------------------------------------------------

def child_indices(numel: int, k: int, index_dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``k`` sorted unique random indices into ``numel`` entries (on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(index_dtype)


def is_reference(backend) -> bool:
    """Whether ``backend`` is the reference one: its comparison with its own twin is skipped
    (it could not fail); the oracles still check it."""
    return getattr(backend, "name", None) == "reference"


def _dt(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.int32: "i32", torch.int64: "i64"}[dtype]


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


# ---- gather -------------------------------------------------------------------------------

# (grad shape, k): 1, primes, 2^k +- 1, a whole tensor, wav2vec2-base's largest Linear (278011
# is a prime just above 3072 * 768 / 8.5); a 2-D grad is read in its flattened order.
GATHER_SIZES = [((1,), 1, TIER_ALL), ((7, 13), 1, TIER_ALL), ((97,), 32, TIER_ALL), ((31, 33), 97, TIER_ALL),
                ((1023,), 1023, TIER_ALL), ((4097,), 1025, TIER_ALL), ((4097,), 1365, TIER_ALL),
                ((278011,), 27803, TIER_ALL), ((278011,), 92670, TIER_ALL)]


def _flat_values(tensor: torch.Tensor) -> list[float]:
    """The entries of ``tensor`` in its logical row-major order, as Python floats (exact for
    every float dtype), read through ``tolist`` and nested lists: no reshape, stride or index op."""
    values = tensor.detach().cpu().tolist()
    for _ in range(tensor.dim() - 1):
        values = [v for row in values for v in row]
    return values if tensor.dim() else [values]


def gather_oracle(grad: torch.Tensor, indices: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """``float32(grad.flatten()[indices])`` (plus ``start``) by plain Python list indexing.

    The gathered 16-bit or fp32 values are exact in fp32. An fp32 accumulation is one add of two
    fp32 numbers: the Python (fp64) sum rounded once to fp32 is that add correctly rounded
    (53 >= 2 * 24 + 2 bits, so the double rounding is innocuous).
    """
    flat = _flat_values(grad)
    picked = [flat[i] for i in indices.cpu().tolist()]
    if start is not None:
        picked = [a + b for a, b in zip(_flat_values(start), picked)]
    return torch.tensor(picked, dtype=torch.float32).to(grad.device)


def check_gather(backend, device, *, shape, k, dtype, index_dtype, seed, transpose=False) -> CaseResult:
    """Gather is exact in every dtype (a cast to fp32, and one fp32 add when accumulating):
    plain, into ``out`` (which is returned) and accumulated onto ``out``, against plain Python
    indexing (:func:`gather_oracle`) and, for backends other than the reference, bit for bit
    against the reference twin."""
    result = CaseResult()
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=gen).to(dtype).to(device)
    if transpose:  # a non-contiguous view: read in its logical (flattened) order
        grad = grad.t()
    idx = child_indices(grad.numel(), k, index_dtype, seed + 1).to(device)
    expected = gather_oracle(grad, idx)
    got = backend.gather(grad, idx)
    result.equal("gather vs Python indexing", got, expected)
    if not is_reference(backend):
        result.equal("gather vs reference", got, reference.gather_ref(grad, idx))
    out = torch.full((k,), 5.0, device=device)
    result.holds("out is returned", backend.gather(grad, idx, out=out) is out)
    result.equal("gather into out vs Python indexing", out, expected)
    acc = torch.randn(k, generator=gen).to(device)
    want = gather_oracle(grad, idx, start=acc)
    start = acc.clone()
    result.holds("accumulate returns out", backend.gather(grad, idx, out=acc, accumulate=True) is acc)
    result.equal("accumulate onto out vs Python indexing", acc, want)
    if not is_reference(backend):
        result.equal("accumulate onto out vs reference", acc,
                     reference.gather_ref(grad, idx, out=start, accumulate=True))
    return result


def gather_cases() -> list[OpCase]:
    cases = []
    for shape, k, tier in GATHER_SIZES:
        numel = math.prod(shape)
        for dtype in FLOAT_DTYPES:
            for index_dtype in INDEX_DTYPES:
                name = f"{'x'.join(map(str, shape))}-k{k}-{_dt(dtype)}-{_dt(index_dtype)}"
                cases.append(OpCase("gather", name, dict(shape=shape, k=k, dtype=dtype, index_dtype=index_dtype,
                                                         seed=numel + k), tier))
    cases += [
        OpCase("gather", "transposed-17x5-k3-fp32-i32",
               dict(shape=(17, 5), k=3, dtype=torch.float32, index_dtype=torch.int32, seed=5, transpose=True)),
        OpCase("gather", "transposed-37x53-k653-fp32-i64",
               dict(shape=(37, 53), k=653, dtype=torch.float32, index_dtype=torch.int64, seed=6, transpose=True)),
        OpCase("gather", "empty-indices-7x13-fp32-i64",
               dict(shape=(7, 13), k=0, dtype=torch.float32, index_dtype=torch.int64, seed=7)),
    ]
    return cases


# ---- sparse AdamW -------------------------------------------------------------------------

HYPERS = {
    "default": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
    # beta1 < 0.5 takes the other branch of lerp; no decay.
    "lerp-no-decay": dict(lr=3e-3, beta1=0.3, beta2=0.99, eps=1e-6, weight_decay=0.0),
    "beta2-0.98-no-decay": dict(lr=3e-3, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.0),
    "lerp-decay-0.1": dict(lr=3e-3, beta1=0.3, beta2=0.98, eps=1e-6, weight_decay=0.1),
}
# The fp32 state (moments, masters, fp32 params) against the reference and torch's AdamW:
# a few ulp of each tensor's scale (backends use fused multiply-adds; the interpreter rounds
# a*b+c twice; the reference's sqrt is not correctly rounded).
ADAMW_STATE_TOL = 2e-6
# A 16-bit param holds its master rounded, so it is within one rounding step of the reference.
ADAMW_PARAM_TOL = {torch.float32: ADAMW_STATE_TOL, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (numel, k): one entry, a single child of two, primes, all but two of 2^10 + 1, half of
# 2^12 + 1, a third of a large prime.
ADAMW_SIZES = [(1, 1, TIER_ALL), (2, 1, TIER_ALL), (97, 13, TIER_ALL), (97, 32, TIER_ALL), (257, 61, TIER_ALL),
               (1025, 1023, TIER_ALL), (4097, 2049, TIER_ALL), (278011, 2781, TIER_ALL),
               (278011, 92670, TIER_COMPILED)]


def check_sparse_adamw(backend, device, *, numel, k, dtype, index_dtype, hyper, steps, master, seed) -> CaseResult:
    """``steps`` AdamW steps on the child entries against ``torch.optim.AdamW`` (fused and not)
    on the gathered child vector, and against the reference twin; non-child entries stay
    bit-identical and a param with a master holds the master rounded (round-to-nearest-even).

    ``master``: ``"none"``, ``"copy"`` (the child entries in fp32, as for 16-bit params) or
    ``"offset"`` (differs from the param: the param must take the master's values).
    """
    result = CaseResult()
    h = HYPERS[hyper]
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(numel, generator=gen).to(dtype).to(device)
    idx = child_indices(numel, k, index_dtype, seed + 1).to(device)
    child = idx.long()
    masters = {"none": None, "copy": param[child].float(), "offset": param[child].float() + 1.0}[master]
    state = [torch.zeros(k, device=device), torch.zeros(k, device=device), masters]
    ours = [param.clone()] + [t.clone() if t is not None else None for t in state]
    theirs = [param.clone()] + [t.clone() if t is not None else None for t in state]
    start = (masters if masters is not None else param[child]).float()
    oracles = []
    for fused in (True, False):
        vector = torch.nn.Parameter(start.clone())
        oracles.append((vector, torch.optim.AdamW([vector], lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                                                  weight_decay=h["weight_decay"], fused=fused)))
    for step in range(1, steps + 1):
        grad = torch.randn(k, generator=gen).to(device)
        backend.sparse_adamw_(ours[0], grad, idx, *ours[1:], step=step, **h)
        if not is_reference(backend):
            reference.sparse_adamw_ref_(theirs[0], grad, idx, *theirs[1:], step=step, **h)
        for vector, optimizer in oracles:
            vector.grad = grad.clone()
            optimizer.step()

    if not is_reference(backend):
        for name, a, b in zip(("exp_avg", "exp_avg_sq", "master"), ours[1:], theirs[1:]):
            if a is not None:
                result.close(f"{name} vs reference", a, b, ADAMW_STATE_TOL)
        result.close("param child entries vs reference", ours[0][child].float(), theirs[0][child].float(),
                     ADAMW_PARAM_TOL[dtype])
    fp32_child = ours[3] if ours[3] is not None else ours[0][child]
    for (vector, optimizer), kind in zip(oracles, ("fused", "unfused")):
        oracle_state = optimizer.state[vector]
        result.close(f"child values vs torch AdamW ({kind})", fp32_child, vector.detach(), ADAMW_STATE_TOL)
        result.close(f"exp_avg vs torch AdamW ({kind})", ours[1], oracle_state["exp_avg"], ADAMW_STATE_TOL)
        result.close(f"exp_avg_sq vs torch AdamW ({kind})", ours[2], oracle_state["exp_avg_sq"], ADAMW_STATE_TOL)
    if ours[3] is not None:
        # Bit for bit as torch rounds it (round to nearest even).
        result.equal("param holds the master rounded", ours[0][child], ours[3].to(dtype))
    untouched = torch.ones(numel, dtype=torch.bool, device=device)
    untouched[child] = False
    result.equal("non-child entries untouched", ours[0][untouched], param[untouched])
    return result


def sparse_adamw_cases() -> list[OpCase]:
    cases = []

    def add(numel, k, dtype, index_dtype, hyper, steps, master, tier):
        name = f"{numel}-k{k}-{_dt(dtype)}{'+master' if master == 'copy' else ''}-{_dt(index_dtype)}-{hyper}"
        cases.append(OpCase("sparse_adamw", name, dict(numel=numel, k=k, dtype=dtype, index_dtype=index_dtype,
                                                       hyper=hyper, steps=steps, master=master,
                                                       seed=numel + 7 * k), tier))

    for numel, k, tier in ADAMW_SIZES:
        for dtype in FLOAT_DTYPES:
            for index_dtype in INDEX_DTYPES:
                add(numel, k, dtype, index_dtype, "default", 5, "none" if dtype == torch.float32 else "copy", tier)
    for numel, k, tier in [(1, 1, TIER_ALL), (97, 32, TIER_ALL), (4097, 1365, TIER_ALL), (278011, 92670, TIER_COMPILED)]:
        for index_dtype in INDEX_DTYPES:
            add(numel, k, torch.float32, index_dtype, "lerp-no-decay", 4, "none", tier)
    for hyper in ("beta2-0.98-no-decay", "lerp-decay-0.1"):
        add(257, 61, torch.float32, torch.int64, hyper, 7, "none", TIER_ALL)
    cases.append(OpCase("sparse_adamw", "1000-k333-fp32+offset-master-i32-default",
                        dict(numel=1000, k=333, dtype=torch.float32, index_dtype=torch.int32, hyper="default",
                             steps=1, master="offset", seed=3)))
    return cases


# ---- Linear per-sample Fisher ---------------------------------------------------------------

# max |ours - expected| / max |expected|, by the dtype of x, against the fp64 oracle and the
# reference twin: backends sum in fp32 (in another order than the twin); 16-bit dots may round
# their products on some backends.
FISHER_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# (B, T, in, out): tiny (below tl.dot's 16), primes, 2^k +- 1, several tiles per axis, a long
# input axis, wav2vec2-base's largest Linear over 8 utterances of 4 s.
FISHER_SHAPES = [((1, 1, 1, 1), TIER_ALL), ((2, 17, 31, 13), TIER_ALL), ((3, 17, 97, 33), TIER_ALL),
                 ((3, 33, 65, 127), TIER_ALL), ((1, 64, 16, 17), TIER_ALL), ((4, 7, 129, 3), TIER_ALL),
                 ((2, 41, 257, 131), TIER_ALL), ((1, 5, 4097, 3), TIER_ALL),
                 ((5, 97, 257, 1025), TIER_COMPILED), ((8, 199, 768, 3072), TIER_CUDA)]


def mixed_lengths(batch: int, frames: int) -> tuple[int, ...]:
    """A full sample, an empty one, one past the end (clamped) and a partial one, cycled."""
    choices = [frames, 0, frames + 3, max(1, frames // 2)]
    return tuple(choices[n % len(choices)] for n in range(batch))


def linear_fisher_oracle(x: torch.Tensor, dy: torch.Tensor, fisher_w: torch.Tensor, fisher_b: torch.Tensor | None,
                         lengths: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fisher_w`` and ``fisher_b`` plus the squared per-sample gradients, from dense autograd.

    Each sample's valid frames (``t < lengths[n]``, clamped to the frames there are) go through
    an ordinary ``F.linear`` in fp64 on their own, and ``backward(dy_n)`` gives that sample's
    weight and bias gradients, which are squared and summed: one backward per sample, the
    definition of the per-sample Fisher, sharing nothing with the ops. Returns fp64 tensors.
    """
    batch, frames = x.shape[0], x.shape[1]
    weight = torch.zeros(fisher_w.shape, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(fisher_w.shape[0], dtype=torch.float64, device=x.device, requires_grad=True)
    want_w = fisher_w.double().clone()
    want_b = fisher_b.double().clone() if fisher_b is not None else None
    for n in range(batch):
        valid = frames if lengths is None else max(0, min(int(lengths[n]), frames))
        if valid == 0:
            continue  # no frame counts: the sample's gradient is zero
        weight.grad = bias.grad = None
        y = F.linear(x[n, :valid].double(), weight, bias)
        y.backward(dy[n, :valid].double())
        want_w += weight.grad.square()
        if want_b is not None:
            want_b += bias.grad.square()
    return want_w, want_b


def check_linear_fisher(backend, device, *, shape, dtype, bias, lengths, seed, length_dtype=torch.int64,
                        dy_dtype=None, x_layout="contiguous", dy_sliced=False) -> CaseResult:
    """Per-sample Fisher accumulated onto a non-zero start (the ops accumulate), against dense
    autograd's per-sample gradients in fp64 squared (:func:`linear_fisher_oracle`) and, for
    backends other than the reference, against the reference twin.

    ``lengths``: None or one int per sample (padding frames hold garbage that must not count).
    ``x_layout``: ``"time-major"`` stores x as [T, B, in], ``"feature-major"`` as [B, in, T]
    (both non-contiguous views); ``dy_sliced`` makes dy a feature slice of a wider tensor;
    ``dy_dtype`` mixes dtypes (fp32 activations with 16-bit output gradients, as under autocast).
    """
    result = CaseResult()
    batch, frames, in_f, out_f = shape
    gen = torch.Generator().manual_seed(seed)
    if x_layout == "time-major":
        x = torch.randn(frames, batch, in_f, generator=gen).to(dtype).to(device).transpose(0, 1)
    elif x_layout == "feature-major":
        x = torch.randn(batch, in_f, frames, generator=gen).to(dtype).to(device).transpose(1, 2)
    else:
        x = torch.randn(batch, frames, in_f, generator=gen).to(dtype).to(device)
    dy_dtype = dy_dtype or dtype
    if dy_sliced:
        dy = torch.randn(batch, frames, out_f + 7, generator=gen).to(dy_dtype).to(device)[:, :, 3:3 + out_f]
    else:
        dy = torch.randn(batch, frames, out_f, generator=gen).to(dy_dtype).to(device)
    fisher_w = torch.rand(out_f, in_f, generator=gen).to(device)
    fisher_b = torch.rand(out_f, generator=gen).to(device) if bias else None
    lengths_t = torch.tensor(lengths, dtype=length_dtype, device=device) if lengths is not None else None
    want_w, want_b = linear_fisher_oracle(x, dy, fisher_w, fisher_b, lengths)
    ref_w = fisher_w.clone()
    ref_b = fisher_b.clone() if bias else None
    backend.linear_fisher_(x, dy, fisher_w, fisher_b, lengths_t)
    result.close("fisher_w vs fp64 per-sample autograd", fisher_w, want_w, FISHER_TOL[dtype])
    if bias:
        result.close("fisher_b vs fp64 per-sample autograd", fisher_b, want_b, FISHER_TOL[dtype])
    if not is_reference(backend):
        reference.linear_fisher_ref_(x, dy, ref_w, ref_b, lengths_t)
        result.close("fisher_w vs reference", fisher_w, ref_w, FISHER_TOL[dtype])
        if bias:
            result.close("fisher_b vs reference", fisher_b, ref_b, FISHER_TOL[dtype])
    return result


def linear_fisher_cases() -> list[OpCase]:
    cases = []
    for shape, tier in FISHER_SHAPES:
        batch, frames = shape[:2]
        for dtype in FLOAT_DTYPES:
            for bias in (True, False):
                for with_lengths in (False, True):
                    lengths = mixed_lengths(batch, frames) if with_lengths else None
                    name = (f"{'x'.join(map(str, shape))}-{_dt(dtype)}{'-bias' if bias else ''}"
                            f"{'-lengths' if with_lengths else ''}")
                    cases.append(OpCase("linear_fisher", name, dict(shape=shape, dtype=dtype, bias=bias, lengths=lengths,
                                                                    seed=sum(shape)), tier))
    # Zero, one, a prime, 2^5 + 1 and the full length, in both length dtypes.
    for dtype in FLOAT_DTYPES:
        for length_dtype in INDEX_DTYPES:
            cases.append(OpCase("linear_fisher", f"5x37x33x31-{_dt(dtype)}-bias-edge-lengths-{_dt(length_dtype)}",
                                dict(shape=(5, 37, 33, 31), dtype=dtype, bias=True, lengths=(0, 1, 17, 33, 37),
                                     length_dtype=length_dtype, seed=2)))
    cases += [
        OpCase("linear_fisher", "33x4x19x7-fp32-time-major-x-lengths",
               dict(shape=(33, 4, 19, 7), dtype=torch.float32, bias=False, lengths=(4, 2) * 16 + (1,),
                    x_layout="time-major", seed=4)),
        OpCase("linear_fisher", "3x19x31x33-fp32-feature-major-x-sliced-dy",
               dict(shape=(3, 19, 31, 33), dtype=torch.float32, bias=False, lengths=None,
                    x_layout="feature-major", dy_sliced=True, seed=3)),
        OpCase("linear_fisher", "3x19x31x33-fp32-x-bf16-dy-bias",
               dict(shape=(3, 19, 31, 33), dtype=torch.float32, dy_dtype=torch.bfloat16, bias=True, lengths=None,
                    x_layout="feature-major", seed=3)),
    ]
    return cases


# ---- SDDMM (sparse Linear weight gradient) ------------------------------------------------

# Relative to sum_n |dy[n, i]| |x[n, j]|. Against fp64 every backend sums exact 16-bit inputs in
# fp32; against dense autograd the 16-bit weight gradient was itself rounded to 8 (bf16) or 11
# (fp16) bits; against the reference, both fp32 sums may err in opposite directions.
SDDMM_EXACT_TOL = 1e-5
SDDMM_DENSE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SDDMM_REFERENCE_TOL = 2e-5
# (N frames, out, in): 1, primes, 2^k +- 1, no frames, wav2vec2-base's largest Linear over
# 8 x 4 s of frames.
SDDMM_SHAPES = [((1, 1, 1), TIER_ALL), ((5, 7, 13), TIER_ALL), ((33, 31, 65), TIER_ALL), ((2, 1, 4097), TIER_ALL),
                ((97, 257, 129), TIER_COMPILED), ((129, 3, 1023), TIER_ALL), ((199, 768, 3072), TIER_CUDA)]


def _dense_autograd_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight.grad of an ordinary nn.Linear whose output gradient is dy (x and dy as [B, T, *])."""
    weight = torch.zeros(dy.shape[1], x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    batch = 1 if x.shape[0] % 2 else 2  # exercise the [B, T, features] fold as well
    y = F.linear(x.reshape(batch, -1, x.shape[1]), weight)
    y.backward(dy.reshape(batch, -1, dy.shape[1]))
    return weight.grad if weight.grad is not None else torch.zeros_like(weight)


def check_sddmm(backend, device, *, rows, out_f, in_f, dtype, index_dtype, k, seed, strided=False) -> CaseResult:
    """The child entries of ``dy^T @ x`` against the fp64 product, dense autograd's gathered
    weight gradient and (backends other than the reference) the reference twin; then into
    ``out`` (returned) and accumulated onto it."""
    result = CaseResult()
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(rows, out_f, generator=gen).to(dtype).to(device)
    x = torch.randn(rows, in_f, generator=gen).to(dtype).to(device)
    idx = child_indices(out_f * in_f, k, index_dtype, seed + 1).to(device)
    child = idx.long()
    bound = (dy.double().abs().t() @ x.double().abs()).flatten()[child] + 1e-30
    exact = (dy.double().t() @ x.double()).flatten()[child]
    dense = _dense_autograd_grad(dy, x).flatten()[child]
    if strided:  # the same values in column-major storage
        dy, x = dy.t().contiguous().t(), x.t().contiguous().t()
    got = backend.sddmm(dy, x, idx)
    result.holds("fp32 result", got.dtype == torch.float32)
    result.close("vs fp64", got, exact, SDDMM_EXACT_TOL, bound)
    result.close("vs dense autograd", got, dense, SDDMM_DENSE_TOL[dtype], bound)
    if not is_reference(backend):
        result.close("vs reference", got, reference.sddmm_ref(dy, x, idx), SDDMM_REFERENCE_TOL, bound)
    out = torch.full((k,), 5.0, device=device)
    result.holds("out is returned", backend.sddmm(dy, x, idx, out=out) is out)
    result.close("into out vs fp64", out, exact, SDDMM_EXACT_TOL, bound)
    start = torch.randn(k, generator=gen).to(device)
    acc = start.clone()
    backend.sddmm(dy, x, idx, out=acc, accumulate=True)
    result.close("accumulated vs fp64", acc, start.double() + exact, SDDMM_EXACT_TOL, bound + start.double().abs())
    return result


def sddmm_cases() -> list[OpCase]:
    cases = []
    for (rows, out_f, in_f), tier in SDDMM_SHAPES:
        numel = out_f * in_f
        for density, k in (("one", 1), ("third", max(1, numel // 3)), ("all", numel)):
            for dtype in FLOAT_DTYPES:
                for index_dtype in INDEX_DTYPES:
                    name = f"{rows}x{out_f}x{in_f}-{density}-{_dt(dtype)}-{_dt(index_dtype)}"
                    cases.append(OpCase("sddmm", name, dict(rows=rows, out_f=out_f, in_f=in_f, dtype=dtype,
                                                            index_dtype=index_dtype, k=k,
                                                            seed=rows * 1000 + out_f + in_f), tier))
    edge = dict(out_f=31, in_f=13, dtype=torch.float32, seed=5)
    cases += [
        OpCase("sddmm", "17x31x13-k97-fp32-i32-strided", dict(edge, rows=17, index_dtype=torch.int32, k=97, strided=True)),
        OpCase("sddmm", "17x31x13-empty-indices-fp32-i64", dict(edge, rows=17, index_dtype=torch.int64, k=0)),
        # No frames: the gradient is zero, and an accumulator keeps its values.
        OpCase("sddmm", "0x31x13-k97-fp32-i32-no-frames", dict(edge, rows=0, index_dtype=torch.int32, k=97)),
    ]
    return cases


# ---- registry -----------------------------------------------------------------------------

CHECKS: dict[str, Callable[..., CaseResult]] = {
    "gather": check_gather, "sparse_adamw": check_sparse_adamw,
    "linear_fisher": check_linear_fisher, "sddmm": check_sddmm,
}
CASES: dict[str, list[OpCase]] = {
    "gather": gather_cases(), "sparse_adamw": sparse_adamw_cases(),
    "linear_fisher": linear_fisher_cases(), "sddmm": sddmm_cases(),
}
ALL_CASES: list[OpCase] = [case for op in OPS for case in CASES[op]]


def triton_interpreted() -> bool:
    """Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def skip_reason(case: OpCase, backend: str, device: str) -> str | None:
    """Why ``case`` does not run on ``backend`` and ``device`` here (None: it runs)."""
    if device == "cuda" and backend == "native":
        return "the native ops take CPU tensors only"
    if device == "cpu" and backend == "triton" and not triton_interpreted():
        return "triton on CPU tensors needs TRITON_INTERPRET=1"
    if case.tier == TIER_CUDA and device != "cuda":
        return "wav2vec2-base-sized: CUDA only (bench/gpu_check.py)"
    if case.tier == TIER_COMPILED and backend == "triton" and device == "cpu":
        return "too slow for the Triton interpreter; runs compiled on CUDA (bench/gpu_check.py)"
    return None


def run_case(case: OpCase, backend, device: torch.device | str) -> CaseResult:
    """Run ``case`` with ``backend`` (a :class:`adtuning.backend_contract.Backend`) on ``device``."""
    return CHECKS[case.op](backend, torch.device(device), **case.params)
