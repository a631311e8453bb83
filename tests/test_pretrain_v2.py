"""Upstream v2's pre-training: corpus v2 speakers, the held-out voices, the on-the-fly
augmentation, iteration-2 targets and resuming, at tiny sizes."""
import json

import espeakng_loader  # noqa: F401  (a hard dependency: fail, never skip, without it)
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adtuning import pretrain
from adtuning.speech import espeak
from adtuning.speech.augment import PretrainingAugmenter, simulate_rooms, warp_targets
from adtuning.speech.pretraining_corpus import generate_pretraining_corpus_v2, pretraining_vocabulary_v2, read_pretraining_corpus
from adtuning.speech.speakers import (
    DOWNSTREAM_LANGUAGES,
    DOWNSTREAM_VARIANTS,
    HELD_OUT_LANGUAGES,
    HELD_OUT_VARIANTS,
    default_speakers,
    english_voices,
    held_out_speakers,
    pretraining_speakers,
    pretraining_speakers_v2,
)
from adtuning.speech.synth_asr import librispeech_speakers
from adtuning.speech.synth_snips import snips_speakers
from adtuning.speech.synth_tasks import distinct_speakers
from adtuning.speech.synthesis import write_wav

TINY = dict(speakers=4, sentences_per_speaker=3, held_out_speakers=1, max_seconds=2.0, progress=False)


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory):
    return generate_pretraining_corpus_v2(tmp_path_factory.mktemp("v2") / "corpus", **TINY)


def _language_variant(voice: str) -> tuple[str, str]:
    language, _, variant = voice.partition("+")
    return language, variant


def test_v2_vocabulary_is_large_and_unique():
    words = pretraining_vocabulary_v2()
    assert len(words) >= 5000 and len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() for w in words)


@pytest.mark.parametrize("n", [1, 50, 700])
def test_v2_speakers_are_odd_pitched_and_disjoint_from_downstream(n):
    pre = pretraining_speakers_v2(n)
    assert len(pre) == n and all(p % 2 == 1 and 0 <= r <= 70 for _, _, p, r in pre)
    triples = {(v, rate, p) for v, rate, p, _ in pre}
    for seed in range(3):
        assert not triples & set(default_speakers(n, seed))


def test_v2_speakers_cover_every_usable_voice_and_variant():
    languages, variants = english_voices()
    assert len(languages) >= 5 and len(variants) >= 50
    assert set(DOWNSTREAM_LANGUAGES) <= set(languages) and set(DOWNSTREAM_VARIANTS) <= set(variants)
    pairs = {_language_variant(v) for v, *_ in pretraining_speakers_v2(len(languages) * len(variants))}
    assert pairs == {(lang, var) for lang in languages for var in variants}


def test_held_out_voices_exist_are_reproducible_and_no_training_corpus_uses_them():
    engine = espeak.synthesizer(None, None)
    names = {ident.rpartition("/")[2].lower() for ident, _ in engine.list_voices()}
    known_variants = {ident.partition("/")[2] for ident, _ in engine.list_voices(variants=True)}
    assert set(HELD_OUT_LANGUAGES) <= names and set(HELD_OUT_VARIANTS) <= known_variants
    assert not any(espeak.has_breath(engine.data, "en+" + v) for v in HELD_OUT_VARIANTS)
    training = [v for v, *_ in pretraining_speakers_v2(1200)] + [v for v, *_ in pretraining_speakers(300)]
    for seed in range(3):
        training += [v for v, *_ in default_speakers(300, seed)]
        training += [v for v, *_ in librispeech_speakers(40, seed)] + [v for v, *_ in distinct_speakers(40, seed)]
        training += [v for v, *_ in snips_speakers(seed).values()]
    for voice in training:
        language, variant = _language_variant(voice)
        assert language not in HELD_OUT_LANGUAGES and variant not in HELD_OUT_VARIANTS, voice
    checks = held_out_speakers(64)
    assert not {v for v, *_ in checks} & set(training)
    for voice, _, _ in checks:
        language, variant = _language_variant(voice)
        assert language in HELD_OUT_LANGUAGES or variant in HELD_OUT_VARIANTS, voice
        engine.set_voice(voice)  # espeak-ng knows it


