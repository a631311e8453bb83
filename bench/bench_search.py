"""AD-TUNING search cost: the search over P = 0.001, 0.01, 0.1 against three separate runs.

Workload: a KS-style utterance classification on random 16 kHz audio with random labels,
wav2vec2 with the ``Wav2Vec2Config()`` widths (random weights) and the SUPERB KS head.
Children come from random scores over the encoder layers (:meth:`ChildNetwork.nested`).

* ``search``: :class:`adtuning.search.AdaptiveSearch` with the paper's plan — every
  candidate to ``r * T`` steps, dev evaluation, the best one continues to ``T`` — on ONE
  model copy (candidates swapped in and out as sparse deltas);
* ``single P=..``: a plain CHILD-TUNING run of one candidate for ``T`` steps (SparseAdamW +
  the same T-step schedule, a dev evaluation at the end), no search bookkeeping: the strictest
  baseline for memory.

Each runs in a fresh process (``bench/memory.py``): wall time and optimizer steps of the run,
and its peak memory (CUDA max allocated; on CPU peak RSS above the bare runtime, high-water
mark reset after the model is built, so weights count and model building does not).
Reported: steps and wall time of the search / the three singles together, and peak memory of
the search / the largest single candidate (target <= 1.05x).

Size: ``ADTUNING_BENCH_SEARCH`` = ``cpu`` (2 layers, batch 2 x 1 s, T = 10, r = 0.2; default on
CPU) or ``full`` (12 layers, 8 x 4 s, T = 50; default on CUDA), or ``key=value,...`` overrides
of ``layers, batch, seconds, total_steps, rung``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory as bench_memory  # noqa: E402  (bench/memory.py)
from sizes import size_settings  # noqa: E402  (bench/sizes.py)

GROUP = "ad-tuning search cost"
FRACTIONS = (0.001, 0.01, 0.1)
SIZES = {
    "cpu": dict(layers=2, batch=2, seconds=1.0, total_steps=10, rung=0.2),
    "full": dict(layers=12, batch=8, seconds=4.0, total_steps=50, rung=0.2),
}
MEMORY_TARGET = 1.05


def settings() -> dict:
    return size_settings("ADTUNING_BENCH_SEARCH", SIZES, backend="fused")


# ------------------------------------------------------------------------------ the worker


class SyntheticKS:
    """A :class:`adtuning.search.TrainingProblem` on random audio (see the module docstring)."""

    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, s: dict):
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        from adtuning.speech import SpeechModel, build_task
        from adtuning.speech.upstream import Upstream

        self.device = torch.device(s["device"])
        torch.manual_seed(0)
        upstream = Upstream(Wav2Vec2Model(Wav2Vec2Config(num_hidden_layers=s["layers"])))
        task = build_task("ks", upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers)
        self.model = SpeechModel(upstream, task).to(self.device)
        self.upstream_params = dict(self.model.upstream.named_parameters())
        self.head_params = dict(self.model.task.named_parameters())
        gen = torch.Generator().manual_seed(1)
        samples = int(s["seconds"] * 16000)
        self.batch_size = s["batch"]
        self.train_wav = torch.randn(4 * s["batch"], samples, generator=gen)
        self.train_label = torch.randint(0, 12, (4 * s["batch"],), generator=gen)
        self.dev = [self._batch(torch.randn(s["batch"], samples, generator=gen),
                                torch.randint(0, 12, (s["batch"],), generator=gen)) for _ in range(2)]

    def _batch(self, wav, label):
        return {"wav": wav, "wav_lengths": torch.full((wav.shape[0],), wav.shape[1], dtype=torch.long), "label": label}

    def train_batches(self, epoch, skip):
        order = torch.randperm(len(self.train_wav), generator=torch.Generator().manual_seed(1000 + epoch))
        for i in range(skip * self.batch_size, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self._batch(self.train_wav[idx], self.train_label[idx])

    def loss(self, batch):
        return self.model.loss(batch)

    def evaluate(self, split):
        return self.model.evaluate(self.dev, progress=False)

    def has_split(self, split):
        return split == "dev"


def _worker(config: dict) -> None:
    torch.set_num_threads(int(config.get("threads") or torch.get_num_threads()))
    from transformers import Wav2Vec2Config, Wav2Vec2Model  # noqa: F401  (runtime, see bench_e2e)

    import adtuning.speech  # noqa: F401
    from adtuning import BackendUnavailableError, ChildNetwork, SparseAdamW, get_backend
    from adtuning.optim import get_linear_schedule_with_warmup
    from adtuning.search import AdaptiveSearch, SearchConfig

    backend = config["backend"]
    note = None
    try:
        get_backend(backend, config["device"])
    except BackendUnavailableError as exc:
        note = f"{backend} unavailable ({str(exc).splitlines()[0]}); used reference"
        backend = "reference"
    device = torch.device(config["device"])
    bench_memory.release_free_memory()
    runtime_rss = bench_memory.rss_bytes()

    problem = SyntheticKS(config)
    gen = torch.Generator().manual_seed(2)
    scored = problem.model.upstream.default_scored_parameters()
    scores = {n: torch.rand(problem.upstream_params[n].shape, generator=gen) for n in scored}
    children = ChildNetwork.nested(scores, FRACTIONS)
    del scores
    T = config["total_steps"]
    search_config = SearchConfig(total_steps=T, rungs=(config["rung"],), keep=(1,), lr=1e-4, head_lr=1e-3,
                                 warmup_steps=max(1, T // 10), backend=backend)
    info = {"backend": backend, "backend_note": note, "k": [c.k for c in children], "scored_entries": children[0].n}

    def run_search() -> dict:
        search = AdaptiveSearch(problem, children, search_config, progress=False)
        best = search.run()
        return {"steps": search.steps_spent(), "steps_exhaustive": search.steps_exhaustive(),
                "chosen_p": best.p, "metric": best.rung_metrics[len(search_config.rungs)][problem.primary_metric],
                "swap_seconds": search.swap_seconds, "eval_seconds": search.eval_seconds}

    def run_single(index: int) -> dict:
        child = children[index]
        opt = SparseAdamW(
            [{"named_params": problem.upstream_params, "child": child, "lr": search_config.lr, "weight_decay": 0.0},
             {"params": list(problem.head_params.values()), "lr": search_config.head_lr, "weight_decay": 0.0}],
            lr=search_config.lr, backend=backend,
        )
        sched = get_linear_schedule_with_warmup(opt, search_config.warmup_steps, T)
        problem.model.train()
        steps, epoch = 0, 0
        while steps < T:
            for batch in problem.train_batches(epoch, 0):
                problem.loss(batch).backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                if steps == T:
                    break
            epoch += 1
        metrics = problem.evaluate("dev")
        return {"steps": steps, "chosen_p": child.p, "metric": metrics[problem.primary_metric]}

    def handle(request: dict) -> dict:
        if request["cmd"] != "run":
            raise ValueError(f"unknown request {request}")
        with bench_memory.PeakMemory(device, in_process=False) as region:
            start = time.perf_counter()
            out = run_search() if config["mode"] == "search" else run_single(config["index"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            out["wall_seconds"] = time.perf_counter() - start
        peak = region.result
        out["peak_bytes"] = peak.peak - (0 if device.type == "cuda" else runtime_rss)
        out["resident_before_run"] = peak.start - (0 if device.type == "cuda" else runtime_rss)
        out["memory_method"] = peak.method
        return out

    bench_memory.serve(handle, ready=info)


# --------------------------------------------------------------------------- the benchmark

RUNS = [dict(name=f"single P={p}", mode="single", index=i) for i, p in enumerate(FRACTIONS)]
RUNS.append(dict(name="search", mode="search"))
_RESULTS: dict[str, dict] = {}


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r["name"].replace(" ", "-"))
def test_search_cost(benchmark, ratios, run):
    """One complete run (search or single candidate) in a fresh process."""
    from conftest import environment

    s = settings()
    worker_config = dict(run, **{k: s[k] for k in ("layers", "batch", "seconds", "total_steps", "rung", "device", "backend")},
                         threads=torch.get_num_threads())
    with bench_memory.Worker(__file__, worker_config) as worker:
        info = worker.ready
        replies = []
        benchmark.group = GROUP
        benchmark.pedantic(lambda: replies.append(worker.call({"cmd": "run"})), rounds=1, iterations=1, warmup_rounds=0)
    report = dict(info, **replies[0], name=run["name"], size=s["size"])
    _RESULTS[run["name"]] = report
    ratios.record(GROUP, run["name"], benchmark.stats.stats.median)
    extra = {k: v for k, v in report.items() if not isinstance(v, (dict,))}
    extra.update(environment(), loadavg_1min_after=os.getloadavg()[0], layers=s["layers"], batch=s["batch"], seconds_of_audio=s["seconds"],
                 total_steps=s["total_steps"], rung=s["rung"])
    if run["mode"] == "search":
        singles = [_RESULTS.get(f"single P={p}") for p in FRACTIONS]
        if all(singles):
            extra["steps_separate"] = sum(r["steps"] for r in singles)
            extra["steps_ratio"] = report["steps"] / extra["steps_separate"]
            extra["wall_separate_s"] = sum(r["wall_seconds"] for r in singles)
            extra["wall_ratio"] = report["wall_seconds"] / extra["wall_separate_s"]
            largest = max(singles, key=lambda r: r["peak_bytes"])
            extra["memory_ratio_to_largest_single"] = report["peak_bytes"] / largest["peak_bytes"]
            extra["largest_single"] = largest["name"]
            chosen = _RESULTS.get(f"single P={report['chosen_p']}")
            if chosen:
                extra["memory_ratio_to_chosen_single"] = report["peak_bytes"] / chosen["peak_bytes"]
            extra["memory_target"] = MEMORY_TARGET
            extra["memory_target_met"] = extra["memory_ratio_to_largest_single"] <= MEMORY_TARGET
            ratios.note("search steps / 3 separate runs",
                        f"{report['steps']} / {extra['steps_separate']} = {extra['steps_ratio']:.3f}")
            ratios.note("search wall time / 3 separate runs",
                        f"{report['wall_seconds']:.1f} s / {extra['wall_separate_s']:.1f} s = {extra['wall_ratio']:.3f}")
            ratios.note("search peak memory / largest single candidate",
                        f"{extra['memory_ratio_to_largest_single']:.3f}x ({bench_memory.mib(report['peak_bytes'])} vs "
                        f"{bench_memory.mib(largest['peak_bytes'])}, target <= {MEMORY_TARGET}x)")
    report.update(extra)
    benchmark.extra_info.update({k: v for k, v in extra.items() if k != "k"}, k=report.get("k"))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        print(__doc__)
