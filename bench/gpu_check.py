"""The one script to run on a lent GPU: correctness of every Triton kernel, then timings.

Run from the repository root (adtuning need not be installed)::

    python bench/gpu_check.py [--results-dir bench/results] [--quick] [--dry-run]

1. **Correctness** on CUDA: ``gather``, ``sparse_adamw_`` and ``linear_fisher_`` of the
   ``triton`` backend on every case of ``tests/op_cases.py`` (the cases that
   ``tests/test_ops.py`` runs on every backend: awkward sizes, every dtype, against the reference
   twins and oracles, with the one error metric ``op_cases.rel_err``), and the
   whole Fisher pass of a small wav2vec2 with ``backend="triton"`` against the reference
   kernels run inside the same backward.
2. **Fisher pass** (``adtuning.fisher.estimate_fisher(..., backend="triton")``) against a
   plain forward+backward of wav2vec2-base (random init, ``Wav2Vec2Model(Wav2Vec2Config())``,
   layerdrop 0, eval mode, the same trainable set) on 8 x 4 s of 16 kHz audio: median time
   and peak memory (``torch.cuda.max_memory_allocated``) of both. Targets: <= 1.3x time,
   <= 1.1x memory.
3. **Sparse AdamW** at P = 0.001, 0.01, 0.1 on one wav2vec2-base-sized tensor against
   ``torch.optim.AdamW(fused=True)`` on the dense tensor, with the achieved GB/s on the bytes
   actually touched (compact streams plus every 32-byte sector of the parameter that holds a
   child entry, read and/or written) as a fraction of the nominal and of the measured copy
   bandwidth (target: >= 60 % of HBM); then one step over all wav2vec2-base tensors, one
   launch per tensor, against dense fused AdamW over the model.
4. **Fisher kernel** per wav2vec2-base Linear shape: the kernel under a few tilings (TF32x3
   and IEEE fp32 dots) against the ordinary weight-gradient GEMM it replaces, for tuning.
5. **Sparse weight gradients**: correctness of the ``sddmm`` kernel on the ``sddmm`` cases of
   ``tests/op_cases.py`` and of a short training run with the SDDMM path against the dense path (section
   ``sparse_weight_grad_correctness``); per wav2vec2-base Linear shape over 8 x 4 s, the SDDMM
   against the dense weight-gradient GEMM + gather it replaces at P = 0.001 ... 0.3, fp32 and
   bf16, with the crossover densities that ``adtuning.sparse_grad.DENSITY_THRESHOLDS["triton"]``
   should hold per dtype (``sparse_weight_grad``); and one wav2vec2-base training step (8 x 4 s), full
   fine-tuning with fused AdamW against CHILD-TUNING with dense and with sparse weight
   gradients: median time and peak memory, as ratios to full fine-tuning (``e2e_train_step``).
6. **Data parallel over NCCL** (only with 2 or more GPUs; ``ddp_nccl``, skipped otherwise):
   ``bench/bench_ddp.py`` in 2 processes — bytes all-reduced per step and step time of the
   compact all-reduce at P = 0.001, 0.01, 0.1 against torch DDP (full fine-tuning, and
   CHILD-TUNING's dense masked gradient).

``--dry-run`` runs every section on the CPU instead, under ``TRITON_INTERPRET=1`` with tiny
sizes and wall-clock timings, so that the script itself is tested before the scarce GPU run
(``tests/test_gpu_check.py``); its figures mean nothing.

Every time is the median of CUDA-event timings after warm-up (the first call compiles).
The JSON written under ``bench/results/`` holds the device, versions, date and all figures,
with ratios against baselines measured in the same run. Exit status: 0 when every
correctness check passed (or when there is no CUDA device: the script then only says so),
1 otherwise. Designed to finish within 5 minutes on one H100/H200.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "bench" / "results"
TIME_BUDGET_S = 270.0  # leave headroom under the 5-minute promise
# Nominal HBM bandwidth (bytes/s) by device-name fragment; the measured copy rate is reported too.
NOMINAL_HBM = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
               "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12}
WAV2VEC2_BASE_SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # (out, in) of its Linears
SPARSE_RATIOS = (0.001, 0.01, 0.1)
SPARSE_BENCH_NUMEL = 94_371_712  # wav2vec2-base's parameter count, as one tensor
# --dry-run: the CPU interpreter stands in for the GPU; tiny sizes keep it to seconds.
DRY_RUN = False
DRY_CHECK_CASES = 12  # correctness cases per op in a dry run, spread over tests/op_cases.py's list


def _tiny_wav2vec2_config():
    """A wav2vec2 small enough for the CPU interpreter (dry runs only)."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=37, conv_dim=(16,) * 7, layerdrop=0.0,
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


