"""The ``native`` backend: the C++ CPU ops of ``csrc/`` as ``torch.ops.adtuning.*``.

The C++ sources ship with the package (``adtuning.csrc``) and are compiled on first use,
never at import time: the first :func:`backend` (or :func:`is_available`) call builds them
with :func:`torch.utils.cpp_extension.load` into a cache directory and loads the library.
Later processes find the library in the cache and only load it.

Environment:

``ADTUNING_DISABLE_NATIVE=1``
    the native ops are off; :func:`backend` raises
    :class:`~adtuning.backend_contract.BackendUnavailableError` (the reference backend still works).
``ADTUNING_NATIVE_CACHE=DIR``
    the cache root, instead of ``~/.cache/adtuning/native`` (``$XDG_CACHE_HOME`` is honoured).
    Builds go to ``DIR/<key>``, where the key names the torch and Python versions and hashes
    the sources, the compiler flags and the CPU (the code is compiled for the host CPU).

A failed build raises :class:`~adtuning.backend_contract.BackendUnavailableError` whose message
carries the tail of the compiler output and names the file with all of it. Concurrent
processes may build at once: ``cpp_extension`` serialises them with a lock file in the
build directory.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Sized
from pathlib import Path

import torch

from adtuning.backend_contract import Backend, BackendProvider, BackendUnavailableError, register_backend

log = logging.getLogger("adtuning")

DISABLE_ENV = "ADTUNING_DISABLE_NATIVE"
CACHE_ENV = "ADTUNING_NATIVE_CACHE"
LIBRARY_NAME = "adtuning_native"
OPS = ("sparse_adamw_", "sparse_adamw_multi_", "gather", "linear_fisher_", "sddmm")

# -O3 and the host's vector ISA for the kernels (on x86-64 with full-width AVX-512 registers:
# the Fisher kernel's register tile is sized for them); OpenMP because ATen's parallel_for is
# a header template that only runs in parallel when the including file is built with it;
# no FMA contraction, so the AdamW arithmetic rounds exactly as written (FMAs are explicit);
# no errno from sqrt, so the AdamW update loop vectorises (gcc otherwise keeps a scalar branch
# per entry for a negative argument; sqrt itself is correctly rounded either way, the values
# are unchanged).
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-march=native"] + (
    ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []
)
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_library_path: str | None = None
_failure: BackendUnavailableError | None = None
_fakes_registered = False


def disabled() -> bool:
    """True when ``ADTUNING_DISABLE_NATIVE`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def source_files() -> list[Path]:
    """The C++ sources and headers of the native ops, as shipped in ``adtuning.csrc``."""
    try:
        root = Path(str(importlib.resources.files("adtuning.csrc")))
    except ModuleNotFoundError as exc:
        # setup.py maps csrc/ to adtuning.csrc: a checkout that pip did not install (or an
        # editable install whose checkout moved) has the package but not its C++ sources.
        raise BackendUnavailableError(
            f"native backend: the C++ sources (package adtuning.csrc) cannot be found ({exc}); "
            f"adtuning is imported from {Path(__file__).parent} but is not installed from there: "
            f"run `pip install -e {Path(__file__).parents[1]}`"
        ) from exc
    files = sorted(p for p in root.iterdir() if p.suffix in (".cpp", ".h"))
    if not any(p.suffix == ".cpp" for p in files):
        raise BackendUnavailableError(f"native backend: no C++ sources found in {root}")
    return files


def _cpu_signature() -> str:
    """The CPU model and feature flags: a library built with -march=native only runs there."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "features", "cpu part")
    seen = {}
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in wanted and key not in seen:
            seen[key] = value.strip()
    return f"{platform.machine()} " + " | ".join(f"{k}={seen[k]}" for k in sorted(seen))


def cache_dir(sources: list[Path] | None = None) -> Path:
    """The build directory for the current sources, torch, Python, flags and CPU."""
    sources = source_files() if sources is None else sources
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (_CFLAGS, _LDFLAGS, [os.environ.get("CXX", ""), _cpu_signature()]):
        digest.update("\0".join(part).encode())
    key = (
        f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
        f"-{digest.hexdigest()[:16]}"
    )
    root = os.environ.get(CACHE_ENV)
    if not root:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(cache_home, "adtuning", "native")
    return Path(root).expanduser() / key


def build_library(sources: list[Path], build_dir: Path, name: str = LIBRARY_NAME) -> str:
    """Compile ``sources`` into ``build_dir`` (or reuse the library there) and load it.

    Returns the path of the loaded shared library.

    Raises:
        BackendUnavailableError: the compiler, the linker or ninja failed; the message holds
            the tail of their output and names ``build_dir/build-error.log`` with all of it.
    """
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    cached = any(build_dir.glob(f"{name}.so")) or any(build_dir.glob(f"{name}.pyd"))
    if cached:
        log.info("loading native ops (cached in %s)", build_dir)
    else:
        log.info(
            "building native ops from %s (cached in %s); this takes about a minute, once",
            sources[0].parent, build_dir,
        )
    start = time.perf_counter()
    try:
        path = cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources if p.suffix == ".cpp"],
            # Copies: cpp_extension appends its own libraries to extra_ldflags in place, which
            # would change cache_dir()'s key for the rest of the process.
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # compiler, linker, ninja or loader failure: all mean "no native"
        error_log = build_dir / "build-error.log"
        output = str(exc)
        error_log.write_text(output)
        tail = "\n".join(output.splitlines()[-40:])
        raise BackendUnavailableError(
            f"native backend: building the C++ ops failed ({type(exc).__name__}); "
            f"full compiler output in {error_log}; its end:\n{tail}"
        ) from exc
    if not cached:
        log.info("built native ops in %.1f s: %s", time.perf_counter() - start, path)
    return str(path)


def _register_fakes() -> None:
    """Fake (meta) implementations: shapes only, so the ops trace under torch.compile/export."""

    def _sparse_adamw_fake(
        param: torch.Tensor, grad: torch.Tensor, indices: torch.Tensor, exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor, master: torch.Tensor | None, lr: float, beta1: float, beta2: float,
        eps: float, weight_decay: float, bias_correction1: float, bias_correction2: float,
    ) -> None:
        k = indices.numel()
        for t in (grad, exp_avg, exp_avg_sq) + ((master,) if master is not None else ()):
            torch._check(t.numel() == k, lambda: "compact tensors must match indices")

    def _sparse_adamw_multi_fake(
        params: list[torch.Tensor], grads: list[torch.Tensor], indices: list[torch.Tensor],
        exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], masters: list[torch.Tensor],
        master_index: list[int], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
        bias_correction1: list[float], bias_correction2: list[float],
    ) -> None:
        n = len(params)
        for values in (grads, indices, exp_avgs, exp_avg_sqs, master_index, bias_correction1, bias_correction2):
            torch._check(len(values) == n, lambda: "every list needs one entry per tensor")
        for t in range(n):
            j = master_index[t]
            _sparse_adamw_fake(
                params[t], grads[t], indices[t], exp_avgs[t], exp_avg_sqs[t], masters[j] if j >= 0 else None,
                lr, beta1, beta2, eps, weight_decay, bias_correction1[t], bias_correction2[t],
            )

    def _gather_fake(grad: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        torch._check(out.numel() == indices.numel(), lambda: "out must match indices")

    def _linear_fisher_fake(
        x: torch.Tensor, dy: torch.Tensor, fisher_w: torch.Tensor, fisher_b: torch.Tensor | None,
        lengths: torch.Tensor | None,
    ) -> None:
        torch._check(x.dim() == 3 and dy.dim() == 3, lambda: "x and dy must be [B, T, F]")
        torch._check(
            fisher_w.shape == (dy.shape[2], x.shape[2]), lambda: "fisher_w must be [out, in]"
        )

    def _sddmm_fake(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        torch._check(dy.dim() == 2 and x.dim() == 2, lambda: "dy and x must be [N, features]")
        torch._check(out.numel() == indices.numel(), lambda: "out must match indices")

    # Passed to register_fake, not decorated by it: as a decorator it is untyped for mypy.
    torch.library.register_fake("adtuning::sparse_adamw_", _sparse_adamw_fake)
    torch.library.register_fake("adtuning::sparse_adamw_multi_", _sparse_adamw_multi_fake)
    torch.library.register_fake("adtuning::gather", _gather_fake)
    torch.library.register_fake("adtuning::linear_fisher_", _linear_fisher_fake)
    torch.library.register_fake("adtuning::sddmm", _sddmm_fake)


def _ops_registered() -> bool:
    """True when every native op has a CPU kernel in this process."""
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"adtuning::{op}", "CPU") for op in OPS
    )


def load() -> str:
    """Build (first time) and load the native ops; return the library path.

    Raises:
        BackendUnavailableError: disabled by ``ADTUNING_DISABLE_NATIVE`` or the build failed.
    """
    global _library_path, _failure, _fakes_registered
    if disabled():
        raise BackendUnavailableError(
            f"native backend disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
        )
    with _lock:
        if _library_path is None:
            if _failure is not None:
                raise _failure
            try:
                sources = source_files()
                _library_path = build_library(sources, cache_dir(sources))
            except BackendUnavailableError as exc:
                _failure = exc
                raise
            if not _ops_registered():
                _failure = BackendUnavailableError(
                    f"native backend: {_library_path} loaded but does not register "
                    f"adtuning::{{{', '.join(OPS)}}} for CPU"
                )
                raise _failure
        if not _fakes_registered:
            _register_fakes()
            _fakes_registered = True
    return _library_path


def is_available() -> bool:
    """True when the native ops can run here (builds them on the first call if needed)."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why the native backend cannot run here, or None when it can (may build, see :func:`load`)."""
    try:
        load()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def gather(
    grad: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Native :class:`~adtuning.backend_contract.GatherOp` (``torch.ops.adtuning.gather``; CPU tensors).

    ``accumulate`` is ignored without ``out``.
    """
    if out is None:
        out = torch.empty(indices.numel(), dtype=torch.float32, device=grad.device)
        accumulate = False
    torch.ops.adtuning.gather.default(grad, indices, out, accumulate)
    return out


def sparse_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Native :class:`~adtuning.backend_contract.SparseAdamWOp`: one fused pass (``torch.ops.adtuning.sparse_adamw_``).

    CPU tensors; a bf16/fp16 ``param`` needs ``master``. The bias corrections are computed
    here in Python float and passed to the C++ op.
    """
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    torch.ops.adtuning.sparse_adamw_.default(
        param, grad, indices, exp_avg, exp_avg_sq, master,
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
        bias_correction1, bias_correction2,
    )


def sparse_adamw_multi_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    indices: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    masters: list[torch.Tensor | None],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Native :class:`~adtuning.backend_contract.SparseAdamWMultiOp`: every tensor in one call and one parallel region (``torch.ops.adtuning.sparse_adamw_multi_``).

    CPU tensors; a bf16/fp16 ``params[t]`` needs ``masters[t]``. Each tensor's bias
    corrections are computed here in Python float exactly as :func:`sparse_adamw_` computes
    them, and the masters are passed as the list of those that exist plus each tensor's
    position in it (``-1``: none; see ``csrc/registration.cpp`` for why). The C++ op checks
    every argument before writing (an index set whose first or last index lies outside its
    parameter included); it still checks each index while it runs, and an out-of-range index
    inside an unsorted set raises afterwards, naming its position, as in the single op.
    """
    # steps and masters are turned into other lists here, so their lengths are checked here;
    # the C++ op checks the others, except with no tensor at all, where the dispatcher could
    # not pick a kernel (and none is needed).
    lists: dict[str, Sized] = {"steps": steps, "masters": masters}
    if not params:
        lists.update(grads=grads, indices=indices, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    for name, values in lists.items():
        if len(values) != len(params):
            raise ValueError(
                f"sparse_adamw_multi_: {name} has {len(values)} entries, params has {len(params)}; "
                "every list needs one entry per tensor"
            )
    if not params:
        return
    bias_correction1 = [1 - beta1 ** float(step) for step in steps]
    bias_correction2 = [1 - beta2 ** float(step) for step in steps]
    present = [master for master in masters if master is not None]
    master_index, position = [], 0
    for master in masters:
        master_index.append(-1 if master is None else position)
        position += master is not None
    torch.ops.adtuning.sparse_adamw_multi_.default(
        params, grads, indices, exp_avgs, exp_avg_sqs, present, master_index,
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
        bias_correction1, bias_correction2,
    )


def linear_fisher_(
    x: torch.Tensor,
    dy: torch.Tensor,
    fisher_w: torch.Tensor,
    fisher_b: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> None:
    """Native :class:`~adtuning.backend_contract.LinearFisherOp`, tile by tile (``torch.ops.adtuning.linear_fisher_``).

    CPU tensors; ``lengths`` may also be a sequence of ints (made a tensor here).
    """
    if lengths is not None and not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths, dtype=torch.long)
    torch.ops.adtuning.linear_fisher_.default(x, dy, fisher_w, fisher_b, lengths)


def sddmm(
    dy: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Native :class:`~adtuning.backend_contract.SDDMMOp` (``torch.ops.adtuning.sddmm``; CPU tensors).

    ``accumulate`` is ignored without ``out``.
    """
    if out is None:
        out = torch.empty(indices.numel(), dtype=torch.float32, device=dy.device)
        accumulate = False
    torch.ops.adtuning.sddmm.default(dy, x, indices, out, accumulate)
    return out


def backend() -> Backend:
    """The ``native`` :class:`~adtuning.backend_contract.Backend`, building the ops on first use.

    Raises:
        BackendUnavailableError: disabled by ``ADTUNING_DISABLE_NATIVE`` or the build failed
            (the message carries the compiler output).
    """
    load()
    return Backend(
        name="native", gather=gather, sparse_adamw_=sparse_adamw_, sparse_adamw_multi_=sparse_adamw_multi_,
        linear_fisher_=linear_fisher_, sddmm=sddmm,
    )

register_backend(BackendProvider("native", backend, fused_on=("cpu",), description="csrc/ C++ ops (torch.ops.adtuning.*); CPU"))
