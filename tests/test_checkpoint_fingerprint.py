"""The base fingerprint, computed by streaming, keeps the values of the whole-tensor version.

Oracles: (1) fingerprints of the tiny and embedded upstreams computed at commit 18a2bb1, before
the streaming version and before loading in the final dtype, hard-coded here: a delta written
then still applies to the base built now; (2) the earlier implementation, inlined below.
"""
import hashlib
import json

import pytest
import torch

from adtuning import checkpoint
from adtuning.checkpoint import apply_delta, save_delta, weights_fingerprint
from adtuning.child import ChildNetwork

# weights_fingerprint(dict(build_upstream(name, dtype=dtype, seed=3).named_parameters())) at 18a2bb1
# (seed 0 for the embedded upstream).
KNOWN = {
    ("tiny-wav2vec2", torch.float32): "sha256:7f038e137cadd91955ca2896af8e323b894cfba926fa1e9e431439d549af61d8",
    ("tiny-wav2vec2", torch.bfloat16): "sha256:82c88fb981b80e9646416634b9fdf6d028ce27dfa50c0a9a76c02ed541c65624",
    ("tiny-hubert", torch.bfloat16): "sha256:0895f780f68cc0ca9d886c3e086c80026edd89f5247095c0044cc143a5d4a946",
    ("tiny-wavlm", torch.float32): "sha256:1b734658a813bc1b4887be9ae1836d4881aeaaf4ca30ae1b16fa119105a0e699",
    ("adtuning-hubert-mini", torch.float32): "sha256:911f37fafe5044dc8dfe7b40f50ebe3492099279223f1d75bc5ac11deb53ed8b",
    ("adtuning-hubert-mini", torch.bfloat16): "sha256:1306312bea8f4d9e9b85b3c0414dc466d12cf4e7b8eb0a1e0b2d615d41e9546c",
}


def _old_fingerprint(named_params):
    """The implementation before streaming (commit 18a2bb1), verbatim."""
    digest = hashlib.sha256()
    for name in sorted(named_params):
        tensor = named_params[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        flat = tensor.contiguous().reshape(-1).cpu()
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return "sha256:" + digest.hexdigest()


@pytest.mark.parametrize(("name", "dtype"), list(KNOWN))
def test_fingerprint_of_built_upstreams_is_unchanged(name, dtype):
    from adtuning.speech import build_upstream

    upstream = build_upstream(name, dtype=dtype, seed=3 if name.startswith("tiny-") else 0)
    assert upstream.dtype == dtype
    assert weights_fingerprint(dict(upstream.named_parameters())) == KNOWN[(name, dtype)]


def test_delta_written_before_streaming_still_applies(tmp_path):
    from adtuning.speech import build_upstream

    base = build_upstream("tiny-wav2vec2", dtype=torch.bfloat16, seed=3)
    params = dict(base.named_parameters())
    name = "model.encoder.layers.0.attention.q_proj.weight"
    child = ChildNetwork(indices={name: torch.tensor([0, 5, 7], dtype=torch.int32)},
                         shapes={name: tuple(params[name].shape)}, p=0.01, k=3)
    tuned = {n: p.detach().clone() for n, p in params.items()}
    tuned[name].view(-1)[torch.tensor([0, 5, 7])] = torch.tensor([1.5, -2.0, 0.25], dtype=torch.bfloat16)
    # The base fingerprint as a delta written at 18a2bb1 recorded it.
    save_delta(tmp_path / "d", tuned, child, {}, {"base_model": "tiny-wav2vec2",
                                                 "base_fingerprint": KNOWN[("tiny-wav2vec2", torch.bfloat16)]})
    fresh = build_upstream("tiny-wav2vec2", dtype=torch.bfloat16, seed=3)
    apply_delta(tmp_path / "d", dict(fresh.named_parameters()))  # refused if the fingerprint differed
    got = dict(fresh.named_parameters())[name].detach().view(-1)[torch.tensor([0, 5, 7])]
    assert torch.equal(got, torch.tensor([1.5, -2.0, 0.25], dtype=torch.bfloat16))


def _awkward_tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(97, 33, generator=g)
    return {
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "one": torch.ones(1),
        "transposed": base.t(),  # not contiguous
        "strided": base[::2, 1::3],
        "bf16": torch.randn(4097, generator=g).to(torch.bfloat16),
        "bf16.t": torch.randn(17, 257, generator=g).to(torch.bfloat16).t(),
        "int": torch.arange(65, dtype=torch.int32).reshape(5, 13),
        "4d": torch.randn(3, 5, 7, 2, generator=g).permute(2, 0, 3, 1),
    }


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 26])
def test_streaming_equals_whole_tensor_hash(monkeypatch, chunk):
    monkeypatch.setattr(checkpoint, "_FINGERPRINT_CHUNK_BYTES", chunk)
    tensors = _awkward_tensors()
    assert weights_fingerprint(tensors) == _old_fingerprint(tensors)


