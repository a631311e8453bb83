"""The shipped pre-trained upstream: it loads, has its recorded size, and its features
separate spoken words that a random model of the same architecture does not separate."""
import json

import espeakng_loader  # noqa: F401  (a hard dependency: fail, never skip, without it)
import numpy as np
import pytest
import torch

from adtuning.speech import DEFAULT_UPSTREAM, EMBEDDED_UPSTREAMS, build_upstream
from adtuning.speech.featurizer import Featurizer
from adtuning.speech.synth import SPEECH_COMMANDS_WORDS, generate_speech_commands
from adtuning.speech.upstream import embedded_upstream_dir


def test_the_cli_default_is_the_shipped_upstream():
    from adtuning import train

    assert train.DEFAULT_UPSTREAM == DEFAULT_UPSTREAM
    assert train.build_parser().parse_args([]).upstream == DEFAULT_UPSTREAM


def test_shipped_upstream_loads_with_its_recorded_size():
    folder = embedded_upstream_dir(DEFAULT_UPSTREAM)
    record = json.loads((folder / "pretraining.json").read_text())
    upstream = build_upstream(DEFAULT_UPSTREAM)
    assert upstream.model.config.model_type == "hubert"
    assert sum(p.numel() for p in upstream.model.parameters()) == record["parameters"]
    assert upstream.frame_stride == 320 and upstream.normalize_waveform
    # held-out masked prediction well above the uniform guess
    assert record["final_held_out_masked_accuracy"] > 5 * record["uniform_accuracy"]


@pytest.mark.parametrize("name", EMBEDDED_UPSTREAMS)
def test_every_embedded_upstream_loads_with_its_recorded_size_and_state(name):
    folder = embedded_upstream_dir(name)
    record = json.loads((folder / "pretraining.json").read_text())
    upstream = build_upstream(name)
    assert sum(p.numel() for p in upstream.model.parameters()) == record["parameters"]
    assert upstream.frame_stride == 320 and upstream.normalize_waveform
    hidden, lengths = upstream(torch.randn(1, 8000), torch.tensor([8000]))
    assert len(hidden) == upstream.num_layers and lengths.tolist() == [24]
    assert all(torch.isfinite(h.float()).all() for h in hidden)
    if "complete" in record:  # v2 records say how far the (resumable) pre-training got
        assert record["step"] >= 1 and 0.0 < record["final_held_out_masked_accuracy"] <= 1.0
        assert record["final_held_out_masked_accuracy"] > record["uniform_accuracy"]


@pytest.fixture(scope="module")
def word_clips(tmp_path_factory):
    """Pooled hidden states need clips: 10 keywords x 8 speakers x 2, split by speaker."""
    root = generate_speech_commands(tmp_path_factory.mktemp("ks") / "speech_commands_v0.01", unknown_words=(),
                                    speakers=8, utterances_per_word=16, seed=3, progress=False)
    manifest = json.loads((root / "adtuning_synth.json").read_text())
    import soundfile as sf

    clips = {"train": [], "eval": []}
    for s in manifest["speakers_detail"]:
        part = "train" if s["split"] == "training" else "eval"
        for label, word in enumerate(SPEECH_COMMANDS_WORDS):
            for path in sorted((root / word).glob(f"{s['hash']}_nohash_*.wav")):
                clips[part].append((sf.read(str(path), dtype="float32")[0], label))
    return clips


def _probe_accuracy(upstream, clips, steps=60) -> float:
    """Train a layer-weighted sum + linear classifier on mean-pooled hidden states (the
    upstream frozen), return accuracy on unseen speakers."""
    def pooled(items):
        wav = torch.from_numpy(np.stack([w for w, _ in items]))
        with torch.no_grad():
            hidden, _ = upstream(wav, torch.full((len(items),), wav.shape[1]))
        return [h.mean(1) for h in hidden], torch.tensor([y for _, y in items])

    torch.manual_seed(0)
    (train_x, train_y), (eval_x, eval_y) = pooled(clips["train"]), pooled(clips["eval"])
    featurizer = Featurizer(len(train_x), normalize=True)
    head = torch.nn.Linear(upstream.hidden_size, len(SPEECH_COMMANDS_WORDS))
    opt = torch.optim.Adam([*featurizer.parameters(), *head.parameters()], lr=2e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(featurizer([x[:, None] for x in train_x])[:, 0]), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head(featurizer([x[:, None] for x in eval_x])[:, 0]).argmax(-1)
    return float((pred == eval_y).float().mean())


def test_shipped_features_separate_words_and_random_ones_do_not(word_clips):
    shipped = build_upstream(DEFAULT_UPSTREAM).eval()
    folder = embedded_upstream_dir(DEFAULT_UPSTREAM)
    from transformers import AutoConfig, AutoModel

    from adtuning.speech.upstream import Upstream

    torch.manual_seed(0)
    random = Upstream(AutoModel.from_config(AutoConfig.from_pretrained(str(folder)))).eval()
    # measured: shipped 0.575; random weights of the same architecture 0.125-0.225 (seeds 0-2)
    assert _probe_accuracy(shipped, word_clips) >= 0.45
    assert _probe_accuracy(random, word_clips) < 0.3
