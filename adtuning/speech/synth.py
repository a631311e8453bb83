"""A deterministic, generated keyword-spotting corpus in the Speech Commands v0.01 layout.

The words are synthesised with espeak-ng, loaded through ctypes from the ``espeakng-loader``
package (a dependency of adtuning), which ships ``libespeak-ng`` and its voice data.
Nothing is downloaded. The corpus is small by default (the tests use it) and as large as
asked (the CLI's embedded KS run, registered in :mod:`adtuning.embedded`).

Layout written by :func:`generate_speech_commands` (``root`` is the training folder; the
test folder is its sibling, as the two archives of the real corpus unpack)::

    <root>/                                  # like speech_commands_v0.01/
        yes/ no/ ... go/                      # the keywords
        bed/ cat/ ...                         # filler words, read as _unknown_
            <speakerhash>_nohash_<i>.wav      # 16 kHz mono PCM-16, exactly 1 s
        _background_noise_/                   # white/pink/brown noise, several seconds
            white_noise.wav ...               #   (the source of _silence_ in training)
        validation_list.txt                   # relative paths, split by speaker hash
        testing_list.txt                      #   exactly as Speech Commands / s3prl do
        adtuning_synth.json                   # manifest: parameters + version, written last
    <root>/../speech_commands_test_set_v0.01/ # like the separate test archive
        yes/ ... go/                          # the clips of testing_list.txt (same bytes)
        _unknown_/<word>_<speakerhash>_nohash_<i>.wav
        _silence_/<noise>_noise_<k>.wav       # 1 s noise crops, some nearly silent
        adtuning_synth.json

A *speaker* is an espeak voice with a variant (``"en-us+f3"``), a speaking rate (words per
minute) and a pitch (0-100), named by an 8-hex-digit hash. The hashes are chosen so that the
Speech Commands rule (``sha1(hash)`` mod 2**27 as a percentage: < 10 validation, < 20
testing, else training; see :func:`speech_commands_split`) puts about 10 % of the speakers in
validation and 10 % in testing, at least one each; the list files agree with that rule, so
readers that recompute it (s3prl) and readers that read the lists see the same split.

Reproducibility: the same call gives byte-identical files. espeak-ng keeps internal state
between utterances (pitch flutter, phase), so each speaker is synthesised in a fresh,
stdlib-only subprocess that runs a fixed sequence of utterances; the post-processing (trim,
resample, placement, gain, noise) is seeded per clip.

The synthesis code is split by concern: the espeak-ng binding (:mod:`adtuning.speech.espeak`),
the speakers (:mod:`adtuning.speech.speakers`), the toolkit every generated corpus shares —
seeding, rendering, manifests, the generation loop — (:mod:`adtuning.speech.synthesis`), and
this module, the keyword corpus. The names this module exported before the split are
re-exported here.
"""
from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Sequence

from adtuning.speech.espeak import EspeakSynthesizer, has_breath, synthesizer
from adtuning.speech.speakers import (
    Speaker,
    assign_speakers,
    default_speakers,
    pretraining_speakers,
    speech_commands_split,
)
from adtuning.speech.synthesis import (
    MANIFEST_NAME,
    NOISE_KINDS,
    OWNER_MARKER,
    SAMPLE_RATE,
    check_words,
    is_ours_or_empty,
    jitter,
    move_into_place,
    noise,
    quantise,
    read_manifest,
    render_utterance,
    rng,
    run_plans,
    synthesise_corpus,
    trim_and_resample,
    write_manifest,
    write_wav,
)

__all__ = [
    "SPEECH_COMMANDS_WORDS",
    "UNKNOWN_WORDS",
    "DEFAULT_UNKNOWN_WORDS",
    "TEST_SET_DIRNAME",
    "MANIFEST_NAME",
    "SAMPLE_RATE",
    "SYNTH_VERSION",
    "Speaker",
    "EspeakSynthesizer",
    "speech_commands_split",
    "default_speakers",
    "pretraining_speakers",
    "speech_commands_test_root",
    "generate_speech_commands",
    "synthesise_corpus",
    "trim_and_resample",
    "place_word",
    "render_utterance",
    "jitter",
]

SPEECH_COMMANDS_WORDS: tuple[str, ...] = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
)
"""The ten keywords of the 12-class Speech Commands task (plus _unknown_ and _silence_)."""

