"""A generated two-speaker diarization corpus (SD) in the LibriMix / Kaldi layout of s3prl's recipe.

Synthesised with espeak-ng through :mod:`adtuning.speech.synthesis` (one fresh espeak-ng process per
speaker, so equal arguments give byte-identical files) and read unchanged by
:class:`~adtuning.speech.corpora.LibriMixDiarizationDataset`. :func:`generate_librimix` writes::

    <root>/                                              # the role of s3prl's diarization data/
        train/ dev/ test/                                # Kaldi data folders:
            wav.scp      # "<rec> ../wav16k/max/<subset>/mix_both/<rec>.wav" (relative to the folder)
            segments     # "<utt> <rec> <start s> <end s>": one speaker turn
            utt2spk  spk2utt  reco2dur  rttm
        wav16k/max/{train-100,dev,test}/mix_both/<rec>.wav   # 16 kHz mono PCM-16 mixtures
        adtuning_synth.json                              # manifest (parameters + version), written last

A recording mixes two speakers of its split taking turns (2-4 alternating turns of a 2-5-word
sentence from the shipped ASR vocabulary). Each next turn either overlaps the previous one (with
probability ``overlap_probability``, by a fraction of the shorter turn drawn from ``overlap``) or
follows it after a pause of 0.1-0.5 s; a speaker's own turns never overlap. Every turn starts and
ends on the 10 ms label grid (turns are padded with silence to a whole number of 160-sample
frames), so the segment times are exactly where each speaker's audio is. Levels differ by up to
+-3 dB between the speakers and a low background noise covers the whole recording.

Speakers are :func:`~adtuning.speech.speakers.default_speakers` (even base pitches: disjoint from the
embedded upstream's pre-training speakers), split into train / dev / test speakers (disjoint,
every voice variant keeping training speakers). They get LibriSpeech-like integer ids.
"""
from __future__ import annotations

import os
from pathlib import Path

from adtuning.speech import synthesis
from adtuning.speech.speakers import assign_speakers, default_speakers
from adtuning.speech.synth_asr import librispeech_vocabulary

__all__ = ["LIBRIMIX_CORPUS_VERSION", "FRAME", "AUDIO_SUBSETS", "generate_librimix"]

LIBRIMIX_CORPUS_VERSION = 1
"""Bumped whenever the corpus's bytes change for equal parameters; invalidates caches."""

FRAME = 160
"""Samples per label frame (10 ms, the recipe's frame_shift): every segment boundary is a multiple."""

AUDIO_SUBSETS = {"train": "train-100", "dev": "dev", "test": "test"}
"""LibriMix's audio folder of each Kaldi data folder."""

_SPLIT_OF = {"training": "train", "validation": "dev", "testing": "test"}


def _place_turns(lengths: list[int], rng, overlap: tuple[float, float], overlap_probability: float) -> list[int]:
    """Start sample of each alternating turn (all on the frame grid), first after 0.2-0.6 s."""
    starts = [FRAME * int(rng.integers(20, 61))]
    ends = [starts[0] + lengths[0]]
    for t in range(1, len(lengths)):
        if rng.random() < overlap_probability:
            cut = FRAME * int(rng.uniform(*overlap) * min(lengths[t - 1], lengths[t]) / FRAME)
            start = ends[t - 1] - cut
        else:
            start = ends[t - 1] + FRAME * int(rng.integers(10, 51))  # a 0.1-0.5 s pause
        if t >= 2:  # the same speaker's previous turn has ended (plus 0.1 s)
            start = max(start, ends[t - 2] + 10 * FRAME)
        starts.append(start)
        ends.append(start + lengths[t])
    return starts


