"""Compile every Triton kernel specialisation ahead of time for a CUDA target; no GPU needed.

The interpreted tests (``TRITON_INTERPRET=1``) check what the kernels compute but never run
Triton's compiler, so a kernel can pass them and still fail to compile for a GPU, or compile
into code that spills registers. This module runs the real pipeline (TTIR, TTGIR, LLVM IR,
PTX, then a cubin from the ``ptxas`` bundled with Triton) on every specialisation the
launchers in :mod:`adtuning.kernels` can produce, and reads registers, spills and shared
memory back from ``ptxas -v``::

    python -m adtuning.triton_compile [--target cuda:90] [--quick] [--json PATH]

Exit status 0 when every specialisation compiled, 1 otherwise. Run it without
``TRITON_INTERPRET`` (under the interpreter the kernels are not compilable objects).
Compiled kernels land in Triton's cache, like the first launch on a GPU would put them.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as _dt
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adtuning.atomic import atomic_write
from adtuning.kernels._common import block_for_sm_count

# Child-set sizes k for the 1-D kernels. The JIT compiles a separate variant when k == 1 (a
# constant) and when k is a multiple of 16, and the launcher's block size follows k: on a
# 132-SM GPU these give blocks 128 (k = 1 and 94,371), 256, 512 and 1024.
ELEMENTWISE_K = (1, 94_371, 200_003, 400_000, 1 << 20)
QUICK_ELEMENTWISE_K = (1, 1 << 20)
# Multiprocessors of the GPUs each target stands for (H100 SXM / H200, A100), which set the
# launcher's block size for a given k.
SM_COUNT = {90: 132, 80: 108}
# (batch, frames, in_features, out_features) whose default tilings cover every block-size
# branch: one frame of a 1 x 1 layer (16 x 16 x 16 tiles; the JIT makes every size
# argument a constant 1), an odd mid-size layer, and wav2vec2-base's feed-forward layer over
# 8 x 4 s (64 x 64 tiles, 16 or 32 frames).
FISHER_SHAPES = ((1, 1, 1, 1), (3, 17, 33, 97), (8, 199, 768, 3072))
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


@dataclasses.dataclass(frozen=True)
class Pointer:
    """A tensor argument: a freshly allocated (16-byte aligned) contiguous tensor of ``dtype``."""

    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """One kernel launch as the launcher makes it: argument values, constexprs, launch options.

    The argument values go through Triton's own specialisation rules at compile time (an int
    equal to 1 becomes a constant; pointers and ints divisible by 16 get an alignment hint), so
    the compiled variant is the one the JIT would build for that launch.
    """

    kernel: str  # attribute path "module:function" under adtuning.kernels
    label: str
    args: tuple[tuple[str, object], ...]  # (argument, Pointer or Python scalar) at run time
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.label} {consts} warps={self.num_warps} stages={self.num_stages}"


def _load_kernel(path: str):
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(f"adtuning.kernels.{module_name}"), attr)


def _gather_specs(quick: bool, sm_count: int) -> list[Specialisation]:
    mod = importlib.import_module("adtuning.kernels.gather")
    specs = []
    for grad_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for index_dtype in (torch.int32, torch.int64):
            for accumulate in (False, True):
                for k in (QUICK_ELEMENTWISE_K if quick else ELEMENTWISE_K):
                    block = block_for_sm_count(k, sm_count, mod.MAX_BLOCK_SIZE)
                    specs.append(Specialisation(
                        "gather:_gather_kernel",
                        f"gather grad={TRITON_TYPE[grad_dtype]} idx={TRITON_TYPE[index_dtype]} k={k}",
                        (("grad_ptr", Pointer(grad_dtype)), ("idx_ptr", Pointer(index_dtype)),
                         ("out_ptr", Pointer(torch.float32)), ("k", k)),
                        (("ACCUMULATE", accumulate), ("BLOCK_SIZE", block)),
                        mod.NUM_WARPS, 3,
                    ))
    return specs


def _sparse_adamw_specs(quick: bool, sm_count: int) -> list[Specialisation]:
    mod = importlib.import_module("adtuning.kernels.sparse_adamw")
    # AdamW's step scalars as the launcher passes them (Python floats: never specialised).
    scalars = (("decay", 1 - 1e-4 * 0.01), ("one_minus_beta1", 0.1), ("beta2", 0.999),
               ("one_minus_beta2", 0.001), ("bias_correction2_sqrt", 0.0316), ("eps", 1e-8),
               ("neg_step_size", -1e-3))
    specs = []
    # fp32 weights with or without a master copy; 16-bit weights always have one.
    for param_dtype, has_master in ((torch.float32, False), (torch.float32, True),
                                    (torch.bfloat16, True), (torch.float16, True)):
        for index_dtype in (torch.int32, torch.int64):
            for k in (QUICK_ELEMENTWISE_K if quick else ELEMENTWISE_K):
                block = block_for_sm_count(k, sm_count, mod.MAX_BLOCK_SIZE)
                args = (("param_ptr", Pointer(param_dtype)), ("grad_ptr", Pointer(torch.float32)),
                        ("idx_ptr", Pointer(index_dtype)), ("exp_avg_ptr", Pointer(torch.float32)),
                        ("exp_avg_sq_ptr", Pointer(torch.float32)),
                        ("master_ptr", Pointer(torch.float32)), ("k", k)) + scalars
                specs.append(Specialisation(
                    "sparse_adamw:_sparse_adamw_kernel",
                    f"sparse_adamw param={TRITON_TYPE[param_dtype]} idx={TRITON_TYPE[index_dtype]} k={k}",
                    args,
                    (("HAS_MASTER", has_master), ("PARAM_BF16", param_dtype == torch.bfloat16),
                     ("BLOCK_SIZE", block)),
                    mod.NUM_WARPS, 3,
                ))
    return specs


def _linear_fisher_spec(shape, x_dtype, dy_dtype, has_bias, has_lengths, config, label,
                        x_transposed: bool = False,
                        lengths_dtype: torch.dtype = torch.int64) -> Specialisation:
    batch, frames, in_features, out_features = shape
    config = dict(config)
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
    # Contiguous [B, T, in] and [B, T, out] tensors, as the Fisher pass saves and receives them;
    # ``x_transposed``: x is a [B, T, in] view of a contiguous [B, in, T] tensor.
    x_strides = (frames * in_features, 1, frames) if x_transposed else (frames * in_features, in_features, 1)
    args = (("x_ptr", Pointer(x_dtype)), ("dy_ptr", Pointer(dy_dtype)),
            ("fisher_w_ptr", Pointer(torch.float32)), ("fisher_b_ptr", Pointer(torch.float32)),
            ("lengths_ptr", Pointer(lengths_dtype)),
            ("batch", batch), ("frames", frames), ("in_features", in_features),
            ("out_features", out_features),
            ("stride_xb", x_strides[0]), ("stride_xt", x_strides[1]), ("stride_xi", x_strides[2]),
            ("stride_db", frames * out_features), ("stride_dt", out_features), ("stride_do", 1))
    constexprs = (("HAS_BIAS", has_bias), ("HAS_LENGTHS", has_lengths)) + tuple(config.items())
    return Specialisation("linear_fisher:_linear_fisher_kernel", label, args, constexprs,
                          num_warps, num_stages)


def _linear_fisher_specs(quick: bool) -> list[Specialisation]:
    from adtuning.kernels.linear_fisher import TUNING_CANDIDATES, kernel_config

    specs = []
    shapes = FISHER_SHAPES[-1:] if quick else FISHER_SHAPES
    for x_dtype, dy_dtype in FISHER_DTYPES:
        pair = f"x={TRITON_TYPE[x_dtype]} dy={TRITON_TYPE[dy_dtype]}"
        for shape in shapes:
            batch, frames, in_f, out_f = shape
            config = kernel_config(x_dtype, dy_dtype, out_f, in_f, frames)
            for has_bias, has_lengths in ((True, True), (False, False)):
                specs.append(_linear_fisher_spec(
                    shape, x_dtype, dy_dtype, has_bias, has_lengths, config,
                    f"linear_fisher {pair} B,T,in,out={batch},{frames},{in_f},{out_f}"))
    if not quick:
        shape = FISHER_SHAPES[-1]
        # The launcher takes any strides (a transposed x is a variant of its own), int32 lengths,
        # and batches of over 2^31 elements (64-bit strides).
        for dtype in (torch.float32, torch.bfloat16):
            config = kernel_config(dtype, dtype, shape[3], shape[2], shape[1])
            specs.append(_linear_fisher_spec(
                shape, dtype, dtype, True, True, config,
                f"linear_fisher x=dy={TRITON_TYPE[dtype]} x transposed", x_transposed=True))
            specs.append(_linear_fisher_spec(
                shape, dtype, dtype, True, True, config,
                f"linear_fisher x=dy={TRITON_TYPE[dtype]} int32 lengths", lengths_dtype=torch.int32))
        huge = (2, 2_800_001, 768, 768)  # T * in > 2^31: the batch strides are 64-bit
        specs.append(_linear_fisher_spec(
            huge, torch.bfloat16, torch.bfloat16, True, True,
            kernel_config(torch.bfloat16, torch.bfloat16, huge[3], huge[2], huge[1]),
            "linear_fisher x=dy=bf16 B,T,in,out=2,2800001,768,768 (64-bit batch strides)"))
        # bench/gpu_check.py times these tilings; each must compile for the run to be useful.
        for dtype in (torch.float32, torch.bfloat16):
            for block_m, block_n, block_k, num_warps, num_stages, precision in TUNING_CANDIDATES:
                config = kernel_config(
                    dtype, dtype, shape[3], shape[2], shape[1], block_m=block_m, block_n=block_n, block_k=block_k, input_precision=precision,
                    num_warps=num_warps, num_stages=num_stages)
                specs.append(_linear_fisher_spec(
                    shape, dtype, dtype, True, True, config,
                    f"linear_fisher tuning candidate x=dy={TRITON_TYPE[dtype]}"))
    return specs


def specialisations(quick: bool = False, capability: int = 90) -> list[Specialisation]:
    """Every kernel variant the launchers make on a GPU of compute capability ``capability``
    (whose usual SM count sets the 1-D kernels' block sizes).

    ``quick``: two child-set sizes per 1-D kernel variant and one layer shape for the Fisher
    kernel.
    """
    sm_count = SM_COUNT.get(capability, SM_COUNT[90])
    return (_gather_specs(quick, sm_count) + _sparse_adamw_specs(quick, sm_count)
            + _linear_fisher_specs(quick))


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

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "stack_frame_bytes": number(r"(\d+) bytes stack frame"),
    }


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
        value = values[name]
        if isinstance(value, Pointer):
            value = torch.empty(16, dtype=value.dtype)  # fresh allocation: 16-byte aligned
        # (is_const=False, specialize=True, align=True): how the JIT treats a plain argument.
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)[:2]
        if kind == "constexpr":  # an int equal to 1
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        else:
            signature[name] = kind
            if key:
                attrs[(position,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


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


def _compile_indexed(args: tuple[int, bool, str]) -> dict:
    index, quick, target_text = args
    spec = specialisations(quick, parse_target(target_text).arch)[index]
    return compile_one(spec, target_text)


def compile_all(target_text: str = "cuda:90", quick: bool = False, jobs: int | None = None,
                progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Compile every specialisation for ``target_text`` with ``jobs`` worker processes."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("adtuning.triton_compile: unset TRITON_INTERPRET; interpreted kernels "
                           "cannot be compiled")
    capability = parse_target(target_text).arch  # fails on a bad target before any work
    count = len(specialisations(quick, capability))
    jobs = max(1, min(jobs or os.cpu_count() or 1, count))
    work = [(i, quick, target_text) for i in range(count)]
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
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "triton": triton.__version__, "ptxas": ptxas}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adtuning.triton_compile",
        description="Compile every adtuning Triton kernel variant for a CUDA target without a "
                    "GPU, and report registers, spills and shared memory from ptxas.")
    parser.add_argument("--target", default="cuda:90",
                        help="backend:compute-capability, e.g. cuda:90 (H100/H200), cuda:80 (A100)")
    parser.add_argument("--quick", action="store_true",
                        help="one block size per variant and wav2vec2-base's layer shape only")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: one per CPU core)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    try:
        parse_target(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")

    total = len(specialisations(args.quick, parse_target(args.target).arch))
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
        rows = compile_all(args.target, args.quick, args.jobs, progress=show)
    except (RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in rows if not r["ok"]]
    spilling = [r for r in rows if r["ok"] and r["spill_store_bytes"] + r["spill_load_bytes"] > 0]
    print(f"{len(rows) - len(failed)}/{len(rows)} compiled for {args.target} in "
          f"{time.perf_counter() - start:.0f} s; {len(spilling)} variants spill registers")
    if args.json is not None:
        report = {"date": _dt.date.today().isoformat(), "target": args.target, "quick": args.quick,
                  "versions": _versions(), "compiled": len(rows) - len(failed),
                  "failed": len(failed), "spilling": len(spilling), "kernels": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=1) + "\n"
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
