"""Per-sample Fisher (eq. 6) against independent oracles."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from adtuning import estimate_fisher
from adtuning.fisher import default_scored_parameter_names
from tests.backends import ALL_BACKENDS, require_backend
from tests.helpers import TinyMLP, TinyWav2Vec2Classifier, mlp_loss, padded_wav_batches, wav_loss


def mlp_data(n, seed=0, d_in=7, classes=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def func_oracle(model, x, y):
    """Mean of squared per-sample gradients through torch.func (vmap over grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return {k: v.square().mean(0) for k, v in per_sample.items()}


def batches_of(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def assert_scores_close(got, expected, rtol=1e-5):
    """Entry-wise comparison with an absolute floor relative to the largest score of the set
    (some true scores are exactly 0 and computed as ~1e-20 round-off)."""
    assert got.keys() == expected.keys()
    scale = max(float(v.abs().max()) for v in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n", [1, 7, 17])
def test_reference_matches_torch_func_oracle(n):
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = mlp_data(n)
    scores = estimate_fisher(model, batches_of(x, y, 4), mlp_loss, progress=False)
    assert_scores_close(scores, func_oracle(model, x, y))
    assert all(v.dtype == torch.float32 and v.shape == p.shape for v, p in zip(scores.values(), model.parameters()))


@pytest.mark.parametrize("algorithm", ["loop", "in-backward"])
def test_per_sample_scores_do_not_depend_on_batching(algorithm):
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = mlp_data(13)
    results = [
        estimate_fisher(model, batches_of(x, y, size), mlp_loss, progress=False, algorithm=algorithm)
        for size in (1, 4, 13)
    ]
    for other in results[1:]:
        assert_scores_close(other, results[0])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_in_backward_pass_matches_reference_on_mlp(backend):
    require_backend(backend)
    torch.manual_seed(0)
    model = TinyMLP(d_in=17, d_hidden=33, classes=3)
    x, y = mlp_data(11, d_in=17, classes=3)
    expected = estimate_fisher(model, batches_of(x, y, 5), mlp_loss, progress=False)
    got = estimate_fisher(model, batches_of(x, y, 5), mlp_loss, progress=False, backend=backend, algorithm="in-backward")
    assert_scores_close(got, expected)


@pytest.fixture(scope="module")
def wav2vec2():
    torch.manual_seed(0)
    return TinyWav2Vec2Classifier()


WAV_LENGTHS = [400, 531, 257, 613, 97 * 5]


def test_wav2vec2_padded_batches_equal_unpadded_samples(wav2vec2):
    solo = estimate_fisher(wav2vec2, padded_wav_batches(WAV_LENGTHS, batch_size=1), wav_loss, progress=False)
    padded = estimate_fisher(wav2vec2, padded_wav_batches(WAV_LENGTHS, batch_size=3), wav_loss, progress=False)
    one = estimate_fisher(wav2vec2, padded_wav_batches(WAV_LENGTHS), wav_loss, progress=False)
    assert_scores_close(padded, solo)
    assert_scores_close(one, solo)
    assert set(solo) == set(default_scored_parameter_names(wav2vec2))
    assert all(".encoder.layers." in name for name in solo)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_wav2vec2_in_backward_matches_reference(wav2vec2, backend):
    require_backend(backend)
    expected = estimate_fisher(wav2vec2, padded_wav_batches(WAV_LENGTHS, batch_size=1), wav_loss, progress=False)
    got = estimate_fisher(
        wav2vec2, padded_wav_batches(WAV_LENGTHS, batch_size=3), wav_loss, progress=False, backend=backend, algorithm="in-backward"
    )
    assert_scores_close(got, expected)


def test_in_backward_falls_back_exactly_for_other_parameter_types(wav2vec2, caplog):
    # The positional convolution is neither Linear nor LayerNorm: it takes the per-sample loop.
    names = default_scored_parameter_names(wav2vec2) + [
        n for n, _ in wav2vec2.named_parameters() if "pos_conv_embed" in n
    ]
    batches = padded_wav_batches(WAV_LENGTHS[:3], batch_size=2)
    expected = estimate_fisher(wav2vec2, batches, wav_loss, params=names, progress=False)
    with caplog.at_level("INFO", logger="adtuning"):
        got = estimate_fisher(wav2vec2, batches, wav_loss, params=names, progress=False, algorithm="in-backward")
    assert_scores_close(got, expected)
    assert "per-sample fallback" in caplog.text and "pos_conv_embed" in caplog.text


def test_model_state_is_restored(wav2vec2):
    wav2vec2.train()
    flags = {n: p.requires_grad for n, p in wav2vec2.named_parameters()}
    before = {n: p.detach().clone() for n, p in wav2vec2.named_parameters()}
    estimate_fisher(wav2vec2, padded_wav_batches(WAV_LENGTHS[:2]), wav_loss, progress=False, algorithm="in-backward")
    assert wav2vec2.training
    assert flags == {n: p.requires_grad for n, p in wav2vec2.named_parameters()}
    assert all(torch.equal(before[n], p) for n, p in wav2vec2.named_parameters())
    assert all(p.grad is None for p in wav2vec2.parameters())
    assert "forward" not in vars(wav2vec2.upstream.encoder.layers[0].attention.q_proj)


def test_batch_mode_is_mean_of_squared_batch_gradients():
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = mlp_data(10)
    batches = batches_of(x, y, 4)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for bx, by in batches:
        grads = torch.autograd.grad(mlp_loss(model, (bx, by)).mean(), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n] += g.square() / len(batches)
    got = estimate_fisher(model, batches, mlp_loss, mode="batch", progress=False)
    assert_scores_close(got, expected)
    clipped = estimate_fisher(model, batches, mlp_loss, mode="batch", clip_norm=1e-3, progress=False)
    for name, value in clipped.items():
        assert float(value.sum()) <= (1e-3) ** 2 * 1.0001


def test_max_samples_truncates_the_last_batch():
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = mlp_data(10)
    got = estimate_fisher(model, batches_of(x, y, 4), mlp_loss, max_samples=6, progress=False)
    assert_scores_close(got, func_oracle(model, x[:6], y[:6]))


def test_bad_arguments_raise_clear_errors():
    model = TinyMLP()
    x, y = mlp_data(3)
    with pytest.raises(ValueError, match="unknown mode"):
        estimate_fisher(model, [(x, y)], mlp_loss, mode="diag")
    with pytest.raises(KeyError, match="not in the model"):
        estimate_fisher(model, [(x, y)], mlp_loss, params=["fc9.weight"])
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        estimate_fisher(model, [(x, y)], lambda m, b: mlp_loss(m, b).mean(), progress=False)
    with pytest.raises(ValueError, match="no samples"):
        estimate_fisher(model, [], mlp_loss, progress=False)
    with pytest.raises(ValueError, match="unknown backend"):
        estimate_fisher(model, [(x, y)], mlp_loss, backend="gpu", progress=False)


# ---- the pass object and the loss adapter ---------------------------------------------------

def test_adapter_hands_frame_lengths_to_the_pass_it_is_given(wav2vec2, monkeypatch):
    import adtuning.fisher as fisher_mod

    seen = []
    original = fisher_mod._InBackwardPass.lengths_for

    def spy(self, x):
        out = original(self, x)
        seen.append(out)
        return out

    monkeypatch.setattr(fisher_mod._InBackwardPass, "lengths_for", spy)
    expected = estimate_fisher(wav2vec2, padded_wav_batches(WAV_LENGTHS, batch_size=1), wav_loss, progress=False)
    got = estimate_fisher(wav2vec2, padded_wav_batches(WAV_LENGTHS, batch_size=3), wav_loss, progress=False,
                          algorithm="in-backward")
    assert_scores_close(got, expected)
    assert any(lengths is not None for lengths in seen)  # the kernels skipped the padding


def test_model_code_does_not_reach_into_the_engine():
    from pathlib import Path

    import adtuning.fisher as fisher_mod
    import adtuning.speech.upstream as upstream_mod

    assert "adtuning.fisher" not in Path(upstream_mod.__file__).read_text()
    assert not hasattr(fisher_mod, "_ACTIVE_PASS") and not hasattr(fisher_mod, "note_sample_lengths")


class _OneRank:
    """A single-process stand-in for DataParallel: the all-reduce of one rank is the identity."""

    def all_reduce_sum_(self, tensor):
        return tensor


@pytest.mark.parametrize("algorithm", ["loop", "in-backward"])
def test_empty_parts_reach_a_pass_taking_adapter_only(algorithm):
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = mlp_data(8)
    batches = batches_of(x, y, 4)
    calls = []

    def adapter(m, batch, fisher_pass):
        calls.append(batch is None)
        return None if batch is None else mlp_loss(m, batch)

    expected = estimate_fisher(model, batches, mlp_loss, progress=False, algorithm=algorithm)
    got = estimate_fisher(model, [batches[0], None, batches[1]], adapter, progress=False, algorithm=algorithm,
                          data_parallel=_OneRank())
    assert_scores_close(got, expected)
    assert calls == [False, True, False]
    plain = estimate_fisher(model, [batches[0], None, batches[1]], mlp_loss, progress=False, algorithm=algorithm,
                            data_parallel=_OneRank())
    assert_scores_close(plain, expected)
    with pytest.raises(ValueError, match="must return None"):
        estimate_fisher(model, [None], lambda m, b, p: torch.zeros(1), progress=False, data_parallel=_OneRank())


class DropoutMLP(TinyMLP):
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        return self.fc2(self.norm(self.drop(torch.tanh(self.fc1(x)))))


def test_batch_mode_with_a_scalar_training_loss_in_train_mode():
    torch.manual_seed(0)
    model = DropoutMLP()
    model.eval()
    x, y = mlp_data(10)
    batches = batches_of(x, y, 4)

    def training_loss(m, batch):
        bx, by = batch
        return F.cross_entropy(m(bx), by, reduction="sum") / 7.0  # any scalar: differentiated as is

    torch.manual_seed(5)
    model.train()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        training_loss(model, batch).backward()
        for n, p in model.named_parameters():
            torch.nn.utils.clip_grad_norm_(p, 0.5)
            expected[n] += p.grad.square()
    expected = {n: v / len(batches) for n, v in expected.items()}
    model.zero_grad(set_to_none=True)
    model.eval()
    torch.manual_seed(5)
    got = estimate_fisher(model, batches, training_loss, mode="batch", clip_norm=0.5, train_mode=True, progress=False)
    assert_scores_close(got, expected)
    assert not model.training  # restored
    torch.manual_seed(5)
    evaluated = estimate_fisher(model, batches, training_loss, mode="batch", clip_norm=0.5, progress=False)
    assert any(not torch.allclose(evaluated[n], expected[n]) for n in expected)  # dropout mattered


def test_train_mode_and_scalar_losses_are_refused_where_they_do_not_belong():
    model = TinyMLP()
    x, y = mlp_data(3)
    with pytest.raises(ValueError, match="train_mode"):
        estimate_fisher(model, [(x, y)], mlp_loss, train_mode=True, progress=False)
    with pytest.raises(ValueError, match="cannot be cut to max_samples"):
        estimate_fisher(model, [(x, y)], lambda m, b: mlp_loss(m, b).mean(), mode="batch", max_samples=2, progress=False)


# ---- scored sets ----------------------------------------------------------------------------

def test_scored_set_choices():
    from adtuning.fisher import SCORED_SETS, check_scored_choice, choose_scored_names
    from adtuning.speech import build_upstream

    up = build_upstream("tiny-wav2vec2")
    names = [n for n, _ in up.named_parameters()]
    default = up.default_scored_parameters()
    assert choose_scored_names("default", names, default) == default
    assert choose_scored_names("encoder-layers", names, default) == default
    published = choose_scored_names("published", names, default)
    assert set(published) - set(default) == {
        "model.feature_projection.layer_norm.weight", "model.feature_projection.layer_norm.bias",
        "model.encoder.layer_norm.weight", "model.encoder.layer_norm.bias"}
    assert not any("conv_layers" in n for n in published)  # fairseq does not call those "layer_norm"
    assert choose_scored_names(r"layers\.1\.feed_forward", names, default) == [
        n for n in names if "layers.1.feed_forward" in n]
    assert set(SCORED_SETS) == {"default", "published", "encoder-layers"}
    with pytest.raises(ValueError, match="valid regular expression"):
        check_scored_choice("layers.(")
    with pytest.raises(ValueError, match="matches no parameter"):
        choose_scored_names("no_such_tensor", names, default)


class _ThreadRanks:
    """Two "ranks" as threads of one process; all_reduce_sum_ sums their tensors at a barrier."""

    def __init__(self, world):
        import threading

        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def rank(self, r):
        group = self

        class Rank:
            def all_reduce_sum_(self, tensor):
                group.slots[r] = tensor.clone()
                group.barrier.wait()
                total = sum(group.slots)
                group.barrier.wait()  # every rank has read the slots before they are reused
                tensor.copy_(total)
                return tensor

        return Rank()


def test_batch_mode_sums_scalar_loss_shares_over_ranks():
    import copy
    import threading

    torch.manual_seed(0)
    model = TinyMLP()
    x, y = mlp_data(9)
    global_batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # the last: one sample, rank 1 empty
    expected = estimate_fisher(model, global_batches, mlp_loss, mode="batch", clip_norm=0.3, progress=False)

    ranks, results, errors = _ThreadRanks(2), [None, None], []

    def run(r):
        try:
            parts = []
            for bx, by in global_batches:
                half = (len(bx) + 1) // 2
                part = (bx[:half], by[:half]) if r == 0 else (bx[half:], by[half:])
                parts.append((part, len(bx)) if len(part[0]) else (None, len(bx)))
            sizes = iter([size for _, size in parts])

            def loss_fn(m, batch, fisher_pass):
                # Called for every global batch, an empty part too (it returns None there).
                global_size = next(sizes)
                if batch is None:
                    return None
                bx, by = batch
                return F.cross_entropy(m(bx), by, reduction="sum") / global_size  # this rank's share of the mean

            results[r] = estimate_fisher(copy.deepcopy(model), [p for p, _ in parts], loss_fn, mode="batch", clip_norm=0.3,
                                         progress=False, data_parallel=ranks.rank(r))
        except Exception as err:  # surfaced below
            errors.append(err)
            ranks.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert_scores_close(results[0], expected)
    assert_scores_close(results[1], expected)
