"""Upstream wrapper and featurizer."""
from __future__ import annotations

import pytest
import torch

from adtuning.speech import TINY_UPSTREAMS, Featurizer, UpstreamLoadError, build_upstream

# WavLM's attention (inside transformers) mixes mask types.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask"),
]


def _batch(lengths=(16000, 9137, 4801), seed=0):
    g = torch.Generator().manual_seed(seed)
    wav = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        wav[b, :n] = 0.3 * torch.randn(n, generator=g)
    return wav, torch.tensor(lengths)


@pytest.mark.parametrize("name", TINY_UPSTREAMS)
def test_hidden_states_and_padding_independence(name):
    up = build_upstream(name).eval()
    wav, lengths = _batch()
    with torch.no_grad():
        hs, fl = up(wav, lengths)
        assert len(hs) == up.num_layers == up.model.config.num_hidden_layers + 1
        assert fl.tolist() == up.model._get_feat_extract_output_lengths(lengths).tolist()
        assert all(h.shape == (3, int(fl.max()), up.hidden_size) for h in hs)
        for b, n in enumerate(lengths.tolist()):
            alone, fl1 = up(wav[b:b + 1, :n], lengths[b:b + 1])
            assert fl1.item() == fl[b].item()
            for h, a in zip(hs, alone):
                torch.testing.assert_close(h[b, : fl[b]], a[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-wav2vec2", "tiny-wav2vec2-stable"])
def test_last_hidden_state_is_the_encoder_output(name):
    # stable-layer-norm models: the last entry is after the encoder's final layer norm
    # (transformers 4.x semantics, which 5.x's output_hidden_states no longer gives)
    up = build_upstream(name).eval()
    wav, lengths = _batch((8000,))
    with torch.no_grad():
        hs, _ = up(wav, lengths)
        ref = up.model(up_input(up, wav, lengths))
    torch.testing.assert_close(hs[-1], ref.last_hidden_state)
    if up.model.config.do_stable_layer_norm:
        normed = torch.nn.functional.layer_norm(hs[-1], (hs[-1].shape[-1],))
        ln = up.model.encoder.layer_norm
        torch.testing.assert_close(hs[-1], normed * ln.weight + ln.bias, rtol=1e-4, atol=1e-4)


def up_input(up, wav, lengths):
    """The waveform the upstream feeds to the model (after its normalisation)."""
    x = wav.clone()
    if up.normalize_waveform:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-5)
    return x


def test_frozen_cnn_layerdrop_and_scored_parameters():
    up = build_upstream("tiny-wav2vec2")
    assert up.model.config.layerdrop == 0.0
    assert all(not p.requires_grad for p in up.model.feature_extractor.parameters())
    names = up.default_scored_parameters()
    assert names and all(n.startswith("model.encoder.layers.") for n in names)
    params = dict(up.named_parameters())
    assert all(n in params for n in names)
    assert any(n.endswith("attention.q_proj.weight") for n in names)
    assert any(n.endswith("feed_forward.output_dense.weight") for n in names)
    assert any(n.endswith("final_layer_norm.weight") for n in names)
    assert not any("feature_extractor" in n or "pos_conv" in n for n in names)


def test_gradients_reach_every_layer_and_checkpointing_matches():
    wav, lengths = _batch((8000, 6000))
    grads = []
    for ckpt in (False, True):
        up = build_upstream("tiny-wav2vec2", gradient_checkpointing=ckpt).train()
        hs, _ = up(wav, lengths)
        sum(h.square().mean() for h in hs).backward()
        grads.append({n: p.grad.clone() for n, p in up.named_parameters() if p.requires_grad})
        assert all(g is not None for g in grads[-1].values())
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5)


def test_bf16_weights():
    up = build_upstream("tiny-hubert", dtype=torch.bfloat16)
    assert up.dtype == torch.bfloat16
    hs, _ = up(*_batch((4000,)))
    assert hs[0].dtype == torch.bfloat16
    f = Featurizer(up.num_layers)
    assert f(hs).dtype == torch.float32


def test_local_directory_round_trip(tmp_path):
    up = build_upstream("tiny-wavlm").eval()
    up.model.save_pretrained(tmp_path / "w")
    loaded = build_upstream(str(tmp_path / "w")).eval()
    wav, lengths = _batch((5000,))
    with torch.no_grad():
        a, _ = up(wav, lengths)
        b, _ = loaded(wav, lengths)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_load_errors(tmp_path):
    with pytest.raises(UpstreamLoadError, match="downloaded|offline"):
        build_upstream(str(tmp_path / "missing"))
    with pytest.raises(UpstreamLoadError, match="downloaded|offline"):
        build_upstream("nobody/no-such-model-xyz")
    with pytest.raises(UpstreamLoadError, match="tiny-wav2vec2"):
        build_upstream("tiny-bert")


def test_featurizer_weighted_sum():
    f = Featurizer(3)
    torch.testing.assert_close(f.layer_weights(), torch.full((3,), 1 / 3))
    hs = [torch.full((1, 2, 4), float(i)) for i in range(3)]
    torch.testing.assert_close(f(hs), torch.full((1, 2, 4), 1.0))
    with torch.no_grad():
        f.weights.copy_(torch.tensor([0.0, 0.0, 100.0]))
    torch.testing.assert_close(f(hs), torch.full((1, 2, 4), 2.0))
    g = Featurizer(2, normalize=True)
    x = [torch.randn(2, 3, 8) * 5 + 3, torch.randn(2, 3, 8)]
    out = g(x)
    expected = sum(torch.nn.functional.layer_norm(h, (8,)) for h in x) / 2
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError):
        g(x[:1])


@pytest.mark.parametrize("name", TINY_UPSTREAMS)
def test_hidden_states_follow_transformers_4_semantics(name):
    # transformers 4.x: hidden_states = inputs of every layer + encoder output (after the final
    # layer norm for stable-layer-norm models). 5.x drops that final layer norm from the last
    # entry; the upstream gives the 4.x list on every version.
    import transformers

    up = build_upstream(name, normalize_waveform=False).eval()
    wav, lengths = _batch((8000,))
    with torch.no_grad():
        hs, _ = up(wav, lengths)
        out = up.model(wav, attention_mask=torch.ones_like(wav, dtype=torch.long), output_hidden_states=True)
    assert len(hs) == len(out.hidden_states)
    for ours, theirs in zip(hs[:-1], out.hidden_states[:-1]):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(hs[-1], out.last_hidden_state)
    if int(transformers.__version__.split(".")[0]) < 5 or not up.model.config.do_stable_layer_norm:
        torch.testing.assert_close(hs[-1], out.hidden_states[-1])
