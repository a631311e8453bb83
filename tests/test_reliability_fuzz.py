"""Property-based fuzzing (hypothesis): corpus readers, audio headers, delta and child loading.

The property is always the same: whatever the bytes, the reader either returns a valid result
or raises its documented error type (``CorpusError``, ``DeltaError``, ``ChildError``), quickly.
Anything else (a ``KeyError``, a ``struct.error``, a crash, a hang past the deadline) fails.

The example counts are fixed and the runs derandomised so the suite is reproducible and stays
within its time budget; ``ADTUNING_FUZZ_SCALE=10`` runs ten times as many examples.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

# hypothesis is a test dependency (pyproject.toml's dev extra): imported, never skipped.
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adtuning.atomic import sha256_hex
from adtuning.checkpoint import CONFIG_FILE, TENSORS_FILE, DeltaError, apply_delta
from adtuning.child import ChildError, ChildNetwork
from adtuning.speech import CorpusError, build_dataset, read_audio
from tests.speech.speech_fixtures import write_fluent, write_speech_commands, write_voxceleb
from tests.test_reliability_artifacts import small_model, write_delta

SCALE = max(1, int(os.environ.get("ADTUNING_FUZZ_SCALE", "1")))


def outcome(err: Exception | None) -> None:
    """Record what happened as a hypothesis event (``--hypothesis-show-statistics`` lists them)."""
    if err is None:
        event("accepted")
        return
    text = re.sub(r"(/|[A-Za-z]:\\)\S*|'[^']*'|\d+", "_", str(err))
    event(f"{type(err).__name__}: {' '.join(text.split()[:6])}")


def fuzz(examples: int):
    """Settings of one fuzz target: ``examples`` (times the scale), reproducible, no example database."""
    return settings(max_examples=examples * SCALE, deadline=timedelta(seconds=5), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# --- mutation strategies -------------------------------------------------------------------------
NASTY_TEXT = ["", " ", "../../etc/passwd", "/etc/passwd", "..", "a/../../b.wav", "\x00", "\ufeff", "\"", "'", ",", "\t",
              "C:\\x.wav", "x" * 300, "nan", "-1", "1e309", "\u202e", "NUL\x00in", "é", "\r"]
text_pieces = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=30))


@st.composite
def mutated_lines(draw, lines: list[str], separator: str):
    """Line-level and field-level edits of a valid list/CSV file: delete, duplicate, swap,
    replace a field with nasty text, append random lines; then maybe random bytes on top."""
    lines = list(lines)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "duplicate", "field", "append", "truncate", "swap"]))
        if not lines:
            lines.append(draw(text_pieces))
            continue
        i = draw(st.integers(0, len(lines) - 1))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif op == "field":
            fields = lines[i].split(separator)
            fields[draw(st.integers(0, len(fields) - 1))] = draw(text_pieces)
            lines[i] = separator.join(fields)
        elif op == "append":
            lines.append(draw(text_pieces))
        elif op == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        else:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and data:
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos + 1:]
    return data


def file_contents(valid: list[str], separator: str):
    return st.one_of(st.binary(max_size=512), mutated_lines(valid, separator))


# --- corpus list files ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz_corpora")
    return {"ic": write_fluent(base / "ic"), "sid": write_voxceleb(base / "sid"), "ks": write_speech_commands(base / "ks")}


def _check_reader(task: str, root: Path, split: str) -> None:
    try:
        ds = build_dataset(task, root, split)
    except CorpusError as err:
        outcome(err)
        return
    outcome(None)
    # Accepted lists must have given a sane dataset: items inside the corpus, each once.
    assert len(ds) > 0
    paths = [Path(ds.audio_path(i)) for i in range(len(ds))]
    assert len(set(paths)) == len(paths)
    assert all(p.is_file() and p.resolve().is_relative_to(root.resolve()) for p in paths)
    ds.load(0)  # the listed files are fixture audio: valid


def _fuzz_list_file(corpus, task: str, rel: str, split: str, data: bytes) -> None:
    path = corpus[task] / rel
    original = path.read_bytes()
    try:
        path.write_bytes(data)
        _check_reader(task, corpus[task], split)
    finally:
        path.write_bytes(original)


def _lines(root: Path, rel: str) -> list[str]:
    return (root / rel).read_text().splitlines()


@fuzz(200)
@given(data=st.data())
def test_fuzz_fluent_csv(corpus, data):
    content = data.draw(file_contents(_lines(corpus["ic"], "data/test_data.csv"), ","))
    _fuzz_list_file(corpus, "ic", "data/test_data.csv", "test", content)


@fuzz(100)
@given(data=st.data())
def test_fuzz_fluent_train_csv(corpus, data):
    content = data.draw(file_contents(_lines(corpus["ic"], "data/train_data.csv"), ","))
    _fuzz_list_file(corpus, "ic", "data/train_data.csv", "dev", content)


@fuzz(200)
@given(data=st.data())
def test_fuzz_voxceleb_split_list(corpus, data):
    content = data.draw(file_contents(_lines(corpus["sid"], "iden_split.txt"), " "))
    _fuzz_list_file(corpus, "sid", "iden_split.txt", data.draw(st.sampled_from(["train", "dev", "test"])), content)


@fuzz(200)
@given(data=st.data())
def test_fuzz_speech_commands_lists(corpus, data):
    rel = data.draw(st.sampled_from(["validation_list.txt", "testing_list.txt"]))
    content = data.draw(file_contents(_lines(corpus["ks"], rel), "/"))
    _fuzz_list_file(corpus, "ks", rel, data.draw(st.sampled_from(["train", "dev"])), content)


# --- audio headers -------------------------------------------------------------------------------
def _valid_wavs() -> dict[str, bytes]:
    out = {}
    x = (0.3 * np.sin(np.arange(400) / 7)).astype(np.float32)
    for subtype, fmt in (("PCM_16", "WAV"), ("FLOAT", "WAV"), ("PCM_24", "WAV"), ("PCM_16", "FLAC")):
        with tempfile.NamedTemporaryFile(suffix=f".{fmt.lower()}") as f:
            sf.write(f.name, np.stack([x, x], 1) if subtype == "FLOAT" else x, 16000, subtype=subtype, format=fmt)
            out[f"{subtype}.{fmt}"] = Path(f.name).read_bytes()
    return out


VALID_AUDIO = _valid_wavs()


@st.composite
def mutated_audio(draw):
    data = bytearray(VALID_AUDIO[draw(st.sampled_from(sorted(VALID_AUDIO)))])
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, min(len(data), 64) - 1))  # the header: format, channels, rate, sizes
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # a plausible but wrong field, written whole
        pos = draw(st.sampled_from([4, 22, 24, 28, 34, 40]))
        data[pos:pos + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 7919, 8000, 44100, 2**31 - 1, 2**32 - 1])))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _check_audio(path: Path, resample: bool, downmix: bool) -> None:
    try:
        wav = read_audio(path, resample=resample, downmix=downmix)
    except CorpusError as err:
        assert path.name in str(err)
        outcome(err)
        return
    outcome(None)
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.size > 0 and np.isfinite(wav).all()


@fuzz(500)
@given(data=mutated_audio(), resample=st.booleans(), downmix=st.booleans())
def test_fuzz_audio_headers(tmp_path_factory, data, resample, downmix):
    path = tmp_path_factory.getbasetemp() / "fuzz_audio.wav"
    path.write_bytes(data)
    _check_audio(path, resample, downmix)


@fuzz(200)
@given(data=st.binary(max_size=1024), resample=st.booleans(), downmix=st.booleans())
def test_fuzz_audio_random_bytes(tmp_path_factory, data, resample, downmix):
    path = tmp_path_factory.getbasetemp() / "fuzz_bytes.wav"
    path.write_bytes(data)
    _check_audio(path, resample, downmix)


# --- delta and child files -----------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text_pieces,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_pieces, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def mutated_json(draw, meta: dict) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=256))
    meta = json.loads(json.dumps(meta))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(meta)) | text_pieces)
        op = draw(st.sampled_from(["delete", "replace", "nested"]))
        if op == "delete":
            meta.pop(key, None)
        elif op == "replace" or not isinstance(meta.get(key), dict) or not meta[key]:
            meta[key] = draw(json_values)
        else:  # change one entry of a nested object (a shape, a metric)
            inner = draw(st.sampled_from(sorted(meta[key])))
            meta[key][inner] = draw(json_values)
    return json.dumps(meta).encode()


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool]


@st.composite
def random_tensor(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    values = torch.tensor(draw(st.lists(st.integers(-60, 60), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                          dtype=torch.float64).reshape(shape)
    if dtype.is_floating_point and values.numel() and draw(st.booleans()):
        values.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return values.to(dtype)


@st.composite
def mutated_tensors(draw, blob: bytes) -> bytes:
    tensors = load_safetensors(blob)
    for _ in range(draw(st.integers(1, 3))):
        if tensors and draw(st.integers(0, 4)):  # mostly existing tensors: the checks are about them
            key = draw(st.sampled_from(sorted(tensors)))
        else:
            key = draw(text_pieces.filter(lambda s: 0 < len(s) < 100))
        op = draw(st.sampled_from(["edit", "edit", "replace", "delete"]))
        if op == "delete":
            tensors.pop(key, None)
        elif op == "replace" or key not in tensors or tensors[key].numel() == 0:
            tensors[key] = draw(random_tensor())
        else:  # one entry of an existing tensor: an index out of order, out of range, a NaN
            t = tensors[key].clone()
            i = draw(st.integers(0, t.numel() - 1))
            if t.is_floating_point():
                choices = [float("nan"), 0.0, 1e30]
            elif t.dtype == torch.bool:
                choices = [False, True]
            else:
                info = torch.iinfo(t.dtype)
                choices = [v for v in (-1, 0, 1, 41, 42, 2**31 - 1) if info.min <= v <= info.max]
            t.view(-1)[i] = draw(st.sampled_from(choices))
            tensors[key] = t
    return save_safetensors(tensors)


@st.composite
def mutated_bytes(draw, blob: bytes) -> bytes:
    data = bytearray(blob)
    header = 8 + struct.unpack("<Q", blob[:8])[0]
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, header - 1) | st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def valid_delta(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_delta") / "delta"
    write_delta(d)
    return {"dir": d, "blob": (d / TENSORS_FILE).read_bytes(), "meta": json.loads((d / CONFIG_FILE).read_text())}


def _check_delta(valid, blob: bytes, meta_bytes: bytes, force: bool) -> None:
    d = valid["dir"].parent / "mutant"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    (d / TENSORS_FILE).write_bytes(blob)
    (d / CONFIG_FILE).write_bytes(meta_bytes)
    upstream, head = small_model(0)
    before = {n: t.detach().clone() for n, t in {**upstream, **head}.items()}
    try:
        apply_delta(d, upstream, head, force=force)
    except DeltaError as err:
        assert all(torch.equal(before[n], t) for n, t in {**upstream, **head}.items()), "a refused delta changed the model"
        outcome(err)
        return
    outcome(None)
    assert all(bool(torch.isfinite(t).all()) for t in {**upstream, **head}.values())
    tensors = load_safetensors(blob)  # an accepted file must be a valid delta, checked independently
    for key, idx in tensors.items():
        if key.endswith(".indices"):
            assert _valid_index_set(idx, upstream[key[len("upstream."):-len(".indices")]].numel())


def _valid_index_set(idx: torch.Tensor, numel: int) -> bool:
    values = idx.tolist()
    return idx.dtype in (torch.int32, torch.int64) and idx.dim() == 1 and values == sorted(set(values)) \
        and all(0 <= v < numel for v in values)


def _with_checksum(meta: dict, blob: bytes) -> bytes:
    return json.dumps({**meta, "tensors_sha256": sha256_hex(blob)}).encode()


@fuzz(300)
@given(data=st.data(), force=st.booleans())
def test_fuzz_delta_json(valid_delta, data, force):
    _check_delta(valid_delta, valid_delta["blob"], data.draw(mutated_json(valid_delta["meta"])), force)


@fuzz(400)
@given(data=st.data(), force=st.booleans(), checksum=st.booleans())
def test_fuzz_delta_tensors(valid_delta, data, force, checksum):
    """Tensor-level changes; with ``checksum`` the JSON is updated to match, so the structural
    checks (not the checksum) must catch them."""
    blob = data.draw(mutated_tensors(valid_delta["blob"]))
    meta = _with_checksum(valid_delta["meta"], blob) if checksum else json.dumps(valid_delta["meta"]).encode()
    _check_delta(valid_delta, blob, meta, force)


@fuzz(300)
@given(data=st.data(), checksum=st.booleans())
def test_fuzz_delta_safetensors_bytes(valid_delta, data, checksum):
    blob = data.draw(mutated_bytes(valid_delta["blob"]))
    meta = _with_checksum(valid_delta["meta"], blob) if checksum else json.dumps(valid_delta["meta"]).encode()
    _check_delta(valid_delta, blob, meta, False)


@pytest.fixture(scope="module")
def valid_child(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_child")
    path = ChildNetwork.from_scores({"a": torch.rand(6, 7), "b": torch.rand(6)}, 0.3).save(d / "child")
    return {"dir": d, "blob": path.read_bytes(), "meta": json.loads(path.with_suffix(".json").read_text())}


def _check_child(valid, blob: bytes, meta_bytes: bytes) -> None:
    base = valid["dir"] / "mutant"
    base.with_suffix(".safetensors").write_bytes(blob)
    base.with_suffix(".json").write_bytes(meta_bytes)
    params = {"a": torch.zeros(6, 7), "b": torch.zeros(6)}
    try:
        child = ChildNetwork.load(base, params)
    except ChildError as err:
        outcome(err)
        return
    outcome(None)
    assert sum(i.numel() for i in child.indices.values()) == child.k
    assert all(_valid_index_set(idx, params[name].numel()) for name, idx in child.indices.items())


@fuzz(400)
@given(data=st.data(), mode=st.sampled_from(["json", "tensors", "bytes"]), checksum=st.booleans())
def test_fuzz_child_files(valid_child, data, mode, checksum):
    blob, meta = valid_child["blob"], valid_child["meta"]
    if mode == "json":
        _check_child(valid_child, blob, data.draw(mutated_json(meta)))
        return
    blob = data.draw(mutated_tensors(blob) if mode == "tensors" else mutated_bytes(blob))
    meta = {**meta, "indices_sha256": sha256_hex(blob)} if checksum else meta
    _check_child(valid_child, blob, json.dumps(meta).encode())