def _import_adtuning():
    """Import adtuning from this checkout, mapping ``kernels/`` to ``adtuning.kernels`` when the
    package is not installed (the GPU machine runs a bare copy of the working tree)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import adtuning

    try:
        importlib.import_module("adtuning.kernels")
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(
            "adtuning.kernels", ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["adtuning.kernels"] = module
        spec.loader.exec_module(module)
        adtuning.kernels = module
    return adtuning


# ---- measurement helpers ----------------------------------------------------------------

def median_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 20) -> float:
    """Median of ``iters`` CUDA-event timings of ``fn`` (ms) after ``warmup`` calls."""
    if DRY_RUN:  # wall clock, one warm-up and three calls: the figure only has to exist
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def peak_bytes(fn: Callable[[], object]) -> int:
    """``torch.cuda.max_memory_allocated`` over one call of ``fn`` (memory held before counts)."""
    if DRY_RUN:  # the process's peak RSS instead (bench/memory.py): only has to be a number
        if str(ROOT / "bench") not in sys.path:
            sys.path.insert(0, str(ROOT / "bench"))
        import memory as bench_memory

        bench_memory.reset_peak_rss()
        fn()
        return bench_memory.peak_rss_bytes()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The one error metric of the tests, ``tests/op_cases.py``'s ``rel_err``: max |actual - expected| /
    max |expected| (the scale of an accumulator)."""
    return _op_cases().rel_err(actual, expected)


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy rate in bytes/s (bytes read plus written)."""
    numel = 1 << 16 if DRY_RUN else 1 << 28  # 1 GiB on the GPU
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=2, iters=10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


# ---- 1. correctness ---------------------------------------------------------------------

def _op_cases():
    """``tests/op_cases.py``, the per-op cases shared with ``tests/test_ops.py``. Imported on first
    use, after :func:`_import_adtuning` (it imports ``adtuning.reference``) and after a dry run has
    set TRITON_INTERPRET."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("tests.op_cases")


def run_op_cases(tb, op: str, device: torch.device) -> list[dict]:
    """The triton backend on every case of ``op`` that runs on ``device`` (a dry run takes
    DRY_CHECK_CASES of them, spread over sizes and dtypes); one record per case, its error and
    tolerance those of its worst comparison. A case that raises is a failed record."""
    op_cases = _op_cases()
    cases = [c for c in op_cases.CASES[op] if op_cases.skip_reason(c, "triton", device.type) is None]
    if DRY_RUN:
        # The longest stride that still picks DRY_CHECK_CASES, coprime with the case lists' inner
        # cycles (dtypes: 3; index dtypes and options: 2) so that every parameter varies.
        step = max((s for s in range(1, len(cases)) if math.gcd(s, 6) == 1 and s * (DRY_CHECK_CASES - 1) < len(cases)),
                   default=1)
        cases = cases[::step][:DRY_CHECK_CASES]
    records = []
    for case in cases:
        try:
            result = op_cases.run_case(case, tb, device)
        except Exception as exc:  # one broken case must not hide the others' results
            records.append({"op": op, "case": case.name, "error": float("inf"), "tolerance": 0.0,
                            "ok": False, "exception": repr(exc)})
            continue
        worst = result.worst
        records.append({"op": op, "case": case.name, "error": worst.error, "tolerance": worst.tolerance,
                        "worst_check": worst.name, "ok": result.ok,
                        "checks": {c.name: c.error for c in result.comparisons}})
    return records


def check_kernels(tb, device: torch.device) -> list[dict]:
    """gather, sparse AdamW and the Linear Fisher kernel on their shared cases; one record per case."""
    return [record for op in ("gather", "sparse_adamw", "linear_fisher") for record in run_op_cases(tb, op, device)]


def check_fisher_pass(adtuning, device: torch.device) -> dict:
    """The whole Fisher pass of a small random wav2vec2: triton vs reference kernels in backward."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    fisher_mod = importlib.import_module("adtuning.fisher")
    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=257, layerdrop=0.0)
    probe = _Probe(Wav2Vec2Model(config), classes=7).to(device)
    batch = _batch(3, 16000, 7, device)
    names = probe.scored_names()
    common = {"params": names, "progress": False}
    ours = fisher_mod.estimate_fisher(probe, [batch], _probe_loss, backend="triton", **common)
    try:
        theirs = fisher_mod.estimate_fisher(probe, [batch], _probe_loss, backend="reference",
                                            algorithm="in-backward", **common)
        oracle = "reference kernels in backward"
    except TypeError:  # no `algorithm` keyword: compare with the per-sample autograd loop
        theirs = fisher_mod.estimate_fisher(probe, [batch], _probe_loss, backend="reference", **common)
        oracle = "per-sample autograd loop"
    # Per tensor, relative to its largest score, floored at 1e-6 of the largest score overall:
    # some tensors have an exactly-zero true gradient (attention key biases: softmax is
    # shift-invariant), so their scores are rounding noise that no two algorithms share.
    floor = 1e-6 * max(v.abs().max().item() for v in theirs.values())
    err = max((ours[n] - theirs[n]).abs().max().item() / max(theirs[n].abs().max().item(), floor)
              for n in names)
    return {"oracle": oracle, "tensors": len(names), "error": err, "tolerance": 1e-4, "ok": err <= 1e-4}


# ---- wav2vec2 probe ---------------------------------------------------------------------

class _Probe(torch.nn.Module):
    """wav2vec2 upstream + mean pooling + linear head: a per-sample NLL for the Fisher pass."""

    def __init__(self, upstream: torch.nn.Module, classes: int):
        super().__init__()
        self.upstream = upstream
        self.head = torch.nn.Linear(upstream.config.hidden_size, classes)

    def scored_names(self) -> list[str]:
        """The transformer encoder layers' parameters (all Linear or LayerNorm), as in the paper."""
        return [n for n, _ in self.named_parameters() if n.startswith("upstream.encoder.layers.")]

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.head(self.upstream(wav).last_hidden_state.mean(1))


