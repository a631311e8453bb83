"""Data-parallel training step: bytes all-reduced and step time, AD-TUNING's compact all-reduce
against torch DDP, in 2 processes (gloo on CPU; NCCL on GPUs through ``bench/gpu_check.py``).

Workload: wav2vec2 with the ``Wav2Vec2Config()`` widths (random weights, ``layers`` encoder
layers) and the SUPERB KS head, random 16 kHz audio and labels, ``batch`` clips of ``seconds``
per process. The trainable set is the same everywhere: the scored upstream tensors (the
encoder layers; the CNN is frozen, the rest of the upstream untouched) and the head.

* ``ours P=..``: :class:`adtuning.optim.SparseAdamW` over a child of P of the scored entries
  (random scores), the sparse weight-gradient path (``weight_grad="auto"``), and
  :class:`adtuning.distributed.GradientReducer`: one all-reduce per step of the compact child
  gradients, the head gradients and the loss;
* ``DDP full FT``: ``torch.nn.parallel.DistributedDataParallel`` over the model, dense
  ``torch.optim.AdamW`` (full fine-tuning of the same tensors);
* ``DDP CHILD-TUNING P=..``: the same DDP, then the published code's dense mask multiplied
  into every scored gradient before a dense AdamW step (what CHILD-TUNING / AD-TUNING run
  under DDP today).

Reported per method: the bytes handed to all-reduce per optimizer step, counted at the call
(our ``torch.distributed.all_reduce`` calls; DDP's buckets through a comm hook), the bytes a
ring all-reduce puts on each rank's wire (``2 (W-1)/W`` times that), the median step time
(forward, backward, communication, clipping, optimizer step; the slowest rank per step), the
optimizer state bytes, and the ratios to DDP full FT measured in the same run. Byte counts are
exact on any machine; times depend on the load (the JSON records the 1-minute load average
before and after).

Run::

    python bench/bench_ddp.py [--size cpu|full] [--json bench/results/<name>.json]
    pytest bench/bench_ddp.py --benchmark-only        # the bench/ harness (ratios in its JSON)

Size: ``--size`` or ``ADTUNING_BENCH_DDP`` = ``cpu`` (2 layers, 2 x 1 s, 2 + 5 steps; default
on CPU) or ``full`` (12 layers, 8 x 4 s, 3 + 10 steps; default on CUDA), or ``key=value,...``
overrides of ``layers, batch, seconds, warmup, steps``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from sizes import size_settings  # noqa: E402  (bench/sizes.py)

GROUP = "data-parallel step (2 processes)"
FRACTIONS = (0.001, 0.01, 0.1)
WORLD = 2
SIZES = {
    "cpu": dict(layers=2, batch=2, seconds=1.0, warmup=2, steps=5),
    "full": dict(layers=12, batch=8, seconds=4.0, warmup=3, steps=10),
    # gpu_check --dry-run: a few seconds on the CPU, figures meaningless.
    "tiny": dict(layers=1, batch=1, seconds=0.25, warmup=1, steps=2),
}
TINY_MODEL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37, conv_dim=(16,) * 7,
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


def settings(size: str | None = None) -> dict:
    """Sizes of this run: ``size`` when given, else from ``ADTUNING_BENCH_DDP``."""
    if size is None:
        return size_settings("ADTUNING_BENCH_DDP", SIZES)
    return dict(SIZES[size], size=size, device="cuda" if torch.cuda.is_available() else "cpu")


def methods() -> list[dict]:
    """The configurations, DDP full fine-tuning (the baseline of every ratio) first."""
    out = [dict(name="DDP full FT", kind="ddp", p=None)]
    out += [dict(name=f"DDP CHILD-TUNING P={p}", kind="ddp", p=p) for p in FRACTIONS]
    out += [dict(name=f"ours P={p}", kind="ours", p=p) for p in FRACTIONS]
    return out


# ------------------------------------------------------------------------ in each process

def _model(s: dict, device: torch.device):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from adtuning.speech import SpeechModel, build_task
    from adtuning.speech.upstream import Upstream

    torch.manual_seed(0)  # the same weights on every rank and for every method
    overrides = TINY_MODEL if s["size"] == "tiny" else {}
    upstream = Upstream(Wav2Vec2Model(Wav2Vec2Config(num_hidden_layers=s["layers"], **overrides)))
    task = build_task("ks", upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers)
    model = SpeechModel(upstream, task).to(device)
    model.train()
    scored = list(upstream.default_scored_parameters())
    upstream_params = dict(upstream.named_parameters())
    for name, p in upstream_params.items():
        p.requires_grad_(name in scored)  # the trainable set of every method
    return model, {n: upstream_params[n] for n in scored}


def _batches(s: dict, rank: int, device: torch.device, count: int) -> list[dict]:
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own part of the data
    samples = int(s["seconds"] * 16000)
    return [{"wav": torch.randn(s["batch"], samples, generator=gen).to(device),
             "wav_lengths": torch.full((s["batch"],), samples, dtype=torch.long, device=device),
             "label": torch.randint(0, 12, (s["batch"],), generator=gen).to(device)} for _ in range(count)]


def _children(scored: dict) -> list:
    from adtuning import ChildNetwork

    gen = torch.Generator().manual_seed(2)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in scored.items()}
    return ChildNetwork.nested(scores, FRACTIONS)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def _time_steps(dp, step, s: dict, device: torch.device) -> list[float]:
    """Per-step wall time, the slowest rank's, after ``warmup`` untimed steps."""
    times = []
    for i in range(s["warmup"] + s["steps"]):
        dp.barrier()
        start = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - start)
    per_rank = dp.all_gather_object(times)
    return [max(ts) for ts in zip(*per_rank)]