def test_v2_corpus_layout_and_determinism(tiny_v2, tmp_path):
    items = read_pretraining_corpus(tiny_v2)
    assert len(items["train"]) == 9 and len(items["held_out"]) == 3
    vocab = set(pretraining_vocabulary_v2())
    assert all(set(text.split()) <= vocab for _, text in items["train"] + items["held_out"])
    again = generate_pretraining_corpus_v2(tmp_path / "again", **TINY)
    files = sorted(p.relative_to(tiny_v2) for p in tiny_v2.rglob("*.wav"))
    assert files and all((tiny_v2 / f).read_bytes() == (again / f).read_bytes() for f in files)


@pytest.fixture(scope="module")
def augmenter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aug")
    babble = []
    for k in range(2):
        babble.append(folder / f"b{k}.wav")
        write_wav(babble[-1], (np.random.default_rng(k).standard_normal(8000) * 3000).astype(np.int16))
    return PretrainingAugmenter(babble, simulate_rooms(folder / "rooms", 1, seed=0), seed=0)


def test_augmentation_is_deterministic_under_a_seed_and_changes_the_audio(augmenter):
    x = (0.3 * np.sin(np.arange(16000) / 7.0)).astype(np.float32)
    outs = [augmenter(x, 1, step) for step in range(12)]
    assert all(np.array_equal(o, augmenter(x, 1, step)) for step, o in enumerate(outs))
    changed = [len(o) != len(x) or not np.allclose(o, x, atol=1e-4) for o in outs]
    assert sum(changed) >= 9
    assert len({o.tobytes() for o in outs}) == len(outs)  # each key its own draw
    assert any(len(o) != len(x) for o in outs)  # speed perturbation among them
    assert np.array_equal(PretrainingAugmenter([], [], seed=0, p=0.0)(x, 1, 0), x)


def test_colour_degradations_are_added_only_when_asked_and_stay_seeded(augmenter):
    """``colour=True`` adds EQ, distortion and bit crushing (by name) and draws reproducibly; without it
    the pipeline is the plain one, stage for stage (so the v2 pre-training stream is unchanged)."""
    plain = PretrainingAugmenter([], [], seed=0)
    coloured = PretrainingAugmenter([], [], seed=0, colour=True)
    names = [type(t).__name__ for t in coloured.stages.transforms]
    assert [type(t).__name__ for t in plain.stages.transforms] == [n for n in names
                                                                  if n not in ("SevenBandParametricEQ", "TanhDistortion", "BitCrush")]
    assert {"SevenBandParametricEQ", "TanhDistortion", "BitCrush"} <= set(names)
    x = (0.3 * np.sin(np.arange(16000) / 7.0)).astype(np.float32)
    outs = [coloured(x, 2, k) for k in range(8)]
    assert all(np.array_equal(o, coloured(x, 2, k)) for k, o in enumerate(outs))
    assert any(o.shape != plain(x, 2, k).shape or not np.array_equal(o, plain(x, 2, k)) for k, o in enumerate(outs))


