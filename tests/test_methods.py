"""The module-adding methods (adtuning.methods): counts, identity at init, training, detach, state
round trip, LoRA merge, errors, dtypes, gradient checkpointing -- on all three model types."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import adtuning.methods as M
from adtuning.checkpoint import weights_fingerprint
from adtuning.speech.featurizer import Featurizer
from adtuning.speech.upstream import Upstream, build_upstream

MODELS = ("tiny-wav2vec2", "tiny-hubert", "tiny-wavlm")
METHOD_NAMES = ("lora", "houlsby", "adapterbias", "prefix", "cnn-adapter", "chapter")
# The heavier mode tests (padding, bf16, checkpointing) run every method on wav2vec2 and the methods
# that touch attention or the layers' structure on all three models.
CROSS = [(m, n) for n in METHOD_NAMES for m in MODELS if m == "tiny-wav2vec2" or n in ("lora", "prefix", "houlsby")]
IDENTITY = tuple(n for n in METHOD_NAMES if M.METHODS[n].identity_at_init)
NON_DEFAULT = {
    "lora": {"rank": 3, "targets": ["q_proj", "k_proj", "out_proj", "intermediate_dense", "output_dense"]},
    "houlsby": {"bottleneck": 5},
    "adapterbias": {},
    "prefix": {"length": 3},
    "cnn-adapter": {"scale": 0.5},
    "chapter": {"bottleneck": 7, "scale": 1.0},
}


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    wav = torch.randn(3, 2881, generator=g)
    lengths = torch.tensor([2881, 2239, 1601])
    return wav, lengths


def outputs(up, wav, lengths):
    with torch.no_grad():
        hidden, _ = up(wav, lengths)
    return [h.clone() for h in hidden]


def probe_loss(hidden, lengths_frames):
    """A loss that depends on every hidden state through a fixed random projection (a plain mean
    square is constant after a final layer norm)."""
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for h in hidden:
        r = torch.randn(h.shape[-1], generator=g).to(h.dtype)
        mask = (torch.arange(h.shape[1])[None, :] < lengths_frames[:, None]).to(h.dtype)
        total = total + (((h * r).sum(-1)) * mask).float().pow(2).mean()
    return total


def train_step(up, attached, wav, lengths, lr=1e-2):
    up.train()
    opt = torch.optim.AdamW(list(attached.parameters().values()), lr=lr)
    hidden, frames = up(wav, lengths)
    probe_loss(hidden, frames).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    up.eval()


def group_norm_upstream() -> Upstream:
    """A small base-like model: group-norm CNN without conv bias, odd sizes, 3 layers."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=30, num_hidden_layers=3, num_attention_heads=3, intermediate_size=37,
                         conv_dim=(17, 17, 17), conv_kernel=(10, 8, 4), conv_stride=(5, 8, 8), conv_bias=False,
                         feat_extract_norm="group", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                         hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0)
    torch.manual_seed(0)
    return Upstream(Wav2Vec2Model(cfg))


# -- counts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("custom", [False, True], ids=["default", "custom"])
def test_count_formula_matches_attached_modules(model, name, custom):
    up = build_upstream(model)
    options = NON_DEFAULT[name] if custom else None
    attached = M.attach(name, up, options)
    real = sum(p.numel() for p in attached.parameters().values())
    assert attached.trainable_count() == real
    assert real == M.expected_trainable_count(name, up.model.config, options)
    trainable = {n for n, p in up.named_parameters() if p.requires_grad}
    assert len(trainable) == len(attached.parameters())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_count_formula_group_norm_cnn(name):
    up = group_norm_upstream()
    attached = M.attach(name, up, NON_DEFAULT[name])
    assert attached.trainable_count() == M.expected_trainable_count(name, up.model.config, NON_DEFAULT[name])


def _matches_paper(count: int, paper: float) -> bool:
    # Table 2 prints millions with two decimals: a count matches when it is within 5 % of the printed
    # figure or prints as the same figure (AdapterBias: 18,444 prints as 0.02M but is 7.8 % below 20,000).
    return abs(count - paper) <= 0.05 * paper or round(count / 1e6, 2) == round(paper / 1e6, 2)


EXPECTED_BASE = {"houlsby": 599_424, "adapterbias": 18_444, "lora": 294_912, "prefix": 101_376,
                 "cnn-adapter": 4_200_448, "chapter": 4_799_872}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_base_size_formula_matches_table_2(name):
    from transformers import Wav2Vec2Config

    count = M.expected_trainable_count(name, Wav2Vec2Config())
    assert count == EXPECTED_BASE[name]
    assert _matches_paper(count, M.METHODS[name].paper_count)
    if name != "adapterbias":
        assert abs(count - M.METHODS[name].paper_count) <= 0.05 * M.METHODS[name].paper_count


