"""End to end for each of the seven tasks: fixture corpus -> tiny upstream -> a few steps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adtuning.speech import SpeechModel, build_dataset, build_task, build_upstream, make_loader

CASES = {
    # task: (upstream, dataset kwargs (besides the fixture root), task kwargs)
    "ks": ("tiny-wav2vec2", {}, {}),
    "ic": ("tiny-hubert", {}, {}),
    "sid": ("tiny-wavlm", {}, {}),
    "asr": ("tiny-wav2vec2-stable", {}, {"project_dim": 32, "rnn_dim": 16}),
    "pr": ("tiny-wav2vec2", {"lexicon": True}, {"project_dim": 32}),
    "sf": ("tiny-hubert", {}, {"project_dim": 32, "rnn_dim": 16}),
    "sd": ("tiny-wavlm", {"chunk_size": 100}, {"hidden_size": 16}),
}

# WavLM's attention (inside transformers) mixes mask types; the SNIPS fixture has one untranscribed file.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask"),
    pytest.mark.filterwarnings("ignore:SNIPS"),
]


def _dataset(corpora, task, split):
    _, dkw, _ = CASES[task]
    dkw = dict(dkw)
    if dkw.pop("lexicon", False):
        dkw["lexicon"] = corpora["lexicon"]
    root = corpora["asr" if task == "pr" else task]
    return build_dataset(task, root, split, **dkw)


def _model(corpora, task, train):
    name, _, tkw = CASES[task]
    up = build_upstream(name, seed=1)
    t = build_task(task, upstream_dim=up.hidden_size, num_layers=up.num_layers, **train.task_kwargs, **tkw)
    return SpeechModel(up, t)


@pytest.mark.parametrize("task", list(CASES))
def test_task_end_to_end(corpora, task):
    torch.manual_seed(0)
    train = _dataset(corpora, task, "train")
    dev = _dataset(corpora, task, "dev")
    test = _dataset(corpora, task, "test")
    assert len(train) and len(dev) and len(test)
    model = _model(corpora, task, train)
    assert model.task.name == task

    # a few optimisation steps on one batch lower the recipe loss
    batch = next(iter(make_loader(train, 4, shuffle=True, seed=0)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    with torch.no_grad():  # measured in eval mode: no dropout / SpecAugment noise
        before = model.eval().loss(batch).item()
    model.train()
    for _ in range(8):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    with torch.no_grad():
        after = model.eval().loss(batch).item()
    assert math.isfinite(before) and after < before

    # per-sample NLL: exact per sample, independent of the rest of the (padded) batch
    rng = np.random.default_rng(0)
    items = [train.load(i, rng) for i in range(min(3, len(train)))]
    with torch.no_grad():
        nll = model.per_sample_nll(train.collate(items))
        single = torch.cat([model.per_sample_nll(train.collate([it])) for it in items])
    assert nll.shape == (len(items),)
    torch.testing.assert_close(nll, single, rtol=1e-4, atol=1e-4)
    assert (nll >= 0).all()

    # evaluation: every metric with its direction, the primary one among them
    metrics = model.evaluate(make_loader(dev, 2, shuffle=False), progress=False)
    directions = model.task.metric_directions
    assert set(metrics) == set(directions)
    assert model.primary_metric in metrics
    assert model.higher_is_better == directions[model.primary_metric]
    assert all(math.isfinite(v) for v in metrics.values())
    assert model.training is False  # evaluate restores the mode it found
    test_metrics = model.evaluate(make_loader(test, 2, shuffle=False), progress=False)
    assert set(test_metrics) == set(directions)


def test_head_parameters_are_the_task(corpora):
    train = _dataset(corpora, "ks", "train")
    model = _model(corpora, "ks", train)
    head = {id(p) for p in model.head_parameters()}
    assert id(model.task.featurizer.weights) in head
    assert not head & {id(p) for p in model.upstream.parameters()}
    n_head = sum(p.numel() for p in model.head_parameters())
    assert n_head == sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.upstream.parameters())


def test_classification_loss_is_mean_nll(corpora):
    train = _dataset(corpora, "ic", "train")
    model = _model(corpora, "ic", train).eval()
    batch = train.collate([train.load(i) for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(model.loss(batch), model.per_sample_nll(batch).mean())


def test_ctc_loss_is_length_normalised_nll(corpora):
    train = _dataset(corpora, "asr", "train")
    model = _model(corpora, "asr", train).eval()
    batch = train.collate([train.load(i) for i in range(3)])
    with torch.no_grad():
        nll = model.per_sample_nll(batch)
        torch.testing.assert_close(model.loss(batch), (nll / batch["target_lengths"]).mean())


def test_sd_loss_matches_s3prl_pit(corpora):
    train = _dataset(corpora, "sd", "train")
    model = _model(corpora, "sd", train).eval()
    batch = train.collate([train.load(i) for i in range(3)])
    with torch.no_grad():
        out = model(batch)
        logits, label, n = out["logits"], batch["activity"], batch["label_lengths"]
        # s3prl pit_loss: per permutation sum over frames of the mean over speakers, min, / frames
        per = []
        for perm in ([0, 1], [1, 0]):
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, label[:, :, perm], reduction="none")
            mask = (torch.arange(label.shape[1])[None, :] < n[:, None]).float()[:, :, None]
            per.append((bce * mask).mean(2).sum(1))
        expected = torch.stack(per, 1).min(1).values.sum() / n.sum()
        torch.testing.assert_close(model.loss(batch), expected)