def test_warp_targets_follows_the_time_scaling():
    t = torch.arange(10)
    assert warp_targets(t, 10).tolist() == t.tolist()
    assert warp_targets(t, 20).tolist() == [i // 2 for i in range(20)]
    assert warp_targets(t, 5).tolist() == [0, 2, 4, 6, 8] or warp_targets(t, 5).tolist() == [1, 3, 5, 7, 9]


def test_layer_features_are_the_chosen_layers_hidden_states():
    torch.manual_seed(0)
    hubert = pretrain.MaskedPredictor(pretrain.mini_hubert_config(32, 3, 2), 4).hubert.eval()
    wav = torch.randn(8000)
    from adtuning.speech.upstream import prepare_waveforms

    x, mask = prepare_waveforms(wav[None], torch.tensor([8000]), normalize=True)
    with torch.no_grad():
        states = hubert(x, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        for layer in (1, 2):
            torch.testing.assert_close(pretrain.layer_features(hubert, wav, layer), states[layer][0])
        assert not torch.allclose(pretrain.layer_features(hubert, wav, 1), pretrain.layer_features(hubert, wav, 2))


def test_iteration2_targets_come_from_the_chosen_layer():
    torch.manual_seed(0)
    hubert = pretrain.MaskedPredictor(pretrain.mini_hubert_config(32, 3, 2), 4).hubert
    wavs = [(torch.randn(n) * 3000).to(torch.int16) for n in (4000, 6400, 8000)]
    train, held, centroids, mean, std = pretrain.iteration2_targets(hubert, wavs[:2], wavs[2:], layer=2, clusters=5,
                                                                    iterations=3, seed=0)
    from adtuning.speech.upstream import prepare_waveforms

    with torch.no_grad():
        for w, t in zip(wavs, train + held):
            x, mask = prepare_waveforms(w[None].float() / 32768.0, torch.tensor([len(w)]), normalize=True)
            feats = hubert(x, attention_mask=mask.long(), output_hidden_states=True).hidden_states[2][0]
            assert torch.equal(torch.cdist((feats - mean) / std, centroids).argmin(1), t)


def _state(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["adtuning_pretrain"])


def test_resumed_run_equals_an_uninterrupted_one(tiny_v2, tmp_path):
    """Iteration 1 -> 2 with augmentation, stopped every 2 steps and resumed, ends in the same
    checkpoint (model, classifier, AdamW state, curves) as one uninterrupted run."""
    common = ["--corpus", "v2", "--corpus-dir", str(tiny_v2), "--speakers", "4", "--sentences-per-speaker", "3",
              "--held-out-speakers", "1", "--max-seconds", "2.0", "--clusters", "6", "--iteration2-clusters", "5",
              "--iteration2-layer", "1", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--steps", "3",
              "--iteration2-steps", "2", "--batch-size", "3", "--eval-interval", "2", "--warmup-steps", "1",
              "--augment", "1.0", "--rooms", "1", "--threads", "1", "--no-progress", "--save-dtype", "bfloat16"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert pretrain.main(["--output-dir", str(tmp_path / "out_whole"), "--state-dir", str(whole)] + common) == 0
    for _ in range(3):
        assert pretrain.main(["--output-dir", str(tmp_path / "out_parts"), "--state-dir", str(parts), "--stop-after", "2"] + common) == 0
    a, b = load_file(str(whole / "checkpoint.safetensors")), load_file(str(parts / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _state(whole / "checkpoint.safetensors"), _state(parts / "checkpoint.safetensors")
    assert (sa["iteration"], sa["step"]) == (sb["iteration"], sb["step"]) == (2, 2)
    assert sa["curves"] == sb["curves"] and [c["step"] for c in sa["curves"]["1"]] == [2, 3]
    with safe_open(str(parts / "targets_iteration2.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["json"]) == {"layer": 1}
    record = json.loads((tmp_path / "out_parts" / "pretraining.json").read_text())
    assert record["complete"] and record["iteration"] == 2 and "--stop-after" in record["command"]
    assert record["corpus"]["held_out_variants"] == list(HELD_OUT_VARIANTS)
    assert load_file(str(tmp_path / "out_parts" / "model.safetensors"))["feature_projection.projection.weight"].dtype == torch.bfloat16


def test_iteration2_can_start_from_an_exported_iteration1(tiny_v2, tmp_path, capsys):
    """A run whose state is lost starts iteration 2 from the iteration-1 export: exported in float32,
    its iteration-2 targets equal those of the run that went on from iteration 1 itself (oracle),
    the record names the source, and an export made with other arguments is refused by flag."""
    common = ["--corpus", "v2", "--corpus-dir", str(tiny_v2), "--speakers", "4", "--sentences-per-speaker", "3",
              "--held-out-speakers", "1", "--max-seconds", "2.0", "--clusters", "6", "--iteration2-clusters", "5",
              "--iteration2-layer", "1", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--steps", "3",
              "--batch-size", "3", "--eval-interval", "2", "--warmup-steps", "1", "--augment", "1.0", "--rooms", "1",
              "--threads", "1", "--no-progress", "--save-dtype", "float32"]
    it1 = tmp_path / "iteration1"
    assert pretrain.main(["--output-dir", str(it1), "--state-dir", str(tmp_path / "s1")] + common) == 0
    assert pretrain.main(["--output-dir", str(tmp_path / "o2"), "--state-dir", str(tmp_path / "whole"), "--iteration2-steps", "2"]
                         + common) == 0
    assert pretrain.main(["--output-dir", str(tmp_path / "o3"), "--state-dir", str(tmp_path / "from"), "--iteration2-steps", "2",
                          "--iteration1-from", str(it1)] + common) == 0
    a = load_file(str(tmp_path / "whole" / "targets_iteration2.safetensors"))
    b = load_file(str(tmp_path / "from" / "targets_iteration2.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "o3" / "pretraining.json").read_text())
    first = json.loads((it1 / "pretraining.json").read_text())
    assert record["complete"] and record["iteration"] == 2 and record["iteration1_from"]["path"] == str(it1)
    assert record["curves"]["1"] == first["curves"]["1"] and record["cpu_hours"] >= first["cpu_hours"]
    # other iteration-1 arguments, or an export that is not the end of iteration 1: refused, naming why
    assert pretrain.main(["--output-dir", str(tmp_path / "o4"), "--state-dir", str(tmp_path / "bad"), "--iteration2-steps", "2",
                          "--iteration1-from", str(it1), *common[:-2], "--save-dtype", "float32", "--lr", "0.01"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert pretrain.main(["--output-dir", str(tmp_path / "o5"), "--state-dir", str(tmp_path / "bad2"), "--iteration2-steps", "2",
                          "--iteration1-from", str(tmp_path / "o3")] + common) == 2
    assert "not the end of iteration 1" in capsys.readouterr().err


def test_a_state_dir_refuses_other_arguments(tiny_v2, tmp_path, capsys):
    args = ["--output-dir", str(tmp_path / "o"), "--state-dir", str(tmp_path / "s"), "--corpus", "v2", "--corpus-dir", str(tiny_v2),
            "--speakers", "4", "--sentences-per-speaker", "3", "--held-out-speakers", "1", "--max-seconds", "2.0",
            "--clusters", "6", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--steps", "1", "--batch-size", "2",
            "--no-progress"]
    assert pretrain.main(args) == 0
    assert pretrain.main(args[:-1] + ["--lr", "0.01", "--no-progress"]) == 2
    assert "--lr" in capsys.readouterr().err
    # A state made before a flag existed (its run.json lacks it) resumes when the flag is at its default.
    run_file = tmp_path / "s" / "run.json"
    saved = json.loads(run_file.read_text())
    del saved["augment_colour"]
    run_file.write_text(json.dumps(saved))
    assert pretrain.main(args) == 0
    assert pretrain.main(args[:-1] + ["--augment", "0.5", "--augment-colour", "--no-progress"]) == 2
    assert "--augment" in capsys.readouterr().err
    assert pretrain.main(args[:-1] + ["--augment-colour", "--no-progress"]) == 2
    assert "--augment-colour needs --augment > 0" in capsys.readouterr().err


def test_v2_corpus_resumes_a_killed_synthesis(tiny_v2, tmp_path, monkeypatch):
    from adtuning.speech import synthesis

    render, calls = synthesis.render_utterance, []

    def dies_on_the_third_speaker(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2 * TINY["sentences_per_speaker"]:
            raise KeyboardInterrupt  # as a kill would stop it
        return render(*args, **kwargs)

    monkeypatch.setattr(synthesis, "render_utterance", dies_on_the_third_speaker)
    with pytest.raises(KeyboardInterrupt):
        generate_pretraining_corpus_v2(tmp_path / "corpus", **TINY)
    (partial,) = tmp_path.glob(".corpus.partial-*")
    kept = {p.relative_to(partial): p.stat().st_mtime_ns for p in partial.glob("s000[01]/*.wav")}
    assert len(kept) == 2 * TINY["sentences_per_speaker"]
    monkeypatch.setattr(synthesis, "render_utterance", render)
    root = generate_pretraining_corpus_v2(tmp_path / "corpus", **TINY)
    assert not list(tmp_path.glob(".corpus.partial-*"))
    assert all((root / rel).stat().st_mtime_ns == t for rel, t in kept.items())  # finished speakers not redone
    ours = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert ours == sorted(p.relative_to(tiny_v2) for p in tiny_v2.rglob("*") if p.is_file())
    assert all((root / f).read_bytes() == (tiny_v2 / f).read_bytes() for f in ours)
