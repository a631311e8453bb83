"""One sparse AdamW step over a child network of wav2vec2-base, against dense AdamW.

The parameter set is every wav2vec2-base tensor (94,370,944 fp32 entries, see
``conftest.wav2vec2_base_shapes``). A child network keeps round(P * numel) random entries
of each tensor (int32 indices) for P = 0.001, 0.01 and 0.1, with compact fp32 gradients and
moments. One optimizer step is timed for

* ``torch fused dense`` / ``torch foreach dense``: ``torch.optim.AdamW(fused=True)`` and
  ``(foreach=True)`` stepping all dense parameters (the baselines; they do not depend on P);
* ``reference P=..`` / ``native P=..``: the sparse step of those backends, tensor by tensor
  (one ``sparse_adamw_`` call per tensor, 210 calls);
* ``native multi P=..``: the same step as one ``sparse_adamw_multi_`` call over all tensors
  (what ``SparseAdamW.step`` does for a parameter group): one dispatcher call, one parallel
  region, a warm prefetch pipeline at the start of each tensor; against the fused dense step
  and against ``native P=..`` (the per-call costs it saves);
* ``native gather (scattered reads only) P=..``: the native ``gather`` op reading the same
  child entries of the parameters into compact buffers, tensor by tensor: the scattered-read
  floor of the update, which must also write those lines back (``native multi`` against it:
  the share of the floor reached, below 1);
* ``triton P=..``, ``triton multi P=..`` and ``torch fused dense`` on CUDA, when there is a
  CUDA device.

Targets at P = 0.01 on CPU: native >= 5x faster than the fused dense step and >= 3x faster
than the reference. Optimizer-state bytes (compact 2 * k * 4 + indices k * 4, against dense
2 * N * 4) are reported next to the times.
"""
from __future__ import annotations

import pytest
import torch

from adtuning.backends import BackendUnavailableError, get_backend

FRACTIONS = (0.001, 0.01, 0.1)
HYPER = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
STEP = 10  # any step past the first: the bias corrections are then ordinary constants


def _group(device: str) -> str:
    return f"sparse_adamw wav2vec2-base {device}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _on(tensors, device: str) -> list[torch.Tensor]:
    return [t.to(device) for t in tensors]