UNKNOWN_WORDS: tuple[str, ...] = (
    "bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin",
    "nine", "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero",
)
"""The twenty filler words of Speech Commands v0.01; any of them is read as _unknown_."""

DEFAULT_UNKNOWN_WORDS: tuple[str, ...] = ("bed", "cat", "dog", "house", "marvin", "wow")
"""The filler words of the default (small) corpus."""

TEST_SET_DIRNAME = "speech_commands_test_set_v0.01"
"""Name of the test folder written next to the training folder (the real archive's name)."""

SYNTH_VERSION = 4  # 2: even base pitches, held-out fraction; 3, 4: held-out speakers stratified by voice variant
"""Bumped whenever the generated bytes change for equal parameters; invalidates caches."""

_CLIP = SAMPLE_RATE  # 1 s clips


def _place(pcm: bytes, rng):
    """Trim espeak's silences, resample to 16 kHz and :func:`place_word` the word."""
    return place_word(trim_and_resample(pcm, _CLIP - 160), rng)  # at most 0.99 s of speech


def place_word(y, rng):
    """A trimmed 16 kHz word (float samples, at most 1 s) as a KS clip of this corpus: scaled to
    a peak drawn from 0.25-0.8, put at a random offset in 1 s, a noise floor 28-42 dB below the
    peak added, quantised. Returns int16 of length 16000. Out-of-domain check sets render their
    words through it too, so that only the speech differs from the training clips."""
    import numpy as np

    y = np.array(y, dtype=np.float64)[:_CLIP]
    peak = float(np.abs(y).max(initial=0.0))
    if peak > 0:
        y *= rng.uniform(0.25, 0.8) / peak
    clip = np.zeros(_CLIP, dtype=np.float64)
    off = int(rng.integers(0, _CLIP - len(y) + 1))
    clip[off : off + len(y)] = y
    level = float(np.abs(y).max(initial=0.0)) or 0.5
    clip += rng.standard_normal(_CLIP) * level * 10 ** (-rng.uniform(28.0, 42.0) / 20)
    return quantise(clip)



def speech_commands_test_root(root: str | os.PathLike) -> Path:
    """The test folder written by :func:`generate_speech_commands` for training folder
    ``root``: ``root/../speech_commands_test_set_v0.01``."""
    return Path(root).parent / TEST_SET_DIRNAME