def _probe_loss(model: _Probe, batch) -> torch.Tensor:
    wav, labels = batch
    return torch.nn.functional.cross_entropy(model(wav), labels, reduction="none")


def _batch(size: int, samples: int, classes: int, device: torch.device):
    gen = torch.Generator().manual_seed(size * samples)
    wav = torch.randn(size, samples, generator=gen).to(device)
    return wav, torch.randint(0, classes, (size,), generator=gen).to(device)


# ---- 2. Fisher kernel against the weight-gradient GEMM ----------------------------------

def bench_fisher_kernel(device: torch.device, batch: int = 8, frames: int = 199) -> list[dict]:
    """Per wav2vec2-base Linear shape: dW GEMM vs the Fisher kernel under several tilings."""
    from adtuning.kernels import linear_fisher
    from adtuning.kernels.linear_fisher import TUNING_CANDIDATES

    # The launcher's defaults, then tilings that compile without spills offline
    # (python -m tools.triton_compile) and are worth timing against them.
    configs = [None, *TUNING_CANDIDATES]
    shapes = WAV2VEC2_BASE_SHAPES
    if DRY_RUN:
        shapes, batch, frames = [(33, 17)], 2, 5
    rows = []
    for out_f, in_f in shapes:
        x = torch.randn(batch, frames, in_f, device=device)
        dy = torch.randn(batch, frames, out_f, device=device)
        dy2, x2 = dy.reshape(-1, out_f), x.reshape(-1, in_f)
        gemm_ms = median_ms(functools.partial(_weight_grad, dy2, x2))
        flops = 2.0 * batch * frames * in_f * out_f
        exact_w = torch.zeros(out_f, in_f, device=device, dtype=torch.float64)
        for n in range(batch):
            exact_w += (dy[n].double().t() @ x[n].double()).square()
        for cfg in configs:
            kwargs = {} if cfg is None else dict(
                block_m=cfg[0], block_n=cfg[1], block_k=cfg[2], num_warps=cfg[3],
                num_stages=cfg[4], input_precision=cfg[5])
            fw, fb = torch.zeros(out_f, in_f, device=device), torch.zeros(out_f, device=device)
            try:
                linear_fisher(x, dy, fw, fb, **kwargs)
                err = rel_err(fw, exact_w)
                ms = median_ms(functools.partial(linear_fisher, x, dy, fw, fb, **kwargs))
            except Exception as exc:  # a tiling may not compile on this GPU: record, go on
                rows.append({"out": out_f, "in": in_f, "config": cfg or "default", "error": repr(exc)})
                continue
            rows.append({
                "out": out_f, "in": in_f, "B": batch, "T": frames, "config": cfg or "default",
                "ms": ms, "dw_gemm_ms": gemm_ms, "ratio_vs_dw_gemm": ms / gemm_ms,
                "tflops": flops / (ms * 1e-3) / 1e12, "rel_err_vs_fp64": err,
            })
    return rows


def _weight_grad(dy2: torch.Tensor, x2: torch.Tensor):
    """The ordinary Linear weight and bias gradients the Fisher kernel replaces."""
    return dy2.t() @ x2, dy2.sum(0)


# ---- 3. Fisher pass against plain forward+backward ----------------------------------------

