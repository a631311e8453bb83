"""Every method of the paper's Table 2, one training step each, side by side (issue 23 item 3).

Workload: the e2e workload of ``bench/e2e_workload.py`` -- ``Wav2Vec2Model(Wav2Vec2Config())`` with
random weights (12 layers, 768 wide), wrapped by :class:`adtuning.speech.Upstream`, the SUPERB KS
head, random 16 kHz waveforms and labels; one step is forward, backward, optimizer step, zero_grad.

Rows (each in its own fresh process, so that its peak memory is its own):

* ``full`` -- every trainable parameter with ``torch.optim.AdamW`` (the baseline of the ratios);
* ``weighted-sum`` -- upstream frozen, the featurizer's layer weights and the head trained;
* ``frozen`` -- upstream frozen, the featurizer reads the last hidden state (no weights), head trained;
* ``lora``, ``houlsby``, ``adapterbias``, ``prefix``, ``cnn-adapter``, ``chapter`` --
  :func:`adtuning.methods.attach` with default options; the method's parameters and the head
  with ``torch.optim.AdamW``;
* ``child-tuning P=0.01`` -- CHILD-TUNING through the e2e workload's public path
  (``ChildNetwork.from_scores`` on random scores over the encoder layers, :class:`SparseAdamW`
  with the chosen backend, weight gradients as the CLI's default ``--weight-grad auto``), as
  ``bench_e2e.py`` measures it.

Figures per row: median step time (``--rounds`` timed steps after one warm-up step that also
allocates the optimizer state), peak memory over the warm-up and the timed steps (``bench/memory.py``:
CUDA max allocated; on CPU peak RSS minus the RSS after imports), optimizer-state bytes, the
upstream's trainable count and the head's; time and memory are also given as ratios to ``full``
measured in the same run.

Sizes: ``--size full`` (default; 12 layers, batch 8 x 4 s: meant for an idle machine or a GPU),
``--size cpu`` (12 layers, 2 x 1 s), ``--tiny`` (a 2-layer, 32-wide model, 2 x 0.5 s; proves the
script works, its timings mean nothing; ``--dry-run`` is the same). Results: JSON at ``--out``
(default ``bench/results/<date>-methods[-<size>].json``) with device, versions and date, and a
Markdown table on stdout.

A worker can be run by hand: ``python bench/bench_methods.py --worker '<json config>'``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_workload  # noqa: E402  (bench/e2e_workload.py)
import memory as bench_memory  # noqa: E402  (bench/memory.py)

SIZES = {
    "full": dict(layers=12, batch=8, seconds=4.0, rounds=5),
    "cpu": dict(layers=12, batch=2, seconds=1.0, rounds=3),
    "tiny": dict(layers=2, batch=2, seconds=0.5, rounds=2,
                 model_overrides=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                      conv_dim=[16] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)),
}
METHOD_ROWS = ("lora", "houlsby", "adapterbias", "prefix", "cnn-adapter", "chapter")
CHILD_P = 0.01
BASELINE = "full"


def rows() -> list[dict]:
    """The configurations, baseline first."""
    out = [dict(name=BASELINE, kind="full"), dict(name="weighted-sum", kind="head"), dict(name="frozen", kind="frozen")]
    out += [dict(name=m, kind="method", method=m) for m in METHOD_ROWS]
    # The CLI's default weight-gradient mode (``auto``: the SDDMM where the child is sparse enough
    # for the backend), not the e2e workload's default (dense GEMM then gather).
    out.append(dict(name=f"child-tuning P={CHILD_P}", kind="child", p=CHILD_P, weight_grad="auto"))
    return out


def environment(device: str) -> dict:
    """Device, names, versions and date of this run."""
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = device.startswith("cuda")
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_1min": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------ the worker


def _adamw(params: list[torch.nn.Parameter]) -> tuple[torch.optim.Optimizer, str]:
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True), "torch.optim.AdamW(fused=True)"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-4, foreach=True), "torch.optim.AdamW(foreach=True)"


def build(config: dict):
    """Model, batch, optimizer and a description of one row (runs inside the worker)."""
    kind = config["kind"]
    if kind in ("full", "child"):
        workload = dict(config, kind=kind, dtype=config["dtype"])
        model, batch, optimizer, info = e2e_workload.build(workload)
        upstream = model.upstream
        if kind == "full":
            info["upstream_trainable"] = sum(p.numel() for p in upstream.parameters() if p.requires_grad)
        else:
            info["upstream_trainable"] = info["k"]
        info["head_trainable"] = sum(p.numel() for p in model.head_parameters())
        return model, batch, optimizer, info

    import adtuning.methods as methods
    from adtuning.speech.featurizer import Featurizer

    dtype = torch.bfloat16 if config["dtype"] == "bf16" else torch.float32
    upstream, model = e2e_workload._model(config, dtype)
    device = torch.device(config["device"])
    model.train()
    for p in upstream.parameters():
        p.requires_grad_(False)
    info: dict = {"dtype": config["dtype"], "upstream_params": sum(p.numel() for p in upstream.parameters())}
    upstream_trainable: list[torch.nn.Parameter] = []
    if kind == "frozen":
        model.task.featurizer = Featurizer(upstream.num_layers, mode="last").to(device)
    elif kind == "method":
        attached = methods.attach(config["method"], upstream)
        upstream_trainable = list(attached.parameters().values())
        info["method_options"] = attached.options
        info["expected_count"] = methods.expected_trainable_count(config["method"], upstream.model.config)
    head = list(model.head_parameters())
    optimizer, info["optimizer"] = _adamw(upstream_trainable + head)
    info["upstream_trainable"] = sum(p.numel() for p in upstream_trainable)
    info["head_trainable"] = sum(p.numel() for p in head)
    gen = torch.Generator().manual_seed(1)
    samples = int(config["seconds"] * 16000)
    batch = {
        "wav": torch.randn(config["batch"], samples, generator=gen).to(device),
        "wav_lengths": torch.full((config["batch"],), samples, dtype=torch.long).to(device),
        "label": torch.randint(0, 12, (config["batch"],), generator=gen).to(device),
    }
    return model, batch, optimizer, info


def _worker(config: dict) -> None:
    torch.set_num_threads(int(config.get("threads") or torch.get_num_threads()))
    from transformers import Wav2Vec2Config, Wav2Vec2Model  # noqa: F401  (runtime, not the row's memory)

    import adtuning.methods  # noqa: F401
    import adtuning.speech  # noqa: F401
    from adtuning import BackendUnavailableError, get_backend

    try:
        get_backend(config["backend"], config["device"])
    except BackendUnavailableError:
        pass  # e2e_workload.build records the fallback
    import peft  # noqa: F401

    device = torch.device(config["device"])
    bench_memory.release_free_memory()
    runtime_rss = bench_memory.rss_bytes()
    model, batch, optimizer, info = build(config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    region = bench_memory.PeakMemory(device, in_process=False).__enter__()
    steps: list[float] = []

    def handle(request: dict) -> dict:
        if request["cmd"] == "step":
            start = time.perf_counter()
            model.loss(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - start)
            return {"seconds": steps[-1]}
        if request["cmd"] == "report":
            region.__exit__(None, None, None)
            peak = region.result
            total = peak.peak if device.type == "cuda" else peak.peak - runtime_rss
            if hasattr(optimizer, "memory_report"):
                state_bytes = optimizer.memory_report()["state_bytes"]
            else:
                state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                  for t in s.values() if torch.is_tensor(t))
            return dict(info, step_seconds=steps, peak_bytes=total, optimizer_state_bytes=state_bytes,
                        memory_method=peak.method, reset_ok=not peak.approximate)
        raise ValueError(f"unknown request {request}")

    bench_memory.serve(handle, ready={k: v for k, v in info.items() if not isinstance(v, dict)})


# ------------------------------------------------------------------------------ the driver


def run(size: str, *, dtype: str, backend: str, device: str, rounds: int | None, only: list[str] | None) -> dict:
    """Measure every row in fresh workers; returns the results document."""
    settings = dict(SIZES[size])
    if rounds is not None:
        settings["rounds"] = rounds
    selected = [r for r in rows() if only is None or r["name"] in only or r["name"] == BASELINE]
    results = []
    for row in selected:
        config = dict(row, dtype=dtype, backend=backend, device=device, threads=torch.get_num_threads(),
                      **{k: v for k, v in settings.items() if k != "rounds"})
        with bench_memory.Worker(__file__, config) as worker:
            for _ in range(settings["rounds"] + 1):
                worker.call({"cmd": "step"})
            report = worker.call({"cmd": "report"})
        timed = report["step_seconds"][1:]
        report.update(name=row["name"], median_step_s=statistics.median(timed) if timed else None)
        results.append(report)
        print(f"  {row['name']:<22} {report['median_step_s']:.4f} s  {bench_memory.mib(report['peak_bytes'])}", file=sys.stderr)
    base = results[0]
    for r in results:
        r["time_ratio_to_full"] = r["median_step_s"] / base["median_step_s"] if base["median_step_s"] else None
        r["memory_ratio_to_full"] = r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] > 0 else None
    return {"benchmark": "bench_methods", "size": size, "settings": settings, "dtype": dtype, "backend": backend,
            "environment": environment(device), "baseline": BASELINE, "rows": results,
            "note": ("tiny model: timings prove the script runs, they are not performance figures"
                     if size == "tiny" else "")}


def table(doc: dict) -> str:
    """Markdown table of a results document."""
    lines = ["| method | upstream trainable | head | step (s) | time / full | peak memory | memory / full | optimizer state |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        t = f"{r['time_ratio_to_full']:.2f}x" if r["time_ratio_to_full"] is not None else "-"
        m = f"{r['memory_ratio_to_full']:.2f}x" if r["memory_ratio_to_full"] is not None else "-"
        lines.append(f"| {r['name']} | {r['upstream_trainable']:,} | {r['head_trainable']:,} | {r['median_step_s']:.4f} | {t} | "
                     f"{bench_memory.mib(r['peak_bytes'])} | {m} | {bench_memory.mib(r['optimizer_state_bytes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="workload size (default: full)")
    parser.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true", help="the tiny model: prove the script works")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="upstream weight dtype")
    parser.add_argument("--backend", default="fused", help="CHILD-TUNING backend (reference, native, fused, triton)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per row (after one warm-up)")
    parser.add_argument("--only", default=None, help="comma list of rows to run (full always runs: the baseline)")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/<date>-methods[-<size>].json)")
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else args.size
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    known = {r["name"] for r in rows()}
    if only is not None and (bad := [s for s in only if s not in known]):
        parser.error(f"--only: unknown row {bad[0]!r}; rows: {', '.join(sorted(known))}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    doc = run(size, dtype=args.dtype, backend=args.backend, device=args.device, rounds=args.rounds, only=only)
    date = doc["environment"]["date"][:10]
    suffix = "" if size == "full" else f"-{size}"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{date}-methods{suffix}.json"
    from adtuning.atomic import atomic_write_bytes

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(doc, indent=2) + "\n").encode())
    print(table(doc))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