def generate_speech_commands(
    root: str | os.PathLike,
    *,
    utterances_per_word: int = 20,
    unknown_words: Sequence[str] | int = DEFAULT_UNKNOWN_WORDS,
    speakers: int | Sequence[tuple[str, int, int]] = 10,
    words: Sequence[str] = SPEECH_COMMANDS_WORDS,
    noise_seconds: float = 10.0,
    held_out_speakers: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    jobs: int | None = None,
    espeak_library: str | None = None,
    espeak_data: str | None = None,
) -> Path:
    """Synthesise a Speech Commands v0.01-style corpus (train folder + test folder).

    Args:
        root: the training folder to create (the role of ``speech_commands_v0.01``). The
            test folder is created next to it, see :func:`speech_commands_test_root`.
        utterances_per_word: clips per word (keyword or filler) over all speakers, spread
            evenly (speaker ``j`` gets ``_nohash_0`` ... ``_nohash_{m-1}``); at least the
            number of speakers.
        unknown_words: filler words (read as ``_unknown_``), or how many of
            :data:`UNKNOWN_WORDS` to take from the front.
        speakers: how many speakers (:func:`default_speakers`), or explicit
            ``(voice, rate, pitch)`` triples such as ``("en-us+f1", 160, 55)``; at least 3.
            Variants with breath noise (f2, f3, f5, whisper, ...) are not reproducible
            in espeak-ng and give a warning.
        words: the keywords (default: the ten of Speech Commands).
        noise_seconds: length of each ``_background_noise_`` file.
        held_out_speakers: fraction of the speakers in validation, and as many again in
            testing (the real corpus: 0.1). Hashes are chosen so that the Speech Commands
            hash rule gives exactly this assignment.
        seed: everything random (speakers, splits, jitter, placement, gains, noise) derives
            from it; equal arguments give byte-identical files.
        progress: show a tqdm progress bar.
        jobs: parallel espeak-ng worker processes (default: CPU count, at most 4). Does not
            change the output.
        espeak_library, espeak_data: override the paths of espeakng-loader.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Caching: when ``root`` and the test folder hold a complete corpus made with the same
    parameters and :data:`SYNTH_VERSION` (their manifests say so), nothing is done. Both
    folders are generated in temporary siblings and renamed into place; the manifest of
    ``root`` is written last, atomically, so an interrupted run never looks complete (a
    killed run may leave hidden ``.<name>.partial-*`` siblings, safe to delete).
    Existing folders are replaced only when a previous run of this function made them (or
    they are empty).

    Raises:
        RuntimeError: espeak-ng cannot be loaded or initialised (names the library path).
        ValueError: unknown voice, bad word lists or counts.
        FileExistsError: ``root`` or the test folder exists with foreign content.
    """
    root = Path(root).absolute()
    test_root = speech_commands_test_root(root)
    words = check_words(words, "word")
    if isinstance(unknown_words, int):
        if not 0 <= unknown_words <= len(UNKNOWN_WORDS):
            raise ValueError(f"unknown_words must be in [0, {len(UNKNOWN_WORDS)}], got {unknown_words}")
        unknown_words = UNKNOWN_WORDS[:unknown_words]
    unknown = check_words(unknown_words, "unknown word")
    if set(words) & set(unknown):
        raise ValueError(f"words and unknown_words overlap: {sorted(set(words) & set(unknown))}")
    if isinstance(speakers, int):
        if speakers < 3:
            raise ValueError(f"need at least 3 speakers (training/validation/testing), got {speakers}")
        triples = default_speakers(speakers, seed)
    else:
        triples = [(str(v), int(r), int(p)) for v, r, p in speakers]
        if len(triples) < 3:
            raise ValueError(f"need at least 3 speakers (training/validation/testing), got {len(triples)}")
    if utterances_per_word < len(triples):
        raise ValueError(
            f"utterances_per_word ({utterances_per_word}) must be at least the number of "
            f"speakers ({len(triples)})"
        )
    if noise_seconds < 1:
        raise ValueError(f"noise_seconds must be >= 1, got {noise_seconds}")
    if not 0 < held_out_speakers < 0.5:
        raise ValueError(f"held_out_speakers must be in (0, 0.5), got {held_out_speakers}")

    params = {
        "words": words, "unknown_words": unknown, "utterances_per_word": int(utterances_per_word),
        "speakers": [list(t) for t in triples], "noise_seconds": float(noise_seconds),
        "seed": int(seed), "sample_rate": SAMPLE_RATE, "held_out_speakers": float(held_out_speakers),
    }
    key = {"generator": "adtuning.speech.synth", "version": SYNTH_VERSION, "params": params,
           "train_dir": root.name}  # one corpus per parent folder: the test folder is shared

    def cached() -> bool:
        for folder in (root, test_root):
            m = read_manifest(folder)
            if m is None or {k: m.get(k) for k in key} != key:
                return False
        return True

    if cached():
        return root
    for folder in (root, test_root):
        if not is_ours_or_empty(folder):
            raise FileExistsError(
                f"{folder} exists and was not made by generate_speech_commands; remove it or "
                "choose another root"
            )

    # Validate the voices in-process (clear errors before any work); the corpus itself is
    # synthesised in fresh worker processes.
    synth = synthesizer(espeak_library, espeak_data)
    voices = sorted({t[0] for t in triples})
    for voice in voices:
        synth.set_voice(voice)
    for voice in voices:
        if has_breath(synth.data, voice):
            warnings.warn(
                f"espeak-ng voice {voice!r} uses breath noise, which is not reproducible: "
                "the corpus will not be byte-identical from run to run",
                stacklevel=2,
            )

    spk = assign_speakers(triples, seed, held_out_speakers)
    tag = f"partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_train = root.parent / f".{root.name}.{tag}"
    tmp_test = test_root.parent / f".{test_root.name}.{tag}"
    try:
        for d in (tmp_train, tmp_test):
            d.mkdir(parents=True)
            (d / OWNER_MARKER).touch()
        counts = _generate(tmp_train, tmp_test, spk, words, unknown, params, synth, progress, jobs)
        if cached():  # someone else finished the same corpus meanwhile
            return root
        info = dict(key, espeak_version=synth.version, counts=counts,
                    speakers_detail=[s.__dict__ for s in spk])
        write_manifest(tmp_test, info)
        (root / MANIFEST_NAME).unlink(missing_ok=True)  # root is incomplete from here on
        move_into_place(tmp_test, test_root)
        move_into_place(tmp_train, root)
        write_manifest(root, info)
    finally:
        for d in (tmp_train, tmp_test):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
    return root


