"""Sparse weight gradient (SDDMM) against dense GEMM + gather, per wav2vec2-base Linear shape.

What one backward does for a trained Linear of wav2vec2-base (768x768 attention projections,
3072x768 and 768x3072 feed-forward layers) with a child of density P:

* baseline (the dense path): the weight-gradient GEMM ``dy^T @ x`` that autograd runs, then
  the backend's gather of the child entries into the compact buffer;
* candidate (the sparse path): the backend's ``sddmm`` straight into the compact buffer.

Both in the same session, on random fp32 and bf16 activations (the latter: bf16 frozen
weights) with N = batch x frames rows and random sorted int32 child indices, for P from 0.001
to 0.3. The density where the SDDMM stops beating the baseline sets the backend's and dtype's
entry of ``adtuning.sparse_grad.DENSITY_THRESHOLDS``; the module's ``crossover`` fixture
prints the crossover this session measured for each shape.

Size: ``ADTUNING_BENCH_SDDMM`` = ``cpu`` (2 x 1 s: 98 rows, default on CPU) or ``full`` (8 x 4 s:
1592 rows, default on CUDA), or ``key=value`` overrides of ``rows, rounds``. On CPU the
backends are reference and native; on CUDA reference and triton (interpreted Triton timings
mean nothing).
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

from adtuning.backends import BackendUnavailableError, get_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sizes import size_settings  # noqa: E402  (bench/sizes.py)

SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # (out, in) of wav2vec2-base's Linears
FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.3)
SIZES = {
    "cpu": dict(rows=98, rounds=5),  # 2 utterances x 49 frames (1 s at 20 ms hops)
    "full": dict(rows=1592, rounds=10),  # 8 utterances x 199 frames (4 s)
    "tiny": dict(rows=17, rounds=2),  # a smoke run of the file itself
}


def _settings() -> dict:
    return size_settings("ADTUNING_BENCH_SDDMM", SIZES)


def _backends(device: str) -> list[str]:
    return ["reference", "triton"] if device == "cuda" else ["reference", "native"]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _group(out_f: int, in_f: int, dtype: str, s: dict) -> str:
    return f"sddmm {out_f}x{in_f} {dtype} N={s['rows']} {s['device']}"


def _impl(name: str, device: str):
    try:
        return get_backend(name, device)
    except BackendUnavailableError as exc:
        pytest.skip(f"backend {name!r} unavailable: {exc}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def settings() -> dict:
    return _settings()


def _operands(out_f: int, in_f: int, rows: int, dtype: str, device: str):
    gen = torch.Generator().manual_seed(out_f * 7 + in_f)
    dy = torch.randn(rows, out_f, generator=gen).to(DTYPES[dtype]).to(device)
    x = torch.randn(rows, in_f, generator=gen).to(DTYPES[dtype]).to(device)
    return dy, x


def _child(numel: int, fraction: float, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(fraction * 1e6) + numel)
    k = max(1, round(fraction * numel))
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(torch.int32).to(device)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_gemm_then_gather(measure, settings, shape, backend, dtype):
    """The dense path: autograd's weight-gradient GEMM, then the backend's gather (P = 0.01)."""
    s = settings
    if backend not in _backends(s["device"]):
        pytest.skip(f"{backend} is not timed on {s['device']}")
    if backend == "reference" and dtype != "fp32":
        pytest.skip("the reference is timed on fp32 only")
    impl = _impl(backend, s["device"])
    out_f, in_f = shape
    dy, x = _operands(out_f, in_f, s["rows"], dtype, s["device"])
    idx = _child(out_f * in_f, 0.01, s["device"])
    buffer = torch.zeros(idx.numel(), device=s["device"])

    def dense():
        impl.gather(dy.t() @ x, idx, out=buffer, accumulate=True)
        _sync(s["device"])

    measure(_group(out_f, in_f, dtype, s), f"dense gemm+gather {backend}", dense, rounds=s["rounds"],
            rows=s["rows"], out_features=out_f, in_features=in_f, dtype=dtype, size=s["size"])


@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda p: f"P={p}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sddmm(measure, ratios, settings, shape, backend, dtype, fraction):
    """The sparse path: the backend's SDDMM of the child entries into the compact buffer."""
    s = settings
    if backend not in _backends(s["device"]):
        pytest.skip(f"{backend} is not timed on {s['device']}")
    if backend == "reference" and dtype != "fp32":
        pytest.skip("the reference is timed on fp32 only")
    impl = _impl(backend, s["device"])
    out_f, in_f = shape
    dy, x = _operands(out_f, in_f, s["rows"], dtype, s["device"])
    idx = _child(out_f * in_f, fraction, s["device"])
    buffer = torch.zeros(idx.numel(), device=s["device"])

    def sparse():
        impl.sddmm(dy, x, idx, out=buffer, accumulate=True)
        _sync(s["device"])

    group = _group(out_f, in_f, dtype, s)
    name = f"sddmm {backend} P={fraction}"
    measure(group, name, sparse, rounds=s["rounds"], rows=s["rows"], out_features=out_f,
            in_features=in_f, dtype=dtype, fraction=fraction, k=idx.numel(), size=s["size"])
    ratios.want(f"{out_f}x{in_f} {dtype} {name} vs dense gemm+gather", group, f"dense gemm+gather {backend}", name)


@pytest.fixture(scope="module", autouse=True)
def crossover(ratios, settings):
    """After the module: per backend and shape, the largest timed P at which the SDDMM was
    still faster than dense GEMM + gather in this session (the threshold of ``"auto"``)."""
    yield
    s = settings
    for backend in _backends(s["device"]):
        for (out_f, in_f), dtype in itertools.product(SHAPES, DTYPES):
            group = _group(out_f, in_f, dtype, s)
            base = ratios.times.get((group, f"dense gemm+gather {backend}"))
            if base is None:
                continue
            faster = [p for p in FRACTIONS
                      if ratios.times.get((group, f"sddmm {backend} P={p}"), float("inf")) <= base]
            label = f"sddmm crossover {backend} {out_f}x{in_f} {dtype} N={s['rows']}"
            ratios.note(label, f"faster up to P={max(faster)}" if faster else "never faster")
