"""The generated Speech Commands corpus: layout, audio format, speaker splits,
determinism, caching and errors. espeakng-loader and soundfile are dependencies of adtuning,
imported, never skipped. (The generation time is measured by bench/synth_speed.py.)"""
import re
from pathlib import Path

import espeakng_loader  # noqa: F401  (a hard dependency: fail, never skip, without it)
import numpy as np
import pytest
import soundfile as sf

from adtuning.speech import espeak, synth
from adtuning.speech.speakers import assign_speakers
from adtuning.speech.synth import (
    DEFAULT_UNKNOWN_WORDS,
    MANIFEST_NAME,
    SPEECH_COMMANDS_WORDS,
    TEST_SET_DIRNAME,
    generate_speech_commands,
    speech_commands_split,
)

# a small corpus for the tests that generate more than once
SMALL = dict(words=("yes", "no", "up"), unknown_words=("cat",), speakers=3, utterances_per_word=4)


def _speaker(rel: str) -> str:
    return re.sub(r"_nohash_.*$", "", Path(rel).name)


def _word_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.glob("*/*.wav")
        if p.parent.name != "_background_noise_"
    )


def _all_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.wav"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The default corpus, generated once."""
    root = tmp_path_factory.mktemp("sc") / "speech_commands_v0.01"
    return generate_speech_commands(root, progress=False)


def test_layout(corpus):
    root = corpus
    test = root.parent / TEST_SET_DIRNAME
    assert root.is_dir() and test.is_dir()
    words = SPEECH_COMMANDS_WORDS + DEFAULT_UNKNOWN_WORDS
    assert {p.name for p in root.iterdir() if p.is_dir()} == set(words) | {"_background_noise_"}
    for w in words:
        assert re.fullmatch(r"[0-9a-f]{8}_nohash_\d+\.wav", next((root / w).glob("*.wav")).name)
    assert len(list((root / "_background_noise_").glob("*.wav"))) >= 2
    assert (root / MANIFEST_NAME).is_file() and (test / MANIFEST_NAME).is_file()

    files = set(_word_files(root))
    for name in ("validation_list.txt", "testing_list.txt"):
        listed = (root / name).read_text().splitlines()
        assert listed and set(listed) <= files

    # the test folder: the 10 keywords + _unknown_ + _silence_, all non-empty
    dirs = {p.name for p in test.iterdir() if p.is_dir()}
    assert dirs == set(SPEECH_COMMANDS_WORDS) | {"_unknown_", "_silence_"}
    assert all(any((test / d).glob("*.wav")) for d in dirs)
    # its keyword clips are the testing_list clips, byte for byte
    testing = (root / "testing_list.txt").read_text().splitlines()
    keyword_tests = [r for r in testing if r.split("/")[0] in SPEECH_COMMANDS_WORDS]
    assert sorted(keyword_tests) == sorted(
        p.relative_to(test).as_posix() for w in SPEECH_COMMANDS_WORDS for p in (test / w).glob("*.wav")
    )
    for rel in keyword_tests:
        assert (test / rel).read_bytes() == (root / rel).read_bytes()


def test_audio_format(corpus):
    root = corpus
    test = root.parent / TEST_SET_DIRNAME
    sample = _word_files(root)[::7] + [p.relative_to(root).as_posix() for p in (root / "yes").glob("*.wav")]
    for rel in sample:
        info = sf.info(str(root / rel))
        assert (info.samplerate, info.channels, info.frames, info.subtype, info.format) == (
            16000, 1, 16000, "PCM_16", "WAV"
        ), rel
        x, _ = sf.read(str(root / rel), dtype="int16")
        x = x.astype(np.float64) / 32768
        assert np.sqrt(np.mean(x**2)) > 0.01, f"{rel} is (nearly) silent"
        assert np.abs(x).max() > 0.1, rel
    for p in list((root / "_background_noise_").glob("*.wav")) + list((test / "_silence_").glob("*.wav")):
        info = sf.info(str(p))
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
    for p in (root / "_background_noise_").glob("*.wav"):
        assert sf.info(str(p)).frames >= 5 * 16000


def test_splits_are_by_speaker(corpus):
    root = corpus
    files = _word_files(root)
    val = set((root / "validation_list.txt").read_text().splitlines())
    tst = set((root / "testing_list.txt").read_text().splitlines())
    train = set(files) - val - tst
    assert val and tst and train and not (val & tst)
    spk = {name: {_speaker(r) for r in rels} for name, rels in (("train", train), ("val", val), ("test", tst))}
    assert not (spk["train"] & spk["val"])
    assert not (spk["train"] & spk["test"])
    assert not (spk["val"] & spk["test"])
    # the lists agree with the hash rule s3prl recomputes from the file names
    for rel in files:
        expected = {"validation": val, "testing": tst, "training": train}[speech_commands_split(_speaker(rel))]
        assert rel in expected, rel