def _generate(train: Path, test: Path, spk: list[Speaker], words: list[str], unknown: list[str],
              params: dict, synth: EspeakSynthesizer, progress: bool, jobs: int | None) -> dict:
    """Write all files of both folders into ``train`` and ``test``; return counts."""
    import numpy as np

    seed, n_utt = params["seed"], params["utterances_per_word"]
    all_words = words + unknown
    per_spk = [n_utt // len(spk) + (1 if j < n_utt % len(spk) else 0) for j in range(len(spk))]

    # the fixed synthesis plan of each speaker: (word, i, voice, rate, pitch)
    plans = []
    for j, s in enumerate(spk):
        plan = []
        for w in all_words:
            for i in range(per_spk[j]):
                r = rng("jitter", seed, s.hash, w, i)
                rate = int(np.clip(round(s.rate * r.uniform(0.9, 1.1)), 80, 450))
                pitch = int(np.clip(s.pitch + int(r.integers(-4, 5)), 0, 100))
                plan.append((w, i, s.voice, rate, pitch))
        plans.append(plan)

    lists: dict[str, list[str]] = {"validation": [], "testing": []}
    test_unknown: list[tuple[str, Path]] = []
    n_test_keyword = 0

    def consume(j: int, k: int, pcm: bytes) -> None:
        nonlocal n_test_keyword
        s, (w, i, *_) = spk[j], plans[j][k]
        if not pcm:
            raise RuntimeError(f"espeak-ng produced no audio for {w!r} ({s.voice})")
        rel = f"{w}/{s.hash}_nohash_{i}.wav"
        write_wav(train / rel, _place(pcm, rng("clip", seed, s.hash, w, i)))
        if s.split != "training":
            lists[s.split].append(rel)
        if s.split == "testing":
            if w in words:
                (test / w).mkdir(exist_ok=True)
                shutil.copyfile(train / rel, test / rel)
                n_test_keyword += 1
            else:
                test_unknown.append((rel, test / "_unknown_" / f"{w}_{s.hash}_nohash_{i}.wav"))

    run_plans([[(v, r, p, w) for w, _, v, r, p in plan] for plan in plans], consume, desc="synthesising speech commands",
              unit="clip", progress=progress, jobs=jobs, engine=synth)
    total = sum(len(p) for p in plans)

    for name in ("validation", "testing"):
        (train / f"{name}_list.txt").write_text("".join(f"{p}\n" for p in sorted(lists[name])))

    # training noise: long files, the source of _silence_ for readers like s3prl
    n_noise = int(round(params["noise_seconds"] * SAMPLE_RATE))
    for kind in NOISE_KINDS:
        gen = rng("background", seed, kind)
        write_wav(train / "_background_noise_" / f"{kind}_noise.wav", quantise(noise(kind, n_noise, gen) * gen.uniform(0.2, 0.5)))

    # test _unknown_ and _silence_: about as many clips as one keyword has
    n_class = max(1, n_test_keyword // max(1, len(words)))
    (test / "_unknown_").mkdir()
    if test_unknown:
        pick = sorted(rng("test-unknown", seed).choice(len(test_unknown), min(n_class, len(test_unknown)), replace=False))
        for k in pick:
            rel, dst = test_unknown[int(k)]
            shutil.copyfile(train / rel, dst)
    (test / "_silence_").mkdir()
    for k in range(n_class):
        gen = rng("test-silence", seed, k)
        kind = NOISE_KINDS[int(gen.integers(len(NOISE_KINDS)))]
        gain = 0.0005 if k % 4 == 0 else gen.uniform(0.01, 0.3)  # some nearly digital silence
        write_wav(test / "_silence_" / f"{kind}_noise_{k}.wav", quantise(noise(kind, _CLIP, gen) * gain))

    return {
        "clips": total, "validation": len(lists["validation"]), "testing": len(lists["testing"]),
        "test_keyword_clips": n_test_keyword, "test_unknown_clips": min(n_class, len(test_unknown)),
        "test_silence_clips": n_class, "background_noise_files": len(NOISE_KINDS),
    }