def generate_librimix(
    root: str | os.PathLike,
    *,
    speakers: int = 24,
    held_out_speakers: float = 1 / 6,
    train_mixtures: int = 400,
    dev_mixtures: int = 64,
    test_mixtures: int = 64,
    turns: tuple[int, int] = (2, 4),
    overlap: tuple[float, float] = (0.1, 0.6),
    overlap_probability: float = 0.5,
    seed: int = 5,
    progress: bool = True,
    jobs: int | None = None,
) -> Path:
    """Synthesise a LibriMix-style two-speaker diarization corpus into ``root`` (cached: nothing
    is done when ``root`` holds a complete corpus with equal parameters).

    Args:
        root: the folder to create (what the SD reader takes as ``root``; replaced only if this
            module made it, or it is empty).
        speakers: number of :func:`~adtuning.speech.speakers.default_speakers` of ``seed``.
        held_out_speakers: fraction of the speakers in dev, as many in test (at least two each:
            a recording needs two speakers of its split).
        train_mixtures, dev_mixtures, test_mixtures: recordings per split.
        turns: (fewest, most) alternating turns per recording (at least 2: both speakers talk).
        overlap: (smallest, largest) overlap of two consecutive turns, as a fraction of the
            shorter one, when they overlap.
        overlap_probability: chance that a turn overlaps the previous one (else a pause).
        seed: speakers, their split, sentences, placement, levels and noise derive from it.
        progress: a tqdm bar.
        jobs: parallel espeak-ng processes (default: CPU count, at most 4); output unchanged.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    import numpy as np

    root = Path(root).absolute()
    counts = {"training": train_mixtures, "validation": dev_mixtures, "testing": test_mixtures}
    if speakers < 6 or not 0 < held_out_speakers < 0.5 or round(held_out_speakers * speakers) < 2:
        raise ValueError(f"need >= 6 speakers and held_out_speakers giving >= 2 speakers each to dev and test "
                         f"(and < 0.5); got speakers={speakers}, held_out_speakers={held_out_speakers}")
    if min(counts.values()) < 1:
        raise ValueError(f"need >= 1 mixture per split, got train={train_mixtures}, dev={dev_mixtures}, test={test_mixtures}")
    if not 2 <= turns[0] <= turns[1]:
        raise ValueError(f"turns must be (fewest, most) with 2 <= fewest <= most, got {turns}")
    if not 0 <= overlap[0] <= overlap[1] <= 0.9 or not 0 <= overlap_probability <= 1:
        raise ValueError(f"need 0 <= overlap[0] <= overlap[1] <= 0.9 and 0 <= overlap_probability <= 1, got "
                         f"overlap={overlap}, overlap_probability={overlap_probability}")
    vocabulary = librispeech_vocabulary()
    spk = assign_speakers(default_speakers(speakers, seed), seed, held_out_speakers)
    ids = sorted(int(i) for i in synthesis.rng("sd-speaker-ids", seed).choice(np.arange(100, 10000), speakers, replace=False))
    spk_id = [ids[int(k)] for k in synthesis.rng("sd-id-order", seed).permutation(speakers)]
    params = {"speakers": [[s.voice, s.rate, s.pitch, s.split] for s in spk], "held_out_speakers": float(held_out_speakers),
              "mixtures": {_SPLIT_OF[s]: int(n) for s, n in counts.items()}, "turns": [int(turns[0]), int(turns[1])],
              "overlap": [float(overlap[0]), float(overlap[1])], "overlap_probability": float(overlap_probability),
              "seed": int(seed), "vocabulary_size": len(vocabulary), "sample_rate": synthesis.SAMPLE_RATE}
    key = {"generator": "adtuning.speech.synth_librimix.generate_librimix", "version": LIBRIMIX_CORPUS_VERSION,
           "params": params}

    plans: list[list] = [[] for _ in spk]
    recordings = []  # (split, rec id, [(speaker index, plan index)] per turn)
    for split, n in counts.items():
        members = [j for j, s in enumerate(spk) if s.split == split]
        for k in range(n):
            r = synthesis.rng("sd-recording", seed, split, k)
            a, b = (members[int(i)] for i in r.choice(len(members), 2, replace=False))
            turn_refs = []
            for t in range(int(r.integers(turns[0], turns[1] + 1))):
                j = (a, b)[t % 2]
                text = " ".join(vocabulary[int(i)] for i in r.integers(0, len(vocabulary), int(r.integers(2, 6))))
                s = spk[j]
                plans[j].append((s.voice, *synthesis.jitter(("sd", seed, split, k, t), s.rate, s.pitch, 1.0, 0.06, 2), text))
                turn_refs.append((j, len(plans[j]) - 1))
            recordings.append((split, f"{spk_id[a]}-{spk_id[b]}-{_SPLIT_OF[split]}{k:04d}", turn_refs))
    audio: dict[tuple[int, int], np.ndarray] = {}

    def write(tmp: Path, j: int, i: int, pcm: bytes) -> None:
        # Kept in memory until the mixtures are built: float32, padded to whole label frames.
        y = synthesis.trim_and_resample(pcm, None, threshold=0.002)
        y = y / max(float(np.abs(y).max(initial=0.0)), 1e-9)
        audio[(j, i)] = np.pad(y, (0, -len(y) % FRAME)).astype(np.float32)

    def finish(tmp: Path) -> int:
        tables: dict[str, dict[str, list[str]]] = {}
        for split, rec, turn_refs in recordings:
            r = synthesis.rng("sd-mix", seed, rec)
            lengths = [len(audio[ref]) for ref in turn_refs]
            starts = _place_turns(lengths, r, overlap, overlap_probability)
            total = max(s + n for s, n in zip(starts, lengths)) + FRAME * int(r.integers(20, 61))
            gains = {turn_refs[0][0]: 1.0, turn_refs[1][0]: float(10 ** (r.uniform(-3.0, 3.0) / 20))}
            mix = np.zeros(total, dtype=np.float64)
            for (j, i), st in zip(turn_refs, starts):
                mix[st:st + len(audio[(j, i)])] += gains[j] * audio[(j, i)]
            mix *= r.uniform(0.3, 0.7) / float(np.abs(mix).max())
            kind = str(r.choice(synthesis.NOISE_KINDS))
            mix += synthesis.noise(kind, total, r) * float(np.abs(mix).max()) * 10 ** (-r.uniform(30.0, 42.0) / 20)
            name = _SPLIT_OF[split]
            synthesis.write_wav(tmp / "wav16k" / "max" / AUDIO_SUBSETS[name] / "mix_both" / f"{rec}.wav", synthesis.quantise(mix))
            t = tables.setdefault(name, {"wav.scp": [], "segments": [], "utt2spk": [], "reco2dur": [], "rttm": []})
            t["wav.scp"].append(f"{rec} ../wav16k/max/{AUDIO_SUBSETS[name]}/mix_both/{rec}.wav\n")
            t["reco2dur"].append(f"{rec} {total / synthesis.SAMPLE_RATE:.2f}\n")  # exact: total is whole 10 ms frames
            for n_turn, ((j, i), st) in enumerate(zip(turn_refs, starts)):
                utt = f"{spk_id[j]}-{rec}-{n_turn}"
                start, end = st // FRAME, (st + len(audio[(j, i)])) // FRAME  # in 10 ms frames, exact
                t["segments"].append(f"{utt} {rec} {start / 100:.2f} {end / 100:.2f}\n")
                t["utt2spk"].append(f"{utt} {spk_id[j]}\n")
                t["rttm"].append(f"SPEAKER {rec} 1 {start / 100:.2f} {(end - start) / 100:.2f} <NA> <NA> {spk_id[j]} <NA> <NA>\n")
        for name, t in tables.items():
            folder = tmp / name
            folder.mkdir()
            for file, lines in t.items():
                (folder / file).write_text("".join(sorted(lines)))
            spk2utt: dict[str, list[str]] = {}
            for line in sorted(t["utt2spk"]):
                utt, speaker = line.split()
                spk2utt.setdefault(speaker, []).append(utt)
            (folder / "spk2utt").write_text("".join(f"{s} {' '.join(u)}\n" for s, u in sorted(spk2utt.items())))
        return len(recordings)

    return synthesis.synthesise_corpus(root, key, plans, write, finish, desc="synthesising SD corpus (LibriMix / Kaldi layout)",
                                   progress=progress, jobs=jobs)
