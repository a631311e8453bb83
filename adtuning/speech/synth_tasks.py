"""Generated corpora for the utterance-level SUPERB tasks SID and IC, in the real corpora's layouts.

Both are synthesised with espeak-ng through the helpers of :mod:`adtuning.speech.synthesis` (one
fresh espeak-ng process per speaker, so equal arguments give byte-identical files) and are read
unchanged by the real readers (:class:`~adtuning.speech.corpora.VoxCeleb1Dataset`,
:class:`~adtuning.speech.corpora.FluentCommandsDataset`). Speakers come from
:func:`adtuning.speech.speakers.default_speakers` (even base pitches), so they are disjoint from
the embedded upstream's pre-training speakers (odd base pitches); each task draws them with its
own seed, so the two tasks' speakers differ too. The manifest (``adtuning_synth.json``,
parameters + version) is written last: a folder without it (an interrupted generation) is
regenerated, and changed parameters invalidate the cache.

:func:`generate_voxceleb1` (SID) writes::

    <root>/
        wav/id1xxxx/<video>/<nnnnn>.wav   # 16 kHz mono PCM-16, silence-trimmed, <= max_seconds
        iden_split.txt                    # "<1|2|3> id1xxxx/<video>/<nnnnn>.wav" (train/dev/test)
        adtuning_synth.json

  Speaker identification is closed-set: every speaker appears in every split. A speaker is a
  (voice variant, language, rate, pitch) combination; each "video" is a recording session with
  its own channel (gain, noise colour and level) and a slight rate offset, and the last
  ``test_videos`` videos of each speaker are the test set, the ``dev_videos`` before them the
  dev set (so dev/test measure identity across sessions, not memorised channels).

:func:`generate_fluent_commands` (IC) writes::

    <root>/
        wavs/speakers/<speakerId>/<uuid>.wav     # 16 kHz mono PCM-16
        data/{train,valid,test}_data.csv         # ,path,speakerId,transcription,action,object,location
        adtuning_synth.json

  The 31 intents (action, object, location) of Fluent Speech Commands, each said by every
  speaker once in a phrasing drawn from a few templates per intent (:data:`FSC_INTENTS`,
  :func:`fsc_phrasings`). Speakers are split train/valid/test (disjoint), every voice variant
  keeping training speakers (:func:`adtuning.speech.speakers.assign_speakers`).
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import uuid
from pathlib import Path

from adtuning.speech import synthesis
from adtuning.speech.pretraining_corpus import pretraining_vocabulary
from adtuning.speech.speakers import assign_speakers, default_speakers

__all__ = ["SID_CORPUS_VERSION", "IC_CORPUS_VERSION", "FSC_INTENTS", "fsc_phrasings", "distinct_speakers",
           "generate_voxceleb1", "generate_fluent_commands"]

SID_CORPUS_VERSION = 1
"""Bumped whenever the SID corpus's bytes change for equal parameters; invalidates caches."""
IC_CORPUS_VERSION = 1
"""Bumped whenever the IC corpus's bytes change for equal parameters; invalidates caches."""


# --------------------------------------------------------------------------- SID (VoxCeleb1)


def distinct_speakers(n: int, seed: int, min_pitch_gap: int = 6, min_rate_gap: int = 20) -> list[tuple[str, int, int]]:
    """The first ``n`` :func:`~adtuning.speech.speakers.default_speakers` of ``seed`` that differ
    from every kept speaker of the same voice by at least ``min_pitch_gap`` in pitch or
    ``min_rate_gap`` wpm in rate: for identification, two speakers of one voice with nearly
    equal pitch and rate would be the same person under per-utterance jitter."""
    pool = default_speakers(50 * n + 50, seed)
    kept: list[tuple[str, int, int]] = []
    for voice, rate, pitch in pool:
        if all(v != voice or abs(p - pitch) >= min_pitch_gap or abs(r - rate) >= min_rate_gap for v, r, p in kept):
            kept.append((voice, rate, pitch))
            if len(kept) == n:
                return kept
    raise ValueError(f"cannot find {n} distinct speakers (min_pitch_gap={min_pitch_gap}, min_rate_gap={min_rate_gap})")


