"""Global child selection, nesting, Bernoulli children, persistence and errors."""
from __future__ import annotations

import json

import pytest
import torch

from adtuning import ChildNetwork
from adtuning.child import ChildError

SIZES = {"layers.0.w": (1,), "layers.0.v": (97,), "layers.1.w": (63, 65), "head": (4097,)}


def scores_with_ties(seed=0, levels=7):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randint(0, levels, s, generator=gen).float() / levels for n, s in SIZES.items()}


def brute_force_topk(scores, k):
    """Sort by (-score, tensor position, flat index): the documented tie order."""
    entries = []
    for position, (name, value) in enumerate(scores.items()):
        for i, v in enumerate(value.reshape(-1).tolist()):
            entries.append((-v, position, i, name))
    entries.sort()
    chosen = {}
    for _, _, i, name in entries[:k]:
        chosen.setdefault(name, []).append(i)
    return {n: sorted(v) for n, v in chosen.items()}, -entries[k - 1][0]


@pytest.mark.parametrize("p", [1e-9, 0.001, 0.01, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("ties", [True, False])
def test_global_topk_matches_brute_force(p, ties):
    scores = scores_with_ties() if ties else {n: torch.rand(s, generator=torch.Generator().manual_seed(3)) for n, s in SIZES.items()}
    child = ChildNetwork.from_scores(scores, p)
    total = sum(v.numel() for v in scores.values())
    assert child.n == total
    assert child.k == max(1, int(p * total + 0.5))
    expected, threshold = brute_force_topk(scores, child.k)
    assert {n: idx.tolist() for n, idx in child.indices.items()} == expected
    assert child.threshold == pytest.approx(threshold)
    for idx in child.indices.values():
        assert idx.dtype == torch.int32
        assert torch.all(idx[1:] > idx[:-1])  # sorted and unique


def test_negative_and_signed_zero_scores_rank_correctly():
    scores = {"a": torch.tensor([-1.0, 0.0, -0.0, 2.0, -3.5]), "b": torch.tensor([0.5, -0.0, -1e-30])}
    child = ChildNetwork.from_scores(scores, 5 / 8)
    expected, _ = brute_force_topk(scores, 5)
    assert {n: idx.tolist() for n, idx in child.indices.items()} == expected


def test_nested_children_contain_each_other_and_are_deterministic():
    scores = scores_with_ties(seed=1, levels=3)
    small, mid, large = ChildNetwork.nested(scores, [0.001, 0.01, 0.1])
    assert large.contains(mid) and mid.contains(small)
    assert not small.contains(large)
    again = ChildNetwork.nested(scores, [0.1, 0.001])
    assert {n: i.tolist() for n, i in again[0].indices.items()} == {n: i.tolist() for n, i in large.indices.items()}
    assert {n: i.tolist() for n, i in again[1].indices.items()} == {n: i.tolist() for n, i in small.indices.items()}


def test_ratios_per_tensor_and_layer():
    scores = {"enc.layers.0.w": torch.ones(10), "enc.layers.1.w": torch.zeros(30), "proj": torch.full((10,), 0.5)}
    child = ChildNetwork.from_scores(scores, 0.2)  # k = 10: all of layer 0
    assert child.tensor_ratios() == {"enc.layers.0.w": 1.0, "enc.layers.1.w": 0.0, "proj": 0.0}
    assert child.layer_ratios() == {"0": 1.0, "1": 0.0, "other": 0.0}
    assert child.names == ["enc.layers.0.w"]


def test_bernoulli_is_seeded_and_near_p():
    params = {n: torch.empty(s) for n, s in SIZES.items()}
    a = ChildNetwork.bernoulli(params, 0.3, seed=5)
    b = ChildNetwork.bernoulli(params, 0.3, seed=5)
    c = ChildNetwork.bernoulli(params, 0.3, seed=6)
    assert {n: i.tolist() for n, i in a.indices.items()} == {n: i.tolist() for n, i in b.indices.items()}
    assert a.k != c.k or any(not torch.equal(a.indices[n], c.indices[n]) for n in a.indices)
    assert abs(a.k / a.n - 0.3) < 0.03
    assert a.method == "bernoulli" and a.threshold is None


def test_save_load_round_trip_and_model_check(tmp_path):
    scores = scores_with_ties()
    child = ChildNetwork.from_scores(scores, 0.05)
    path = child.save(tmp_path / "child")
    assert path.suffix == ".safetensors" and (tmp_path / "child.json").is_file()
    assert json.loads((tmp_path / "child.json").read_text())["k"] == child.k
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    model = {n: torch.empty(s) for n, s in SIZES.items()}
    loaded = ChildNetwork.load(tmp_path / "child.safetensors", model)
    assert loaded.k == child.k and loaded.p == child.p and loaded.threshold == child.threshold
    assert all(torch.equal(loaded.indices[n], child.indices[n]) for n in child.indices)
    assert list(loaded.indices) == list(child.indices)

    wrong_shape = dict(model, head=torch.empty(4096))
    with pytest.raises(ValueError, match="head.*shape"):
        ChildNetwork.load(tmp_path / "child", wrong_shape)
    missing = {n: t for n, t in model.items() if n != "head"}
    with pytest.raises(ChildError, match="child.safetensors.*not in the model: head"):
        ChildNetwork.load(tmp_path / "child", missing)
    with pytest.raises(FileNotFoundError, match="nothere"):
        ChildNetwork.load(tmp_path / "nothere")
    (tmp_path / "child.json").write_text("{not json")
    with pytest.raises(ValueError, match="child.json"):
        ChildNetwork.load(tmp_path / "child")


@pytest.mark.parametrize("p", [0, -0.1, 1.5, float("nan"), "0.1", True])
def test_bad_ratio_is_rejected(p):
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        ChildNetwork.from_scores({"a": torch.rand(3)}, p)


def test_bad_score_sets_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        ChildNetwork.from_scores({}, 0.1)
    with pytest.raises(ValueError, match="NaN/inf"):
        ChildNetwork.from_scores({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="NaN/inf"):
        ChildNetwork.from_scores({"a": torch.tensor([1.0, float("inf")])}, 0.5)
    with pytest.raises(ValueError, match="'b' is empty"):
        ChildNetwork.from_scores({"a": torch.rand(2), "b": torch.empty(0)}, 0.5)


def test_names_with_dots_keep_their_own_files(tmp_path):
    """``p0.01`` and ``p0.1`` are two children (a suffix swap made both ``p0``)."""
    scores = {"a": torch.rand(100, generator=torch.Generator().manual_seed(0))}
    small, large = ChildNetwork.nested(scores, [0.01, 0.1])
    assert small.save(tmp_path / "p0.01.safetensors").name == "p0.01.safetensors"
    large.save(tmp_path / "p0.1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0.01.json", "p0.01.safetensors", "p0.1.json", "p0.1.safetensors"]
    assert ChildNetwork.load(tmp_path / "p0.01.safetensors").k == small.k
    assert ChildNetwork.load(tmp_path / "p0.1.json").k == large.k
    assert ChildNetwork.load(tmp_path / "p0.1").k == large.k


# ---- the published count rule: keep score >= numpy.percentile(all, (1 - p) * 100) ----------

import numpy as np  # noqa: E402


def published_mask(scores, p):
    """The published selection, written from its description: one flat numpy vector of all
    scores, ``polar = np.percentile(r, (1 - p) * 100)``, keep ``score >= polar``."""
    flat = np.concatenate([v.reshape(-1).numpy() for v in scores.values()])
    polar = np.percentile(flat, (1 - p) * 100)
    return {n: np.flatnonzero(v.reshape(-1).numpy() >= polar).tolist() for n, v in scores.items()}, polar


AWKWARD_N = [1, 2, 3, 5, 7, 31, 127, 257, 1023, 1025, 4095, 4097, 8191]
AWKWARD_P = [1e-9, 0.001, 0.01, 0.1, 1 / 3, 0.37, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("n", AWKWARD_N)
def test_percentile_rule_matches_numpy_on_awkward_sizes(n):
    # Split the n entries over up to three tensors: the rule is global.
    gen = torch.Generator().manual_seed(n)
    values = torch.rand(n, generator=gen)
    cuts = sorted({0, n // 3, (2 * n) // 3, n})
    scores = {f"t{i}": values[a:b].clone() for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a}
    for p in AWKWARD_P:
        child = ChildNetwork.from_scores(scores, p, count_rule="percentile")
        expected, polar = published_mask(scores, p)
        got = {n_: child.indices[n_].tolist() if n_ in child.indices else [] for n_ in scores}
        assert got == expected, (n, p)
        assert child.threshold == float(polar)
        assert child.k == sum(len(v) for v in expected.values())


@pytest.mark.parametrize("n", [2, 3, 7, 257, 1023, 1025])
def test_percentile_rule_count_on_distinct_scores(n):
    from fractions import Fraction

    scores = {"a": torch.randperm(n, generator=torch.Generator().manual_seed(1)).float() + 1.0}
    for p in AWKWARD_P:
        child = ChildNetwork.from_scores(scores, p, count_rule="percentile")
        # numpy's float index (1 - p) * 100 / 100 * (N - 1): keep N - floor(index), less the lower
        # neighbour when the index is fractional.
        index = float(np.true_divide((1 - p) * 100, 100)) * (n - 1)
        assert child.k == n - int(np.floor(index)) - (index != np.floor(index)), (n, p)
        exact = Fraction(p) * (n - 1)
        if abs(exact - round(exact)) > 1e-9:  # away from float rounding of an integer index:
            assert child.k == 1 + int(exact), (n, p)  # 1 + floor(p (N - 1))


def test_percentile_rule_keeps_every_tie():
    # 9 entries of one value around the threshold: round keeps exactly round(p N), percentile all ties.
    scores = {"a": torch.tensor([0.1] * 5 + [0.5] * 9), "b": torch.tensor([0.9, 0.5, 0.2])}
    p = 0.25  # N = 17: round -> 4 entries; percentile: index 12 of the sorted scores is 0.5
    by_round = ChildNetwork.from_scores(scores, p)
    by_percentile = ChildNetwork.from_scores(scores, p, count_rule="percentile")
    assert by_round.k == 4
    assert by_percentile.k == 11  # 0.9 and all ten 0.5s
    expected, _ = published_mask(scores, p)
    assert {n: v.tolist() for n, v in by_percentile.indices.items()} == expected


def test_percentile_rule_with_interpolation_rounding_onto_the_lower_neighbour():
    # Neighbours one ulp apart: a + (b - a) * gamma rounds back to a for small gamma, and the
    # published rule (score >= polar) then keeps a as well: one entry more than 1 + floor(p (N-1)).
    a = 1.0
    b = float(np.nextafter(np.float32(a), np.float32(2)))
    for n, p in [(11, 0.15), (101, 0.013), (1001, 0.0025)]:
        values = torch.linspace(0.0, 0.5, n)
        lower = int(np.floor(np.true_divide((1 - p) * 100, 100) * (n - 1)))
        values[lower], values[lower + 1:] = a, b + torch.arange(n - lower - 1).float()
        scores = {"a": values}
        child = ChildNetwork.from_scores(scores, p, count_rule="percentile")
        expected, polar = published_mask(scores, p)
        assert child.indices["a"].tolist() == expected["a"], (n, p, polar)


def test_percentile_rule_random_ties_and_nesting_match_numpy():
    for seed in range(20):
        scores = scores_with_ties(seed=seed, levels=1 + seed % 6)
        ps = [0.001, 0.01, 0.1, 0.5]
        children = ChildNetwork.nested(scores, ps, count_rule="percentile")
        for p, child in zip(ps, children):
            expected, _ = published_mask(scores, p)
            assert {n: child.indices[n].tolist() if n in child.indices else [] for n in scores} == expected
        assert all(big.contains(small) for small, big in zip(children, children[1:]))


def test_unknown_count_rule_is_an_error():
    with pytest.raises(ValueError, match="unknown count rule 'topk'"):
        ChildNetwork.from_scores({"a": torch.rand(3)}, 0.5, count_rule="topk")