def test_contiguous_cpu_tensors_are_hashed_without_a_copy(monkeypatch):
    tensor = torch.randn(1000)
    seen = []

    class Recorder:
        def update(self, data):
            seen.append(data)

    checkpoint._hash_tensor_bytes(Recorder(), tensor)
    assert len(seen) == 1
    view = seen[0]
    assert isinstance(view, memoryview) and view.nbytes == tensor.numel() * 4
    tensor[0] = 42.0  # the hashed buffer is the tensor's own memory
    assert bytes(view[:4]) == torch.tensor([42.0]).numpy().tobytes()


def test_an_ft_delta_is_written_from_the_parameters_without_a_copy_and_reads_back(tmp_path, monkeypatch):
    """Memory: FT's delta (a child holding every entry) is as large as the upstream, so it is
    written straight from the parameters (views, no gathered copy, no in-memory file); the
    written file is what safetensors' own reader and apply_delta read back, checksum included."""
    from safetensors.torch import load_file

    from adtuning.search_candidate import baseline_child

    torch.manual_seed(0)
    params = {"a.weight": torch.randn(7, 5), "b.bias": torch.randn(17)}
    child = baseline_child("full", {n: tuple(p.shape) for n, p in params.items()})
    pointers: dict[str, int] = {}
    from adtuning import atomic

    write = atomic.save_file

    def spy(tensors, path, metadata=None):
        pointers.update({k: t.untyped_storage().data_ptr() for k, t in tensors.items()})
        return write(tensors, path, metadata=metadata)

    monkeypatch.setattr(atomic, "save_file", spy)
    fingerprint = weights_fingerprint(params)
    save_delta(tmp_path / "d", params, child, {}, {"base_model": "x", "base_fingerprint": fingerprint})
    for name, param in params.items():
        assert pointers[f"upstream.{name}.values"] == param.untyped_storage().data_ptr(), name
    stored = load_file(str(tmp_path / "d" / checkpoint.TENSORS_FILE))
    for name, param in params.items():
        assert torch.equal(stored[f"upstream.{name}.values"], param.reshape(-1))
    meta = json.loads((tmp_path / "d" / checkpoint.CONFIG_FILE).read_text())
    assert meta["tensors_sha256"] == "sha256:" + hashlib.sha256((tmp_path / "d" / checkpoint.TENSORS_FILE).read_bytes()).hexdigest()
    fresh = {n: torch.zeros_like(p) for n, p in params.items()}
    fresh_fingerprint = weights_fingerprint(fresh)
    assert fresh_fingerprint != fingerprint
    meta["base_fingerprint"] = fresh_fingerprint  # apply onto other base weights: the values replace them
    (tmp_path / "d" / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    apply_delta(tmp_path / "d", fresh)
    for name, param in params.items():
        assert torch.equal(fresh[name], param), name