@pytest.mark.slow
def test_base_size_attached_counts():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    up = Upstream(Wav2Vec2Model(Wav2Vec2Config()))
    for name in METHOD_NAMES:
        attached = M.attach(name, up)
        assert attached.trainable_count() == EXPECTED_BASE[name], name
        attached.detach()


# -- function ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", IDENTITY)
def test_identity_at_init(model, name):
    up = build_upstream(model).eval()
    wav, lengths = batch()
    before = outputs(up, wav, lengths)
    M.attach(name, up)
    after = outputs(up, wav, lengths)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_step_trains_method_only_and_detach_restores(model, name):
    up = build_upstream(model).eval()
    wav, lengths = batch()
    base_params = {n: p.detach().clone() for n, p in up.named_parameters()}
    base_flags = {n: p.requires_grad for n, p in up.named_parameters()}
    fingerprint = weights_fingerprint(dict(up.named_parameters()))
    attn_impl = up.model.config._attn_implementation
    before = outputs(up, wav, lengths)
    attached = M.attach(name, up)
    assert not any(p.requires_grad for n, p in attached.base_named_parameters().items())
    assert weights_fingerprint(attached.base_named_parameters()) == fingerprint
    at_init = outputs(up, wav, lengths)
    train_step(up, attached, wav, lengths)
    trained = outputs(up, wav, lengths)
    assert max((a - b).abs().max().item() for a, b in zip(trained, at_init)) > 1e-5
    for n, p in attached.base_named_parameters().items():
        assert torch.equal(p, base_params[n]), n
        assert p.grad is None, n
    attached.detach()
    assert {n: p.requires_grad for n, p in up.named_parameters()} == base_flags
    assert weights_fingerprint(dict(up.named_parameters())) == fingerprint
    assert up.model.config._attn_implementation == attn_impl
    assert not hasattr(up, M.CONTAINER_NAME)
    for module in up.modules():
        assert not module._forward_hooks, type(module).__name__
    for a, b in zip(outputs(up, wav, lengths), before):
        assert torch.equal(a, b)
    attached.detach()  # idempotent


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_dict_round_trip(model, name):
    wav, lengths = batch()
    up = build_upstream(model).eval()
    attached = M.attach(name, up, NON_DEFAULT[name])
    train_step(up, attached, wav, lengths)
    expected = outputs(up, wav, lengths)
    state = attached.state_dict()
    assert set(state) == set(attached.parameters())
    fresh = build_upstream(model).eval()
    again = M.attach(name, fresh, attached.options)
    again.load_state_dict(state)
    for a, b in zip(outputs(fresh, wav, lengths), expected):
        assert torch.equal(a, b)


def test_load_state_dict_errors():
    up = build_upstream("tiny-wav2vec2")
    attached = M.attach("houlsby", up)
    state = attached.state_dict()
    key = sorted(state)[0]
    with pytest.raises(M.MethodStateError, match="missing"):
        attached.load_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(M.MethodStateError, match="unexpected"):
        attached.load_state_dict({**state, "layers.99.up.weight": state[key]})
    with pytest.raises(M.MethodStateError, match="shape"):
        attached.load_state_dict({**state, key: state[key].flatten()[:-1]})
    bad = state[key].clone()
    bad.view(-1)[0] = float("nan")
    with pytest.raises(M.MethodStateError, match="NaN"):
        attached.load_state_dict({**state, key: bad})
    for n, p in attached.parameters().items():
        assert torch.equal(p, state[n])  # nothing was copied


@pytest.mark.parametrize("model", MODELS)
def test_lora_merge_gives_plain_transformers_model(model):
    wav, lengths = batch()
    up = build_upstream(model).eval()
    base_names = sorted(n for n, _ in up.named_parameters())
    attached = M.attach("lora", up)
    train_step(up, attached, wav, lengths, lr=5e-2)
    expected = outputs(up, wav, lengths)
    merged = attached.merge()
    assert merged is up.model
    assert type(merged).__module__.startswith("transformers.")
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in merged.modules())
    assert sorted(n for n, _ in up.named_parameters()) == base_names
    for layer in merged.encoder.layers:
        assert "torch_multi_head_self_attention" not in layer.attention.__dict__
    for a, b in zip(outputs(up, wav, lengths), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n != "lora"])
