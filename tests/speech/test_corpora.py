"""Corpus readers: layouts, labels, and bad input."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
from speech_fixtures import SR, tone, write

from adtuning.speech import CorpusError, build_dataset, read_audio
from adtuning.speech.corpora import KS_CLASSES
from adtuning.speech.corpora.speech_commands import _hash_split


# --- audio -------------------------------------------------------------------------------
def test_read_audio_errors_name_the_file(tmp_path):
    with pytest.raises(CorpusError, match="not found.*missing.wav"):
        read_audio(tmp_path / "missing.wav")
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(CorpusError, match="corrupt.wav"):
        read_audio(bad)
    stereo = write(tmp_path / "stereo.wav", np.zeros((800, 2), np.float32))
    with pytest.raises(CorpusError, match="stereo.wav.*2 channels"):
        read_audio(stereo)


def test_read_audio_resamples_when_asked_and_slices(tmp_path):
    p = write(tmp_path / "8k.wav", tone(200.0, 1.0, 0)[::2], sr=8000)
    with pytest.raises(CorpusError, match="8k.wav has sample rate 8000 Hz.*resample=true"):
        read_audio(p)
    wav = read_audio(p, resample=True)
    assert wav.dtype == np.float32 and abs(len(wav) - SR) <= 2
    part = read_audio(p, start=1000, stop=3000, resample=True)
    assert len(part) == 2000
    np.testing.assert_allclose(read_audio(write(tmp_path / "16k.wav", tone(200.0, 0.5, 1)), start=10, stop=20),
                               sf.read(str(tmp_path / "16k.wav"), dtype="float32")[0][10:20])


@pytest.mark.parametrize("task", ["ks", "ic", "sid", "asr", "pr", "sf", "sd"])
def test_missing_corpus_folder(tmp_path, task):
    with pytest.raises(CorpusError, match=str(tmp_path / "nowhere")):
        build_dataset(task, tmp_path / "nowhere", "train", **({"lexicon": tmp_path / "x"} if task == "pr" else {}))


# --- KS ----------------------------------------------------------------------------------
def test_speech_commands_splits_and_labels(corpora):
    idx = {c: i for i, c in enumerate(KS_CLASSES)}
    train = build_dataset("ks", corpora["ks"], "train")
    dev = build_dataset("ks", corpora["ks"], "dev")
    test = build_dataset("ks", corpora["ks"], "test")

    def labels(ds):
        return sorted(c for c, _ in ds.items)

    # 2 training speakers per word (speaker 2 is in validation_list, 3 in testing_list), 2 noises
    assert labels(train) == sorted([idx["yes"]] * 2 + [idx["no"]] * 2 + [idx["_unknown_"]] * 2 + [idx["_silence_"]] * 2)
    assert labels(dev) == sorted([idx["yes"], idx["no"], idx["_unknown_"]] + [idx["_silence_"]] * 2)
    assert labels(test) == sorted([idx["yes"]] * 2 + [idx["no"]] * 2 + [idx["_unknown_"]] * 2 + [idx["_silence_"]])

    def words(ds):
        return {p.name for _, p in ds.items if p.parent.name != "_background_noise_"}

    assert not words(train) & words(dev)
    silence = next(i for i, (c, _) in enumerate(train.items) if c == idx["_silence_"])
    assert len(train.load(silence, np.random.default_rng(0))["wav"]) == SR
    yes = next(i for i, (c, _) in enumerate(train.items) if c == idx["yes"])
    np.testing.assert_allclose(train.load(yes)["wav"], read_audio(train.items[yes][1]) * 10 ** (-3 / 20), rtol=1e-6)
    assert train.task_kwargs == {"num_classes": 12}


def test_speech_commands_hash_rule_without_lists(corpora, tmp_path):
    root = tmp_path / "speech_commands_v0.01"
    shutil.copytree(corpora["ks"], root)
    (root / "validation_list.txt").unlink()
    (root / "testing_list.txt").unlink()
    for split in ("train", "dev"):
        ds = build_dataset("ks", root, split)
        assert all(_hash_split(p.name) == split for c, p in ds.items if c != KS_CLASSES.index("_silence_"))


def test_speech_commands_unknown_test_class(corpora, tmp_path):
    troot = tmp_path / "speech_commands_test_set_v0.01"
    shutil.copytree(corpora["ks"].parent / "speech_commands_test_set_v0.01", troot)
    write(troot / "maybe" / "x_nohash_0.wav", tone(100.0, 1.0, 0))
    with pytest.raises(CorpusError, match="maybe"):
        build_dataset("ks", corpora["ks"], "test", test_root=troot)


# --- IC ----------------------------------------------------------------------------------
def test_fluent_labels_and_unknown_value(corpora, tmp_path):
    train = build_dataset("ic", corpora["ic"], "train")
    assert train.slot_values == [["activate", "deactivate", "increase"], ["lights", "volume", "music"],
                                 ["kitchen", "none", "bedroom"]]
    assert train.task_kwargs == {"values_per_slot": [3, 3, 3]}
    assert train.load(3)["labels"] == [0, 2, 2]
    root = tmp_path / "fsc"
    shutil.copytree(corpora["ic"], root)
    csv_path = root / "data" / "valid_data.csv"
    csv_path.write_text(csv_path.read_text().replace("bedroom", "garage"))
    with pytest.raises(CorpusError, match="valid_data.csv line 5.*garage"):
        build_dataset("ic", root, "dev")


# --- SID ---------------------------------------------------------------------------------
def test_voxceleb_splits_and_missing_file(corpora, tmp_path):
    train = build_dataset("sid", corpora["sid"], "train")
    assert len(train) == 6 and train.task_kwargs == {"num_classes": 3}
    assert sorted({lab for _, lab in train.items}) == [0, 1, 2]
    assert len(build_dataset("sid", corpora["sid"], "dev")) == 3
    root = tmp_path / "vox"
    shutil.copytree(corpora["sid"], root)
    (root / "wav" / "id10002" / "vid1" / "00003.wav").unlink()
    with pytest.raises(CorpusError, match="id10002/vid1/00003.wav"):
        build_dataset("sid", root, "test")
    (root / "iden_split.txt").write_text("4 id10001/a/b.wav\n")
    with pytest.raises(CorpusError, match="iden_split.txt line 1"):
        build_dataset("sid", root, "train")


def test_voxceleb_train_crop(corpora):
    ds = build_dataset("sid", corpora["sid"], "train", max_timestep=4000)
    wav = ds.load(0, np.random.default_rng(0))["wav"]
    assert len(wav) == 4000 and np.abs(wav).max() == pytest.approx(1.0)


# --- ASR / PR ----------------------------------------------------------------------------
def test_librispeech_asr_and_errors(corpora, tmp_path):
    ds = build_dataset("asr", corpora["asr"], "train")
    assert [u for u, _, _ in ds.items] == [f"19-198-{i:04d}" for i in range(4)]
    root = tmp_path / "LibriSpeech"
    shutil.copytree(corpora["asr"], root)
    trans = root / "dev-clean" / "84" / "198" / "84-198.trans.txt"
    trans.write_text(trans.read_text().replace("THE DOG", "THE 2 DOGS"))
    with pytest.raises(CorpusError, match="84-198-0001.*'2'"):
        build_dataset("asr", root, "dev")
    (root / "test-clean" / "61" / "198" / "61-198-0002.flac").unlink()
    with pytest.raises(CorpusError, match="61-198-0002.flac"):
        build_dataset("asr", root, "test")
    with pytest.raises(CorpusError, match="train-other-500"):
        build_dataset("asr", root, "train", subsets=["train-other-500"])


def test_librispeech_pr_lexicon(corpora, tmp_path):
    ds = build_dataset("pr", corpora["asr"], "train", lexicon=corpora["lexicon"])
    from adtuning.speech.tasks.text import PhonemeVocab

    v = PhonemeVocab()
    assert v.decode(ds.items[0][2]) == "AH0 K AE1 T"  # "A CAT": first pronunciation of CAT wins
    with pytest.raises(CorpusError, match="lexicon"):
        build_dataset("pr", corpora["asr"], "train")
    short = tmp_path / "short.txt"
    short.write_text("A AH0\nCAT K AE1 T\n")
    with pytest.raises(CorpusError, match="19-198-0001.*THE"):
        build_dataset("pr", corpora["asr"], "train", lexicon=short)
    bad = tmp_path / "bad.txt"
    bad.write_text("A AH0\nCAT K AE9 T\n")
    with pytest.raises(CorpusError, match="bad.txt line 2.*AE9"):
        build_dataset("pr", corpora["asr"], "train", lexicon=bad)


# --- SF ----------------------------------------------------------------------------------
def test_snips_reader(corpora, tmp_path):
    with pytest.warns(UserWarning, match="skipped 1"):
        train = build_dataset("sf", corpora["sf"], "train")
    assert train.skipped["no transcript"] == 1
    assert len(train) == 6 and train.task_kwargs == {"slots": ["genre", "city"]}
    text = train.vocab.decode(train.items[0][2])
    assert text == "PLAY B-genre JAZZ MUSIC E-genre"
    assert len(build_dataset("sf", corpora["sf"], "dev")) == 3
    root = tmp_path / "SNIPS"
    shutil.copytree(corpora["sf"], root)
    iob = root / "all.iob.snips.txt"
    iob.write_text(iob.read_text().replace("O O O O O city", "O O O O O country"))
    with pytest.raises(CorpusError, match="B-country"):
        build_dataset("sf", root, "dev")


def test_snips_split_speakers(corpora):
    with pytest.raises(CorpusError, match="Brian"):
        build_dataset("sf", corpora["sf"], "test", speakers=["Brian"])


# --- SD ----------------------------------------------------------------------------------
def test_librimix_chunks_and_activity(corpora, tmp_path):
    ds = build_dataset("sd", corpora["sd"], "train", chunk_size=150)
    assert [c for c in ds.chunks if c[0] == "train_mix0"] == [("train_mix0", 0, 150), ("train_mix0", 150, 200)]
    item = ds.load(0)
    assert item["activity"].shape == (150, 2) and len(item["wav"]) == 150 * 160
    act = ds.activity("train_mix0", 0, 200)
    np.testing.assert_array_equal(act[:, 0], (np.arange(200) < 120).astype(np.float32))
    np.testing.assert_array_equal(act[:, 1], (np.arange(200) >= 80).astype(np.float32))
    test = build_dataset("sd", corpora["sd"], "test", chunk_size=150)  # rttm only
    np.testing.assert_array_equal(test.activity("test_mix0", 0, 200), act)
    root = tmp_path / "mix"
    shutil.copytree(corpora["sd"], root)
    with open(root / "dev" / "segments", "a") as f:
        f.write("dev_mix0_x dev_mix0 0.1 0.2\n")
    with open(root / "dev" / "utt2spk", "a") as f:
        f.write("dev_mix0_x third\n")
    with pytest.raises(CorpusError, match="dev_mix0 has 3 speakers"):
        build_dataset("sd", root, "dev")
    scp = root / "train" / "wav.scp"  # relative paths resolve against the data folder
    scp.write_text(scp.read_text().replace(str(corpora["sd"] / "train") + "/", ""))
    assert len(build_dataset("sd", root, "train", chunk_size=150)) == len(ds)
    (root / "train" / "wavs" / "train_mix1.wav").unlink()
    with pytest.raises(CorpusError, match="train_mix1.wav"):
        build_dataset("sd", root, "train")
