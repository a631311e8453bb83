"""The pytest-benchmark harness of ``bench/``.

Run::

    pytest bench/ --benchmark-only --benchmark-json bench/results/<name>.json

Files named ``bench_<op>.py`` are collected here (the default test run only looks in
``tests/``). Every result carries the device, the CPU/GPU name, the torch / triton /
transformers versions and the date (in ``machine_info`` of the JSON and in each benchmark's
``extra_info``). Each module compares its implementations with a torch baseline measured in
the same session; the ratios it asks for (:class:`Ratios`) are computed from the medians,
printed at the end of the run and stored in the JSON under ``adtuning_ratios``, with the
memory figures next to them.

``TRITON_INTERPRET`` is left alone: interpreted Triton timings mean nothing, so the Triton
benchmarks run only on CUDA and skip elsewhere.
"""
from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

# --------------------------------------------------------------------------- collection


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` as test modules, unless pytest already does: a file named on the
    command line, or one that matches ``python_files``."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, p) for p in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


# -------------------------------------------------------------------------- environment


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """Device, CPU/GPU name, library versions, thread count, commit and date of this run
    (:func:`adtuning.environment.environment`, the recorder of the CLI, bench/ and tools/)."""
    from adtuning.environment import environment as record

    return record()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Put the environment into the JSON's ``machine_info``."""
    machine_info["adtuning"] = environment()


# ------------------------------------------------------------------------------- ratios


@dataclass
class Ratios:
    """Median times recorded in this session and the ratios to report between them."""

    times: dict[tuple[str, str], float] = field(default_factory=dict)
    wanted: list[tuple[str, str, str, str]] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)

    def record(self, group: str, name: str, seconds: float) -> None:
        """Remember the median time of implementation ``name`` in ``group``."""
        self.times[(group, name)] = seconds

    def want(self, label: str, group: str, baseline: str, candidate: str) -> None:
        """Report ``time(baseline) / time(candidate)`` (a speed-up when > 1) as ``label``."""
        if (label, group, baseline, candidate) not in self.wanted:
            self.wanted.append((label, group, baseline, candidate))

    def note(self, label: str, value: object) -> None:
        """Report a figure that is not a time (bytes of optimizer state, sizes)."""
        self.notes[label] = value

    def table(self) -> list[dict]:
        """The wanted ratios whose two sides were both measured."""
        rows = []
        for label, group, baseline, candidate in self.wanted:
            base, cand = self.times.get((group, baseline)), self.times.get((group, candidate))
            if base is None or cand is None:
                continue
            rows.append({
                "label": label, "group": group, "baseline": baseline, "candidate": candidate,
                "baseline_median_s": base, "candidate_median_s": cand, "speedup": base / cand,
            })
        return rows


_RATIOS = Ratios()


@pytest.fixture(scope="session")
def ratios() -> Ratios:
    """The session's :class:`Ratios`."""
    return _RATIOS


@pytest.fixture
def measure(benchmark, ratios) -> Callable[..., None]:
    """``measure(group, name, fn, rounds=3, **extra)``: benchmark ``fn`` and record its median.

    Uses ``benchmark.pedantic`` with one warm-up round and one call per round, because each
    call here is long (milliseconds to a second) and mutates state.
    """

    def run(group: str, name: str, fn: Callable[[], object], rounds: int = 3, **extra) -> None:
        benchmark.group = group
        benchmark.extra_info.update(environment())
        benchmark.extra_info.update(implementation=name, **extra)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        if benchmark.stats is not None:
            ratios.record(group, name, benchmark.stats.stats.median)

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Store the ratios and memory figures next to the raw results."""
    output_json["adtuning_environment"] = environment()
    output_json["adtuning_ratios"] = _RATIOS.table()
    output_json["adtuning_notes"] = _RATIOS.notes


def pytest_terminal_summary(terminalreporter):
    """Print the ratios and notes after pytest-benchmark's own tables."""
    rows = _RATIOS.table()
    if not rows and not _RATIOS.notes:
        return
    env = environment()
    terminalreporter.section("adtuning ratios (median times, same session)")
    terminalreporter.write_line(
        f"{env['device']} | {env['gpu'] or env['cpu']} | {env['threads']} threads | "
        f"torch {env['torch']} | {env['date']}"
    )
    for row in rows:
        terminalreporter.write_line(
            f"{row['label']:<58} {row['speedup']:8.2f}x   "
            f"({row['baseline']}: {row['baseline_median_s'] * 1e3:.2f} ms, "
            f"{row['candidate']}: {row['candidate_median_s'] * 1e3:.2f} ms)"
        )
    for label, value in _RATIOS.notes.items():
        terminalreporter.write_line(f"{label:<58} {value}")


# --------------------------------------------------------------------- shared workloads

# Every parameter tensor of wav2vec2-base, as transformers' Wav2Vec2Model(Wav2Vec2Config())
# names them, except the pre-training-only masked_spec_embed: 210 tensors, 94,370,944 entries
# (the CNN feature encoder, the feature projection, the weight-normed positional convolution
# and 12 transformer layers).
_CONV_LAYERS = [(512, 1, 10)] + [(512, 512, 3)] * 4 + [(512, 512, 2)] * 2
_LAYER = [
    ("attention.q_proj.weight", (768, 768)), ("attention.q_proj.bias", (768,)),
    ("attention.k_proj.weight", (768, 768)), ("attention.k_proj.bias", (768,)),
    ("attention.v_proj.weight", (768, 768)), ("attention.v_proj.bias", (768,)),
    ("attention.out_proj.weight", (768, 768)), ("attention.out_proj.bias", (768,)),
    ("layer_norm.weight", (768,)), ("layer_norm.bias", (768,)),
    ("feed_forward.intermediate_dense.weight", (3072, 768)),
    ("feed_forward.intermediate_dense.bias", (3072,)),
    ("feed_forward.output_dense.weight", (768, 3072)),
    ("feed_forward.output_dense.bias", (768,)),
    ("final_layer_norm.weight", (768,)), ("final_layer_norm.bias", (768,)),
]


def wav2vec2_base_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the wav2vec2-base parameters (no download needed)."""
    shapes = [(f"feature_extractor.conv_layers.{i}.conv.weight", s)
              for i, s in enumerate(_CONV_LAYERS)]
    shapes += [
        ("feature_extractor.conv_layers.0.layer_norm.weight", (512,)),
        ("feature_extractor.conv_layers.0.layer_norm.bias", (512,)),
        ("feature_projection.layer_norm.weight", (512,)),
        ("feature_projection.layer_norm.bias", (512,)),
        ("feature_projection.projection.weight", (768, 512)),
        ("feature_projection.projection.bias", (768,)),
        ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", (1, 1, 128)),
        ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", (768, 48, 128)),
        ("encoder.pos_conv_embed.conv.bias", (768,)),
        ("encoder.layer_norm.weight", (768,)),
        ("encoder.layer_norm.bias", (768,)),
    ]
    for layer in range(12):
        shapes += [(f"encoder.layers.{layer}.{name}", s) for name, s in _LAYER]
    return shapes


@pytest.fixture(scope="session")
def w2v2_params() -> list[torch.Tensor]:
    """Random fp32 tensors shaped like the wav2vec2-base parameters (94,370,944 entries)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for _, shape in wav2vec2_base_shapes()]


@pytest.fixture(scope="session")
def w2v2_grads(w2v2_params) -> list[torch.Tensor]:
    """Dense random gradients for :func:`w2v2_params`."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(p.shape, generator=gen) for p in w2v2_params]


@functools.lru_cache(maxsize=4)
def _child_indices(numels: tuple[int, ...], fraction: float) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(int(fraction * 1e6))
    out = []
    for n in numels:
        k = max(1, round(fraction * n))
        out.append(torch.randperm(n, generator=gen)[:k].sort().values.to(torch.int32))
    return tuple(out)


@pytest.fixture(scope="session")
def child_indices(w2v2_params) -> Callable[[float], tuple[torch.Tensor, ...]]:
    """``child_indices(P)``: per tensor, round(P * numel) sorted unique random int32 indices."""
    numels = tuple(p.numel() for p in w2v2_params)
    return lambda fraction: _child_indices(numels, fraction)