def bench_fisher_pass(device: torch.device, batch: int = 8, seconds: float = 4.0, config=None) -> dict:
    """wav2vec2-base (or ``config``), 8 x 4 s: estimate_fisher(backend='triton') vs plain fwd+bwd."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    fisher_mod = importlib.import_module("adtuning.fisher")
    torch.manual_seed(0)
    config = config or Wav2Vec2Config(layerdrop=0.0)
    probe = _Probe(Wav2Vec2Model(config), classes=10).to(device).eval()
    names = set(probe.scored_names())
    data = _batch(batch, int(16000 * seconds), 10, device)

    # Same model, mode and trainable set as the Fisher pass; the ordinary dW instead of F.
    # (estimate_fisher restores these flags after each pass.)
    scored = [p for n, p in probe.named_parameters() if n in names]
    for name, p in probe.named_parameters():
        p.requires_grad_(name in names)

    def plain():
        for p in scored:
            p.grad = None  # fresh gradients each time, as the Fisher pass has fresh accumulators
        _probe_loss(probe, data).sum().backward()

    def fisher_pass():
        return fisher_mod.estimate_fisher(probe, [data], _probe_loss, params=sorted(names),
                                          backend="triton", progress=False)

    result = {"model": f"Wav2Vec2Model, random init, eval mode, {config.num_hidden_layers} layers, "
                       f"hidden {config.hidden_size}, layerdrop {config.layerdrop}",
              "batch": f"{batch} x {seconds:g} s at 16 kHz", "scored_tensors": len(names),
              "scored_entries": sum(p.numel() for n, p in probe.named_parameters() if n in names)}
    result["plain_ms"] = median_ms(plain, warmup=2, iters=10)
    for p in probe.parameters():
        p.grad = None
    result["fisher_ms"] = median_ms(fisher_pass, warmup=2, iters=10)
    result["plain_peak_bytes"] = peak_bytes(plain)
    for p in probe.parameters():
        p.grad = None
    result["fisher_peak_bytes"] = peak_bytes(fisher_pass)
    result["time_ratio"] = result["fisher_ms"] / result["plain_ms"]
    result["meets_time_target_1.3x"] = result["time_ratio"] <= 1.3
    if result["plain_peak_bytes"]:  # 0 in dry runs: no allocator statistics on the CPU
        result["memory_ratio"] = result["fisher_peak_bytes"] / result["plain_peak_bytes"]
        result["meets_memory_target_1.1x"] = result["memory_ratio"] <= 1.1
    return result


# ---- 4. sparse AdamW ----------------------------------------------------------------------

BENCH_HYPER = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


class _SparseSteps:
    """Callable doing one sparse AdamW step (step count advancing) over a list of tensors."""

    def __init__(self, tb, work: list[tuple]):
        self.tb, self.work, self.step = tb, work, 0

    def __call__(self) -> None:
        self.step += 1
        for param, grad, idx, exp_avg, exp_avg_sq, master in self.work:
            self.tb.sparse_adamw_(param, grad, idx, exp_avg, exp_avg_sq, master, step=self.step, **BENCH_HYPER)


def bench_sparse_adamw(tb, device: torch.device, numel: int, peak_bw: float | None, copy_bw: float) -> list[dict]:
    """Sparse step at each P vs torch.optim.AdamW(fused=True) on the dense tensor."""
    rows = []
    dense = torch.nn.Parameter(torch.randn(numel, device=device))
    dense.grad = torch.randn(numel, device=device)
    fused = torch.optim.AdamW([dense], lr=1e-4, weight_decay=0.01, fused=True)
    dense_ms = median_ms(fused.step, warmup=3, iters=20)
    del fused, dense
    for dtype in (torch.float32, torch.bfloat16):
        param = torch.randn(numel, device=device).to(dtype)
        for ratio in SPARSE_RATIOS:
            k = round(ratio * numel)
            idx = torch.randperm(numel, device=device)[:k].sort().values.to(torch.int32)
            grad = torch.randn(k, device=device)
            exp_avg, exp_avg_sq = torch.zeros(k, device=device), torch.zeros(k, device=device)
            master = param[idx.long()].float() if dtype != torch.float32 else None
            ms = median_ms(_SparseSteps(tb, [(param, grad, idx, exp_avg, exp_avg_sq, master)]), warmup=3, iters=20)
            compact = k * (4 + 4 + 2 * 8 + (8 if master is not None else 0))  # idx, grad, m+v r/w, master r/w
            # param: every sector holding a child entry is read (no master) and written.
            passes = 1 if master is not None else 2
            sectors = torch.unique(idx.long() // (32 // param.element_size())).numel()
            touched = compact + passes * 32 * sectors
            useful = compact + passes * k * param.element_size()
            rate = touched / (ms * 1e-3)
            rows.append({
                "param_dtype": str(dtype).replace("torch.", ""), "P": ratio, "numel": numel, "k": k,
                "ms": ms, "dense_fused_adamw_ms": dense_ms, "speedup_vs_dense_fused": dense_ms / ms,
                "touched_bytes": touched, "useful_bytes": useful,
                "touched_GBps": rate / 1e9, "useful_GBps": useful / (ms * 1e-3) / 1e9,
                "fraction_of_nominal_hbm": rate / peak_bw if peak_bw else None,
                "fraction_of_measured_copy": rate / copy_bw,
                "meets_target_60pct_hbm": (rate / (peak_bw or copy_bw)) >= 0.6,
            })
    return rows


def bench_model_step(tb, device: torch.device, config=None) -> list[dict]:
    """One sparse step over every wav2vec2-base (or ``config``) tensor, one launch each, vs
    dense fused AdamW over all of them."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    model = Wav2Vec2Model(config or Wav2Vec2Config())
    params = [p.detach().clone().to(device) for p in model.parameters()]
    del model
    numel = sum(p.numel() for p in params)
    dense = [torch.nn.Parameter(p.clone()) for p in params]
    for p in dense:
        p.grad = torch.randn_like(p)
    fused = torch.optim.AdamW(dense, lr=1e-4, fused=True)
    dense_ms = median_ms(fused.step, warmup=3, iters=10)
    del fused, dense
    rows = []
    for ratio in SPARSE_RATIOS:
        work = []
        for p in params:
            k = round(ratio * p.numel())
            if k == 0:
                continue
            idx = torch.randperm(p.numel(), device=device)[:k].sort().values.to(torch.int32)
            work.append((p, torch.randn(k, device=device), idx, torch.zeros(k, device=device),
                         torch.zeros(k, device=device), None))
        ms = median_ms(_SparseSteps(tb, work), warmup=2, iters=10)
        rows.append({"P": ratio, "tensors": len(work), "numel": numel, "ms": ms,
                     "dense_fused_adamw_ms": dense_ms, "speedup_vs_dense_fused": dense_ms / ms})
    return rows