def test_non_lora_merge_raises(name):
    attached = M.attach(name, build_upstream("tiny-wav2vec2"))
    assert not attached.mergeable
    with pytest.raises(M.MethodNotMergeableError, match="cannot be merged"):
        attached.merge()
    assert attached.trainable_count() > 0  # still attached


# -- modes: padding, attention implementations, dtypes, checkpointing ------------------------------
@pytest.mark.parametrize("model,name", CROSS)
def test_sample_outputs_do_not_depend_on_padding(model, name):
    up = build_upstream(model).eval()
    attached = M.attach(name, up)
    train_step(up, attached, *batch())
    wav, lengths = batch(1)
    padded = outputs(up, wav, lengths)
    frames = up.frame_lengths(lengths)
    alone = outputs(up, wav[2:3, : lengths[2]], lengths[2:3])
    for p, a in zip(padded, alone):
        torch.testing.assert_close(p[2, : frames[2]], a[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ("tiny-wav2vec2", "tiny-hubert"))
def test_prefix_eager_and_sdpa_agree(model):
    wav, lengths = batch()
    results = []
    for impl in ("eager", "sdpa"):
        up = build_upstream(model).eval()
        up.model.config._attn_implementation = impl
        attached = M.attach("prefix", up, {"length": 4})
        torch.manual_seed(5)
        with torch.no_grad():
            for p in attached.parameters().values():
                p.normal_()
        results.append(outputs(up, wav, lengths))
        attached.detach()
        assert up.model.config._attn_implementation == impl
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model,name", CROSS)
def test_bfloat16(model, name):
    up = build_upstream(model, dtype=torch.bfloat16).eval()
    wav, lengths = batch()
    before = outputs(up, wav, lengths)
    attached = M.attach(name, up)
    assert {p.dtype for p in attached.parameters().values()} == {torch.bfloat16}
    if M.METHODS[name].identity_at_init:
        for a, b in zip(outputs(up, wav, lengths), before):
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)
    up.train()
    hidden, frames = up(wav, lengths)
    probe_loss(hidden, frames).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in attached.parameters().values())
    assert all(torch.isfinite(p.grad).all() for p in attached.parameters().values() if p.grad is not None)


@pytest.mark.parametrize("model,name", CROSS)
def test_gradient_checkpointing_gives_the_same_gradients(model, name):
    wav, lengths = batch()
    grads = []
    for checkpointing in (False, True):
        up = build_upstream(model, gradient_checkpointing=checkpointing)
        torch.manual_seed(3)
        attached = M.attach(name, up)
        with torch.no_grad():
            for p in attached.parameters().values():
                p.add_(torch.randn_like(p) * 0.05)  # away from zero-init so that every grad is non-zero
        up.train()
        hidden, frames = up(wav, lengths)
        probe_loss(hidden, frames).backward()
        grads.append({n: p.grad.clone() for n, p in attached.parameters().items()})
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


# -- errors and options ------------------------------------------------------------------------------
def test_unknown_method():
    with pytest.raises(M.MethodAttachError, match="unknown method 'bitfit'.*lora"):
        M.attach("bitfit", build_upstream("tiny-wav2vec2"))
    with pytest.raises(M.MethodAttachError, match="unknown method"):
        M.expected_trainable_count("nope", build_upstream("tiny-wav2vec2").model.config)


@pytest.mark.parametrize("name,options,match", [
    ("lora", {"rnk": 4}, "no option 'rnk'"),
    ("lora", {"rank": 0}, "--lora-rank"),
    ("lora", {"rank": "x"}, "--lora-rank"),
    ("lora", {"rank": 2.5}, "--lora-rank"),
    ("lora", {"targets": ["q_proj", "query"]}, "--lora-targets.*'query'"),
    ("lora", {"targets": []}, "--lora-targets"),
    ("lora", {"alpha": float("nan")}, "--lora-alpha"),
    ("lora", {"dropout": 1.0}, "--lora-dropout"),
    ("houlsby", {"bottleneck": 0}, "--houlsby-bottleneck"),
    ("houlsby", {"rank": 4}, "no option 'rank'"),
    ("adapterbias", {"bottleneck": 4}, "no option 'bottleneck'.*none"),
    ("prefix", {"length": -1}, "--prefix-length"),
    ("cnn-adapter", {"scale": 0}, "--cnn-adapter-scale"),
    ("chapter", {"bottleneck": 0}, "--chapter-bottleneck"),
])
def test_bad_options(name, options, match):
    up = build_upstream("tiny-wav2vec2")
    names = sorted(n for n, _ in up.named_parameters())
    with pytest.raises(ValueError, match=match):
        M.attach(name, up, options)
    assert sorted(n for n, _ in up.named_parameters()) == names
    M.attach(name, up)  # nothing was left behind


