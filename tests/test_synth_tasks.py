"""The generated corpora of the utterance-level tasks, SID (VoxCeleb1 layout) and IC (Fluent Speech
Commands layout), and of the sequence tasks, ASR/PR (LibriSpeech layout + lexicon), SF (Audio SNIPS
layout) and SD (LibriMix / Kaldi layout): determinism, read back by the real readers, speaker
splits, cache, and the CLI end to end."""
from __future__ import annotations

import dataclasses
import json

import espeakng_loader  # noqa: F401  (a hard dependency: fail, never skip, without it)
import pytest

from adtuning import train
from adtuning.embedded import EMBEDDED_CORPORA
from adtuning.speech import (
    TASK_NAMES,
    build_dataset,
    espeak,
    synth,
    synthesis,
)
from adtuning.speech.corpora.snips import SPEAKERS as SNIPS_SPEAKERS
from adtuning.speech.synth_asr import (
    LEXICON_NAME,
    espeak_to_cmu,
    generate_librispeech,
    librispeech_speakers,
    librispeech_vocabulary,
)
from adtuning.speech.synth_librimix import generate_librimix
from adtuning.speech.synth_snips import SNIPS_SLOT_VALUES, SNIPS_TEMPLATES, generate_snips, snips_speakers
from adtuning.speech.synth_tasks import FSC_INTENTS, distinct_speakers, generate_fluent_commands, generate_voxceleb1
from adtuning.speech.tasks.text import PHONEMES, CharacterVocab, PhonemeVocab

TINY_SID = dict(speakers=4, videos_per_speaker=3, utterances_per_video=2, seed=1)  # 1 train, 1 dev, 1 test video
TINY_IC = dict(speakers=4, held_out_speakers=0.15, seed=2)  # 2 train, 1 valid, 1 test speaker
# 2 train, 1 dev, 1 test speaker; 2 chapters of 2 utterances each
TINY_ASR = dict(speakers=4, held_out_speakers=0.25, chapters_per_speaker=2, utterances_per_chapter=2, seed=3)
TINY_SF = dict(train_sentences=16, valid_sentences=4, test_sentences=8, seed=4)  # 2 / 1 / 2 per speaker
TINY_SD = dict(speakers=6, held_out_speakers=1 / 3, train_mixtures=4, dev_mixtures=2, test_mixtures=3, seed=5)  # 2 / 2 / 2 speakers
GENERATORS = {"sid": (generate_voxceleb1, TINY_SID), "ic": (generate_fluent_commands, TINY_IC),
              "asr": (generate_librispeech, TINY_ASR), "sf": (generate_snips, TINY_SF), "sd": (generate_librimix, TINY_SD)}
# PR runs on the ASR corpus (its generator writes the lexicon too).
CLI_PARAMS = {**{task: kwargs for task, (_, kwargs) in GENERATORS.items()}, "pr": TINY_ASR}