# ---- 5. sparse weight gradients (SDDMM) ---------------------------------------------------

SDDMM_BENCH_FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
SDDMM_BENCH_ROWS = 8 * 199  # 8 utterances x 4 s at wav2vec2's 20 ms frame rate


def check_sparse_weight_grad(tb, device: torch.device) -> list[dict]:
    """The sddmm kernel on its shared cases (bounds relative to sum |dy||x|), and a short
    training run with the SDDMM path against the dense path on the triton backend."""
    from adtuning import ChildNetwork, SparseAdamW, install_sparse_weight_grad

    records = run_op_cases(tb, "sddmm", device)

    def train(mode: str):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5)).to(device)
        data_gen = torch.Generator().manual_seed(1)
        scores = {n: torch.rand(p.shape, generator=data_gen) for n, p in model.named_parameters()}
        child = ChildNetwork.from_scores(scores, 0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = SparseAdamW([{"named_params": model.named_parameters(), "child": child}], lr=3e-3, backend="triton")
        handle = install_sparse_weight_grad(model, opt, mode)
        for _ in range(6):
            x = torch.randn(3, 7, 13, generator=data_gen).to(device)
            y = torch.randint(0, 5, (3, 7), generator=data_gen).to(device)
            torch.nn.functional.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
        handle.remove()
        return child, before, {n: p.detach().clone() for n, p in model.named_parameters()}

    child, before, dense = train("dense")
    _, _, sparse = train("sparse")
    worst, untouched = 0.0, True
    for name, value in sparse.items():
        keep = torch.ones(value.numel(), dtype=torch.bool, device=device)
        if name in child.indices:
            idx = child.indices[name].long().to(device)
            keep[idx] = False
            worst = max(worst, (value.flatten()[idx] - dense[name].flatten()[idx]).abs().max().item())
        untouched = untouched and torch.equal(value.flatten()[keep], before[name].flatten()[keep])
    records.append({"op": "sparse training", "case": "6 steps dense vs sparse dW, triton backend",
                    "error": worst, "tolerance": 1e-4, "non_child_bit_identical": untouched,
                    "ok": worst <= 1e-4 and untouched})
    return records


def bench_sparse_weight_grad(tb, device: torch.device) -> dict:
    """Per wav2vec2-base Linear shape, the SDDMM (both operand layouts of the kernel) against
    dense GEMM + gather, and the crossover density of the launcher's default layout."""
    from adtuning.kernels import sddmm as sddmm_kernel

    shapes, rows, fractions = WAV2VEC2_BASE_SHAPES, SDDMM_BENCH_ROWS, SDDMM_BENCH_FRACTIONS
    if DRY_RUN:
        shapes, rows, fractions = [(33, 17)], 5, (0.01, 0.3)
    table, crossover, crossover_transposed = [], {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        for out_f, in_f in shapes:
            dy = torch.randn(rows, out_f, device=device).to(dtype)
            x = torch.randn(rows, in_f, device=device).to(dtype)
            numel = out_f * in_f
            dense_idx = torch.randperm(numel, device=device)[:max(1, numel // 100)].sort().values.to(torch.int32)
            dense_out = torch.zeros(dense_idx.numel(), device=device)
            dense_ms = median_ms(lambda: tb.gather(dy.t() @ x, dense_idx, out=dense_out, accumulate=True))
            faster, faster_transposed = [], []
            for fraction in fractions:
                k = max(1, round(fraction * numel))
                idx = torch.randperm(numel, device=device)[:k].sort().values.to(torch.int32)
                out = torch.zeros(k, device=device)
                ms = median_ms(lambda: tb.sddmm(dy, x, idx, out=out, accumulate=True))
                transposed_ms = median_ms(lambda: sddmm_kernel(dy, x, idx, out=out, accumulate=True,
                                                               transpose_operands=True))
                table.append({"dtype": str(dtype).replace("torch.", ""), "out": out_f, "in": in_f, "N": rows,
                              "P": fraction, "k": k, "sddmm_ms": ms, "sddmm_transposed_ms": transposed_ms,
                              "dense_gemm_gather_ms": dense_ms, "speedup": dense_ms / ms,
                              "speedup_transposed": dense_ms / transposed_ms})
                if ms <= dense_ms:
                    faster.append(fraction)
                if transposed_ms <= dense_ms:
                    faster_transposed.append(fraction)
            key = f"{str(dtype).replace('torch.', '')} {out_f}x{in_f}"
            crossover[key] = max(faster) if faster else 0.0
            crossover_transposed[key] = max(faster_transposed) if faster_transposed else 0.0
    return {"rows": table, "crossover": crossover, "crossover_transposed_operands": crossover_transposed,
            "suggested_threshold": {"fp32": min(v for k, v in crossover.items() if k.startswith("float32")),
                                    "bf16": min(v for k, v in crossover.items() if k.startswith("bfloat16"))}}


E2E_CONFIGS = [dict(name="full fp32", kind="full", dtype="fp32")] + [
    dict(name=f"child P={p} {dtype}{' sparse-dW' if wg != 'dense' else ''}", kind="child", p=p, dtype=dtype,
         weight_grad=wg)
    for dtype in ("fp32", "bf16") for p in (0.001, 0.01) for wg in ("dense", "sparse")
]


def bench_e2e_train_step(device: torch.device) -> list[dict]:
    """One wav2vec2-base training step (8 x 4 s): full fine-tuning vs CHILD-TUNING with dense and
    with sparse weight gradients; median time and peak memory, ratios to full fine-tuning."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import e2e_workload

    size = dict(layers=12, batch=8, seconds=4.0)
    if DRY_RUN:
        size = dict(layers=1, batch=1, seconds=0.25, model_overrides=dict(
            hidden_size=32, num_attention_heads=2, intermediate_size=37, conv_dim=(16,) * 7,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2))
    rows = []
    for config in E2E_CONFIGS:
        if DRY_RUN and config["dtype"] == "bf16":
            continue  # the interpreter's figures mean nothing; one dtype exercises the code
        full = dict(config, device=str(device), backend="triton", **size)
        model, batch, optimizer, info = e2e_workload.build(full)

        def step():
            model.loss(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        ms = median_ms(step, warmup=2, iters=3 if DRY_RUN else 10)
        peak = peak_bytes(step)
        rows.append(dict({k: v for k, v in info.items() if not isinstance(v, dict)}, name=config["name"],
                         ms=ms, peak_bytes=peak))
        model = batch = optimizer = None  # free this configuration before building the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]
    for row in rows[1:]:
        row["time_ratio_to_full"] = row["ms"] / base["ms"]
        row["memory_ratio_to_full"] = row["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None
    return rows


def bench_ddp_nccl() -> dict:
    """``bench/bench_ddp.py`` over NCCL in 2 processes on 2 GPUs (wav2vec2-base, 8 x 4 s per GPU):
    bytes all-reduced per step and step time of the compact all-reduce at P = 0.001, 0.01, 0.1
    against DDP full fine-tuning and DDP with CHILD-TUNING's dense mask. Skipped with fewer than
    2 GPUs; a dry run runs it over gloo on the CPU at a tiny size."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import bench_ddp

    if DRY_RUN:
        return bench_ddp.run_comparison(bench_ddp.settings("tiny"), "cpu", backend="reference")
    if torch.cuda.device_count() < bench_ddp.WORLD:
        return {"skipped": f"needs {bench_ddp.WORLD} GPUs, found {torch.cuda.device_count()}"}
    return bench_ddp.run_comparison(bench_ddp.settings("full"), "cuda", backend="triton")


def check_rng_streams(device: torch.device) -> dict:
    """A candidate's random stream on ``device`` (:mod:`adtuning.rng`): paused after some draws
    (dropout masks on the device, and a CPU draw), other draws in between, set back: the next
    draws are those an uninterrupted stream makes; a stream started twice from one seed draws the
    same. On CUDA this covers the device generator, which the CPU tests cannot."""
    from adtuning import rng

    def draws() -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.nn.functional.dropout(torch.ones(4099, device=device), p=0.5, training=True)
        return mask.cpu(), torch.rand(3)

    rng.set_state(rng.initial_state(11, device), device)
    first = draws()
    paused = rng.get_state(device)
    uninterrupted = draws()
    rng.set_state(rng.initial_state(12, device), device)
    draws()  # another candidate's draws
    rng.set_state(paused, device)
    resumed = draws()
    rng.set_state(rng.initial_state(11, device), device)
    again = draws()
    same_after_pause = all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))
    same_from_seed = all(torch.equal(a, b) for a, b in zip(first, again))
    return {"state_bytes": int(paused.numel()), "cpu_state_bytes": rng.CPU_STATE_BYTES,
            "same_after_pause": same_after_pause, "same_from_seed": same_from_seed,
            "ok": same_after_pause and same_from_seed and (device.type != "cuda" or paused.numel() > rng.CPU_STATE_BYTES)}


# ---- driver -------------------------------------------------------------------------------

def environment() -> dict:
    """Device, versions, commit and date recorded with every result
    (:func:`adtuning.environment.environment`, the recorder of the CLI, bench/ and tools/)."""
    from adtuning.environment import environment as record

    return record("cuda" if torch.cuda.is_available() else "cpu")


def _section(results: dict, name: str, fn: Callable[[], object], started: float) -> None:
    """Run one section, storing its result or its error; sections past the budget are skipped
    (not in dry runs, whose speed depends on the CPU's load)."""
    if not DRY_RUN and time.monotonic() - started > TIME_BUDGET_S:
        results[name] = {"skipped": f"time budget of {TIME_BUDGET_S:.0f} s spent"}
        print(f"[gpu_check] {name}: skipped (time budget spent)", flush=True)
        return
    t0 = time.monotonic()
    try:
        results[name] = fn()
        status = "done"
    except Exception as exc:
        results[name] = {"error": repr(exc), "traceback": traceback.format_exc()}
        status = f"FAILED: {exc!r}"
    print(f"[gpu_check] {name}: {status} in {time.monotonic() - t0:.1f} s", flush=True)


def _summary(results: dict) -> list[str]:
    lines = []
    kernels = results.get("kernel_correctness")
    if isinstance(kernels, list):
        bad = [r for r in kernels if not r["ok"]]
        worst = {}
        for r in kernels:
            worst[r["op"]] = max(worst.get(r["op"], 0.0), r["error"])
        lines.append(f"kernels: {len(kernels) - len(bad)}/{len(kernels)} cases ok; worst error "
                     + ", ".join(f"{op} {err:.2e}" for op, err in worst.items()))
        lines += [f"  FAIL {r['op']} {r['case']}: {r['error']:.3e} > {r['tolerance']:.0e}" for r in bad]
    fp = results.get("fisher_pass_correctness", {})
    if "error" in fp and isinstance(fp["error"], float):
        lines.append(f"Fisher pass vs {fp['oracle']}: error {fp['error']:.2e} ({'ok' if fp['ok'] else 'FAIL'})")
    for row in results.get("fisher_kernel", []) if isinstance(results.get("fisher_kernel"), list) else []:
        if "ms" in row:
            lines.append(f"Fisher kernel {row['out']}x{row['in']} {row['config']}: {row['ms']:.3f} ms "
                         f"({row['ratio_vs_dw_gemm']:.2f}x dW GEMM, {row['tflops']:.1f} TFLOP/s, err {row['rel_err_vs_fp64']:.1e})")
    pass_ = results.get("fisher_pass", {})
    if "memory_ratio" in pass_:
        lines.append(f"Fisher pass: {pass_['fisher_ms']:.1f} ms vs plain fwd+bwd {pass_['plain_ms']:.1f} ms "
                     f"= {pass_['time_ratio']:.2f}x (target <= 1.3x); peak memory "
                     f"{pass_['fisher_peak_bytes'] / 2**30:.2f} vs {pass_['plain_peak_bytes'] / 2**30:.2f} GiB "
                     f"= {pass_['memory_ratio']:.2f}x (target <= 1.1x)")
    for row in results.get("sparse_adamw", []) if isinstance(results.get("sparse_adamw"), list) else []:
        frac = row["fraction_of_nominal_hbm"] or row["fraction_of_measured_copy"]
        lines.append(f"sparse AdamW {row['param_dtype']} P={row['P']}: {row['ms']:.3f} ms vs dense fused "
                     f"{row['dense_fused_adamw_ms']:.3f} ms; {row['touched_GBps']:.0f} GB/s touched "
                     f"= {100 * frac:.0f}% of HBM (target >= 60%)")
    sw = results.get("sparse_weight_grad_correctness")
    if isinstance(sw, list):
        bad = [r for r in sw if not r["ok"]]
        lines.append(f"sparse weight gradients: {len(sw) - len(bad)}/{len(sw)} cases ok; worst error "
                     f"{max(r['error'] for r in sw):.2e}")
        lines += [f"  FAIL {r['op']} {r['case']}: {r['error']:.3e} > {r['tolerance']:.0e}" for r in bad]
    streams = results.get("rng_streams")
    if isinstance(streams, dict) and "ok" in streams:
        lines.append(f"random streams ({streams['state_bytes']} B state): pause/resume {'ok' if streams['same_after_pause'] else 'FAIL'}, "
                     f"from seed {'ok' if streams['same_from_seed'] else 'FAIL'}")
    sg = results.get("sparse_weight_grad")
    if isinstance(sg, dict) and "crossover" in sg:
        lines.append("SDDMM vs dense GEMM + gather, crossover P per shape: "
                     + ", ".join(f"{k} {v:g}" for k, v in sg["crossover"].items())
                     + f"; suggested DENSITY_THRESHOLDS['triton'] {sg['suggested_threshold']}")
        lines.append("  with transpose_operands=True: "
                     + ", ".join(f"{k} {v:g}" for k, v in sg["crossover_transposed_operands"].items()))
    for row in results.get("e2e_train_step", []) if isinstance(results.get("e2e_train_step"), list) else []:
        ratios = ""
        if "time_ratio_to_full" in row:
            memory = row["memory_ratio_to_full"]
            ratios = f" = {row['time_ratio_to_full']:.3f}x time" + (f", {memory:.3f}x memory" if memory else "")
        lines.append(f"e2e step {row['name']}: {row['ms']:.1f} ms, peak {row['peak_bytes'] / 2**30:.2f} GiB{ratios}")
    ddp = results.get("ddp_nccl")
    if isinstance(ddp, dict) and "rows" in ddp:
        for row in ddp["rows"]:
            lines.append(f"data parallel ({ddp['environment']['process_group_backend']}, 2 processes) {row['name']}: "
                         f"{row['allreduce_bytes_per_step']:,} B/step = {row['bytes_ratio_to_ddp_full']:.5f}x DDP, "
                         f"step {row['median_step_s'] * 1e3:.1f} ms = {row['step_time_ratio_to_ddp_full']:.3f}x DDP full FT")
    elif isinstance(ddp, dict) and "skipped" in ddp:
        lines.append(f"data parallel (NCCL): skipped: {ddp['skipped']}")
    for row in results.get("sparse_adamw_model", []) if isinstance(results.get("sparse_adamw_model"), list) else []:
        lines.append(f"sparse AdamW whole model ({row['tensors']} launches) P={row['P']}: {row['ms']:.3f} ms "
                     f"vs dense fused {row['dense_fused_adamw_ms']:.3f} ms")
    return lines


def _correctness_ok(results: dict) -> bool:
    kernels = results.get("kernel_correctness")
    fp = results.get("fisher_pass_correctness")
    sparse = results.get("sparse_weight_grad_correctness")
    kernels_ok = isinstance(kernels, list) and all(r["ok"] for r in kernels)
    pass_ok = isinstance(fp, dict) and (fp.get("ok", False) or "skipped" in fp)
    sparse_ok = isinstance(sparse, list) and all(r["ok"] for r in sparse) or (
        isinstance(sparse, dict) and "skipped" in sparse)
    streams = results.get("rng_streams")
    streams_ok = isinstance(streams, dict) and streams.get("ok", False)
    return kernels_ok and pass_ok and sparse_ok and streams_ok


def main(argv: list[str] | None = None) -> int:
    """Run every check and benchmark; write the JSON; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS,
                        help="folder for the JSON (default: bench/results)")
    parser.add_argument("--quick", action="store_true",
                        help="correctness only, no timings")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every section on the CPU under TRITON_INTERPRET=1 with tiny sizes, "
                             "to test this script without a GPU (the figures mean nothing)")
    args = parser.parse_args(argv)
    global DRY_RUN
    DRY_RUN = args.dry_run
    if DRY_RUN:
        if "adtuning.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run needs TRITON_INTERPRET=1 before the kernels are imported")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    elif not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False); "
              "the kernels are tested on the CPU by tests/test_ops.py under TRITON_INTERPRET=1 "
              "(and this script by --dry-run)")
        return 0

    started = time.monotonic()
    device = torch.device("cpu" if DRY_RUN else "cuda")
    adtuning = _import_adtuning()
    from adtuning.backends import get_backend

    tb = get_backend("triton", device)
    results: dict = {"environment": environment(), "dry_run": DRY_RUN}
    print(f"[gpu_check] {results['environment'].get('gpu') or results['environment'].get('device')} torch {torch.__version__} "
          f"triton {results['environment']['triton']}", flush=True)
    _section(results, "kernel_correctness", lambda: check_kernels(tb, device), started)
    _section(results, "fisher_pass_correctness", lambda: check_fisher_pass(adtuning, device), started)
    _section(results, "sparse_weight_grad_correctness", lambda: check_sparse_weight_grad(tb, device), started)
    _section(results, "rng_streams", lambda: check_rng_streams(device), started)
    if not args.quick:
        # Most important figures first: later sections are skipped if the time budget runs out.
        pass_kwargs = {"batch": 2, "seconds": 0.25, "config": _tiny_wav2vec2_config()} if DRY_RUN else {}
        _section(results, "fisher_pass", lambda: bench_fisher_pass(device, **pass_kwargs), started)
        torch.cuda.empty_cache()
        name = results["environment"].get("gpu") or ""
        peak = next((bw for key, bw in NOMINAL_HBM.items() if key in name), None)
        _section(results, "bandwidth", lambda: {"nominal_hbm_Bps": peak,
                                                "measured_copy_Bps": copy_bandwidth(device)}, started)
        copy_bw = results["bandwidth"].get("measured_copy_Bps") or peak or 1.0
        _section(results, "sparse_adamw",
                 lambda: bench_sparse_adamw(tb, device, 10_007 if DRY_RUN else SPARSE_BENCH_NUMEL,
                                            peak, copy_bw), started)
        torch.cuda.empty_cache()
        model_config = _tiny_wav2vec2_config() if DRY_RUN else None
        _section(results, "sparse_adamw_model", lambda: bench_model_step(tb, device, model_config), started)
        torch.cuda.empty_cache()
        _section(results, "sparse_weight_grad", lambda: bench_sparse_weight_grad(tb, device), started)
        torch.cuda.empty_cache()
        _section(results, "e2e_train_step", lambda: bench_e2e_train_step(device), started)
        torch.cuda.empty_cache()
        _section(results, "ddp_nccl", bench_ddp_nccl, started)
        _section(results, "fisher_kernel", lambda: bench_fisher_kernel(device), started)
    results["elapsed_s"] = time.monotonic() - started
    ok = _correctness_ok(results)
    results["correctness_ok"] = ok

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = "".join(c if c.isalnum() else "-" for c in (results["environment"].get("gpu") or "cuda"))
    if DRY_RUN:
        slug = "dry-run-cpu"
    path = args.results_dir / f"gpu_check_{stamp}_{slug}.json"
    text = json.dumps(results, indent=2, default=str)
    from adtuning.atomic import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    print("\n".join(_summary(results)))
    print(f"[gpu_check] {'all correctness checks passed' if ok else 'CORRECTNESS FAILURES'}; "
          f"{results['elapsed_s']:.0f} s; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
