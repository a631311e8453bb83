"""Reliability: bad audio files and bad corpus metadata give clear errors naming file (and line).

Each test is one row of tests/RELIABILITY.md. Audio files are generated with soundfile.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from adtuning.speech import CorpusError, MissingDataError, build_dataset, read_audio
from adtuning.speech.audio import audio_num_samples, corpus_path, read_lines
from tests.speech.speech_fixtures import (
    tone,
    write_fluent,
    write_lexicon,
    write_librimix,
    write_librispeech,
    write_snips,
    write_speech_commands,
    write_voxceleb,
)

SR = 16000


def wav(path: Path, data: np.ndarray, sr: int = SR, subtype: str = "PCM_16", fmt: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype, format=fmt)
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    base = tmp_path_factory.mktemp("reliability_corpora")
    return {"ks": write_speech_commands(base / "ks"), "ic": write_fluent(base / "ic"), "sid": write_voxceleb(base / "sid"),
            "asr": write_librispeech(base / "asr"), "lexicon": write_lexicon(base / "asr"), "sf": write_snips(base / "sf"),
            "sd": write_librimix(base / "sd")}


@pytest.fixture
def copy(corpora, tmp_path):
    def make(task: str) -> Path:
        return Path(shutil.copytree(corpora[task], tmp_path / corpora[task].name))
    return make


# --- audio --------------------------------------------------------------------------------
def test_8khz_is_refused_naming_file_and_rate_unless_resampling(tmp_path):
    p = wav(tmp_path / "narrow.wav", tone(300.0, 0.5, 0)[::2], sr=8000)
    with pytest.raises(CorpusError, match=r"narrow\.wav has sample rate 8000 Hz; 16000 Hz is required.*resample=true"):
        read_audio(p)
    out = read_audio(p, resample=True)
    assert out.dtype == np.float32 and abs(len(out) - SR // 2) <= 1


def test_44k1_resamples_and_a_rate_without_common_factor_is_refused(tmp_path):
    cd = wav(tmp_path / "cd.wav", np.zeros(4410, np.float32), sr=44100)
    assert len(read_audio(cd, resample=True)) == 1600
    odd = wav(tmp_path / "odd.wav", np.zeros(800, np.float32), sr=7919)  # prime: 127 M-entry resampling kernel
    with pytest.raises(CorpusError, match=r"odd\.wav: cannot resample 7919 Hz"):
        read_audio(odd, resample=True)


def test_an_implausible_header_rate_is_refused_even_when_resampling(tmp_path):
    slow = wav(tmp_path / "slow.wav", np.zeros(500, np.float32), sr=500)  # 1 s would become 32 s
    with pytest.raises(CorpusError, match=r"slow\.wav: sample rate 500 Hz is outside the 1000-768000 Hz of real recordings"):
        read_audio(slow, resample=True)


def test_stereo_is_refused_unless_downmixed(tmp_path):
    left, right = tone(300.0, 0.25, 0), tone(700.0, 0.25, 1)
    p = wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    with pytest.raises(CorpusError, match=r"stereo\.wav has 2 channels.*downmix=true"):
        read_audio(p)
    np.testing.assert_allclose(read_audio(p, downmix=True), (left + right) / 2, rtol=0, atol=1e-7)


@pytest.mark.parametrize("subtype,fmt,tol", [("PCM_24", "WAV", 2**-23), ("PCM_32", "WAV", 2**-31), ("PCM_U8", "WAV", 2**-7),
                                             ("DOUBLE", "WAV", 1e-7), ("PCM_24", "FLAC", 2**-23)])
def test_other_sample_formats_decode_to_the_same_float32(tmp_path, subtype, fmt, tol):
    x = tone(440.0, 0.1, 3)
    p = wav(tmp_path / f"x.{fmt.lower()}", x, subtype=subtype, fmt=fmt)
    out = read_audio(p)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, x, rtol=0, atol=tol)


def test_empty_file_is_refused(tmp_path):
    p = wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    with pytest.raises(CorpusError, match=r"empty\.wav is empty \(0 samples\)"):
        read_audio(p)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_float_wav_is_refused(tmp_path, bad):
    x = tone(300.0, 0.1, 0)
    x[[5, 17]] = bad
    p = wav(tmp_path / "nan.wav", x, subtype="FLOAT")
    with pytest.raises(CorpusError, match=r"nan\.wav holds 2 NaN/inf samples"):
        read_audio(p)
    with pytest.raises(CorpusError, match="NaN/inf"):  # also after a downmix or a resample
        read_audio(wav(tmp_path / "nan2.wav", np.stack([x, x], 1), sr=8000, subtype="FLOAT"), downmix=True, resample=True)


def test_truncated_wav_is_refused(tmp_path):
    good = wav(tmp_path / "good.wav", tone(300.0, 0.5, 0))
    data = good.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"cut\.wav is truncated: its header declares 16000 data bytes, the file holds 7978"):
        read_audio(cut)
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(data[:44])
    with pytest.raises(CorpusError, match="header_only.wav is truncated"):
        read_audio(header_only)


def test_truncated_flac_is_refused(tmp_path):
    good = wav(tmp_path / "good.flac", tone(300.0, 1.0, 0) + 0.1 * np.random.default_rng(0).standard_normal(SR).astype(np.float32),
               fmt="FLAC")
    cut = tmp_path / "cut.flac"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorpusError, match=r"cannot decode audio file .*cut\.flac"):
        read_audio(cut)


@pytest.mark.parametrize("content", [b"", b"RIFF", b"RIFF\x00\x00garbage" * 10, b"\x00" * 1000, b"not audio at all\n" * 50,
                                     b"fLaC" + bytes(range(256))])
def test_garbage_or_headerless_files_name_the_file(tmp_path, content):
    p = tmp_path / "garbage.wav"
    p.write_bytes(content)
    with pytest.raises(CorpusError, match=r"garbage\.wav"):
        read_audio(p)
    with pytest.raises(CorpusError, match=r"garbage\.wav"):
        audio_num_samples(p)


def test_missing_file_and_a_range_past_the_end(tmp_path):
    with pytest.raises(CorpusError, match=r"audio file not found: .*missing\.wav"):
        read_audio(tmp_path / "missing.wav")
    p = wav(tmp_path / "short.wav", tone(300.0, 0.1, 0))
    with pytest.raises(CorpusError, match=r"short\.wav: samples \[5000, 6000\) requested, but it holds 1600"):
        read_audio(p, start=5000, stop=6000)


def test_bad_audio_options_are_refused(corpora):
    with pytest.raises(CorpusError, match="resample must be true or false, got 'yes'"):
        build_dataset("ic", corpora["ic"], "train", resample="yes")


@pytest.mark.parametrize("task", ["ks", "ic", "sid", "asr", "pr", "sf", "sd"])
def test_every_reader_passes_the_audio_policy_through(copy, corpora, task):
    """Every reader refuses an 8 kHz stereo file by default and accepts it with resample/downmix."""
    root = copy("asr" if task == "pr" else task)
    extra = {"lexicon": corpora["lexicon"]} if task == "pr" else {}
    ds = build_dataset(task, root, "train", **extra)
    path = ds.wavs[ds.chunks[0][0]] if task == "sd" else Path(ds.audio_path(0))
    seconds = audio_num_samples(path) / SR
    x = tone(300.0, seconds, 0)[::2]
    wav(path, np.stack([x, x], 1), sr=8000, fmt="FLAC" if path.suffix == ".flac" else "WAV")
    with pytest.raises(CorpusError, match=f"{path.name} has 2 channels"):
        ds.load(0)
    ds = build_dataset(task, root, "train", resample=True, downmix=True, **extra)
    assert ds.load(0)["wav"].dtype == np.float32


# --- corpus metadata: Fluent Speech Commands (CSV) ---------------------------------------------
def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_fluent_missing_column(copy):
    root = copy("ic")
    _edit(root / "data" / "train_data.csv", ",location", ",place")
    with pytest.raises(CorpusError, match=r"train_data\.csv line 1: missing column\(s\) \['location'\]"):
        build_dataset("ic", root, "train")


def test_fluent_short_row_and_empty_value(copy):
    root = copy("ic")
    csv_path = root / "data" / "test_data.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:3] + [lines[3].rsplit(",", 1)[0]] + lines[4:]) + "\n")
    with pytest.raises(CorpusError, match=r"test_data\.csv line 4: 6 fields, but the header has 7"):
        build_dataset("ic", root, "test")
    csv_path.write_text("\n".join(lines[:3] + [lines[3].rsplit(",", 1)[0] + ","] + lines[4:]) + "\n")
    with pytest.raises(CorpusError, match=r"test_data\.csv line 4: empty location"):
        build_dataset("ic", root, "test")


def test_fluent_unknown_label(copy):
    root = copy("ic")
    _edit(root / "data" / "test_data.csv", "lights,kitchen", "lights,attic")
    with pytest.raises(CorpusError, match=r"test_data\.csv line 2: location value 'attic' does not occur in the training set"):
        build_dataset("ic", root, "test")


def test_fluent_duplicate_and_leaked_rows(copy):
    root = copy("ic")
    csv_path = root / "data" / "valid_data.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(CorpusError, match=r"valid_data\.csv line 6: 'wavs/speakers/spkC/valid_1\.wav' is listed twice \(first on line 3\)"):
        build_dataset("ic", root, "dev")
    train_row = (root / "data" / "train_data.csv").read_text().splitlines()[1]
    csv_path.write_text("\n".join(lines + [train_row]) + "\n")
    with pytest.raises(CorpusError, match=r"valid_data\.csv line 6: .*spkA/train_0\.wav' is also in the training set \(.*train_data\.csv line 2\)"):
        build_dataset("ic", root, "dev")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "wavs/../../outside.wav", "C:\\Windows\\x.wav"])
def test_fluent_path_escaping_the_root(copy, bad):
    root = copy("ic")
    _edit(root / "data" / "test_data.csv", "wavs/speakers/spkD/test_0.wav", bad)
    with pytest.raises(CorpusError, match=r"test_data\.csv line 2: audio path .* (leaves the corpus root|is absolute)"):
        build_dataset("ic", root, "test")


def test_fluent_missing_audio_file_is_found_when_reading_the_list(copy):
    root = copy("ic")
    (root / "wavs" / "speakers" / "spkD" / "test_2.wav").unlink()
    with pytest.raises(CorpusError, match=r"test_data\.csv line 4: audio file not found: .*test_2\.wav"):
        build_dataset("ic", root, "test")


def test_fluent_empty_split_and_empty_file(copy):
    root = copy("ic")
    csv_path = root / "data" / "test_data.csv"
    csv_path.write_text(csv_path.read_text().splitlines()[0] + "\n")
    with pytest.raises(CorpusError, match=r"test_data\.csv: no rows \(the test split is empty\)"):
        build_dataset("ic", root, "test")
    csv_path.write_text("")
    with pytest.raises(CorpusError, match=r"test_data\.csv: empty file"):
        build_dataset("ic", root, "test")


@pytest.mark.parametrize("content,message", [(b"\xff\xfe,path\n", r"line 1: not UTF-8 text"),
                                              (b',path,action,object,location\n0,"a\x00b,c,d,e\n', r"line 2: NUL byte"),
                                              (b',path,action,object,location\n0,"unterminated,c,d,e\n',
                                               r"line 2: 2 fields, but the header has 5")])
def test_fluent_binary_or_malformed_csv(copy, content, message):
    root = copy("ic")
    (root / "data" / "test_data.csv").write_bytes(content)
    # The file name and the whole message, in that order (no alternation may drop the name).
    with pytest.raises(CorpusError, match=r"test_data\.csv (?:" + message + ")"):
        build_dataset("ic", root, "test")


# --- corpus metadata: VoxCeleb1 (split list) -------------------------------------------------
def _split_lines(root: Path) -> list[str]:
    return (root / "iden_split.txt").read_text().splitlines()


def test_voxceleb_bad_line_and_escaping_path(copy):
    root = copy("sid")
    lines = _split_lines(root)
    (root / "iden_split.txt").write_text("\n".join(lines + ["1 ../../passwd"]) + "\n")
    with pytest.raises(CorpusError, match=r"iden_split\.txt line 13: audio path '\.\./\.\./passwd' leaves the corpus root"):
        build_dataset("sid", root, "train")
    (root / "iden_split.txt").write_text("\n".join(lines + ["1 id10001/vid0"]) + "\n")
    with pytest.raises(CorpusError, match=r"iden_split\.txt line 13: expected '<1\|2\|3> <speaker>/<video>/<file>\.wav'"):
        build_dataset("sid", root, "train")
    (root / "iden_split.txt").write_text("\n".join(lines + ["1 id10001//x.wav"]) + "\n")
    with pytest.raises(CorpusError, match=r"line 13: empty speaker, video or file name"):
        build_dataset("sid", root, "train")


def test_voxceleb_duplicate_utterance(copy):
    root = copy("sid")
    lines = _split_lines(root)
    (root / "iden_split.txt").write_text("\n".join(lines + ["3 " + lines[0].split()[1]]) + "\n")
    with pytest.raises(CorpusError, match=r"iden_split\.txt line 13: id10001/vid0/00000\.wav is listed twice \(first on line 1\)"):
        build_dataset("sid", root, "test")


def test_voxceleb_speaker_without_training_data(copy):
    root = copy("sid")
    lines = [line for line in _split_lines(root) if not (line.startswith("1 id10003"))]
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=r"iden_split\.txt line \d+: speaker id10003 has no training utterance"):
        build_dataset("sid", root, "test")


def test_voxceleb_empty_split_and_binary_list(copy):
    root = copy("sid")
    (root / "iden_split.txt").write_text("\n".join(line for line in _split_lines(root) if not line.startswith("3 ")) + "\n")
    with pytest.raises(CorpusError, match=r"VoxCeleb1 \(test\): .*iden_split\.txt lists no utterance with split id 3"):
        build_dataset("sid", root, "test")
    (root / "iden_split.txt").write_bytes(b"1 id10001/vid0/00000.wav\n\x80\x81\n")
    with pytest.raises(CorpusError, match=r"iden_split\.txt line 2: not UTF-8 text"):
        build_dataset("sid", root, "train")


# --- corpus metadata: Speech Commands (list files, folders) ------------------------------------
def test_speech_commands_list_escaping_or_malformed(copy):
    root = copy("ks")
    lst = root / "validation_list.txt"
    original = lst.read_text()
    lst.write_text(original + "../../etc/passwd\n")
    with pytest.raises(CorpusError, match=r"validation_list\.txt line 4: audio path '\.\./\.\./etc/passwd' leaves the corpus root"):
        build_dataset("ks", root, "train")
    lst.write_text(original + "yes/sub/x.wav\n")
    with pytest.raises(CorpusError, match=r"validation_list\.txt line 4: expected '<word>/<file>\.wav'"):
        build_dataset("ks", root, "train")
    lst.write_text(original + "yes/nothere_nohash_0.wav\n")
    with pytest.raises(CorpusError, match=r"validation_list\.txt line 4: listed file not found: .*nothere_nohash_0\.wav"):
        build_dataset("ks", root, "train")


def test_speech_commands_duplicates_and_a_clip_in_both_lists(copy):
    root = copy("ks")
    val, test = root / "validation_list.txt", root / "testing_list.txt"
    original = val.read_text()
    first = original.splitlines()[0]
    val.write_text(original + first + "\n")
    with pytest.raises(CorpusError, match=rf"validation_list\.txt line 4: {first} is listed twice \(first on line 1\)"):
        build_dataset("ks", root, "dev")
    val.write_text(original)
    test.write_text(test.read_text() + first + "\n")
    with pytest.raises(CorpusError, match=rf"testing_list\.txt line 4: {first} is also in .*validation_list\.txt \(line 1\)"):
        build_dataset("ks", root, "dev")


def test_speech_commands_one_list_missing(copy):
    root = copy("ks")
    (root / "testing_list.txt").unlink()
    with pytest.raises(CorpusError, match=r"validation_list\.txt exists but .*testing_list\.txt does not"):
        build_dataset("ks", root, "train")


def test_speech_commands_empty_split(tmp_path):
    root = tmp_path / "speech_commands_v0.01"
    (root / "yes").mkdir(parents=True)
    with pytest.raises(CorpusError, match=r"Speech Commands \(train\): no \.wav files found under .*speech_commands_v0\.01"):
        build_dataset("ks", root, "train")


# --- corpus metadata: LibriSpeech (transcripts, lexicon) -------------------------------------------
def _trans(root: Path, subset: str = "train-clean-100") -> Path:
    return next((root / subset).rglob("*.trans.txt"))


def test_librispeech_duplicate_and_escaping_utterance_ids(copy):
    root = copy("asr")
    trans = _trans(root)
    lines = trans.read_text().splitlines()
    trans.write_text("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(CorpusError, match=rf"{trans.name} line {len(lines) + 1}: utterance {lines[0].split()[0]} is listed twice "
                                          rf"\(first in .*{trans.name} line 1\)"):
        build_dataset("asr", root, "train")
    for bad in ("../../../../etc/passwd", "..", "a\\b"):
        trans.write_text(f"{bad} HELLO\n")
        with pytest.raises(CorpusError, match=rf"{trans.name} line 1: utterance id .* is not a plain file name"):
            build_dataset("asr", root, "train")


def test_librispeech_binary_transcript_and_missing_text(copy):
    root = copy("asr")
    trans = _trans(root)
    trans.write_bytes(b"19-198-0000 HELLO\n\xff\xfe\n")
    with pytest.raises(CorpusError, match=rf"{trans.name} line 2: not UTF-8 text"):
        build_dataset("asr", root, "train")
    trans.write_text("19-198-0000   \n")
    with pytest.raises(CorpusError, match=rf"{trans.name} line 1: no transcript for '19-198-0000'"):
        build_dataset("asr", root, "train")


def test_librispeech_empty_subset_is_missing_data(copy):
    root = copy("asr")
    for t in (root / "test-clean").rglob("*.trans.txt"):
        t.unlink()
    with pytest.raises(MissingDataError, match=r"LibriSpeech: no \*\.trans\.txt under .*test-clean"):
        build_dataset("asr", root, "test")


def test_lexicon_binary_file_is_refused(copy, tmp_path):
    root = copy("asr")
    lexicon = tmp_path / "lex.txt"
    lexicon.write_bytes(b"HELLO HH AH0 L OW1\n\x00\x00\n")
    with pytest.raises(CorpusError, match=r"lex\.txt line 2: NUL byte"):
        build_dataset("pr", root, "train", lexicon=lexicon)


# --- corpus metadata: Audio SNIPS --------------------------------------------------------------
def test_snips_duplicate_utterance_and_slot(copy):
    root = copy("sf")
    iob = root / "all.iob.snips.txt"
    lines = iob.read_text().splitlines()
    iob.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(CorpusError, match=rf"all\.iob\.snips\.txt line {len(lines) + 1}: utterance {lines[1].split()[0]} is "
                                          r"listed twice \(first on line 2\)"):
        build_dataset("sf", root, "train")
    iob.write_text("\n".join(lines) + "\n")
    (root / "slots.txt").write_text("slots\ngenre\ncity\ngenre\n")
    with pytest.raises(CorpusError, match=r"slots\.txt line 4: slot 'genre' is listed twice \(first on line 2\)"):
        build_dataset("sf", root, "train")
    (root / "slots.txt").write_text("slots\n")
    with pytest.raises(CorpusError, match=r"slots\.txt: no slot names"):
        build_dataset("sf", root, "train")


def test_snips_bad_line_unknown_slot_and_binary_file(copy):
    root = copy("sf")
    iob = root / "all.iob.snips.txt"
    text = iob.read_text()
    iob.write_text(text.replace("\tO O genre genre PlayMusic", "\tO O genre PlayMusic", 1))
    with pytest.raises(CorpusError, match=r"all\.iob\.snips\.txt line 1 \(Ivy-snips-train-0\): expected 'BOS words EOS<TAB>tags'"):
        build_dataset("sf", root, "train")
    iob.write_text(text.replace("O O genre genre PlayMusic", "O O artist artist PlayMusic", 1))
    with pytest.raises(CorpusError, match=r"all\.iob\.snips\.txt line 1 \(Ivy-snips-train-0\): .*artist"):
        build_dataset("sf", root, "train")
    iob.write_bytes(b"\x00" * 64)
    with pytest.raises(CorpusError, match=r"all\.iob\.snips\.txt line 1: NUL byte"):
        build_dataset("sf", root, "train")


def test_snips_split_without_transcribed_audio_is_missing_data(copy):
    root = copy("sf")
    for f in (root / "test").glob("*.wav"):
        f.unlink()
    with pytest.raises(MissingDataError, match=r"SNIPS \(test\): no transcribed wav of speakers"):
        build_dataset("sf", root, "test")


# --- corpus metadata: LibriMix (Kaldi tables) --------------------------------------------------
def test_librimix_duplicate_keys(copy):
    root = copy("sd")
    for name in ("wav.scp", "segments", "utt2spk"):
        path = root / "train" / name
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines + [lines[0]]) + "\n")
        with pytest.raises(CorpusError, match=rf"train/{name} line {len(lines) + 1}: \S+ is listed twice \(first on line 1\)"):
            build_dataset("sd", root, "train")
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("target", ["../../../outside.wav", "../../x/../../y.wav"])
def test_librimix_relative_path_leaving_the_root(copy, target):
    root = copy("sd")
    scp = root / "train" / "wav.scp"
    rec = scp.read_text().split()[0]
    scp.write_text(f"{rec} {target}\n")
    with pytest.raises(CorpusError, match=r"wav\.scp line 1: audio path .* leaves the corpus root"):
        build_dataset("sd", root, "train")


@pytest.mark.parametrize("old,new,message", [("0.00 1.20", "0.00 abc", r"segments line 1: end 'abc' is not a number"),
                                             ("0.00 1.20", "0.00 nan", r"segments line 1: end 'nan' must be a finite time"),
                                             ("0.00 1.20", "1.50 1.20", r"segments line 1: the turn ends \(1.20\) before it starts"),
                                             ("0.00 1.20", "-1 1.20", r"segments line 1: start '-1' must be a finite time")])
def test_librimix_bad_times(copy, old, new, message):
    root = copy("sd")
    _edit(root / "train" / "segments", old, new)
    with pytest.raises(CorpusError, match=message):
        build_dataset("sd", root, "train")


def test_librimix_bad_reco2dur_and_binary_table(copy):
    root = copy("sd")
    rec = (root / "train" / "wav.scp").read_text().split()[0]
    (root / "train" / "reco2dur").write_text(f"{rec} two\n")
    with pytest.raises(CorpusError, match=r"reco2dur line 1: duration 'two' is not a number"):
        build_dataset("sd", root, "train")
    (root / "train" / "reco2dur").unlink()
    (root / "train" / "utt2spk").write_bytes(b"\xc3\x28 x\n")
    with pytest.raises(CorpusError, match=r"utt2spk line 1: not UTF-8 text"):
        build_dataset("sd", root, "train")


# --- an optional test split: absent is fine, broken is an error -------------------------------------
def test_an_absent_test_split_is_skipped_but_a_broken_one_is_an_error(copy):
    from adtuning.train import _optional_split

    root = copy("sd")
    shutil.rmtree(root / "test")
    assert _optional_split(build_dataset, "sd", root, {}) is None
    root = copy("sf")
    _edit(root / "all.iob.snips.txt", "Emma-snips-test-0 BOS PLAY JAZZ MUSIC EOS\t", "Emma-snips-test-0 BOS PLAY JAZZ EOS\t")
    with pytest.raises(CorpusError, match=r"all\.iob\.snips\.txt line \d+ \(Emma-snips-test-0\)"):
        _optional_split(build_dataset, "sf", root, {})


# --- the helpers every list reader can use -------------------------------------------------------
def test_corpus_path_and_read_lines(tmp_path):
    assert corpus_path(tmp_path, "a/./b.wav", "x line 1") == tmp_path / "a" / "b.wav"
    for bad in ("", "  ", "/abs.wav", "a/../../b.wav", "..\\..\\b.wav"):
        with pytest.raises(CorpusError, match="x line 1"):
            corpus_path(tmp_path, bad, "x line 1")
    p = tmp_path / "list.txt"
    p.write_bytes(b"\xef\xbb\xbfone\r\ntwo\n")  # a BOM and CRLF are fine
    assert read_lines(p) == ["one", "two"]
    with pytest.raises(CorpusError, match=r"cannot read .*nothere\.txt"):
        read_lines(tmp_path / "nothere.txt")
