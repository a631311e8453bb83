"""A training stream's random state: the CPU generator's, and the accelerator's when it trains there.

Dropout (and anything else the model draws) runs on the model's device: on CUDA from the CUDA
generator, not the CPU one. The search keeps one random stream per candidate, so that pausing a
candidate, training another and coming back (or resuming after a kill) draws exactly what one
uninterrupted run of it would draw. On CUDA that needs the device generator's state too.

The state is one ``uint8`` tensor, so every place that keeps, gathers or checkpoints a stream needs
nothing else: the CPU generator's state (exactly :func:`torch.get_rng_state`, so CPU runs and their
checkpoints are as before), followed on CUDA by the device generator's state. A state without the
device part (a checkpoint written on the CPU, resumed on CUDA) leaves the device generator alone.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: The length of the CPU generator's state (the prefix of every stream state).
CPU_STATE_BYTES = int(torch.get_rng_state().numel())


def _on_cuda(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    device = torch.device(device)
    return device if device.type == "cuda" else None


def initial_state(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The state a stream seeded with ``seed`` starts from (the global generators are not touched)."""
    cpu = torch.Generator().manual_seed(seed).get_state()
    cuda = _on_cuda(device)
    if cuda is None:
        return cpu
    return torch.cat([cpu, torch.Generator(device=cuda).manual_seed(seed).get_state().cpu()])


def get_state(device: torch.device | str | None = None) -> torch.Tensor:
    """The global generators' state for a model on ``device``, as one tensor."""
    cpu = torch.get_rng_state()
    cuda = _on_cuda(device)
    if cuda is None:
        return cpu
    return torch.cat([cpu, torch.cuda.get_rng_state(cuda)])


def set_state(state: torch.Tensor, device: torch.device | str | None = None) -> None:
    """Put ``state`` (from :func:`get_state` or :func:`initial_state`) back into the global generators.

    Raises:
        ValueError: ``state`` is shorter than a CPU generator's state (not a stream state).
    """
    if state.dtype != torch.uint8 or state.dim() != 1 or state.numel() < CPU_STATE_BYTES:
        raise ValueError(f"not a random-stream state: {state.dtype} tensor of shape {tuple(state.shape)} "
                         f"(expected uint8, at least {CPU_STATE_BYTES} bytes)")
    torch.set_rng_state(state[:CPU_STATE_BYTES].clone())
    cuda = _on_cuda(device)
    if cuda is not None and state.numel() > CPU_STATE_BYTES:
        torch.cuda.set_rng_state(state[CPU_STATE_BYTES:].clone(), cuda)


@contextlib.contextmanager
def kept(device: torch.device | str | None = None) -> Iterator[None]:
    """The global generators for a model on ``device`` as they were before the block, after it
    (what runs inside, an evaluation or a callback, does not move the training stream)."""
    state = get_state(device)
    try:
        yield
    finally:
        set_state(state, device)
