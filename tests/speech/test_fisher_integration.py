"""The speech model meets the Fisher pass: per-sample gradients do not leak through padding.

The in-backward Fisher algorithm is exact only if samples do not interact (and frames past
``note_sample_lengths`` carry no gradient); the per-sample autograd loop is exact anyway. They
agree on a padded batch only if the upstream, featurizer and head mask padding correctly.
"""
from __future__ import annotations

import pytest
import torch

from adtuning.fisher import estimate_fisher
from adtuning.speech import SpeechModel, build_dataset, build_task, build_upstream, make_loader

# WavLM's attention (inside transformers) mixes mask types.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask"),
]


@pytest.mark.parametrize("task, root_key, dkw, tkw", [
    ("ic", "ic", {}, {}),
    ("asr", "asr", {}, {"project_dim": 16, "rnn_dim": 8}),
    ("sd", "sd", {"chunk_size": 150}, {"hidden_size": 8}),
])
def test_in_backward_fisher_matches_per_sample_loop(corpora, task, root_key, dkw, tkw):
    train = build_dataset(task, corpora[root_key], "train", **dkw)
    up = build_upstream("tiny-wav2vec2", seed=2)
    model = SpeechModel(up, build_task(task, upstream_dim=up.hidden_size, num_layers=up.num_layers,
                                       **train.task_kwargs, **tkw))
    batches = list(make_loader(train, 3, shuffle=False, bucket=False))  # mixed lengths: padding
    assert any(len(set(b["wav_lengths"].tolist())) > 1 for b in batches[:2])

    def nll(m, b):
        return m.per_sample_nll(b)

    loop = estimate_fisher(model, batches, nll, backend="reference", algorithm="loop", progress=False,
                          max_samples=6)
    fused = estimate_fisher(model, batches, nll, backend="reference", algorithm="in-backward", progress=False,
                           max_samples=6)
    assert set(loop) == {"upstream." + n for n in up.default_scored_parameters()}
    for name, ref in loop.items():
        if name.endswith("attention.k_proj.bias"):
            continue  # its gradient is zero in exact arithmetic (softmax shift invariance): noise only
        torch.testing.assert_close(fused[name], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()) + 1e-20)
