"""The pre-training recipe (python -m adtuning.pretrain) and its corpus, at tiny sizes."""
import json

import espeakng_loader  # noqa: F401  (a hard dependency: fail, never skip, without it)
import pytest
import torch

from adtuning import pretrain
from adtuning.speech import build_upstream
from adtuning.speech.pretraining_corpus import (
    generate_pretraining_corpus,
    pretraining_vocabulary,
    read_pretraining_corpus,
)
from adtuning.speech.synth import default_speakers, pretraining_speakers

TINY_CORPUS = dict(speakers=3, sentences_per_speaker=4, held_out_speakers=1, progress=False)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    return generate_pretraining_corpus(tmp_path_factory.mktemp("pt") / "corpus", **TINY_CORPUS)


def test_vocabulary_is_a_few_hundred_unique_words():
    words = pretraining_vocabulary()
    assert 300 <= len(words) <= 1000 and len(set(words)) == len(words)


@pytest.mark.parametrize("n", [1, 7, 30, 120])
def test_pretraining_speakers_are_disjoint_from_downstream_speakers(n):
    # Every downstream corpus draws its speakers from default_speakers (even pitches).
    pre = set(pretraining_speakers(n))
    for seed in range(3):
        assert not pre & set(default_speakers(n, seed))
    assert all(p % 2 == 1 for _, _, p in pre)


def test_corpus_layout_determinism_and_cache(tiny_corpus, tmp_path):
    items = read_pretraining_corpus(tiny_corpus)
    assert len(items["train"]) == 8 and len(items["held_out"]) == 4
    vocab = set(pretraining_vocabulary())
    assert all(set(text.split()) <= vocab for _, text in items["train"] + items["held_out"])
    again = generate_pretraining_corpus(tmp_path / "again", **TINY_CORPUS)
    files = sorted(p.relative_to(tiny_corpus) for p in tiny_corpus.rglob("*.wav"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.wav"))
    assert all((tiny_corpus / f).read_bytes() == (again / f).read_bytes() for f in files)
    stamp = (again / "transcripts.tsv").stat().st_mtime_ns
    generate_pretraining_corpus(again, **TINY_CORPUS)  # cache hit: nothing rewritten
    assert (again / "transcripts.tsv").stat().st_mtime_ns == stamp


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    found = pretrain.kmeans(x, 3, iterations=10, seed=0)
    assert torch.cdist(centres, found).min(1).values.max() < 0.1


def test_mfcc_frames_match_the_cnn_frames():
    config = pretrain.mini_hubert_config(hidden_size=32, layers=1, heads=2)
    from transformers import HubertModel

    model = HubertModel(config)
    for n in (400, 719, 720, 16000, 16001):
        frames = pretrain.mfcc_frames(torch.randn(n))
        assert frames.shape == (int(model._get_feat_extract_output_lengths(torch.tensor(n))), 39)


def test_masked_prediction_loss_decreases_on_a_fixed_batch(tiny_corpus):
    torch.manual_seed(0)
    wavs, feats = pretrain.load_split(read_pretraining_corpus(tiny_corpus)["train"])
    targets = [torch.randint(8, (len(f),)) for f in feats]  # any fixed targets can be fitted
    data = pretrain.Utterances(wavs, targets)
    wav, wav_lengths, tgt, frame_lengths = data.batch(range(4), 40, torch.Generator().manual_seed(0))
    masks = pretrain.span_masks(frame_lengths, 0.5, 5, seed=0)
    assert masks.any() and not (masks & (tgt < 0)).any()  # padding is never masked
    model = pretrain.MaskedPredictor(pretrain.mini_hubert_config(hidden_size=32, layers=1, heads=2), 8)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model(wav, wav_lengths, masks)
        loss = torch.nn.functional.cross_entropy(logits[masks], tgt[masks])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_recipe_writes_an_upstream_the_loader_reads(tiny_corpus, tmp_path):
    out = tmp_path / "upstream"
    code = pretrain.main(["--output-dir", str(out), "--corpus-dir", str(tiny_corpus), "--speakers", "3",
                          "--sentences-per-speaker", "4", "--held-out-speakers", "1", "--clusters", "8",
                          "--steps", "3", "--eval-interval", "2", "--batch-size", "4", "--hidden-size", "32",
                          "--layers", "1", "--heads", "2", "--warmup-steps", "1", "--no-progress"])
    assert code == 0
    record = json.loads((out / "pretraining.json").read_text())
    assert record["seed"] == 0 and record["corpus"]["train_utterances"] == 8
    assert 0.0 <= record["final_held_out_masked_accuracy"] <= 1.0 and record["wall_seconds"] > 0
    assert [c["step"] for c in record["curves"]["1"]] == [2, 3] and record["complete"]
    upstream = build_upstream(str(out))
    assert upstream.model.config.model_type == "hubert" and upstream.num_layers == 2
    assert sum(p.numel() for p in upstream.model.parameters()) == record["parameters"]
    hidden, lengths = upstream(torch.randn(2, 16000), torch.tensor([16000, 8000]))
    assert hidden[-1].shape == (2, 49, 32) and lengths.tolist() == [49, 24]


def test_recipe_rejects_bad_sizes(tmp_path, capsys):
    assert pretrain.main(["--output-dir", str(tmp_path), "--hidden-size", "40", "--heads", "3"]) == 2
    assert "--hidden-size" in capsys.readouterr().err
