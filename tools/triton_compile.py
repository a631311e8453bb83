"""Compile the Triton kernels ahead of time for a CUDA target; no GPU needed.

The interpreted tests (``TRITON_INTERPRET=1``) check what the kernels compute but never run
Triton's compiler, so a kernel can pass them and still fail to compile for a GPU, or compile
into code that spills registers. This module calls the public launchers of
:mod:`adtuning.kernels` on meta tensors for a set of representative launches (every dtype,
index type, optional argument and block-size branch; layer shapes from 1 x 1 to wav2vec2-base;
lengths, strides and sizes that change the JIT's specialisation), records the kernel call each
launcher would make instead of launching it, derives the variant with Triton's own
specialisation rules, and runs the real pipeline (TTIR, TTGIR, LLVM IR, PTX, then a cubin from
the ``ptxas`` bundled with Triton), reading registers, spills and shared memory back from
``ptxas -v``::

    python -m tools.triton_compile [--target cuda:90] [--quick] [--json PATH]   # from the repository root

Exit status 0 when every variant compiled, 1 otherwise. Run it without ``TRITON_INTERPRET``
(under the interpreter the kernels are not compilable objects).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import functools
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from adtuning.atomic import atomic_write
from adtuning.kernels._common import block_for_sm_count

# Child-set sizes k for the 1-D kernels. The JIT compiles a separate variant when k == 1 (a
# constant) and when k is a multiple of 16, and the launcher's block size follows k: on a
# 132-SM GPU these give blocks 128 (k = 1, 768 and 94,371), 256, 512 and 1024.
ELEMENTWISE_K = (1, 768, 94_371, 200_003, 400_000, 1 << 20)
QUICK_ELEMENTWISE_K = (1, 1 << 20)
# Multiprocessors of the GPUs each target stands for (H100 SXM / H200, A100): they set the
# launchers' block sizes for a given k. Other targets need --sm-count.
SM_COUNT = {90: 132, 80: 108}
# (batch, frames, in_features, out_features): one frame of a 1 x 1 layer (every size argument
# becomes the constant 1), an odd mid-size layer (no alignment hints), wav2vec2-base's
# feed-forward layer over 8 x 4 s (the usual launch), 208 frames (a multiple of 16: a hint of
# its own), and one frame per sample (2-D inputs reach the kernel as [N, 1, features]).
FISHER_SHAPES = ((1, 1, 1, 1), (3, 17, 33, 97), (8, 199, 768, 3072), (8, 208, 768, 768),
                 (16, 1, 768, 768))
QUICK_FISHER_SHAPES = ((8, 199, 768, 3072),)
# (x dtype, dy dtype) pairs the launcher accepts: equal 16-bit or fp32 dtypes, and mixed ones.
FISHER_DTYPES = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
)
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.int32: "i32", torch.int64: "i64"}
KERNEL_MODULES = {"gather": "_gather_kernel", "sparse_adamw": "_sparse_adamw_kernel",
                  "linear_fisher": "_linear_fisher_kernel", "sddmm": "_sddmm_kernel"}
# (frames, out_features, in_features, k) of the SDDMM launches: a 1 x 1 layer with one entry
# (constants everywhere), an odd mid-size layer, and wav2vec2-base's feed-forward layer over
# 8 x 4 s (1,599 frames per sample) at the child densities of P = 0.001 and 0.01.
SDDMM_SHAPES = ((1, 1, 1, 1), (17, 33, 97, 31), (12_792, 3072, 768, 2_359), (12_792, 3072, 768, 23_593))
QUICK_SDDMM_SHAPES = ((12_792, 3072, 768, 2_359),)
LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """One kernel launch as a launcher made it: argument values, constexprs, launch options.

    The argument values go through Triton's own specialisation rules at compile time (an int
    equal to 1 becomes a constant; pointers and ints divisible by 16 get an alignment hint), so
    the compiled variant is the one the JIT would build for that launch.
    """

    kernel: str  # attribute path "module:function" under adtuning.kernels
    label: str
    args: tuple[tuple[str, object], ...]  # (argument, meta tensor or Python scalar)
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.label} {consts} warps={self.num_warps} stages={self.num_stages}"


def _load_kernel(path: str):
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(f"adtuning.kernels.{module_name}"), attr)


@contextlib.contextmanager
def _recorded_launches(sm_count: int) -> Iterator[list]:
    """Make the launchers record their kernel calls instead of launching them.

    Inside, the launchers run their own argument checks and configuration code on meta
    tensors as if on a CUDA device with ``sm_count`` multiprocessors (not interpreting); each
    ``kernel[grid](*args, **kwargs)`` appends ``(module, args, kwargs)`` to the yielded list.
    """
    calls: list = []

    class Recorder:
        def __init__(self, module: str):
            self.module = module

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.module, args, kwargs))

    def block(k, device, largest=1024, smallest=128):
        return block_for_sm_count(k, sm_count, largest, smallest)

    patches = []
    for name, kernel_attr in KERNEL_MODULES.items():
        module = importlib.import_module(f"adtuning.kernels.{name}")
        patches.append((module, kernel_attr, Recorder(name)))
        patches.append((module, "check_device", lambda *tensors: None))
        if hasattr(module, "elementwise_block"):
            patches.append((module, "elementwise_block", block))
        if hasattr(module, "interpreting"):
            patches.append((module, "interpreting", lambda: False))
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in patches]
    try:
        for module, attr, value in patches:
            setattr(module, attr, value)
        yield calls
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _launch_cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(label, call of a public launcher on meta tensors) for every representative launch."""
    from adtuning.kernels import gather, linear_fisher, sddmm, sparse_adamw
    from adtuning.kernels.linear_fisher import TUNING_CANDIDATES

    ks = QUICK_ELEMENTWISE_K if quick else ELEMENTWISE_K
    for grad_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for index_dtype in (torch.int32, torch.int64):
            for accumulate in (False, True):
                for k in ks:
                    def call(grad_dtype=grad_dtype, index_dtype=index_dtype, accumulate=accumulate, k=k):
                        gather(_meta(4 * k, dtype=grad_dtype), _meta(k, dtype=index_dtype),
                               out=_meta(k) if accumulate else None, accumulate=accumulate)
                    yield (f"gather grad={TRITON_TYPE[grad_dtype]} idx={TRITON_TYPE[index_dtype]} "
                           f"k={k}"), call
    # fp32 weights with or without a master copy; 16-bit weights always have one.
    for param_dtype, has_master in ((torch.float32, False), (torch.float32, True),
                                    (torch.bfloat16, True), (torch.float16, True)):
        for index_dtype in (torch.int32, torch.int64):
            for k in ks:
                def call(param_dtype=param_dtype, has_master=has_master, index_dtype=index_dtype, k=k):
                    sparse_adamw(_meta(4 * k, dtype=param_dtype), _meta(k), _meta(k, dtype=index_dtype),
                                 _meta(k), _meta(k), _meta(k) if has_master else None, step=3,
                                 lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
                yield (f"sparse_adamw param={TRITON_TYPE[param_dtype]} idx={TRITON_TYPE[index_dtype]} "
                       f"master={has_master} k={k}"), call

    def fisher_call(shape, x_dtype, dy_dtype, has_bias, lengths_dtype, x_transposed=False, **tiling):
        batch, frames, in_f, out_f = shape
        x = (_meta(batch, in_f, frames, dtype=x_dtype).transpose(1, 2) if x_transposed
             else _meta(batch, frames, in_f, dtype=x_dtype))
        linear_fisher(x, _meta(batch, frames, out_f, dtype=dy_dtype), _meta(out_f, in_f),
                      _meta(out_f) if has_bias else None,
                      _meta(batch, dtype=lengths_dtype) if lengths_dtype is not None else None,
                      **tiling)

    # SDDMM (sparse weight gradients): equal and mixed input dtypes, both index types, with and
    # without accumulation into the compact buffer, strided or frame-contiguous operands.
    for x_dtype, dy_dtype in FISHER_DTYPES:
        for frames, out_f, in_f, k in (QUICK_SDDMM_SHAPES if quick else SDDMM_SHAPES):
            for index_dtype in (torch.int32, torch.int64):
                for accumulate in (False, True):
                    for transposed in ((False,) if quick else (False, True)):
                        def call(x_dtype=x_dtype, dy_dtype=dy_dtype, frames=frames, out_f=out_f, in_f=in_f,
                                 k=k, index_dtype=index_dtype, accumulate=accumulate, transposed=transposed):
                            sddmm(_meta(frames, out_f, dtype=dy_dtype), _meta(frames, in_f, dtype=x_dtype),
                                  _meta(k, dtype=index_dtype), out=_meta(k), accumulate=accumulate,
                                  transpose_operands=transposed)
                        yield (f"sddmm x={TRITON_TYPE[x_dtype]} dy={TRITON_TYPE[dy_dtype]} "
                               f"N,out,in,k={frames},{out_f},{in_f},{k} idx={TRITON_TYPE[index_dtype]} "
                               f"accumulate={accumulate} frame-contiguous={transposed}"), call
    for x_dtype, dy_dtype in FISHER_DTYPES:
        for shape in (QUICK_FISHER_SHAPES if quick else FISHER_SHAPES):
            for has_bias in (True, False):
                for lengths_dtype in (torch.int64, None):
                    yield (f"linear_fisher x={TRITON_TYPE[x_dtype]} dy={TRITON_TYPE[dy_dtype]} "
                           f"B,T,in,out={','.join(map(str, shape))} bias={has_bias} "
                           f"lengths={TRITON_TYPE.get(lengths_dtype)}"), (
                        lambda a=(shape, x_dtype, dy_dtype, has_bias, lengths_dtype): fisher_call(*a))
    if quick:
        return
    usual = FISHER_SHAPES[2]
    for dtype in (torch.float32, torch.bfloat16):
        name = TRITON_TYPE[dtype]
        yield (f"linear_fisher x=dy={name} int32 lengths",
               lambda d=dtype: fisher_call(usual, d, d, True, torch.int32))
        yield (f"linear_fisher x=dy={name} x transposed",
               lambda d=dtype: fisher_call(usual, d, d, True, torch.int64, x_transposed=True))
        # bench/gpu_check.py times these tilings; each must compile for the run to be useful.
        for block_m, block_n, block_k, num_warps, num_stages, precision in TUNING_CANDIDATES:
            tiling = {"block_m": block_m, "block_n": block_n, "block_k": block_k,
                      "num_warps": num_warps, "num_stages": num_stages, "input_precision": precision}
            yield (f"linear_fisher tuning candidate x=dy={name}",
                   lambda d=dtype, t=tiling: fisher_call(usual, d, d, True, torch.int64, **t))
    # The largest sample the launcher accepts (2^31 elements): 64-bit batch strides.
    largest = (2, 2**21, 1024, 1024)
    yield ("linear_fisher x=dy=bf16 B,T,in,out=2,2097152,1024,1024 (64-bit batch strides)",
           lambda: fisher_call(largest, torch.bfloat16, torch.bfloat16, True, torch.int64))


def specialisations(quick: bool = False, capability: int = 90,
                    sm_count: int | None = None) -> list[Specialisation]:
    """The distinct kernel variants of the representative launches on a GPU of compute
    capability ``capability`` with ``sm_count`` multiprocessors (default: :data:`SM_COUNT`).

    ``quick``: two child-set sizes per 1-D kernel variant and one layer shape for the Fisher
    kernel.
    """
    if sm_count is None:
        if capability not in SM_COUNT:
            raise ValueError(f"no SM count known for compute capability {capability}; pass sm_count")
        sm_count = SM_COUNT[capability]
    specs, seen = [], set()
    for label, call in _launch_cases(quick):
        with _recorded_launches(sm_count) as calls:
            call()
        for module, args, kwargs in calls:
            kernel_path = f"{module}:{KERNEL_MODULES[module]}"
            kernel = _load_kernel(kernel_path)
            runtime = [name for name in kernel.arg_names if name not in kwargs]
            spec = Specialisation(
                kernel_path, label, tuple(zip(runtime, args, strict=True)),
                tuple((k, v) for k, v in kwargs.items() if k not in LAUNCH_OPTIONS),
                kwargs.get("num_warps", 4), kwargs.get("num_stages", 3),
            )
            key = _variant_key(kernel, spec)
            if key not in seen:
                seen.add(key)
                specs.append(spec)
    return specs


def _variant_key(kernel, spec: Specialisation) -> tuple:
    """What makes two launches compile to the same binary."""
    signature, constexprs, attrs = _specialise(kernel, spec)
    return (spec.kernel, tuple(signature.items()), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            tuple(sorted(attrs)), spec.num_warps, spec.num_stages)


def _specialise(kernel, spec: Specialisation) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attributes that Triton's JIT derives for ``spec``'s arguments."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    constexprs = dict(spec.constexprs)
    values = dict(spec.args)
    signature, attrs = {}, {}
    for position, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in values:
            raise KeyError(f"{spec.kernel}: no value given for argument {name!r}")
        # Meta tensors have data_ptr 0: aligned, like a fresh CUDA allocation.
        # (is_const=False, specialize=True, align=True): how the JIT treats a plain argument.
        kind, key = native_specialize_impl(CUDABackend, values[name], False, True, True)[:2]
        if kind == "constexpr":  # an int equal to 1
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        else:
            signature[name] = kind
            if key:
                attrs[(position,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


def parse_target(text: str):
    """``cuda:90`` -> Triton GPUTarget (capability 90, 32 threads per warp)."""
    from triton.backends.compiler import GPUTarget

    match = re.fullmatch(r"cuda:(\d+)", text.strip())
    if not match:
        raise ValueError(f"--target must look like cuda:90 (backend:capability), got {text!r}")
    return GPUTarget("cuda", int(match.group(1)), 32)


def _ptxas_report(ptx: str, capability: int) -> dict:
    """Registers, spill bytes and stack frame from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
             str(source), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True, check=False,
        )
    log = result.stderr + result.stdout
    if result.returncode != 0:
        raise RuntimeError(f"ptxas -v failed ({result.returncode}):\n{log}")

    def number(pattern: str, required: bool = True) -> int:
        found = re.search(pattern, log)
        if found is None and required:  # a changed ptxas report must not read as "no spills"
            raise RuntimeError(f"ptxas -v output has no match for {pattern!r}:\n{log}")
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "stack_frame_bytes": number(r"(\d+) bytes stack frame", required=False),
    }


def compile_one(spec: Specialisation, target_text: str) -> dict:
    """Compile one specialisation for ``target_text``; a dict with the outcome and resources."""
    import triton
    from triton.compiler import ASTSource, make_backend

    target = parse_target(target_text)
    row = {"kernel": spec.kernel.split(":")[1], "variant": spec.describe()}
    start = time.perf_counter()
    try:
        kernel = _load_kernel(spec.kernel)
        signature, constexprs, attrs = _specialise(kernel, spec)
        row["constant_args"] = [name for name in constexprs if name not in dict(spec.constexprs)]
        options = make_backend(target).parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                            attrs=attrs),
                                  target=target, options=options.__dict__)
        row.update(_ptxas_report(compiled.asm["ptx"], target.arch))
        row["shared_bytes"] = int(compiled.metadata.shared)
        row["ok"] = True
    except Exception as exc:  # report every failure, not just the first
        row["ok"] = False
        row["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


@functools.lru_cache(maxsize=4)
def _cached_specialisations(quick: bool, capability: int, sm_count: int | None) -> list[Specialisation]:
    return specialisations(quick, capability, sm_count)


def _compile_indexed(args: tuple[int, bool, str, int | None]) -> dict:
    index, quick, target_text, sm_count = args
    spec = _cached_specialisations(quick, parse_target(target_text).arch, sm_count)[index]
    return compile_one(spec, target_text)


def compile_all(target_text: str = "cuda:90", quick: bool = False, jobs: int | None = None,
                progress: Callable[[dict], None] | None = None,
                sm_count: int | None = None) -> list[dict]:
    """Compile every variant for ``target_text`` with ``jobs`` worker processes."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("tools.triton_compile: unset TRITON_INTERPRET; interpreted kernels "
                           "cannot be compiled")
    capability = parse_target(target_text).arch  # fails on a bad target before any work
    count = len(_cached_specialisations(quick, capability, sm_count))
    jobs = max(1, min(jobs or os.cpu_count() or 1, count))
    work = [(i, quick, target_text, sm_count) for i in range(count)]
    rows: list[dict] = []
    if jobs == 1:
        for item in work:
            rows.append(_compile_indexed(item))
            if progress:
                progress(rows[-1])
        return rows
    # spawn, not fork: the parent may already hold Triton/LLVM state that forking would copy.
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in pool.map(_compile_indexed, work):
            rows.append(row)
            if progress:
                progress(row)
    return rows


def _versions() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90).version
    except Exception as exc:  # the version only decorates the report
        ptxas = f"unknown ({exc})"
    from adtuning.environment import environment

    return {**environment(), "triton": triton.__version__, "ptxas": ptxas}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.triton_compile",
        description="Compile the adtuning Triton kernel variants of representative launches for a "
                    "CUDA target without a GPU, and report registers, spills and shared memory "
                    "from ptxas.")
    parser.add_argument("--target", default="cuda:90",
                        help="backend:compute-capability, e.g. cuda:90 (H100/H200), cuda:80 (A100)")
    parser.add_argument("--quick", action="store_true",
                        help="two child-set sizes per 1-D kernel variant and wav2vec2-base's layer "
                             "shape only for the Fisher kernel")
    parser.add_argument("--sm-count", type=int, default=None,
                        help="multiprocessors of the GPU (sets the 1-D kernels' block sizes; "
                             f"default: {SM_COUNT} by capability)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: one per CPU core)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    try:
        capability = parse_target(args.target).arch
    except ValueError as exc:
        parser.error(str(exc))
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.sm_count is not None and args.sm_count < 1:
        parser.error(f"--sm-count must be >= 1, got {args.sm_count}")
    if args.sm_count is None and capability not in SM_COUNT:
        parser.error(f"--sm-count is needed for --target {args.target} (known: {sorted(SM_COUNT)})")

    total = len(_cached_specialisations(args.quick, capability, args.sm_count))
    done = 0

    def show(row: dict) -> None:
        nonlocal done
        done += 1
        if row["ok"]:
            spill = row["spill_store_bytes"] + row["spill_load_bytes"]
            status = (f"regs={row['registers']:3d} spill={spill:4d}B "
                      f"smem={row['shared_bytes'] // 1024:3d}KiB {row['seconds']:5.1f}s")
        else:
            status = "FAILED"
        print(f"[{done:3d}/{total}] {status}  {row['variant']}", flush=True)
        if not row["ok"]:
            print("    " + row["error"].strip().splitlines()[-1], flush=True)

    start = time.perf_counter()
    try:
        rows = compile_all(args.target, args.quick, args.jobs, progress=show, sm_count=args.sm_count)
    except (RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in rows if not r["ok"]]
    spilling = [r for r in rows if r["ok"] and r["spill_store_bytes"] + r["spill_load_bytes"] > 0]
    print(f"{len(rows) - len(failed)}/{len(rows)} compiled for {args.target} in "
          f"{time.perf_counter() - start:.0f} s; {len(spilling)} variants spill registers")
    if args.json is not None:
        report = {"date": _dt.date.today().isoformat(), "target": args.target, "quick": args.quick,
                  "sm_count": args.sm_count or SM_COUNT[capability],
                  "versions": _versions(), "compiled": len(rows) - len(failed),
                  "failed": len(failed), "spilling": len(spilling), "kernels": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=1) + "\n"
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