def _generate(task, root, **overrides):
    fn, kwargs = GENERATORS[task]
    return fn(root, progress=False, jobs=2, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth_tasks")
    return {task: _generate(task, base / task) for task in GENERATORS}


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _audio_files(root):
    return [p for p in sorted(root.rglob("*")) if p.suffix in (".wav", ".flac")]


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_same_call_gives_the_same_bytes(task, corpora, tmp_path):
    again = _files(_generate(task, tmp_path / task))
    assert again == _files(corpora[task])
    assert len(_audio_files(corpora[task])) > 0


def test_sid_layout_is_read_by_the_voxceleb1_reader(corpora):
    root = corpora["sid"]
    assert (root / "iden_split.txt").is_file()
    for split in ("train", "dev", "test"):
        ds = build_dataset("sid", root, split)
        assert len(ds) == 4 * 1 * 2  # speakers x videos of the split x utterances per video
        assert ds.task_kwargs == {"num_classes": 4}
        assert sorted({label for _, label in ds.items}) == [0, 1, 2, 3]  # closed set: every speaker in every split
        sample = ds.load(0)
        assert sample["wav"].ndim == 1 and 0.2 * synth.SAMPLE_RATE < len(sample["wav"]) <= 3 * synth.SAMPLE_RATE
    assert sorted(p.name for p in (root / "wav").iterdir()) == ["id10001", "id10002", "id10003", "id10004"]
    # Dev and test are whole held-out sessions (videos), never a training video.
    videos = {}
    for line in (root / "iden_split.txt").read_text().splitlines():
        which, rel = line.split()
        videos.setdefault(which, set()).add(rel.rsplit("/", 1)[0])
    assert not (videos["1"] & videos["2"]) and not (videos["1"] & videos["3"]) and not (videos["2"] & videos["3"])


def test_ic_layout_is_read_by_the_fluent_reader(corpora):
    root = corpora["ic"]
    sizes = {"train": 2 * 31, "dev": 31, "test": 31}
    speakers = {}
    for split, n in sizes.items():
        ds = build_dataset("ic", root, split)
        assert len(ds) == n
        assert ds.task_kwargs == {"values_per_slot": [6, 14, 4]}
        intents = {tuple(ds.slot_values[k][v] for k, v in enumerate(labels)) for _, labels in ds.items}
        assert intents == set(FSC_INTENTS)  # every speaker says every intent
        speakers[split] = {path.parent.name for path, _ in ds.items}
        assert all(path.is_file() for path, _ in ds.items)
    assert not (speakers["train"] & speakers["dev"]) and not (speakers["train"] & speakers["test"])
    assert not (speakers["dev"] & speakers["test"])
    assert (len(speakers["train"]), len(speakers["dev"]), len(speakers["test"])) == (2, 1, 1)


def test_asr_layout_is_read_by_the_librispeech_reader(corpora):
    root = corpora["asr"]
    vocabulary = {w.upper() for w in librispeech_vocabulary()}
    speakers = {}
    for split, subset in (("train", "train-clean-100"), ("dev", "dev-clean"), ("test", "test-clean")):
        ds = build_dataset("asr", root, split)
        n_speakers = {"train": 2, "dev": 1, "test": 1}[split]
        assert len(ds) == n_speakers * 2 * 2  # speakers x chapters x utterances
        speakers[split] = {p.name for p in (root / subset).iterdir()}
        assert len(speakers[split]) == n_speakers
        for utt, path, targets in ds.items:
            spk, chapter, _ = utt.split("-")
            assert path == root / subset / spk / chapter / f"{utt}.flac"
            text = ds_text(root / subset / spk / chapter, utt)
            assert 3 <= len(text.split()) <= 7 and set(text.split()) <= vocabulary
            assert targets == CharacterVocab().encode(text)
        wav = ds.load(0)["wav"]
        assert wav.ndim == 1 and 0.3 * synth.SAMPLE_RATE < len(wav) < 6 * synth.SAMPLE_RATE
    assert not (speakers["train"] & speakers["dev"]) and not (speakers["train"] & speakers["test"])
    assert not (speakers["dev"] & speakers["test"])
    listed = [line.split("|")[0].strip() for line in (root / "SPEAKERS.TXT").read_text().splitlines()[1:]]
    assert sorted(listed) == sorted(speakers["train"] | speakers["dev"] | speakers["test"])


def ds_text(chapter_dir, utt):
    for line in next(chapter_dir.glob("*.trans.txt")).read_text().splitlines():
        if line.split(" ", 1)[0] == utt:
            return line.split(" ", 1)[1]
    raise AssertionError(f"{utt} not in {chapter_dir}")


def test_pr_targets_are_exactly_what_espeak_spoke(corpora):
    """The PR reader builds targets from the lexicon; they equal espeak-ng's phonemisation of the
    whole sentence (what the synthesiser spoke), mapped to CMU phones."""
    root = corpora["asr"]
    engine = espeak.synthesizer(None, None)
    for split in ("train", "dev", "test"):
        ds = build_dataset("pr", root, split, lexicon=root / LEXICON_NAME)
        asr = build_dataset("asr", root, split)
        assert len(ds) == len(asr)
        for (utt, _, targets), (_, _, chars) in zip(ds.items, asr.items):
            text = CharacterVocab().decode(chars)
            spoken = [p for group in engine.phonemes(text.lower(), "en-us") for p in group]
            assert PhonemeVocab().decode(targets) == " ".join(espeak_to_cmu(spoken)), utt
    lexicon = (root / LEXICON_NAME).read_text().splitlines()
    assert len(lexicon) == len(librispeech_vocabulary())
    assert all(p in PHONEMES for line in lexicon for p in line.split()[1:])


def test_espeak_to_cmu_maps_stress_and_split_phonemes():
    assert espeak_to_cmu(["k", "'A@", "t"]) == ["K", "AA1", "R", "T"]
    assert espeak_to_cmu(["b", "'V", "?", "n-"]) == ["B", "AH1", "T", "AH0", "N"]
    assert espeak_to_cmu(["f", ",aI@"]) == ["F", "AY2", "ER0"]
    with pytest.raises(ValueError, match="'Q'"):
        espeak_to_cmu(["Q"], "a test")


def test_sf_layout_is_read_by_the_snips_reader(corpora):
    root = corpora["sf"]
    iob = {line.split(" ", 1)[0]: line for line in (root / "all.iob.snips.txt").read_text().splitlines()}
    assert len(iob) == 16 + 4 + 8
    slots = (root / "slots.txt").read_text().splitlines()
    assert slots[0] == "O" and slots[1:] == sorted(SNIPS_SLOT_VALUES)
    for split, folder, n in (("train", "train", 16), ("dev", "valid", 4), ("test", "test", 8)):
        ds = build_dataset("sf", root, split)
        assert len(ds) == n and ds.unknown_characters == 0
        assert ds.task_kwargs == {"slots": sorted(SNIPS_SLOT_VALUES)}
        names = {uid.split("-")[0] for uid, _, _ in ds.items}
        assert names == set(SNIPS_SPEAKERS[split])  # the recipe's speakers, every one of them
        for uid, path, targets in ds.items:
            assert path == root / folder / f"{uid}.wav" and uid.split("-")[1:3] == ["snips", folder]
            words, rest = iob[uid].split("\t")
            words, tags = words.split()[2:-1], rest.split()[1:-1]
            assert rest.split()[-1] in SNIPS_TEMPLATES and len(words) == len(tags)
            # The reference string the SF metrics parse: B-slot value E-slot around each slot value.
            expected, k = [], 0
            while k < len(words):
                if tags[k] == "O":
                    expected.append(words[k])
                    k += 1
                    continue
                e = k
                while e < len(tags) and tags[e] == tags[k]:
                    e += 1
                assert " ".join(w.lower() for w in words[k:e]) in SNIPS_SLOT_VALUES[tags[k]]
                expected.append(f"B-{tags[k]} {' '.join(words[k:e])} E-{tags[k]}")
                k = e
            assert ds.vocab.decode(targets) == " ".join(expected)
    # The held-out voices are other people than the training ones.
    voices = {name: v for name, v in snips_speakers(TINY_SF["seed"]).items()}
    train = {voices[n] for n in SNIPS_SPEAKERS["train"]}
    held = {voices[n] for n in SNIPS_SPEAKERS["dev"] + SNIPS_SPEAKERS["test"]}
    assert len(train) == 8 and len(held) == 8 and not train & held


def test_sd_layout_is_read_by_the_librimix_reader(corpora):
    import soundfile as sf

    root = corpora["sd"]
    speakers, overlapped = {}, 0
    for split, n in (("train", 4), ("dev", 2), ("test", 3)):
        ds = build_dataset("sd", root, split)
        assert len(ds) == n and ds.task_kwargs == {"num_speakers": 2, "frame_shift": 160}
        utt2spk = dict(line.split() for line in (root / split / "utt2spk").read_text().splitlines())
        speakers[split] = set(utt2spk.values())
        assert len(speakers[split]) == 2
        durations = dict(line.split() for line in (root / split / "reco2dur").read_text().splitlines())
        for index, (rec, start, end) in enumerate(ds.chunks):
            wav = ds.wavs[rec]
            samples, rate = sf.read(str(wav))
            assert rate == synth.SAMPLE_RATE and len(samples) % 160 == 0 and start == 0
            assert end == len(samples) // 160 == round(float(durations[rec]) * 100)  # one chunk per recording
            activity = ds.load(index)["activity"]
            assert activity.shape == (end, 2) and (activity.sum(0) > 0).all()  # both speakers talk
            overlapped += int((activity.sum(1) == 2).sum())
            # The labels are where the audio is: frames without a speaker hold only the low noise floor.
            power = (samples[: end * 160].reshape(end, 160) ** 2).mean(1)
            silent, speech = power[activity.sum(1) == 0], power[activity.sum(1) > 0]
            assert silent.size and silent.max() < 0.05 * speech.mean()
        for line in (root / split / "segments").read_text().splitlines():
            _, _, st, et = line.split()
            assert float(st) * 100 == pytest.approx(round(float(st) * 100), abs=1e-9)  # on the 10 ms grid
            assert float(et) > float(st)
        assert sorted((root / split / "rttm").read_text().splitlines()) == (root / split / "rttm").read_text().splitlines()
    assert overlapped > 0  # some turns overlap
    assert not (speakers["train"] & speakers["dev"]) and not (speakers["train"] & speakers["test"])
    assert not (speakers["dev"] & speakers["test"])


def test_librimix_reader_rounds_reco2dur_to_samples(tmp_path):
    # Kaldi's reco2dur holds rounded decimals: 2.01 s * 16000 is 32159.999... in floating point.
    import numpy as np

    folder = tmp_path / "train"
    folder.mkdir()
    synthesis.write_wav(folder / "r.wav", np.zeros(32160, dtype=np.int16))
    (folder / "wav.scp").write_text("r r.wav\n")
    (folder / "segments").write_text("s-r-0 r 0.50 1.00\n")
    (folder / "utt2spk").write_text("s-r-0 s\n")
    (folder / "reco2dur").write_text("r 2.01\n")
    ds = build_dataset("sd", tmp_path, "train")
    assert ds.chunks == [("r", 0, 201)]
    assert ds.activity("r", 0, 201)[:, 0].sum() == 50


def _manifest_speakers(root):
    speakers = json.loads((root / synth.MANIFEST_NAME).read_text())["params"]["speakers"]
    if isinstance(speakers, dict):  # SF: name -> (voice, rate, pitch)
        speakers = list(speakers.values())
    return {tuple(s[:3]) for s in speakers}


def _embedded_speakers(task):
    """The (voice, rate, pitch) speakers of a task's embedded default corpus, without generating it."""
    params = EMBEDDED_CORPORA[task].params
    if task == "sid":
        return set(distinct_speakers(params["speakers"], params["seed"], params.get("min_pitch_gap", 6),
                                     params.get("min_rate_gap", 20)))
    if task in ("asr", "pr"):
        return set(librispeech_speakers(params["speakers"], params["seed"]))
    if task == "sf":
        return set(snips_speakers(params["seed"]).values())
    return set(synth.default_speakers(params["speakers"], params["seed"]))


def test_speakers_are_disjoint_from_pretraining_and_between_tasks(corpora):
    # The shipped upstream was pre-trained on pretraining_speakers(64, 0) (its pretraining.json).
    pretraining = set(synth.pretraining_speakers(64, 0))
    for task, root in corpora.items():
        triples = _manifest_speakers(root)
        assert triples and not triples & pretraining, task
        assert all(pitch % 2 == 0 for _, _, pitch in triples)  # default_speakers' even pitches
    # The embedded defaults: another seed per task, and no speaker shared between two tasks' corpora.
    embedded = {task: _embedded_speakers(task) for task in ("ks", "sid", "ic", "asr", "sf", "sd")}
    assert len(embedded["sid"]) == 32
    for a in embedded:
        assert not embedded[a] & pretraining, a
        for b in embedded:
            assert a == b or not embedded[a] & embedded[b], (a, b)


def test_sid_speakers_of_one_voice_differ_in_pitch_or_rate():
    kept = distinct_speakers(32, 1)
    for a, (va, ra, pa) in enumerate(kept):
        for vb, rb, pb in kept[a + 1:]:
            assert va != vb or abs(pa - pb) >= 6 or abs(ra - rb) >= 20


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_half_written_or_changed_cache_is_regenerated(task, tmp_path):
    root = _generate(task, tmp_path / task)
    reference = _files(root)
    manifest = root / synth.MANIFEST_NAME
    wav = _audio_files(root)[0]
    wav.unlink()
    assert _generate(task, root) == root and not wav.exists()  # complete manifest: cached, not checked file by file
    manifest.unlink()  # as after an interrupted generation: the manifest is written last
    _generate(task, root)
    assert _files(root) == reference
    manifest.write_text("{not json")
    _audio_files(root)[0].write_bytes(b"junk")
    _generate(task, root)
    assert _files(root) == reference
    _generate(task, root, seed=7)  # other parameters: regenerated
    assert json.loads(manifest.read_text())["params"]["seed"] == 7


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_foreign_folder_is_never_replaced(task, tmp_path):
    (tmp_path / task).mkdir()
    (tmp_path / task / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        _generate(task, tmp_path / task)
    assert (tmp_path / task / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("task", sorted(CLI_PARAMS))
def test_cli_runs_the_embedded_corpus_end_to_end(task, tmp_path, monkeypatch, capsys):
    corpus = EMBEDDED_CORPORA[task]
    monkeypatch.setitem(EMBEDDED_CORPORA, task, dataclasses.replace(corpus, params=CLI_PARAMS[task]))
    folder = corpus.folder
    out, cache = tmp_path / "run", tmp_path / "cache"
    # No --task-option: the CLI applies the registry's reader/head options (PR's lexicon, the ASR/SF
    # head, SD's LSTM size) and the delta records them, so export rebuilds the same head.
    argv = ["--task", task, "--steps", "4", "--batch-size", "4", "--fisher-samples", "8", "--eval-interval", "2",
            "--no-progress", "--log-level", "WARNING", "--output-dir", str(out), "--corpus-cache", str(cache)]
    assert train.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "test" in summary["final"] and summary["primary_metric"] in summary["final"]["test"]
    assert (cache / folder / synth.MANIFEST_NAME).is_file()
    recorded = json.loads((out / "delta" / "delta.json").read_text())["task_options"]
    assert recorded == corpus.resolved_task_options(cache / folder)


def test_every_task_has_an_embedded_corpus():
    assert set(EMBEDDED_CORPORA) == set(TASK_NAMES)  # the embedded corpora and the task registry name the same tasks
    assert EMBEDDED_CORPORA["pr"].folder == EMBEDDED_CORPORA["asr"].folder  # PR is the ASR corpus + its lexicon
    assert EMBEDDED_CORPORA["pr"].params == EMBEDDED_CORPORA["asr"].params