def _run_ours(dp, s: dict, config: dict, device: torch.device, backend: str) -> dict:
    import torch.distributed as dist

    from adtuning import SparseAdamW, install_sparse_weight_grad
    from adtuning.distributed import GradientReducer

    model, scored = _model(s, device)
    child = next(c for c in _children(scored) if c.p == config["p"])
    head = list(model.task.parameters())
    optimizer = SparseAdamW([{"named_params": dict(model.upstream.named_parameters()), "child": child},
                             {"params": head, "lr": 1e-3}], lr=1e-4, weight_decay=0.0, backend=backend)
    handle = install_sparse_weight_grad(model, optimizer, "auto")
    reducer = GradientReducer(dp, optimizer, head)
    batches = _batches(s, dp.rank, device, s["warmup"] + s["steps"])
    sent: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    def step(i):
        reducer.prepare()
        loss = model.loss(batches[i]) / dp.world_size  # equal parts: each rank's share of the global mean
        loss.backward()
        reducer.reduce(float(loss.detach()))
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dist.all_reduce = counting
    try:
        times = _time_steps(dp, step, s, device)
    finally:
        dist.all_reduce = original
    head_entries = sum(p.numel() for p in head)
    steps = s["warmup"] + s["steps"]
    info = {"k": child.k, "scored_entries": child.n, "head_entries": head_entries,
            "allreduce_bytes_per_step": sum(sent) // steps, "allreduce_calls_per_step": len(sent) / steps,
            "expected_bytes_per_step": 4 * (child.k + head_entries + 1),
            "optimizer_state_bytes": _state_bytes(optimizer), "sparse_weight_grad": handle.summary(),
            "backend": optimizer.backend_name, "step_seconds": times}
    handle.remove()
    reducer.release()
    return info


def _run_ddp(dp, s: dict, config: dict, device: torch.device) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    model, scored = _model(s, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sent: list[int] = []

    def counting_hook(state, bucket):
        sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    masks = []
    if config["p"] is not None:
        # The published code keeps a dense mask per scored tensor and multiplies it into the gradient.
        child = next(c for c in _children(scored) if c.p == config["p"])
        for name, p in scored.items():
            mask = torch.zeros(p.numel(), dtype=p.dtype, device=device)
            if name in child.indices:
                mask[child.indices[name].long().to(device)] = 1
            masks.append((p, mask.view_as(p)))
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if all(p is not q for q, _ in masks)], "lr": 1e-3},
                                   {"params": [p for p, _ in masks], "lr": 1e-4, "weight_decay": 0.0}])
    batches = _batches(s, dp.rank, device, s["warmup"] + s["steps"])

    def step(i):
        outputs = ddp(batches[i])  # DDP all-reduces the bucketed gradients during backward
        loss = model.task.loss(outputs, batches[i])
        loss.backward()
        for p, mask in masks:
            p.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = _time_steps(dp, step, s, device)
    steps = s["warmup"] + s["steps"]
    head_entries = sum(p.numel() for p in model.task.parameters())
    scored_entries = sum(p.numel() for p in scored.values())
    return {"scored_entries": scored_entries, "head_entries": head_entries,
            "allreduce_bytes_per_step": sum(sent) // steps, "allreduce_calls_per_step": len(sent) / steps,
            "expected_bytes_per_step": 4 * (scored_entries + head_entries),
            "optimizer_state_bytes": _state_bytes(optimizer),
            "mask_bytes": sum(m.numel() * m.element_size() for _, m in masks), "step_seconds": times}


def _job(rank: int, store: str, s: dict, device_type: str, backend: str, out: str) -> None:
    from adtuning.distributed import DataParallel

    if device_type == "cpu":
        torch.set_num_threads(int(s.get("threads") or 1))
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    dp = DataParallel.initialize(rank=rank, world_size=WORLD, local_rank=rank, device=device, timeout_s=900,
                                 init_method=f"file://{store}")
    rows = []
    for config in methods():
        info = _run_ours(dp, s, config, device, backend) if config["kind"] == "ours" else _run_ddp(dp, s, config, device)
        info.update(name=config["name"], p=config["p"])
        rows.append(info)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if dp.is_main:
        Path(out).write_text(json.dumps(rows))
    dp.barrier()
    dp.close()


