"""End-to-end: one training step of wav2vec2-base, full fine-tuning against CHILD-TUNING.

Model: ``Wav2Vec2Model(Wav2Vec2Config())`` with random weights (transformers defaults: 12
layers, 768 wide, 94.4M parameters), wrapped by :class:`adtuning.speech.Upstream` (CNN
feature encoder frozen, layerdrop 0, all hidden states), with the SUPERB KS head (weighted
sum of hidden states, ``Linear(768, 256)``, mean pooling, 12 classes). Input: random 16 kHz
waveforms with random labels. One step is forward, backward, optimizer step, zero_grad.

Configurations, each in its own fresh process (so that its peak memory is its own):

* ``full fp32`` — every trainable parameter (all but the CNN) with ``torch.optim.AdamW``
  (``fused=True``, the fastest torch implementation on both CPU and CUDA). The baseline.
* ``child P=... fp32`` — CHILD-TUNING at P = 0.001, 0.01, 0.1: a child network chosen by
  :meth:`ChildNetwork.from_scores` from random scores over ``upstream.default_scored_parameters()``
  (the encoder layers); :class:`SparseAdamW` over the upstream (tensors without child entries
  get ``requires_grad=False``; the hook gathers and frees dense gradients) plus a dense group
  for the head. Random scores spread the child over every tensor, so every weight gradient is
  still computed: the worst case for step time (a Fisher-chosen child leaves some tensors out).
* ``child P=... bf16`` — the same with the upstream weights in bf16 (frozen entries stay
  bf16; the optimizer keeps an fp32 master copy of the child entries only).
* ``child P=... <dtype> sparse-dW`` — the same with :func:`adtuning.install_sparse_weight_grad`
  in ``"auto"`` mode: Linear weights whose child density is below the backend's threshold get
  only their child entries of ``dW`` (SDDMM into the compact buffers) instead of the dense
  weight-gradient GEMM + gather. The rows without the suffix are the dense path.
* ``child P=... fp32 fisher[ sparse-dW]`` — the dense and sparse-dW paths with a child chosen
  by a real per-sample Fisher pass (:func:`e2e_workload.fisher_children`: the same weights,
  32 clips of the embedded KS corpus, nested children for every P from one ranking). Fisher
  children concentrate in some tensors and rows, so more tensors have no child at all (no
  weight gradient) and the densities of the rest are uneven: the workload of a real run.

Figures: median step time (pytest-benchmark, one warm-up step that also allocates the
optimizer state) and peak memory over the warm-up and the timed steps (see
``bench/memory.py``: CUDA max allocated; on CPU peak RSS minus the RSS after imports, reset
after the model is built). Both are reported as ratios to ``full fp32`` of the same session.
Targets: memory <= 0.5x at P=0.01 fp32 and <= 0.35x at P=0.01 bf16; time <= 0.8x at P=0.001
on the dense path, and with sparse weight gradients <= 0.70x at P=0.001 and <= 0.75x at
P=0.01 (random and Fisher children alike).

Size: ``ADTUNING_BENCH_E2E`` = ``full`` (8 x 4 s, the realistic batch; default on CUDA) or
``cpu`` (2 x 1 s, default on CPU: a step of the full size takes minutes on two cores, and the
whole CPU suite must fit in ~15 minutes); or
``key=value,...`` overrides of ``layers, batch, seconds, rounds, backend, device``.
Activations shrink with the batch while weights and optimizer state do not, so memory ratios
at the CPU size are *lower* (better) than at the realistic size; the README says which size
each table used.

A worker can be run by hand: ``python bench/bench_e2e.py --worker '{"kind": "full"}'``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_workload  # noqa: E402  (bench/e2e_workload.py)
import memory as bench_memory  # noqa: E402  (bench/memory.py)
from sizes import size_settings  # noqa: E402  (bench/sizes.py)

GROUP = "e2e wav2vec2-base train step"
FRACTIONS = (0.001, 0.01, 0.1)
SIZES = {
    "full": dict(layers=12, batch=8, seconds=4.0, rounds=5),
    "cpu": dict(layers=12, batch=2, seconds=1.0, rounds=3),
}
TARGETS = {  # (config name, figure) -> largest acceptable ratio to full fine-tuning
    ("child P=0.01 fp32", "memory"): 0.5,
    ("child P=0.01 bf16", "memory"): 0.35,
    ("child P=0.001 fp32", "time"): 0.8,
    ("child P=0.001 fp32 sparse-dW", "time"): 0.7,
    ("child P=0.01 fp32 sparse-dW", "time"): 0.75,
    ("child P=0.001 fp32 fisher sparse-dW", "time"): 0.7,
    ("child P=0.01 fp32 fisher sparse-dW", "time"): 0.75,
}
SPARSE_DW_FRACTIONS = (0.001, 0.01)  # P=0.1 is above every backend's threshold: same as dense
FISHER_SAMPLES = 32
BASELINE = "full fp32"


def settings() -> dict:
    """The size and options of this session (see the module docstring)."""
    return size_settings("ADTUNING_BENCH_E2E", SIZES, backend="fused")


def configurations() -> list[dict]:
    """Full fine-tuning first (the baseline), then CHILD-TUNING for each P and weight dtype."""
    configs = [dict(name=BASELINE, kind="full", dtype="fp32")]
    for dtype in ("fp32", "bf16"):
        for p in FRACTIONS:
            configs.append(dict(name=f"child P={p} {dtype}", kind="child", p=p, dtype=dtype, weight_grad="dense"))
    for dtype in ("fp32", "bf16"):
        for p in SPARSE_DW_FRACTIONS:
            configs.append(dict(name=f"child P={p} {dtype} sparse-dW", kind="child", p=p, dtype=dtype,
                                weight_grad="auto"))
    for weight_grad, suffix in (("dense", ""), ("auto", " sparse-dW")):
        for p in SPARSE_DW_FRACTIONS:
            configs.append(dict(name=f"child P={p} fp32 fisher{suffix}", kind="child", p=p, dtype="fp32",
                                weight_grad=weight_grad, children="fisher"))
    return configs


# ------------------------------------------------------------------------------ the worker


def _build(config: dict):
    """Model, batch and optimizer of one configuration (runs inside the worker)."""
    return e2e_workload.build(config)


def _worker(config: dict) -> None:
    torch.set_num_threads(int(config.get("threads") or torch.get_num_threads()))
    # Everything imported or loaded before the baseline reading counts as runtime, not as
    # memory of the configuration: transformers' wav2vec2 modelling module (lazily imported,
    # ~200 MB of RSS) and the compiled ops of the backend.
    from transformers import Wav2Vec2Config, Wav2Vec2Model  # noqa: F401

    import adtuning.speech  # noqa: F401
    from adtuning import BackendUnavailableError, get_backend

    try:
        get_backend(config["backend"], config["device"])
    except BackendUnavailableError:
        pass  # _build records the fallback

    device = torch.device(config["device"])
    bench_memory.release_free_memory()
    runtime_rss = bench_memory.rss_bytes()
    model, batch, optimizer, info = _build(config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    region = bench_memory.PeakMemory(device, in_process=False).__enter__()
    steps = []

    def step() -> None:
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def handle(request: dict) -> dict:
        if request["cmd"] == "step":
            start = time.perf_counter()
            step()
            steps.append(time.perf_counter() - start)
            return {"seconds": steps[-1]}
        if request["cmd"] == "report":
            region.__exit__(None, None, None)
            peak = region.result
            if device.type == "cuda":
                total = peak.peak  # live tensor bytes, weights included
            else:
                total = peak.peak - runtime_rss  # everything above the bare runtime
            report = dict(info, steps=len(steps), step_seconds=steps, peak_bytes=total,
                          resident_before_steps=peak.start - (0 if device.type == "cuda" else runtime_rss),
                          runtime_rss=runtime_rss if device.type != "cuda" else None,
                          memory_method=peak.method, reset_ok=not peak.approximate)
            if hasattr(optimizer, "memory_report"):
                report["optimizer_memory"] = optimizer.memory_report()
            else:
                report["optimizer_memory"] = {"state_bytes": sum(
                    t.numel() * t.element_size() for s in optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))}
            return report
        raise ValueError(f"unknown request {request}")

    bench_memory.serve(handle, ready=info)


# --------------------------------------------------------------------------- the benchmark

_RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def e2e_settings() -> dict:
    return settings()


@pytest.fixture(scope="module")
def fisher_child_paths(e2e_settings, tmp_path_factory) -> dict[float, str]:
    """Fisher-chosen children of the benchmark model for every sparse-dW P (computed once)."""
    s = e2e_settings
    config = {k: s[k] for k in ("layers", "device", "backend")}
    try:
        return e2e_workload.fisher_children(config, SPARSE_DW_FRACTIONS, tmp_path_factory.mktemp("fisher"),
                                            samples=FISHER_SAMPLES)
    except Exception as exc:  # e.g. espeak-ng missing: the random-children rows still run
        pytest.skip(f"no Fisher children: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("config", configurations(), ids=lambda c: c["name"].replace(" ", "-"))
def test_train_step(benchmark, measure, ratios, e2e_settings, request, config):
    """Median step time and peak memory of one configuration, in a fresh process."""
    s = e2e_settings
    if config["name"] != BASELINE and BASELINE not in _RESULTS:
        pytest.skip("the full fine-tuning baseline did not run in this session; no ratio possible")
    worker_config = dict(config, **{k: s[k] for k in ("layers", "batch", "seconds", "device", "backend")},
                         threads=torch.get_num_threads())
    if config.get("children") == "fisher":
        worker_config["child_path"] = request.getfixturevalue("fisher_child_paths")[config["p"]]
    load_before = os.getloadavg()[0]
    with bench_memory.Worker(__file__, worker_config) as worker:
        info = worker.ready
        measure(GROUP, config["name"], lambda: worker.call({"cmd": "step"}), rounds=s["rounds"],
                size=s["size"], layers=s["layers"], batch=s["batch"], seconds_of_audio=s["seconds"],
                **{k: v for k, v in info.items() if not isinstance(v, dict)})
        report = worker.call({"cmd": "report"})
    # The worker's own clock, without the pipe round trip (warm-up step excluded).
    own_median = statistics.median(report["step_seconds"][1:]) if len(report["step_seconds"]) > 1 else None
    result = dict(report, name=config["name"], median_step_s=own_median, size=s["size"])
    _RESULTS[config["name"]] = result
    extra = dict(peak_bytes=report["peak_bytes"], worker_median_step_s=own_median,
                 loadavg_1min_before_after=[load_before, os.getloadavg()[0]],
                 memory_method=report["memory_method"],
                 optimizer_state_bytes=report["optimizer_memory"].get("state_bytes"))
    base = _RESULTS.get(BASELINE)
    if base is not None and config["name"] != BASELINE:
        extra["memory_ratio_to_full"] = report["peak_bytes"] / base["peak_bytes"]
        if own_median and base["median_step_s"]:
            extra["time_ratio_to_full"] = own_median / base["median_step_s"]
        for figure in ("memory", "time"):
            target = TARGETS.get((config["name"], figure))
            if target is not None and f"{figure}_ratio_to_full" in extra:
                extra[f"{figure}_target"] = target
                extra[f"{figure}_target_met"] = extra[f"{figure}_ratio_to_full"] <= target
        ratios.want(f"e2e step {config['name']} vs {BASELINE}", GROUP, BASELINE, config["name"])
        ratios.note(f"e2e peak memory {config['name']} / {BASELINE}",
                    f"{extra['memory_ratio_to_full']:.3f}x ({bench_memory.mib(report['peak_bytes'])} vs "
                    f"{bench_memory.mib(base['peak_bytes'])})")
    else:
        ratios.note(f"e2e peak memory {BASELINE} ({s['size']}: {s['batch']} x {s['seconds']} s, "
                    f"{s['layers']} layers)", bench_memory.mib(report["peak_bytes"]))
    result.update(extra)
    benchmark.extra_info.update(extra)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        print(__doc__)
