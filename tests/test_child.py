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