def run_comparison(s: dict, device_type: str = "cpu", backend: str = "fused") -> dict:
    """Run every method in ``WORLD`` processes on ``device_type`` (gloo on CPU, NCCL on CUDA);
    returns the rows with their ratios to DDP full FT and the environment of the run."""
    import torch.multiprocessing as mp

    from adtuning.backends import BackendUnavailableError, get_backend

    note = None
    try:
        get_backend(backend, device_type)
    except BackendUnavailableError as exc:
        note = f"{backend} unavailable ({str(exc).splitlines()[0]}); used reference"
        backend = "reference"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_job, args=(os.path.join(tmp, "store"), s, device_type, backend, out), nprocs=WORLD, join=True)
        rows = json.loads(Path(out).read_text())
    base = rows[0]
    for row in rows:
        row["median_step_s"] = statistics.median(row["step_seconds"])
        row["ring_wire_bytes_per_rank_per_step"] = row["allreduce_bytes_per_step"] * 2 * (WORLD - 1) // WORLD
        row["bytes_ratio_to_ddp_full"] = row["allreduce_bytes_per_step"] / base["allreduce_bytes_per_step"]
        row["step_time_ratio_to_ddp_full"] = row["median_step_s"] / base["median_step_s"]
    for row in rows:
        if row["name"].startswith("ours"):
            masked = next(r for r in rows if r["name"] == f"DDP CHILD-TUNING P={row['p']}")
            row["step_time_ratio_to_ddp_child_tuning"] = row["median_step_s"] / masked["median_step_s"]
            row["bytes_within_target"] = row["allreduce_bytes_per_step"] <= 1.1 * 4 * (row["k"] + row["head_entries"])
    env = _environment(device_type)
    env.update(world_size=WORLD, process_group_backend="nccl" if device_type == "cuda" else "gloo",
               threads_per_process=s.get("threads") or 1 if device_type == "cpu" else None,
               loadavg_1min_before=load_before, loadavg_1min_after=os.getloadavg()[0], backend=backend, backend_note=note)
    return {"environment": env, "settings": s, "rows": rows}


def _environment(device_type: str) -> dict:
    from adtuning.environment import environment

    return environment(device_type)


def summary_lines(result: dict) -> list[str]:
    """The table printed after a run."""
    env = result["environment"]
    lines = [f"{GROUP}: {env['device']} ({env.get('gpu') or env.get('cpu', '')}), {env['process_group_backend']}, "
             f"torch {env['torch']}, {env['date']}, load {env['loadavg_1min_before']:.2f} -> {env['loadavg_1min_after']:.2f}"]
    for row in result["rows"]:
        extra = ""
        if "step_time_ratio_to_ddp_child_tuning" in row:
            extra = f", {row['step_time_ratio_to_ddp_child_tuning']:.3f}x DDP CHILD-TUNING's step"
        lines.append(f"{row['name']:<26} {row['allreduce_bytes_per_step']:>12,} B/step all-reduced "
                     f"({row['bytes_ratio_to_ddp_full']:.5f}x DDP), step {row['median_step_s'] * 1e3:8.1f} ms "
                     f"({row['step_time_ratio_to_ddp_full']:.3f}x DDP full FT{extra})")
    return lines


# --------------------------------------------------------------------------- pytest entry

def test_ddp_bytes_and_step_time(benchmark, ratios):
    """The whole comparison in one 2-process job; each method's median step time goes to the
    harness's ratios (the pytest-benchmark timing is that of the whole job)."""
    s = settings()
    results = []
    benchmark.group = GROUP
    benchmark.pedantic(lambda: results.append(run_comparison(s, "cuda" if s["device"] == "cuda" else "cpu")),
                       rounds=1, iterations=1, warmup_rounds=0)
    result = results[0]
    for row in result["rows"]:
        ratios.record(GROUP, row["name"], row["median_step_s"])
        if row["name"] != "DDP full FT":
            ratios.want(f"step: DDP full FT / {row['name']}", GROUP, "DDP full FT", row["name"])
        ratios.note(f"all-reduce bytes/step {row['name']}",
                    f"{row['allreduce_bytes_per_step']:,} ({row['bytes_ratio_to_ddp_full']:.5f}x DDP)")
    benchmark.extra_info.update(result["environment"], rows=result["rows"], settings=s)
    for row in result["rows"]:
        assert row["allreduce_bytes_per_step"] == row["expected_bytes_per_step"], row["name"]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="workload size (default: cpu, or full on CUDA)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda with >= 2 GPUs, else cpu")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default: print only)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.device_count() >= WORLD else "cpu")
    if device == "cuda" and torch.cuda.device_count() < WORLD:
        print(f"bench_ddp: needs {WORLD} GPUs for --device cuda, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    s = settings(args.size)
    result = run_comparison(s, device)
    print("\n".join(summary_lines(result)))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
