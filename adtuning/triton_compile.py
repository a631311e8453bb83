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

# Block sizes elementwise_block() can pick for the 1-D kernels (128 .. 1024).
ELEMENTWISE_BLOCKS = (128, 256, 512, 1024)
# (out_features, in_features, frames) whose default tilings cover every block-size branch:
# a 1 x 1 layer over one frame (16 x 16 x 16 tiles, 4 warps), an odd mid-size layer, and
# wav2vec2-base's feed-forward shape over 4 s (64 x 64 x 32 tiles, 8 warps).
FISHER_SHAPES = ((1, 1, 1), (97, 33, 17), (3072, 768, 199))
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
class Specialisation:
    """One compiled variant of a kernel: argument types, constexprs and launch options."""

    kernel: str  # attribute path "module:function" under adtuning.kernels
    label: str
    arg_types: tuple[tuple[str, str], ...]  # (argument, Triton type) of the run-time arguments
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.label} {consts} warps={self.num_warps} stages={self.num_stages}"


def _load_kernel(path: str):
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(f"adtuning.kernels.{module_name}"), attr)


def _gather_specs(quick: bool) -> list[Specialisation]:
    mod = importlib.import_module("adtuning.kernels.gather")

    specs = []
    for grad_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for index_dtype in (torch.int32, torch.int64):
            for accumulate in (False, True):
                for block in (ELEMENTWISE_BLOCKS[-1:] if quick else ELEMENTWISE_BLOCKS):
                    specs.append(Specialisation(
                        "gather:_gather_kernel",
                        f"gather grad={TRITON_TYPE[grad_dtype]} idx={TRITON_TYPE[index_dtype]}",
                        (("grad_ptr", "*" + TRITON_TYPE[grad_dtype]),
                         ("idx_ptr", "*" + TRITON_TYPE[index_dtype]),
                         ("out_ptr", "*fp32"), ("k", "i32")),
                        (("ACCUMULATE", accumulate), ("BLOCK_SIZE", block)),
                        mod.NUM_WARPS, 3,
                    ))
    return specs


def _sparse_adamw_specs(quick: bool) -> list[Specialisation]:
    mod = importlib.import_module("adtuning.kernels.sparse_adamw")

    scalars = ("decay", "one_minus_beta1", "beta2", "one_minus_beta2", "bias_correction2_sqrt",
               "eps", "neg_step_size")
    specs = []
    # fp32 weights with or without a master copy; 16-bit weights always have one.
    for param_dtype, has_master in ((torch.float32, False), (torch.float32, True),
                                    (torch.bfloat16, True), (torch.float16, True)):
        for index_dtype in (torch.int32, torch.int64):
            for block in (ELEMENTWISE_BLOCKS[-1:] if quick else ELEMENTWISE_BLOCKS):
                arg_types = (("param_ptr", "*" + TRITON_TYPE[param_dtype]), ("grad_ptr", "*fp32"),
                             ("idx_ptr", "*" + TRITON_TYPE[index_dtype]), ("exp_avg_ptr", "*fp32"),
                             ("exp_avg_sq_ptr", "*fp32"), ("master_ptr", "*fp32"), ("k", "i32"))
                arg_types += tuple((name, "fp32") for name in scalars)
                specs.append(Specialisation(
                    "sparse_adamw:_sparse_adamw_kernel",
                    f"sparse_adamw param={TRITON_TYPE[param_dtype]} idx={TRITON_TYPE[index_dtype]}",
                    arg_types,
                    (("HAS_MASTER", has_master), ("PARAM_BF16", param_dtype == torch.bfloat16),
                     ("BLOCK_SIZE", block)),
                    mod.NUM_WARPS, 3,
                ))
    return specs


def _linear_fisher_spec(x_dtype, dy_dtype, has_bias, has_lengths, config, label) -> Specialisation:
    config = dict(config)
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
    ints = ("batch", "frames", "in_features", "out_features", "stride_xb", "stride_xt",
            "stride_xi", "stride_db", "stride_dt", "stride_do")
    arg_types = (("x_ptr", "*" + TRITON_TYPE[x_dtype]), ("dy_ptr", "*" + TRITON_TYPE[dy_dtype]),
                 ("fisher_w_ptr", "*fp32"), ("fisher_b_ptr", "*fp32"), ("lengths_ptr", "*i64"))
    arg_types += tuple((name, "i32") for name in ints)
    constexprs = (("HAS_BIAS", has_bias), ("HAS_LENGTHS", has_lengths)) + tuple(config.items())
    return Specialisation("linear_fisher:_linear_fisher_kernel", label, arg_types, constexprs,
                          num_warps, num_stages)


def _linear_fisher_specs(quick: bool, capability: int) -> list[Specialisation]:
    from adtuning.kernels.linear_fisher import TUNING_CANDIDATES, kernel_config

    specs = []
    shapes = FISHER_SHAPES[-1:] if quick else FISHER_SHAPES
    for x_dtype, dy_dtype in FISHER_DTYPES:
        pair = f"x={TRITON_TYPE[x_dtype]} dy={TRITON_TYPE[dy_dtype]}"
        for out_f, in_f, frames in shapes:
            config = kernel_config(x_dtype, dy_dtype, out_f, in_f, frames, capability=capability)
            for has_bias, has_lengths in ((True, True), (False, False)):
                specs.append(_linear_fisher_spec(
                    x_dtype, dy_dtype, has_bias, has_lengths, config,
                    f"linear_fisher {pair} layer={out_f}x{in_f} T={frames}"))
    if not quick:
        # bench/gpu_check.py times these tilings; each must compile for the run to be useful.
        for dtype in (torch.float32, torch.bfloat16):
            for block_m, block_n, block_k, num_warps, num_stages, precision in TUNING_CANDIDATES:
                config = kernel_config(
                    dtype, dtype, 3072, 768, 199, capability=capability, block_m=block_m, block_n=block_n,
                    block_k=block_k, input_precision=precision, num_warps=num_warps,
                    num_stages=num_stages)
                specs.append(_linear_fisher_spec(
                    dtype, dtype, True, True, config,
                    f"linear_fisher tuning candidate x=dy={TRITON_TYPE[dtype]}"))
    return specs


def specialisations(quick: bool = False, capability: int = 90) -> list[Specialisation]:
    """Every kernel variant the launchers make on a GPU of compute capability ``capability``.

    ``quick``: one block size per 1-D kernel variant and one layer shape for the Fisher kernel.
    """
    return (_gather_specs(quick) + _sparse_adamw_specs(quick)
            + _linear_fisher_specs(quick, capability))


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


def compile_one(spec: Specialisation, target_text: str) -> dict:
    """Compile one specialisation for ``target_text``; a dict with the outcome and resources."""
    import triton
    from triton.compiler import ASTSource, make_backend

    target = parse_target(target_text)
    row = {"kernel": spec.kernel.split(":")[1], "variant": spec.describe()}
    start = time.perf_counter()
    try:
        kernel = _load_kernel(spec.kernel)
        constexprs = dict(spec.constexprs)
        types = dict(spec.arg_types)
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in types:
                signature[name] = types[name]
            else:
                raise KeyError(f"{spec.kernel}: no type given for argument {name!r}")
        # Fresh PyTorch allocations are 16-byte aligned, and the JIT specialises on that.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name].startswith("*")}
        backend = make_backend(target)
        options = backend.parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
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