def test_cache_hit_does_not_rewrite(corpus):
    root = corpus
    before = {p: p.stat().st_mtime_ns for p in root.parent.rglob("*") if p.is_file()}
    assert generate_speech_commands(root, progress=False) == root
    after = {p: p.stat().st_mtime_ns for p in root.parent.rglob("*") if p.is_file()}
    assert after == before


def test_deterministic_and_parameter_sensitive(tmp_path):
    a = generate_speech_commands(tmp_path / "a" / "sc", progress=False, **SMALL)
    b = generate_speech_commands(tmp_path / "b" / "sc", progress=False, **SMALL)
    for sub in ("sc", TEST_SET_DIRNAME):
        fa, fb = _all_files(a.parent / sub), _all_files(b.parent / sub)
        assert fa.keys() == fb.keys() and len(fa) > 0
        assert all(fa[k] == fb[k] for k in fa), sub
    for name in ("validation_list.txt", "testing_list.txt", MANIFEST_NAME):
        assert (a / name).read_bytes() == (b / name).read_bytes()

    # other parameters on the same root: regenerated, different content, cache key updated
    old = _all_files(b)
    generate_speech_commands(b, progress=False, seed=1, **SMALL)
    new = _all_files(b)
    assert new.keys() != old.keys() or any(new[k] != old[k] for k in new)
    assert '"seed": 1' in (b / MANIFEST_NAME).read_text()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_generate", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_speech_commands(tmp_path / "sc", progress=False, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_bad_library_names_its_path(tmp_path):
    lib = tmp_path / "no-such-libespeak-ng.so"
    with pytest.raises(RuntimeError, match=re.escape(str(lib))):
        generate_speech_commands(tmp_path / "sc", progress=False, espeak_library=str(lib), **SMALL)


@pytest.mark.parametrize("voice", ["xx-nosuchlang", "en-us+nosuchvariant"])
def test_unknown_voice_is_named(tmp_path, voice):
    speakers = [("en-us+m1", 160, 50), (voice, 160, 50), ("en+f1", 170, 60)]
    kw = dict(SMALL, speakers=speakers)
    with pytest.raises(ValueError, match=re.escape(voice)):
        generate_speech_commands(tmp_path / "sc", progress=False, **kw)
    assert not (tmp_path / "sc").exists()


def test_breath_voices_are_flagged():
    data = synth.EspeakSynthesizer().data
    assert espeak.has_breath(data, "en+f3") and not espeak.has_breath(data, "en+f1")
    assert not any(espeak.has_breath(data, v) for v, _, _ in synth.default_speakers(30))


def test_refuses_foreign_folder_and_bad_counts(tmp_path):
    foreign = tmp_path / "sc"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not a corpus")
    with pytest.raises(FileExistsError):
        generate_speech_commands(foreign, progress=False, **SMALL)
    assert (foreign / "mine.txt").exists()
    with pytest.raises(ValueError):
        generate_speech_commands(tmp_path / "x", progress=False, **dict(SMALL, speakers=2))
    with pytest.raises(ValueError):
        generate_speech_commands(tmp_path / "x", progress=False, **dict(SMALL, utterances_per_word=2))
    with pytest.raises(ValueError):
        generate_speech_commands(tmp_path / "x", progress=False, **dict(SMALL, unknown_words=("yes",)))


def test_split_rule_matches_speech_commands():
    # values of the reference rule (which_set of the Speech Commands README)
    import hashlib

    for h in ("0a7c2a8d", "3f6e8332", "ffffffff", "00000000"):
        pct = (int(hashlib.sha1(h.encode()).hexdigest(), 16) % 2**27) * (100.0 / (2**27 - 1))
        want = "validation" if pct < 10 else "testing" if pct < 20 else "training"
        assert speech_commands_split(h) == want


def test_held_out_speakers_use_variants_heard_in_training():
    # New speakers at test time, but no voice variant that no training speaker has.
    from collections import Counter

    for n, held_out in ((20, 0.1), (48, 1 / 6), (64, 0.2)):
        speakers = assign_speakers(synth.default_speakers(n), 0, held_out)
        variants = Counter(s.voice.partition("+")[2] for s in speakers)
        trained = Counter(s.voice.partition("+")[2] for s in speakers if s.split == "training")
        assert all(2 * trained[v] >= count for v, count in variants.items())  # at least half of each in training
        assert sum(s.split == "validation" for s in speakers) == sum(s.split == "testing" for s in speakers) == round(held_out * n)