def _backend(name: str, device: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device; the GPU figures come from bench/gpu_check.py")
    try:
        return get_backend(name, device)
    except BackendUnavailableError as exc:
        pytest.skip(f"backend {name!r} unavailable: {exc}")


@pytest.mark.parametrize(
    "device,flavour", [("cpu", "fused"), ("cpu", "foreach"), ("cuda", "fused")],
    ids=["cpu-fused", "cpu-foreach", "cuda-fused"],
)
def test_dense_adamw(measure, ratios, w2v2_params, w2v2_grads, device, flavour):
    """torch.optim.AdamW stepping every dense parameter: the baseline."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device; the GPU figures come from bench/gpu_check.py")
    params = [torch.nn.Parameter(p) for p in _on(w2v2_params, device)]
    for p, g in zip(params, _on(w2v2_grads, device)):
        p.grad = g
    opt = torch.optim.AdamW(
        params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"], **{flavour: True},
    )
    numel = sum(p.numel() for p in params)

    def step():
        opt.step()
        _sync(device)

    measure(_group(device), f"torch {flavour} dense", step, rounds=3,
            numel=numel, state_bytes=2 * numel * 4)
    ratios.note(f"dense AdamW state ({numel:,} entries)", f"{2 * numel * 4 / 2**20:,.1f} MiB")


@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda p: f"P={p}")
@pytest.mark.parametrize(
    "backend,device", [("reference", "cpu"), ("native", "cpu"), ("triton", "cuda")],
    ids=["reference", "native", "triton"],
)
def test_sparse_adamw(measure, ratios, w2v2_params, child_indices, fraction, backend, device):
    """One sparse AdamW step of a backend over the child network at P = ``fraction``."""
    impl = _backend(backend, device)
    gen = torch.Generator().manual_seed(2)
    indices = _on(child_indices(fraction), device)
    # Own copies of the parameters: the steps must not disturb the dense baselines' inputs.
    params = _on(w2v2_params, device) if device == "cuda" else [p.clone() for p in w2v2_params]
    grads = _on([torch.randn(i.numel(), generator=gen) for i in indices], device)
    moments = [(torch.zeros_like(g), torch.rand_like(g)) for g in grads]
    k = sum(i.numel() for i in indices)

    def step():
        for p, g, i, (m, v) in zip(params, grads, indices, moments):
            impl.sparse_adamw_(p, g, i, m, v, None, step=STEP, **HYPER)
        _sync(device)

    name = f"{backend} P={fraction}"
    measure(_group(device), name, step, rounds=5 if fraction < 0.1 else 3,
            fraction=fraction, k=k, state_bytes=2 * k * 4, index_bytes=k * 4)
    ratios.note(f"compact state at P={fraction} (k={k:,})",
                f"{2 * k * 4 / 2**20:,.2f} MiB moments + {k * 4 / 2**20:,.2f} MiB indices")
    dense = "torch fused dense"
    ratios.want(f"{name} vs {dense} ({device})", _group(device), dense, name)
    if backend != "reference":
        ratios.want(f"{name} vs reference P={fraction}", _group(device),
                    f"reference P={fraction}", name)
    if device == "cpu":
        ratios.want(f"{name} vs torch foreach dense", _group(device),
                    "torch foreach dense", name)


@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda p: f"P={p}")
@pytest.mark.parametrize("backend,device", [("native", "cpu"), ("triton", "cuda")], ids=["native", "triton"])
def test_sparse_adamw_multi(measure, ratios, w2v2_params, child_indices, fraction, backend, device):
    """The same sparse step as one ``sparse_adamw_multi_`` call over all tensors."""
    impl = _backend(backend, device)
    gen = torch.Generator().manual_seed(2)
    indices = list(_on(child_indices(fraction), device))
    params = _on(w2v2_params, device) if device == "cuda" else [p.clone() for p in w2v2_params]
    grads = _on([torch.randn(i.numel(), generator=gen) for i in indices], device)
    exp_avgs = [torch.zeros_like(g) for g in grads]
    exp_avg_sqs = [torch.rand_like(g) for g in grads]
    masters: list[torch.Tensor | None] = [None] * len(params)
    steps = [float(STEP)] * len(params)
    k = sum(i.numel() for i in indices)

    def step():
        impl.sparse_adamw_multi_(params, grads, indices, exp_avgs, exp_avg_sqs, masters, steps, **HYPER)
        _sync(device)

    name = f"{backend} multi P={fraction}"
    measure(_group(device), name, step, rounds=5 if fraction < 0.1 else 3,
            fraction=fraction, k=k, tensors=len(params), state_bytes=2 * k * 4, index_bytes=k * 4)
    dense = "torch fused dense"
    ratios.want(f"{name} vs {dense} ({device})", _group(device), dense, name)
    ratios.want(f"{name} vs {backend} P={fraction} (one call per tensor)", _group(device),
                f"{backend} P={fraction}", name)


@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda p: f"P={p}")
def test_native_gather_floor(measure, ratios, w2v2_params, child_indices, fraction):
    """The native gather reading the child entries of every parameter: the scattered-read floor."""
    impl = _backend("native", "cpu")
    indices = child_indices(fraction)
    outs = [torch.empty(i.numel()) for i in indices]

    def read_all():
        for p, i, o in zip(w2v2_params, indices, outs):
            impl.gather(p, i, out=o)

    name = f"native gather (scattered reads only) P={fraction}"
    measure(_group("cpu"), name, read_all, rounds=5 if fraction < 0.1 else 3,
            fraction=fraction, k=sum(i.numel() for i in indices))
    multi = f"native multi P={fraction}"
    ratios.want(f"{multi} vs its scattered-read floor", _group("cpu"), name, multi)
    ratios.note(f"{multi} vs its scattered-read floor",
                "time(gather) / time(multi): the share of the read-only floor that the update "
                "reaches (below 1: the update also writes the lines back; the gather row makes "
                "one call per tensor, so it carries their per-call costs too)")
