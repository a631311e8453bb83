"""Per-sample Fisher pass (paper eq. 6) against a plain forward + backward.

Model: wav2vec2 with the ``Wav2Vec2Config()`` widths (768 / 3072, 12 heads), random weights,
KS head; scored parameters: the transformer encoder layers (``default_scored_parameters``).
Input: random 16 kHz audio with random labels. Timed, in the same session, one batch each:

* ``plain fwd+bwd``: ``per_sample_nll(batch).sum().backward()`` with only the scored
  parameters requiring grad — the cost of an ordinary training backward (the baseline);
* ``reference loop``: :func:`estimate_fisher` with ``backend="reference"`` — one
  ``autograd.grad`` per sample (the oracle);
* ``reference in-backward``: the in-backward algorithm running the reference kernels;
* ``native``: the in-backward algorithm with the C++ kernels (CPU);
* ``triton``: the in-backward algorithm with the Triton kernels (CUDA only).

Size: ``ADTUNING_BENCH_FISHER`` = ``cpu`` (2 layers, 4 x 1 s; default on CPU) or ``full``
(12 layers, 8 x 4 s; default on CUDA), or ``key=value,...`` overrides of ``layers, batch,
seconds, rounds``. Next to each time: peak-memory growth during one call (``bench/memory.py``;
CUDA max allocated, or in-process peak RSS growth on CPU, approximate). Target (issue):
in-backward Fisher <= 1.3x the time and <= 1.1x the memory of the plain forward + backward
(checked on CUDA by ``bench/gpu_check.py``).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from adtuning import BackendUnavailableError, estimate_fisher, get_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory as bench_memory  # noqa: E402  (bench/memory.py)
from sizes import size_settings  # noqa: E402  (bench/sizes.py)

SIZES = {"cpu": dict(layers=2, batch=4, seconds=1.0, rounds=3), "full": dict(layers=12, batch=8, seconds=4.0, rounds=5)}
BASELINE = "plain fwd+bwd"


def settings() -> dict:
    return size_settings("ADTUNING_BENCH_FISHER", SIZES, overridable=SIZES["cpu"])


@pytest.fixture(scope="module")
def workload():
    """(model, batch, settings): the model in eval mode, as during a Fisher pass."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from adtuning.speech import SpeechModel, build_task
    from adtuning.speech.upstream import Upstream

    s = settings()
    torch.manual_seed(0)
    upstream = Upstream(Wav2Vec2Model(Wav2Vec2Config(num_hidden_layers=s["layers"])))
    task = build_task("ks", upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers)
    model = SpeechModel(upstream, task).to(s["device"]).eval()
    gen = torch.Generator().manual_seed(1)
    samples = int(s["seconds"] * 16000)
    batch = {
        "wav": torch.randn(s["batch"], samples, generator=gen),
        "wav_lengths": torch.full((s["batch"],), samples, dtype=torch.long),
        "label": torch.randint(0, 12, (s["batch"],), generator=gen),
    }
    return model, batch, s


def _group(s: dict) -> str:
    return f"fisher wav2vec2 {s['layers']} layers {s['batch']}x{s['seconds']:g}s {s['device']}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _scored(model) -> list[str]:
    return [f"upstream.{n}" for n in model.upstream.default_scored_parameters()]


IMPLS = [
    (BASELINE, None, None),
    ("reference loop", "reference", "loop"),
    ("reference in-backward", "reference", "in-backward"),
    ("native", "native", "in-backward"),
    ("triton", "triton", "in-backward"),
]


@pytest.mark.parametrize("name,backend,algorithm", IMPLS, ids=[i[0].replace(" ", "-") for i in IMPLS])
def test_fisher(benchmark, measure, ratios, workload, name, backend, algorithm):
    """One batch through one implementation."""
    model, batch, s = workload
    device = s["device"]
    if backend == "triton" and device != "cuda":
        pytest.skip("triton is benchmarked on CUDA only (interpreted timings mean nothing)")
    if backend == "native" and device == "cuda":
        pytest.skip("native is the CPU backend")
    if backend is not None:
        try:
            get_backend(backend, device)
        except BackendUnavailableError as exc:
            pytest.skip(f"backend {backend!r} unavailable: {exc}")
    scored = _scored(model)
    named = dict(model.named_parameters())

    if backend is None:
        saved = {n: p.requires_grad for n, p in named.items()}
        wanted = set(scored)

        def run():
            for n, p in named.items():
                p.requires_grad_(n in wanted)
            model.per_sample_nll(batch).sum().backward()
            for n in scored:
                named[n].grad = None
            _sync(device)
    else:
        def run():
            estimate_fisher(model, [batch], lambda m, b, fisher_pass: m.per_sample_nll(b, fisher_pass.note_sample_lengths),
                            params=scored,
                            backend=backend, algorithm=algorithm, progress=False)
            _sync(device)

    _, peak = bench_memory.measure_peak(run, device)
    measure(_group(s), name, run, rounds=s["rounds"], size=s["size"], layers=s["layers"],
            batch=s["batch"], seconds_of_audio=s["seconds"],
            scored_entries=sum(named[n].numel() for n in scored),
            peak_growth_bytes=peak.growth, memory_approximate=peak.approximate, memory_method=peak.method)
    ratios.note(f"fisher {name}: peak memory growth", bench_memory.mib(peak.growth))
    if backend is None:
        for n, flag in saved.items():
            named[n].requires_grad_(flag)
    else:
        ratios.want(f"fisher {name} vs {BASELINE}", _group(s), BASELINE, name)
