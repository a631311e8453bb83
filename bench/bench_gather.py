"""Gradient gather at a child network of wav2vec2-base, native against reference.

What the per-parameter hook does once per backward: read the dense gradient of every
wav2vec2-base tensor (94,370,944 entries, fp32 or bf16) at the child indices
(round(P * numel) random int32 indices per tensor, P = 0.001, 0.01, 0.1) into preallocated
compact fp32 buffers, accumulating as with gradient accumulation. The baseline is the
reference backend (``index_select`` + cast + add) measured in the same session; the dense
``torch.Tensor.clone`` of all gradients is timed as the memory-traffic yardstick.
"""
from __future__ import annotations

import pytest
import torch

from adtuning.backends import BackendUnavailableError, get_backend

FRACTIONS = (0.001, 0.01, 0.1)
GROUP = "gather wav2vec2-base cpu"


def _backend(name: str):
    try:
        return get_backend(name, "cpu")
    except BackendUnavailableError as exc:
        pytest.skip(f"backend {name!r} unavailable: {exc}")


def test_dense_grad_clone(measure, w2v2_grads):
    """Copy of every dense gradient: one read and one write of all 94M entries."""

    def copy_all():
        for g in w2v2_grads:
            g.clone()

    measure(GROUP, "dense clone", copy_all, rounds=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda p: f"P={p}")
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_gather(measure, ratios, w2v2_grads, child_indices, backend, fraction, dtype):
    """Accumulating gather of all gradients at the child indices."""
    if dtype != torch.float32 and fraction != 0.01:
        pytest.skip("bf16 gradients are timed at P=0.01 only")
    impl = _backend(backend)
    grads = w2v2_grads if dtype == torch.float32 else [g.to(dtype) for g in w2v2_grads]
    indices = child_indices(fraction)
    outs = [torch.zeros(i.numel()) for i in indices]

    def gather_all():
        for g, i, o in zip(grads, indices, outs):
            impl.gather(g, i, out=o, accumulate=True)

    name = f"{backend} P={fraction} {dtype}".replace("torch.", "")
    measure(GROUP, name, gather_all, rounds=5, fraction=fraction, dtype=str(dtype),
            k=sum(i.numel() for i in indices))
    if backend == "native":
        ratios.want(f"gather {name} vs reference", GROUP, name.replace("native", "reference"),
                    name)