def test_options_parse_command_line_strings():
    up = build_upstream("tiny-wav2vec2")
    attached = M.attach("lora", up, {"rank": "3", "targets": "q_proj, k_proj", "alpha": "6"})
    assert attached.options == {"rank": 3, "alpha": 6.0, "dropout": 0.0, "targets": ["q_proj", "k_proj"]}
    assert attached.trainable_count() == 2 * 2 * 3 * (32 + 32)


def test_option_fields_give_flags():
    fields = M.method_option_fields()
    assert set(fields) == set(METHOD_NAMES)
    flags = {f.flag: f for fs in fields.values() for f in fs}
    assert {"--lora-rank", "--lora-targets", "--houlsby-bottleneck", "--prefix-length", "--cnn-adapter-scale",
            "--chapter-bottleneck", "--chapter-scale", "--lora-alpha", "--lora-dropout"} == set(flags)
    assert flags["--lora-rank"].default == 8 and flags["--lora-rank"].type is int
    assert flags["--lora-targets"].parse("q_proj,v_proj") == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="--prefix-length"):
        flags["--prefix-length"].parse("many")
    assert all(f.help for f in flags.values())


def test_attach_twice_and_foreign_upstreams():
    up = build_upstream("tiny-wav2vec2")
    M.attach("houlsby", up)
    with pytest.raises(M.MethodAttachError, match="already attached"):
        M.attach("lora", up)

    class Fake(nn.Module):
        name = "fake"

        def __init__(self):
            super().__init__()
            self.model = nn.Linear(2, 2)

    with pytest.raises(M.MethodAttachError, match="'fake'.*not wav2vec2"):
        M.attach("lora", Fake())


def test_attach_error_leaves_upstream_untouched(monkeypatch):
    up = build_upstream("tiny-wav2vec2")
    layer = up.model.encoder.layers[1]
    monkeypatch.delattr(layer, "feed_forward")
    names = sorted(n for n, _ in up.named_parameters())
    flags = {n: p.requires_grad for n, p in up.named_parameters()}
    with pytest.raises(M.MethodAttachError, match="encoder.layers.1 has no feed_forward"):
        M.attach("houlsby", up)
    assert not hasattr(up, M.CONTAINER_NAME)
    assert sorted(n for n, _ in up.named_parameters()) == names
    assert {n: p.requires_grad for n, p in up.named_parameters()} == flags
    assert not any(m._forward_hooks for m in up.modules())


# -- featurizer's last-layer mode (the frozen Baseline) -------------------------------------------------
def test_featurizer_last_mode():
    hidden = [torch.randn(2, 5, 4) for _ in range(3)]
    last = Featurizer(3, mode="last")
    assert list(last.parameters()) == []
    assert torch.equal(last(hidden), hidden[-1])
    torch.testing.assert_close(last.layer_weights(), torch.tensor([0.0, 0.0, 1.0]))
    normed = Featurizer(3, mode="last", normalize=True)
    torch.testing.assert_close(normed(hidden), torch.nn.functional.layer_norm(hidden[-1], (4,)))
    default = Featurizer(3)
    assert [n for n, _ in default.named_parameters()] == ["weights"]
    with pytest.raises(ValueError, match="featurizer mode"):
        Featurizer(3, mode="first")


def test_frozen_uses_last_layer_with_a_task_head():
    from adtuning.recipe.methods import prepare_task
    from adtuning.speech import build_task

    task = build_task("ks", upstream_dim=32, num_layers=3, normalize_features=True)
    before = {n for n, _ in task.named_parameters()}
    prepare_task("frozen", task)
    assert task.featurizer.mode == "last" and task.featurizer.normalize and task.featurizer.num_layers == 3
    assert {n for n, _ in task.named_parameters()} == before - {"featurizer.weights"}
    hidden = [torch.randn(2, 5, 32) for _ in range(3)]
    torch.testing.assert_close(task.featurizer(hidden), torch.nn.functional.layer_norm(hidden[-1], (32,)))
    weighted = build_task("ks", upstream_dim=32, num_layers=3)
    prepare_task("weighted-sum", weighted)
    assert weighted.featurizer.mode == "weighted-sum" and "featurizer.weights" in dict(weighted.named_parameters())


def test_prefix_refuses_flash_attention():
    up = build_upstream("tiny-wav2vec2")
    up.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(M.MethodAttachError, match="flash_attention_2"):
        M.attach("prefix", up)
    assert up.model.config._attn_implementation == "flash_attention_2"
    assert not hasattr(up, M.CONTAINER_NAME)