def _video_id(seed: int, speaker: int, video: int) -> str:
    # YouTube-like 11-character ids, as VoxCeleb1's video folders.
    digest = hashlib.sha1(f"adtuning-sid|{seed}|{speaker}|{video}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:11]


def generate_voxceleb1(
    root: str | os.PathLike,
    *,
    speakers: int = 32,
    videos_per_speaker: int = 5,
    utterances_per_video: int = 4,
    dev_videos: int = 1,
    test_videos: int = 1,
    max_seconds: float = 3.0,
    words: tuple[int, int] = (2, 5),
    min_pitch_gap: int = 6,
    min_rate_gap: int = 20,
    seed: int = 1,
    progress: bool = True,
    jobs: int | None = None,
) -> Path:
    """Synthesise a VoxCeleb1-layout speaker-identification corpus into ``root`` (cached:
    nothing is done when ``root`` holds a complete corpus with equal parameters).

    Args:
        root: the folder to create (replaced only if this module made it, or it is empty).
        speakers: number of speakers (:func:`distinct_speakers` of ``seed``), ids ``id10001``...
        videos_per_speaker: sessions per speaker, each with its own channel.
        utterances_per_video: utterances per session: random phrases of 2-5 words from the
            shipped vocabulary (speaker identity is in the voice, not the words).
        dev_videos, test_videos: how many of each speaker's sessions (the last ones) form the
            dev and test splits; the others are training.
        max_seconds: longer utterances are cut.
        words: (fewest, most) words per phrase.
        min_pitch_gap, min_rate_gap: how far apart two speakers of one voice are at least, in
            pitch or in rate (see :func:`distinct_speakers`).
        seed: speakers, phrases, jitter, channels and gains derive from it.
        progress: a tqdm bar.
        jobs: parallel espeak-ng processes (default: CPU count, at most 4); output unchanged.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root).absolute()
    if speakers < 2 or utterances_per_video < 1 or dev_videos < 1 or test_videos < 1 \
            or videos_per_speaker < dev_videos + test_videos + 1:
        raise ValueError("need >= 2 speakers, >= 1 utterance per video, >= 1 dev and test video and at least "
                         f"one training video; got speakers={speakers}, videos_per_speaker={videos_per_speaker}, "
                         f"utterances_per_video={utterances_per_video}, dev_videos={dev_videos}, test_videos={test_videos}")
    if not 1 <= words[0] <= words[1]:
        raise ValueError(f"words must be (fewest, most) with 1 <= fewest <= most, got {words}")
    vocabulary = pretraining_vocabulary()
    triples = distinct_speakers(speakers, seed, min_pitch_gap, min_rate_gap)
    params = {"speakers": [list(t) for t in triples], "videos_per_speaker": int(videos_per_speaker),
              "utterances_per_video": int(utterances_per_video), "dev_videos": int(dev_videos),
              "test_videos": int(test_videos), "max_seconds": float(max_seconds), "seed": int(seed),
              "words": [int(words[0]), int(words[1])], "vocabulary_size": len(vocabulary), "sample_rate": synthesis.SAMPLE_RATE}
    key = {"generator": "adtuning.speech.synth_tasks.generate_voxceleb1", "version": SID_CORPUS_VERSION, "params": params}

    plans, meta = [], []  # meta[j][i] = (relative path, split id, channel)
    for j, (voice, rate, pitch) in enumerate(triples):
        plan, info = [], []
        for v in range(videos_per_speaker):
            ch = synthesis.rng("sid-channel", seed, j, v)
            # A session: its own rate offset, noise colour and level (the channel).
            channel = (float(ch.uniform(0.96, 1.04)), str(ch.choice(synthesis.NOISE_KINDS)), float(ch.uniform(22.0, 40.0)))
            which = "3" if v >= videos_per_speaker - test_videos else "2" if v >= videos_per_speaker - test_videos - dev_videos else "1"
            video = _video_id(seed, j, v)
            for k in range(utterances_per_video):
                r = synthesis.rng("sid-phrase", seed, j, v, k)
                text = " ".join(vocabulary[int(i)] for i in r.integers(0, len(vocabulary), int(r.integers(words[0], words[1] + 1))))
                plan.append((voice, *synthesis.jitter(("sid", seed, j, v, k), rate, pitch, channel[0], 0.04, 1), text))
                info.append((f"id{10001 + j}/{video}/{k + 1:05d}.wav", which, channel))
        plans.append(plan)
        meta.append(info)
    max_samples = int(max_seconds * synthesis.SAMPLE_RATE)

    def write(tmp: Path, j: int, i: int, pcm: bytes) -> None:
        rel, _, (_, kind, snr) = meta[j][i]
        y = synthesis.render_utterance(pcm, synthesis.rng("sid-gain", seed, j, i), max_samples, (snr - 2.0, snr + 2.0), kind)
        synthesis.write_wav(tmp / "wav" / rel, y)

    def finish(tmp: Path) -> int:
        lines = [f"{which} {rel}\n" for info in meta for rel, which, _ in info]
        (tmp / "iden_split.txt").write_text("".join(lines))
        return len(lines)

    return synthesis.synthesise_corpus(root, key, plans, write, finish, desc="synthesising SID corpus (VoxCeleb1 layout)",
                       progress=progress, jobs=jobs)


# --------------------------------------------------------------------------- IC (Fluent Speech Commands)

FSC_INTENTS: tuple[tuple[str, str, str], ...] = (
    ("activate", "lamp", "none"), ("activate", "lights", "bedroom"), ("activate", "lights", "kitchen"),
    ("activate", "lights", "none"), ("activate", "lights", "washroom"), ("activate", "music", "none"),
    ("bring", "juice", "none"), ("bring", "newspaper", "none"), ("bring", "shoes", "none"), ("bring", "socks", "none"),
    ("change language", "Chinese", "none"), ("change language", "English", "none"),
    ("change language", "German", "none"), ("change language", "Korean", "none"),
    ("change language", "none", "none"),
    ("deactivate", "lamp", "none"), ("deactivate", "lights", "bedroom"), ("deactivate", "lights", "kitchen"),
    ("deactivate", "lights", "none"), ("deactivate", "lights", "washroom"), ("deactivate", "music", "none"),
    ("decrease", "heat", "bedroom"), ("decrease", "heat", "kitchen"), ("decrease", "heat", "none"),
    ("decrease", "heat", "washroom"), ("decrease", "volume", "none"),
    ("increase", "heat", "bedroom"), ("increase", "heat", "kitchen"), ("increase", "heat", "none"),
    ("increase", "heat", "washroom"), ("increase", "volume", "none"),
)
"""The 31 (action, object, location) intents of Fluent Speech Commands, with its value spellings."""

# Templates per (action, object); {L} is " in the <location>" or "", {l} is "<location> " or "".
_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("activate", "lights"): ("turn on the {l}lights", "switch on the lights{L}", "lights on{L}"),
    ("activate", "lamp"): ("turn on the lamp", "switch on the lamp", "lamp on"),
    ("activate", "music"): ("play music", "turn on the music", "put on some music"),
    ("deactivate", "lights"): ("turn off the {l}lights", "switch off the lights{L}", "lights off{L}"),
    ("deactivate", "lamp"): ("turn off the lamp", "switch off the lamp", "lamp off"),
    ("deactivate", "music"): ("stop the music", "turn off the music", "pause music"),
    ("increase", "heat"): ("turn up the heat{L}", "increase the heating{L}", "make it warmer{L}"),
    ("decrease", "heat"): ("turn down the heat{L}", "decrease the heating{L}", "make it cooler{L}"),
    ("increase", "volume"): ("turn up the volume", "increase the volume", "make it louder"),
    ("decrease", "volume"): ("turn down the volume", "decrease the volume", "make it quieter"),
    ("bring", "*"): ("bring me the {o}", "fetch my {o}", "get me the {o}"),
    ("change language", "*"): ("change language to {o}", "switch the language to {o}", "set my language to {o}"),
    ("change language", "none"): ("change language", "switch the language", "language settings"),
}


def fsc_phrasings(action: str, obj: str, location: str) -> list[str]:
    """The phrasings of one :data:`FSC_INTENTS` intent (capitalised, as FSC's transcriptions)."""
    templates = _TEMPLATES.get((action, obj)) or _TEMPLATES[(action, "*")]
    where = location != "none"
    return [t.format(o=obj, L=f" in the {location}" if where else "", l=f"{location} " if where else "").capitalize()
            for t in templates]


def generate_fluent_commands(
    root: str | os.PathLike,
    *,
    speakers: int = 40,
    held_out_speakers: float = 0.15,
    max_seconds: float = 3.0,
    seed: int = 2,
    progress: bool = True,
    jobs: int | None = None,
) -> Path:
    """Synthesise a Fluent-Speech-Commands-layout intent-classification corpus into ``root``
    (cached: nothing is done when ``root`` holds a complete corpus with equal parameters).

    Args:
        root: the folder to create (``fluent_speech_commands_dataset``; replaced only if this
            module made it, or it is empty).
        speakers: number of :func:`~adtuning.speech.speakers.default_speakers` of ``seed``; each
            says each of the 31 intents once.
        held_out_speakers: fraction of the speakers in valid, as many in test (at least one each).
        max_seconds: longer utterances are cut.
        seed: speakers, their split, phrasings, jitter and gains derive from it.
        progress: a tqdm bar.
        jobs: parallel espeak-ng processes (default: CPU count, at most 4); output unchanged.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root).absolute()
    if speakers < 3 or not 0 < held_out_speakers < 0.5:
        raise ValueError(f"need >= 3 speakers and 0 < held_out_speakers < 0.5, got {speakers}, {held_out_speakers}")
    spk = assign_speakers(default_speakers(speakers, seed), seed, held_out_speakers)
    params = {"speakers": [[s.voice, s.rate, s.pitch, s.hash, s.split] for s in spk],
              "held_out_speakers": float(held_out_speakers), "max_seconds": float(max_seconds), "seed": int(seed),
              "intents": [list(t) for t in FSC_INTENTS], "sample_rate": synthesis.SAMPLE_RATE}
    key = {"generator": "adtuning.speech.synth_tasks.generate_fluent_commands", "version": IC_CORPUS_VERSION, "params": params}

    plans, rows = [], []  # rows[j][i] = csv row without the index
    for j, s in enumerate(spk):
        plan, info = [], []
        order = synthesis.rng("ic-order", seed, j).permutation(len(FSC_INTENTS))
        for i, n in enumerate(order):
            action, obj, location = FSC_INTENTS[int(n)]
            options = fsc_phrasings(action, obj, location)
            text = options[int(synthesis.rng("ic-phrase", seed, j, i).integers(0, len(options)))]
            plan.append((s.voice, *synthesis.jitter(("ic", seed, j, i), s.rate, s.pitch, 1.0, 0.08, 3), text))
            name = uuid.UUID(bytes=hashlib.sha1(f"adtuning-ic|{seed}|{j}|{i}".encode()).digest()[:16], version=4)
            info.append([f"wavs/speakers/{s.hash}/{name}.wav", s.hash, text, action, obj, location])
        plans.append(plan)
        rows.append(info)
    max_samples = int(max_seconds * synthesis.SAMPLE_RATE)

    def write(tmp: Path, j: int, i: int, pcm: bytes) -> None:
        synthesis.write_wav(tmp / rows[j][i][0], synthesis.render_utterance(pcm, synthesis.rng("ic-gain", seed, j, i), max_samples, (28.0, 42.0)))

    def finish(tmp: Path) -> int:
        (tmp / "data").mkdir()
        for split, name in (("training", "train"), ("validation", "valid"), ("testing", "test")):
            buf = io.StringIO()
            out = csv.writer(buf, lineterminator="\n")
            out.writerow(["", "path", "speakerId", "transcription", "action", "object", "location"])
            selected = [row for s, info in zip(spk, rows) if s.split == split for row in info]
            out.writerows([k, *row] for k, row in enumerate(selected))
            (tmp / "data" / f"{name}_data.csv").write_text(buf.getvalue(), encoding="utf-8")
        return sum(map(len, rows))

    return synthesis.synthesise_corpus(root, key, plans, write, finish, desc="synthesising IC corpus (Fluent Speech Commands layout)",
                       progress=progress, jobs=jobs)
