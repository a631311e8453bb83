"""Reliability of the artifacts people ship: deltas, child networks, merged models.

Bad files are refused with an error naming the file and what is wrong, before anything is
modified; loading never unpickles; a full disk leaves the previous files valid and no
temporary behind. Each test is one or more rows of tests/RELIABILITY.md.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from adtuning import atomic
from adtuning.atomic import WriteError, atomic_write, atomic_write_files, sha256_hex
from adtuning.checkpoint import (
    CONFIG_FILE,
    TENSORS_FILE,
    DeltaError,
    apply_delta,
    read_delta_config,
    save_delta,
    weights_fingerprint,
)
from adtuning.child import ChildError, ChildNetwork


# --- a small model and its delta -------------------------------------------------------------
def small_model(seed: int = 0) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    upstream = {"enc.weight": nn.Parameter(torch.randn(6, 7, generator=g)), "enc.bias": nn.Parameter(torch.randn(6, generator=g))}
    head = {"cls.weight": nn.Parameter(torch.randn(3, 6, generator=g))}
    return upstream, head


def write_delta(directory: Path, seed: int = 0, p: float = 0.2) -> tuple[dict, dict]:
    """Fine-tune (change the child entries of) the seed-``seed`` model and save its delta."""
    upstream, head = small_model(seed)
    base = weights_fingerprint(upstream)
    child = ChildNetwork.from_scores({n: torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) for n, t in upstream.items()}, p)
    with torch.no_grad():
        for name, idx in child.indices.items():
            upstream[name].view(-1)[idx.long()] += 1.0
        head["cls.weight"].mul_(2)
    save_delta(directory, upstream, child, head, {"base_model": "small", "base_fingerprint": base, "task": "ks"})
    return upstream, head


@pytest.fixture
def delta(tmp_path):
    d = tmp_path / "delta"
    write_delta(d)
    return d


def rewrite_tensors(directory: Path, edit) -> None:
    """Replace delta.safetensors by ``edit(tensors)`` and update the checksum, so that only the
    structural checks can catch the change."""
    tensors = load_safetensors((directory / TENSORS_FILE).read_bytes())
    edit(tensors)
    blob = save_safetensors(tensors)
    (directory / TENSORS_FILE).write_bytes(blob)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    meta["tensors_sha256"] = sha256_hex(blob)
    (directory / CONFIG_FILE).write_text(json.dumps(meta))


def rewrite_config(directory: Path, edit) -> None:
    meta = json.loads((directory / CONFIG_FILE).read_text())
    edit(meta)
    (directory / CONFIG_FILE).write_text(json.dumps(meta))


def apply_to_fresh(directory: Path, seed: int = 0, **kw):
    upstream, head = small_model(seed)
    before = {n: t.detach().clone() for n, t in {**upstream, **head}.items()}
    try:
        return apply_delta(directory, upstream, head, **kw), upstream, head
    except DeltaError:
        after = {**upstream, **head}
        assert all(torch.equal(before[n], after[n]) for n in before), "a refused delta modified the model"
        raise


def test_round_trip_restores_the_fine_tuned_weights(delta):
    upstream, head = write_delta(delta.parent / "again")
    _, got_up, got_head = apply_to_fresh(delta)
    assert all(torch.equal(got_up[n], upstream[n]) for n in upstream)
    assert torch.equal(got_head["cls.weight"], head["cls.weight"])
    assert read_delta_config(delta)["tensors_sha256"].startswith("sha256:")


# --- fingerprint: same shapes, other weights ---------------------------------------------------
def test_other_base_weights_are_refused_unless_forced(delta, caplog):
    with pytest.raises(DeltaError, match=r"delta\.json was trained on base model 'small'.*different base model.*--force"):
        apply_to_fresh(delta, seed=1)
    with caplog.at_level(logging.WARNING, logger="adtuning"):
        _, upstream, _ = apply_to_fresh(delta, seed=1, force=True)
    assert "applying it anyway (force)" in caplog.text
    tensors = load_safetensors((delta / TENSORS_FILE).read_bytes())
    idx = tensors["upstream.enc.weight.indices"].long()
    assert torch.equal(upstream["enc.weight"].view(-1)[idx], tensors["upstream.enc.weight.values"])


def test_forcing_does_not_bypass_shape_checks(delta):
    upstream, head = small_model(0)
    upstream["enc.weight"] = nn.Parameter(torch.zeros(7, 6))
    with pytest.raises(DeltaError, match=r"'enc\.weight' has shape \(6, 7\) in the delta but \(7, 6\) in the upstream"):
        apply_delta(delta, upstream, head, force=True)
    upstream, head = small_model(0)
    with pytest.raises(DeltaError, match=r"head tensor 'other' is missing"):
        apply_delta(delta, upstream, {**head, "other": nn.Parameter(torch.zeros(2))})
    with pytest.raises(DeltaError, match=r"head tensor 'cls\.weight' is not in the task head"):
        apply_delta(delta, upstream, {})


# --- delta tensors: every structural fault -----------------------------------------------------
def _set(key, value):
    def edit(t):
        t[key] = value
    return edit


def _del(key):
    def edit(t):
        del t[key]
    return edit


def _perturb_indices(fn):
    def edit(t):
        t["upstream.enc.weight.indices"] = fn(t["upstream.enc.weight.indices"].clone())
    return edit


TENSOR_FAULTS = {
    "index past the end": (_perturb_indices(lambda i: torch.cat([i[:-1], torch.tensor([42], dtype=i.dtype)])),
                           r"indices has indices outside \[0, 42\)"),
    "negative index": (_perturb_indices(lambda i: torch.cat([torch.tensor([-1], dtype=i.dtype), i[1:]])), r"outside \[0, 42\)"),
    "unsorted indices": (_perturb_indices(lambda i: i.flip(0)), "is not sorted and unique"),
    "duplicate indices": (_perturb_indices(lambda i: torch.cat([i[:1], i[:-1]])), "is not sorted and unique"),
    "float indices": (_perturb_indices(lambda i: i.float()), "has dtype torch.float32; expected int32 or int64"),
    "2-D indices": (_perturb_indices(lambda i: i.reshape(1, -1)), "must be 1-D"),
    "fewer values than indices": (lambda t: t.update({"upstream.enc.weight.values": t["upstream.enc.weight.values"][:-1]}),
                                  "must be a 1-D float tensor of"),
    "integer values": (lambda t: t.update({"upstream.enc.weight.values": t["upstream.enc.weight.values"].int()}),
                       "must be a 1-D float tensor"),
    "values without indices": (_del("upstream.enc.weight.indices"), "has no matching indices tensor"),
    "indices without values": (_del("upstream.enc.weight.values"), "has no matching upstream.enc.weight.values"),
    "NaN value": (lambda t: t["upstream.enc.weight.values"].__setitem__(0, float("nan")), "upstream.enc.weight.values has 1 NaN/inf"),
    "inf in the head": (lambda t: t["head.cls.weight"].__setitem__((0, 0), float("inf")), "head.cls.weight has 1 NaN/inf"),
    "integer head": (lambda t: t.update({"head.cls.weight": t["head.cls.weight"].long()}), "head tensor head.cls.weight has dtype"),
    "unknown tensor name": (_set("optimizer.state", torch.zeros(2)), "unexpected tensor 'optimizer.state'"),
    "tensor not in delta.json": (lambda t: t.update({"upstream.other.indices": torch.tensor([0], dtype=torch.int32),
                                                     "upstream.other.values": torch.zeros(1)}), "which delta.json has no shape for"),
    "more entries than k": (_perturb_indices(lambda i: torch.arange(i.numel() + 1, dtype=i.dtype)), r"holds \d+ child entries but"),
}


@pytest.mark.parametrize("fault", list(TENSOR_FAULTS))
def test_a_structurally_bad_delta_is_refused_and_nothing_changes(delta, fault):
    edit, message = TENSOR_FAULTS[fault]
    if fault == "more entries than k":  # values must follow the indices to reach the count check
        def edit(t, _base=edit):
            _base(t)
            t["upstream.enc.weight.values"] = torch.zeros(t["upstream.enc.weight.indices"].numel())
    rewrite_tensors(delta, edit)
    with pytest.raises(DeltaError, match=r"delta\.safetensors.*" + message if "delta.json" not in message else message):
        apply_to_fresh(delta)


def test_a_torn_pair_fails_the_checksum(delta, tmp_path):
    other = tmp_path / "other"
    write_delta(other, p=0.3)
    (delta / TENSORS_FILE).write_bytes((other / TENSORS_FILE).read_bytes())  # new tensors, old JSON
    with pytest.raises(DeltaError, match=r"delta\.safetensors does not match .*delta\.json.*torn"):
        apply_to_fresh(delta)


@pytest.mark.parametrize("cut", [0, 7, 100, -1])
def test_a_truncated_or_garbage_tensor_file_is_refused(delta, cut):
    data = (delta / TENSORS_FILE).read_bytes()
    (delta / TENSORS_FILE).write_bytes(data[:cut] if cut >= 0 else b"\xff" * 64)
    rewrite_config(delta, lambda m: m.pop("tensors_sha256"))  # a delta from before checksums
    with pytest.raises(DeltaError, match=r"delta\.safetensors is not a readable safetensors file"):
        apply_to_fresh(delta)


def test_a_pickle_in_place_of_the_tensors_is_refused_without_unpickling(delta, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (delta / TENSORS_FILE).write_bytes(pickle.dumps({"x": Boom()}))
    rewrite_config(delta, lambda m: m.pop("tensors_sha256"))

    def no_pickle(*a, **k):
        raise AssertionError("pickle used while loading an artifact")

    for target in (pickle, ):
        monkeypatch.setattr(target, "load", no_pickle)
        monkeypatch.setattr(target, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    with pytest.raises(DeltaError, match="not a readable safetensors file"):
        apply_to_fresh(delta)


def test_loading_artifacts_never_unpickles(delta, tmp_path, monkeypatch):
    child = ChildNetwork.from_scores({"a": torch.rand(50)}, 0.1)
    child.save(tmp_path / "child")

    def no_pickle(*a, **k):
        raise AssertionError("pickle used while loading an artifact")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    apply_to_fresh(delta)
    ChildNetwork.load(tmp_path / "child")


# --- delta.json: keys and types ---------------------------------------------------------------
CONFIG_FAULTS = {
    "not JSON": (b"{not json", r"is not valid JSON"),
    "not UTF-8": (b'{"format": "\xff"}', r"is not UTF-8"),
    "a list, not an object": (b"[1, 2]", r"expected a JSON object, got list"),
    "deeply nested": (b"[" * 100000 + b"]" * 100000, r"not valid JSON|expected a JSON object"),
    "another format": ({"format": "something.else"}, r"is not an adtuning delta"),
    "another version": ({"version": 2}, r"unsupported delta version 2"),
    "version true": ({"version": True}, r"unsupported delta version True"),
    "p as a string": ({"p": "0.2"}, r"'p' must be a number, got '0\.2'"),
    "p negative": ({"p": -0.1}, r"p must be in \[0, 1\]"),  # 0 is a method's delta with no upstream entry
    "p above one": ({"p": 1.5}, r"p must be in \[0, 1\]"),
    "p NaN": ({"p": float("nan")}, r"'p' must be a number, got nan"),
    "k fractional": ({"k": 8.5}, r"'k' must be an integer"),
    "k boolean": ({"k": True}, r"'k' must be an integer, got True"),
    "k above n": ({"k": 10**6}, r"k=1000000 is not between 0 and n=48"),
    "n wrong": ({"n": 49}, r"n=49 but upstream_shapes hold 48 entries"),
    "shapes as a list": ({"upstream_shapes": [[6, 7]]}, r"'upstream_shapes' must be an object"),
    "negative dimension": ({"upstream_shapes": {"enc.weight": [-6, 7], "enc.bias": [6]}}, r"upstream_shapes\['enc\.weight'\] must be"),
    "bad fingerprint": ({"base_fingerprint": "md5:abc"}, r"base_fingerprint must be 'sha256:<64 hex digits>'"),
    "bad checksum format": ({"tensors_sha256": 12}, r"'tensors_sha256' must be a string"),
    "task options not an object": ({"task_options": "x=1"}, r"'task_options' must be an object"),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_a_bad_delta_json_is_refused_naming_the_key(delta, fault):
    change, message = CONFIG_FAULTS[fault]
    if isinstance(change, bytes):
        (delta / CONFIG_FILE).write_bytes(change)
    else:
        rewrite_config(delta, lambda m: m.update(change))
    with pytest.raises(DeltaError, match=r"delta\.json.*" + message):
        apply_to_fresh(delta)


@pytest.mark.parametrize("key", ["format", "version", "base_model", "base_fingerprint", "p", "k", "n", "upstream_shapes"])
def test_a_missing_delta_json_key_is_named(delta, key):
    rewrite_config(delta, lambda m: m.pop(key))
    with pytest.raises(DeltaError, match=rf"delta\.json.*({key!r}|format=None|version None)"):
        read_delta_config(delta)


# --- child networks ----------------------------------------------------------------------------
@pytest.fixture
def child_path(tmp_path):
    child = ChildNetwork.from_scores({"a": torch.rand(6, 5, generator=torch.Generator().manual_seed(0)), "b": torch.rand(9)}, 0.3)
    return child.save(tmp_path / "child")


def rewrite_child(path: Path, edit_tensors=None, edit_meta=None) -> None:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    if edit_tensors is not None:
        tensors = load_safetensors(path.read_bytes())
        edit_tensors(tensors)
        blob = save_safetensors(tensors)
        path.write_bytes(blob)
        meta["indices_sha256"] = sha256_hex(blob)
    if edit_meta is not None:
        edit_meta(meta)
    meta_path.write_text(json.dumps(meta))


CHILD_FAULTS = {
    "out of range": (lambda t: t.update({"indices.b": torch.tensor([0, 9], dtype=torch.int32)}), None, r"outside \[0, 9\)"),
    "unsorted": (lambda t: t.update({"indices.a": t["indices.a"].flip(0)}), None, "not sorted and unique"),
    "duplicated": (lambda t: t.update({"indices.a": torch.cat([t["indices.a"][:1], t["indices.a"][:-1]])}), None, "not sorted and unique"),
    "float dtype": (lambda t: t.update({"indices.a": t["indices.a"].double()}), None, "expected int32 or int64"),
    "unknown tensor": (lambda t: t.update({"weights.a": torch.zeros(1)}), None, "unexpected tensor 'weights.a'"),
    "name without a shape": (lambda t: t.update({"indices.c": torch.tensor([0], dtype=torch.int32)}), None, "'c' has no shape"),
    "count is not k": (None, lambda m: m.update({"k": m["k"] - 1}), r"indices but k="),
    "unknown method": (None, lambda m: m.update({"method": "magic"}), "method must be 'fisher' or 'bernoulli'"),
    "p out of range": (None, lambda m: m.update({"p": 1.5}), r"p must be in \(0, 1\]"),
    "threshold as a string": (None, lambda m: m.update({"threshold": "high"}), "'threshold' must be a number or null"),
    "shape not a list": (None, lambda m: m.update({"shapes": {"a": "6x5", "b": [9]}}), r"shapes\['a'\] must be a list"),
    "missing shapes": (None, lambda m: m.pop("shapes"), "missing key 'shapes'"),
    "another version": (None, lambda m: m.update({"version": 7}), "unsupported child network version 7"),
    "torn pair": (None, lambda m: m.update({"indices_sha256": "sha256:" + "0" * 64}), "does not match .*torn"),
}


@pytest.mark.parametrize("fault", list(CHILD_FAULTS))
def test_a_bad_child_network_is_refused(child_path, fault):
    edit_tensors, edit_meta, message = CHILD_FAULTS[fault]
    rewrite_child(child_path, edit_tensors, edit_meta)
    with pytest.raises(ChildError, match=r"child\.(json|safetensors).*" + message):
        ChildNetwork.load(child_path)


def test_a_child_with_bad_indices_is_never_written(tmp_path):
    child = ChildNetwork(indices={"a": torch.tensor([3, 1], dtype=torch.int32)}, shapes={"a": (5,)}, p=0.4, k=2)
    with pytest.raises(ChildError, match=r"refusing to write .*child\.safetensors: indices of 'a' is not sorted and unique"):
        child.save(tmp_path / "child")
    assert not list(tmp_path.iterdir())


# --- disk full (ENOSPC) and other write failures --------------------------------------------------
def fail_writes_after(monkeypatch, budget: int, err: int = errno.ENOSPC) -> None:
    """Make os.write accept ``budget`` bytes in total (a short write at the edge), then fail with ``err``."""
    real = os.write
    left = [budget]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(err, os.strerror(err))
        n = real(fd, bytes(data)[: left[0]])
        left[0] -= n
        return n

    monkeypatch.setattr(atomic.os, "write", write)


def only_final_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_disk_full_in_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    atomic.atomic_write_bytes(target, b"old")
    fail_writes_after(monkeypatch, 10)
    with pytest.raises(WriteError, match=r"writing .*out\.bin failed: No space left on device; the previous out\.bin is unchanged") as info:
        atomic.atomic_write_bytes(target, b"x" * 1000)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, RuntimeError)
    assert target.read_bytes() == b"old" and only_final_files(tmp_path) == ["out.bin"]


def test_a_failing_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text("old"))

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(WriteError, match=r"out\.json failed: Input/output error") as info:
        atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert info.value.errno == errno.EIO
    assert target.read_text() == "old" and only_final_files(tmp_path) == ["out.json"]


def test_a_failure_in_the_second_of_two_files_replaces_neither(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    atomic_write_files({a: b"old-a", b: b"old-b"})
    fail_writes_after(monkeypatch, 5)
    with pytest.raises(WriteError, match=r"b\.bin"):
        atomic_write_files({a: b"new-a", b: b"new-b"})
    assert (a.read_bytes(), b.read_bytes()) == (b"old-a", b"old-b") and only_final_files(tmp_path) == ["a.bin", "b.bin"]


@pytest.mark.parametrize("where", ["tensors", "json", "never"])
def test_disk_full_while_saving_a_delta_keeps_the_previous_delta(tmp_path, monkeypatch, where):
    d = tmp_path / "delta"
    upstream, head = write_delta(d)
    before = {f: (d / f).read_bytes() for f in (TENSORS_FILE, CONFIG_FILE)}
    if where == "tensors":
        # The tensor file is written by safetensors itself; this is what it raises on a full disk
        # (seen on a 1 MB tmpfs, safetensors 0.8), after writing part of the file.
        real = atomic.save_file

        def full_disk(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(atomic, "save_file", full_disk)
    else:
        fail_writes_after(monkeypatch, 10**9 if where == "never" else 50)  # the JSON is written with os.write
    if where == "never":
        write_delta(d, p=0.3)
        assert (d / TENSORS_FILE).read_bytes() != before[TENSORS_FILE]
        return
    with pytest.raises(WriteError, match=r"(delta\.safetensors|delta\.json) failed: No space left on device"):
        write_delta(d, p=0.3)
    assert {f: (d / f).read_bytes() for f in (TENSORS_FILE, CONFIG_FILE)} == before
    assert only_final_files(d) == [CONFIG_FILE, TENSORS_FILE]
    monkeypatch.undo()
    _, got, _ = apply_to_fresh(d)
    assert all(torch.equal(got[n], upstream[n]) for n in upstream)


def test_disk_full_while_saving_a_child_keeps_the_previous_child(child_path, monkeypatch):
    old = ChildNetwork.load(child_path)
    fail_writes_after(monkeypatch, 40)
    with pytest.raises(WriteError, match=r"child\.safetensors failed: No space left on device"):
        ChildNetwork.from_scores({"a": torch.rand(6, 5), "b": torch.rand(9)}, 0.9).save(child_path)
    monkeypatch.undo()
    again = ChildNetwork.load(child_path)
    assert again.k == old.k and only_final_files(child_path.parent) == ["child.json", "child.safetensors"]


def test_a_crash_between_the_two_renames_is_detected(tmp_path, monkeypatch):
    d = tmp_path / "delta"
    write_delta(d)
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies after the tensors were renamed
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_delta(d, p=0.3)
    monkeypatch.undo()
    with pytest.raises(DeltaError, match="does not match.*torn"):
        apply_to_fresh(d)


def test_temporaries_of_a_killed_writer_are_cleared_by_the_next_save(tmp_path):
    d = tmp_path / "delta"
    write_delta(d)
    (d / f".{TENSORS_FILE}.abc123.tmp").write_bytes(b"half a file")
    write_delta(d)
    assert only_final_files(d) == [CONFIG_FILE, TENSORS_FILE]


def test_a_nonfinite_delta_is_never_written(tmp_path):
    upstream, head = small_model(0)
    child = ChildNetwork.from_scores({n: torch.rand(t.shape) for n, t in upstream.items()}, 0.5)
    name, idx = next(iter(child.indices.items()))
    with torch.no_grad():
        upstream[name].view(-1)[idx[0]] = float("nan")
    with pytest.raises(DeltaError, match=rf"refusing to write .*delta\.safetensors: tensor upstream\.{name}\.values has 1 NaN/inf"):
        save_delta(tmp_path / "delta", upstream, child, head, {"base_model": "m", "base_fingerprint": "sha256:" + "0" * 64})
    with torch.no_grad():
        upstream[name].view(-1)[idx[0]] = 0.0
        head["cls.weight"][0, 0] = float("-inf")
    with pytest.raises(DeltaError, match=r"tensor head\.cls\.weight has 1 NaN/inf"):
        save_delta(tmp_path / "delta", upstream, child, head, {"base_model": "m", "base_fingerprint": "sha256:" + "0" * 64})
    assert not (tmp_path / "delta").exists() or not list((tmp_path / "delta").iterdir())


# --- export: a real (tiny) speech delta, --force, merge ---------------------------------------------
@pytest.fixture(scope="module")
def speech_delta(tmp_path_factory):
    from adtuning.speech import SpeechModel, build_task, build_upstream

    upstream = build_upstream("tiny-hubert", seed=0)
    base = weights_fingerprint(dict(upstream.named_parameters()))
    model = SpeechModel(upstream, build_task("ks", upstream_dim=upstream.hidden_size, num_layers=upstream.num_layers, num_classes=12))
    params = dict(model.upstream.named_parameters())
    child = ChildNetwork.bernoulli({n: params[n] for n in upstream.default_scored_parameters()}, 0.05, seed=0)
    with torch.no_grad():
        for name, idx in child.indices.items():
            params[name].view(-1)[idx.long()] += 0.01
    d = tmp_path_factory.mktemp("speech") / "delta"
    save_delta(d, params, child, dict(model.task.named_parameters()),
               {"base_model": "tiny-hubert", "base_fingerprint": base, "base_seed": 0, "task": "ks",
                "task_options": {}, "task_kwargs": {"num_classes": 12}})
    return d


def other_base(speech_delta, tmp_path) -> Path:
    """The same delta, recorded as trained on the seed-1 tiny model: same shapes, other weights."""
    d = tmp_path / "delta"
    d.mkdir()
    for f in (TENSORS_FILE, CONFIG_FILE):
        (d / f).write_bytes((speech_delta / f).read_bytes())
    rewrite_config(d, lambda m: m.update(base_seed=1))
    return d


def test_export_refuses_a_base_with_other_weights_unless_forced(speech_delta, tmp_path, capsys):
    from adtuning.export import load_finetuned
    from adtuning.export import main as export_main

    d = other_base(speech_delta, tmp_path)
    with pytest.raises(DeltaError, match="different base model"):
        load_finetuned(d)
    assert export_main([str(d), "--merge", str(tmp_path / "merged")]) == 2
    assert "different base model" in capsys.readouterr().err and not (tmp_path / "merged").exists()
    assert export_main([str(d), "--merge", str(tmp_path / "merged"), "--force"]) == 0
    assert (tmp_path / "merged" / "adtuning_head.json").is_file()


def test_export_rejects_a_delta_json_without_a_usable_task(speech_delta, tmp_path, capsys):
    from adtuning.export import main as export_main

    d = other_base(speech_delta, tmp_path)
    rewrite_config(d, lambda m: m.update(base_seed=0, task_kwargs={"num_classes": 12, "bogus": 1}))
    assert export_main([str(d), "--merge", str(tmp_path / "m")]) == 2
    assert "cannot build the task head 'ks'" in capsys.readouterr().err
    rewrite_config(d, lambda m: m.pop("task"))
    assert export_main([str(d), "--merge", str(tmp_path / "m")]) == 2
    assert "missing key 'task'" in capsys.readouterr().err
    rewrite_config(d, lambda m: m.update(task="ks", base_dtype="float8"))
    assert export_main([str(d), "--merge", str(tmp_path / "m")]) == 2
    assert "base_dtype must be one of float32, bfloat16" in capsys.readouterr().err


def test_merge_is_all_or_nothing(speech_delta, tmp_path, monkeypatch, capsys):
    from adtuning.export import main as export_main
    from adtuning.export import merge_delta

    out = tmp_path / "merged"
    merge_delta(speech_delta, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail_writes_after(monkeypatch, 0)  # the head files are the last written
    assert export_main([str(speech_delta), "--merge", str(out)]) == 1
    assert "No space left on device; nothing was replaced" in capsys.readouterr().err
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert only_final_files(tmp_path) == ["merged"]
    merge_delta(speech_delta, out)  # a previous merge is replaced
    assert only_final_files(tmp_path) == ["merged"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep")
    assert export_main([str(speech_delta), "--merge", str(tmp_path / "precious")]) == 1
    assert "precious exists and is not an empty folder or a previous merge" in capsys.readouterr().err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep"


def test_safetensors_io_errors_become_os_errors_and_others_stay_as_they_are(tmp_path, monkeypatch):
    """atomic.save_safetensors_file: the library's I/O failure (its message carries the OS error
    number) is an OSError with that errno, which the atomic writers name as a WriteError; any
    other failure of the library is left alone."""
    def fail(message):
        def save_file(tensors, path, metadata=None):
            raise SafetensorError(message)
        return save_file

    monkeypatch.setattr(atomic, "save_file", fail("Error while serializing: I/O error: No space left on device (os error 28)"))
    with pytest.raises(WriteError, match=r"t\.safetensors failed: No space left on device") as info:
        atomic.atomic_write(tmp_path / "t.safetensors", lambda tmp: atomic.save_safetensors_file({"a": torch.zeros(3)}, tmp))
    assert info.value.errno == errno.ENOSPC and only_final_files(tmp_path) == []
    monkeypatch.setattr(atomic, "save_file", fail("Error while serializing: a tensor is not contiguous"))
    with pytest.raises(SafetensorError, match="not contiguous"):
        atomic.save_safetensors_file({"a": torch.zeros(3)}, tmp_path / "u.safetensors")
    monkeypatch.undo()
    atomic.save_safetensors_file({"a": torch.arange(3.0)}, tmp_path / "v.safetensors", metadata={"k": "v"})
    assert torch.equal(load_file(str(tmp_path / "v.safetensors"))["a"], torch.arange(3.0))
