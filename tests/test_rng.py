"""adtuning.rng: a candidate's random stream, CPU generator plus the CUDA one when the model is there.

The oracle is torch's own generator API. The CUDA generator cannot run here: its get/set are
replaced by a recorder, which checks that the device part is kept, put back and left alone as
documented (bench/gpu_check.py's ``rng_streams`` section checks the real one on a GPU).
"""
from __future__ import annotations

import pytest
import torch

from adtuning import rng


def test_a_cpu_stream_is_exactly_torchs_cpu_generator_state():
    assert torch.equal(rng.initial_state(5), torch.Generator().manual_seed(5).get_state())
    assert torch.equal(rng.initial_state(5, "cpu"), rng.initial_state(5))
    assert rng.CPU_STATE_BYTES == torch.get_rng_state().numel()
    rng.set_state(rng.initial_state(5), "cpu")
    expected = torch.rand(7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(7), expected)
    paused = rng.get_state("cpu")
    assert torch.equal(paused, torch.get_rng_state())
    after = torch.rand(3)
    torch.rand(11)  # someone else's draws
    rng.set_state(paused, "cpu")
    assert torch.equal(torch.rand(3), after)


class FakeCuda:
    """Stands in for torch.cuda's generator state calls."""

    def __init__(self) -> None:
        self.state = torch.arange(16, dtype=torch.uint8)
        self.sets: list[torch.Tensor] = []

    def get(self, device=None) -> torch.Tensor:
        return self.state.clone()

    def set(self, state: torch.Tensor, device=None) -> None:
        self.sets.append(state.clone())
        self.state = state.clone()


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set)
    return fake


def test_on_cuda_the_device_generator_travels_with_the_cpu_one(fake_cuda):
    torch.manual_seed(3)
    state = rng.get_state("cuda:0")
    assert state.numel() == rng.CPU_STATE_BYTES + 16
    assert torch.equal(state[:rng.CPU_STATE_BYTES], torch.get_rng_state())
    assert torch.equal(state[rng.CPU_STATE_BYTES:], fake_cuda.state)
    # Both parts are put back.
    fake_cuda.state = torch.zeros(16, dtype=torch.uint8)
    cpu_next = torch.rand(4)
    rng.set_state(state, "cuda:0")
    assert torch.equal(fake_cuda.sets[-1], torch.arange(16, dtype=torch.uint8))
    assert torch.equal(torch.rand(4), cpu_next)


def test_a_cpu_written_state_on_cuda_leaves_the_device_generator_alone(fake_cuda):
    cpu_only = rng.initial_state(9)
    rng.set_state(cpu_only, "cuda")
    assert fake_cuda.sets == []
    assert torch.equal(torch.get_rng_state(), cpu_only)
    # And a CUDA-written state resumed on the CPU uses its CPU part only.
    with_device = torch.cat([rng.initial_state(9), torch.full((16,), 7, dtype=torch.uint8)])
    rng.set_state(with_device, "cpu")
    assert fake_cuda.sets == [] and torch.equal(torch.get_rng_state(), cpu_only)


@pytest.mark.parametrize("bad", [torch.zeros(10, dtype=torch.uint8), torch.zeros(rng.CPU_STATE_BYTES, dtype=torch.int64),
                                 torch.zeros(2, rng.CPU_STATE_BYTES, dtype=torch.uint8)])
def test_a_tensor_that_is_no_stream_state_is_refused(bad):
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match="not a random-stream state"):
        rng.set_state(bad)
    assert torch.equal(torch.get_rng_state(), before)


def test_kept_puts_the_stream_back_after_the_block_even_when_it_raises():
    rng.set_state(rng.initial_state(4))
    expected = torch.rand(5, generator=torch.Generator().manual_seed(4))
    with rng.kept("cpu"):
        torch.rand(9)  # an evaluation's or a callback's draws
    with pytest.raises(RuntimeError), rng.kept("cpu"):
        torch.rand(2)
        raise RuntimeError("inside")
    assert torch.equal(torch.rand(5), expected)
