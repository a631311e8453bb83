"""Grouped Fisher passes: the scores, children, summary and histogram of G = 1, bit for bit,
holding one group's scores at a time.

Oracles: ``estimate_fisher(..., groups=1)`` for the scores, ``ChildNetwork.nested`` on all the
scores for the children, ``fisher_summary`` for the summary, numpy for the histogram bins.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch

from adtuning import fisher as fisher_module
from adtuning.child import ChildNetwork
from adtuning.fisher import estimate_fisher, fisher_summary
from adtuning.fisher_groups import (
    TopCandidates,
    auto_fisher_groups,
    candidate_ranks,
    fisher_children,
    fisher_phase_bytes,
    module_units,
    split_groups,
    training_phase_bytes,
)
from adtuning.plots import ScoreHistogram, log_score_histogram
from tests.backends import require_backend
from tests.helpers import TinyMLP, TinyWav2Vec2Classifier, mlp_loss, padded_wav_batches, wav_loss

WAV_LENGTHS = [400, 531, 257, 613, 97 * 5]


def mlp_batches(n=11, size=4, d_in=17, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d_in, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]


@pytest.fixture(scope="module")
def wav2vec2():
    torch.manual_seed(0)
    return TinyWav2Vec2Classifier()


def assert_bit_equal(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], expected[name]), name


def assert_same_children(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert (a.p, a.k, a.threshold, a.method) == (b.p, b.k, b.threshold, b.method)
        assert a.shapes == b.shapes and list(a.indices) == list(b.indices)
        for name in b.indices:
            assert a.indices[name].dtype == b.indices[name].dtype
            assert torch.equal(a.indices[name], b.indices[name]), name


# ---- splitting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("numels", [[5], [1, 1, 1], [7, 1, 13, 2, 97, 3, 4097, 5], [10] * 9])
def test_groups_are_contiguous_nonempty_and_balanced(numels):
    for groups in range(1, len(numels) + 1):
        runs = split_groups(numels, groups)
        assert len(runs) == groups and all(len(r) for r in runs)
        assert [i for r in runs for i in r] == list(range(len(numels)))
    even = split_groups([10] * 9, 3)
    assert [list(r) for r in even] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_groups_keep_a_modules_tensors_together():
    names = ["a.weight", "a.bias", "b.weight", "c.weight", "c.bias", "d.weight"]
    numels = [100, 10, 50, 100, 10, 5]
    units = module_units(names)
    assert units == ["a", "a", "b", "c", "c", "d"]
    for groups in range(1, 5):
        for run in split_groups(numels, groups, units):
            assert units[run.start - 1] != units[run.start] if run.start else True
    with pytest.raises(ValueError, match="scored modules \\(4\\)"):
        split_groups(numels, 5, units)


@pytest.mark.parametrize("groups", [0, 4, -1, 1.5, True])
def test_bad_group_counts_are_refused(groups):
    with pytest.raises(ValueError, match="Fisher groups"):
        split_groups([1, 2, 3], groups)


# ---- scores --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,algorithm,backend", [
    ("per-sample", "loop", "reference"),
    ("per-sample", "in-backward", "reference"),
    ("per-sample", "in-backward", "native"),
    ("batch", None, "reference"),
])
def test_grouped_scores_equal_one_pass_bit_for_bit_mlp(mode, algorithm, backend):
    require_backend(backend)
    torch.manual_seed(0)
    model = TinyMLP(d_in=17, d_hidden=33, classes=3)
    kwargs = dict(mode=mode, backend=backend, progress=False)
    if algorithm:
        kwargs["algorithm"] = algorithm
    if mode == "batch":
        kwargs["clip_norm"] = 0.05
    batches = mlp_batches()
    expected = estimate_fisher(model, batches, mlp_loss, **kwargs)
    for groups in (2, 3):  # TinyMLP has three modules
        assert_bit_equal(estimate_fisher(model, batches, mlp_loss, groups=groups, **kwargs), expected)


@pytest.mark.parametrize("mode,algorithm,backend", [
    ("per-sample", "loop", "reference"),
    ("per-sample", "in-backward", "native"),
    ("batch", None, "reference"),
])
def test_grouped_scores_equal_one_pass_bit_for_bit_wav2vec2(wav2vec2, mode, algorithm, backend):
    require_backend(backend)
    kwargs = dict(mode=mode, backend=backend, progress=False)
    if algorithm:
        kwargs["algorithm"] = algorithm
    batches = padded_wav_batches(WAV_LENGTHS, batch_size=2)
    expected = estimate_fisher(wav2vec2, batches, wav_loss, **kwargs)
    modules = len(set(module_units(list(expected))))
    for groups in (2, 3, modules):
        got = estimate_fisher(wav2vec2, lambda: padded_wav_batches(WAV_LENGTHS, batch_size=2), wav_loss,
                              groups=groups, **kwargs)
        assert_bit_equal(got, expected)


class DropoutMLP(TinyMLP):
    def __init__(self):
        super().__init__(d_in=17, d_hidden=33, classes=3)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        return self.fc2(self.drop(self.norm(torch.tanh(self.fc1(x)))))


def test_train_mode_groups_draw_the_same_dropout_masks():
    torch.manual_seed(0)
    model = DropoutMLP()
    kwargs = dict(mode="batch", train_mode=True, progress=False)
    torch.manual_seed(5)
    expected = estimate_fisher(model, mlp_batches(), mlp_loss, **kwargs)
    after_one = torch.get_rng_state()
    for groups in (2, 3):
        torch.manual_seed(5)
        assert_bit_equal(estimate_fisher(model, mlp_batches(), mlp_loss, groups=groups, **kwargs), expected)
        assert torch.equal(torch.get_rng_state(), after_one)  # left where one pass leaves it


def test_an_iterator_cannot_be_read_for_several_groups():
    model = TinyMLP()
    with pytest.raises(ValueError, match="fresh iterable"):
        estimate_fisher(model, iter(mlp_batches(d_in=7, classes=5)), mlp_loss, groups=2, progress=False)
    # One group reads it once: fine.
    estimate_fisher(model, iter(mlp_batches(d_in=7, classes=5)), mlp_loss, groups=1, progress=False)


# ---- one group's scores at a time ------------------------------------------------------------

def test_a_pass_holds_the_scores_of_one_group_only(wav2vec2, monkeypatch):
    allocations, alive = [], []
    original = fisher_module._score_buffers

    def recording(scored, device, flat):
        fisher, buffer = original(scored, device, flat)
        # Score tensors of earlier passes still referenced when this pass allocates its own:
        allocations.append((sum(v.numel() for v in fisher.values()), sum(1 for ref in alive if ref() is not None)))
        alive.extend(weakref.ref(v) for v in fisher.values())
        return fisher, buffer

    monkeypatch.setattr(fisher_module, "_score_buffers", recording)
    make = lambda: padded_wav_batches(WAV_LENGTHS[:3], batch_size=2)  # noqa: E731
    selection = fisher_children(wav2vec2, make, wav_loss, [0.01, 0.05], groups=4, progress=False)
    assert [entries for entries, _ in allocations] == selection.group_entries
    assert all(earlier == 0 for _, earlier in allocations)  # the previous group's scores were freed
    total = sum(selection.group_entries)
    assert max(selection.group_entries) < 0.5 * total
    assert selection.candidate_bytes <= 8 * candidate_ranks([0.01, 0.05], total)


# ---- children, summary, histogram ------------------------------------------------------------

@pytest.mark.parametrize("count_rule", ["round", "percentile"])
@pytest.mark.parametrize("mode", ["per-sample", "batch"])
def test_children_summary_histogram_equal_those_of_all_scores(wav2vec2, count_rule, mode):
    ps = [0.3, 0.001, 0.05, 0.01]
    make = lambda: padded_wav_batches(WAV_LENGTHS, batch_size=3)  # noqa: E731
    scores = estimate_fisher(wav2vec2, make(), wav_loss, mode=mode, progress=False)
    expected = ChildNetwork.nested(scores, ps, count_rule=count_rule)
    for groups in (1, 2, 3, len(set(module_units(list(scores))))):
        selection = fisher_children(wav2vec2, make, wav_loss, ps, groups=groups, count_rule=count_rule, mode=mode,
                                    progress=False)
        assert_same_children(selection.children, expected)
        assert selection.summary == fisher_summary(scores)
        assert selection.histogram == log_score_histogram(scores)


def test_children_take_renamed_names(wav2vec2):
    make = lambda: padded_wav_batches(WAV_LENGTHS[:2])  # noqa: E731
    scores = estimate_fisher(wav2vec2, make(), wav_loss, progress=False)
    renamed = {n[len("upstream."):]: v for n, v in scores.items()}
    selection = fisher_children(wav2vec2, make, wav_loss, [0.02], groups=3, progress=False,
                                rename=lambda n: n[len("upstream."):])
    assert_same_children(selection.children, ChildNetwork.nested(renamed, [0.02]))


def _awkward_scores(seed, ties):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7, 3), (97,), (2, 257), (4097,), (13,), (31, 33)]
    scores = {}
    for i, shape in enumerate(shapes):
        value = torch.rand(shape, generator=gen)
        if ties:
            value = (value * 4).floor() / 4  # only 0, 0.25, 0.5, 0.75: massive ties, zeros included
        scores[f"t{i}"] = value
    return scores


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("count_rule", ["round", "percentile"])
def test_candidates_give_nested_children_exactly_with_ties(ties, count_rule):
    scores = _awkward_scores(1, ties)
    names = list(scores)
    total = sum(v.numel() for v in scores.values())
    ps = [1 / total, 0.001, 0.01, 0.1, 0.37, 1.0]
    expected = ChildNetwork.nested(scores, ps, count_rule=count_rule)
    for groups in (1, 2, 3, len(names)):
        top = TopCandidates(ps, total, count_rule)
        for run in split_groups([scores[n].numel() for n in names], groups):
            top.add({names[i]: scores[names[i]] for i in run})
        assert_same_children(top.children(), expected)


def test_candidates_refuse_an_incomplete_or_repeated_feed():
    scores = _awkward_scores(2, False)
    total = sum(v.numel() for v in scores.values())
    top = TopCandidates([0.01], total)
    top.add({"t0": scores["t0"]})
    with pytest.raises(ValueError, match="scored twice"):
        top.add({"t0": scores["t0"]})
    with pytest.raises(ValueError, match="were fed"):
        top.children()


def test_histogram_bins_match_numpy_and_parts_sum_to_the_whole():
    gen = torch.Generator().manual_seed(3)
    scores = {f"t{i}": torch.rand(n, generator=gen).pow(8) * 10 ** (i - 3) for i, n in enumerate([1, 97, 4097, 256])}
    scores["t1"][:5] = 0
    whole = log_score_histogram(scores)
    values = np.concatenate([v.numpy().astype(np.float64) for v in scores.values()])
    positive = values[values > 0]
    bins, counts = np.unique(np.floor(np.log10(positive) * 10).astype(np.int64), return_counts=True)
    assert whole["zeros"] == 5 and sum(whole["counts"]) == positive.size
    assert len(whole["edges"]) == len(whole["counts"]) + 1
    assert whole["edges"][0] == bins[0] / 10 and math.isclose(whole["edges"][-1], (bins[-1] + 1) / 10)
    dense = dict(zip(bins.tolist(), counts.tolist()))
    assert whole["counts"] == [dense.get(j, 0) for j in range(bins[0], bins[-1] + 1)]
    part = ScoreHistogram()
    for name in reversed(list(scores)):
        part.add(scores[name])
    assert part.result() == whole
    assert log_score_histogram({"z": torch.zeros(3)}) == {"edges": [0.0, 1.0], "counts": [0], "zeros": 3, "bins_per_decade": 10}


# ---- auto ---------------------------------------------------------------------------------------

def test_auto_groups_is_the_smallest_that_fits_the_training_budget():
    numels = [1024 * 1024] * 4 + [4096 * 1024, 1024 * 4096] * 2 + [1024] * 8  # a layer-like mix
    scored = {f"m{i}.weight": n for i, n in enumerate(numels)}
    total = sum(numels)
    for ps, element in [([0.5], 2), ([0.1, 0.01], 2), ([0.3], 4), ([0.2, 0.02], 2)]:
        g = auto_fisher_groups(scored, ps, weight_bytes=2 * total, weight_element_size=element)
        budget = training_phase_bytes(numels, max(ps), element)
        assert fisher_phase_bytes(numels, g, ps) <= budget
        assert all(fisher_phase_bytes(numels, smaller, ps) > budget for smaller in range(1, g))
    assert auto_fisher_groups(scored, [0.9], weight_bytes=1, weight_element_size=2) == 1
    # One tensor alone over the budget: one module per group, the most there can be.
    assert auto_fisher_groups(scored, [1e-6], weight_bytes=1, weight_element_size=2) == len(numels)
    # Headroom lowers the count.
    tight = auto_fisher_groups(scored, [0.01], weight_bytes=1, weight_element_size=2)
    loose = auto_fisher_groups(scored, [0.01], weight_bytes=1, weight_element_size=2, headroom_bytes=4 * total)
    assert loose == 1 < tight
