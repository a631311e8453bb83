"""The synthetic speakers of the generated corpora.

A *speaker* is an espeak-ng voice with a variant (``"en-us+f3"``), a speaking rate (words per
minute) and a base pitch (0-100); the v2 pre-training speakers add an intonation range.

Three disjoint families, so that no corpus shares a speaker with another family:

* :func:`default_speakers` — the *downstream* speakers of every task corpus: 14 reproducible
  variants (:data:`DOWNSTREAM_VARIANTS`) of ``en-us`` / ``en``, **even** base pitches.
* :func:`pretraining_speakers` (v1) and :func:`pretraining_speakers_v2` — the embedded
  upstreams' *pre-training* speakers, **odd** base pitches (v2: every usable English voice and
  variant except the held-out ones, wide rate / pitch / range).
* :data:`HELD_OUT_LANGUAGES` and :data:`HELD_OUT_VARIANTS` — espeak-ng voices and variants no
  training corpus (pre-training or downstream) uses: the out-of-domain checks' speakers.

:func:`assign_speakers` gives speakers Speech Commands hashes with designated splits.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from adtuning.speech.synthesis import rng

__all__ = ["DOWNSTREAM_LANGUAGES", "DOWNSTREAM_VARIANTS", "HELD_OUT_LANGUAGES", "HELD_OUT_VARIANTS", "Speaker",
           "speech_commands_split", "default_speakers", "pretraining_speakers", "pretraining_speakers_v2", "english_voices",
           "held_out_speakers", "variant", "assign_speakers"]

# Variants without "breath": espeak-ng's breath noise (f2, f3, f5, whisper, ...) reads
# state that differs from process to process, so those voices are not bit-reproducible.
DOWNSTREAM_VARIANTS = ("m1", "f1", "m3", "f4", "m2", "linda", "m4", "belinda", "m5", "steph", "m6",
                       "aunty", "m7", "Annie")
"""The variants of :func:`default_speakers` (and of the v1 pre-training speakers)."""
DOWNSTREAM_LANGUAGES = ("en-us", "en")
"""The languages of :func:`default_speakers`: American and British English."""
_VARIANTS, _LANGUAGES = DOWNSTREAM_VARIANTS, DOWNSTREAM_LANGUAGES

HELD_OUT_LANGUAGES = ("en-gb-scotland",)
"""espeak-ng English voices that no training corpus uses (out-of-domain checks only)."""
HELD_OUT_VARIANTS = ("Andy", "adam", "anika", "grandma", "m8", "quincy", "shelby", "travis")
"""espeak-ng variants that no training corpus uses (out-of-domain checks only); none of them
has breath noise, so held-out clips are reproducible."""

_MAX_WAVS_PER_CLASS = 2**27 - 1  # constant of the Speech Commands split rule


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: espeak voice (``"en-us+f3"``), rate (wpm), pitch (0-100),
    its 8-hex-digit Speech Commands speaker hash and its split
    (``"training"``, ``"validation"`` or ``"testing"``)."""

    voice: str
    rate: int
    pitch: int
    hash: str
    split: str


def speech_commands_split(speaker_hash: str, validation_percentage: float = 10.0,
                          testing_percentage: float = 10.0) -> str:
    """The Speech Commands split of a speaker hash (``which_set`` of the dataset's README,
    recomputed identically by s3prl): ``"validation"``, ``"testing"`` or ``"training"``."""
    h = int(hashlib.sha1(speaker_hash.encode("utf-8")).hexdigest(), 16)
    percentage = (h % (_MAX_WAVS_PER_CLASS + 1)) * (100.0 / _MAX_WAVS_PER_CLASS)
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "testing"
    return "training"


def default_speakers(n: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """``n`` deterministic (voice, rate, pitch) triples of *downstream* speakers: 14
    reproducible espeak-ng variants (7 male, 7 female) alternating American and British
    English, rates 135-195 wpm and **even** base pitches 30-70 drawn from ``seed``.

    The embedded upstream's pre-training speakers (:func:`pretraining_speakers`) have odd
    base pitches, so no downstream corpus built from these speakers shares a speaker with
    the pre-training corpus, whatever ``n`` and ``seed``."""
    r = rng("speakers", seed)
    out = []
    for j in range(n):
        voice = f"{_LANGUAGES[(j + j // len(_VARIANTS)) % 2]}+{_VARIANTS[j % len(_VARIANTS)]}"
        out.append((voice, int(r.integers(135, 196)), 30 + 2 * int(r.integers(0, 21))))
    return out


def pretraining_speakers(n: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """``n`` deterministic (voice, rate, pitch) triples of the upstream's *pre-training*
    speakers: the same reproducible variants, rates 125-205 wpm and **odd** base pitches
    21-79 (disjoint from every :func:`default_speakers` triple by the pitch's parity)."""
    r = rng("pretraining-speakers", seed)
    out = []
    for j in range(n):
        voice = f"{_LANGUAGES[(j + 1 + j // len(_VARIANTS)) % 2]}+{_VARIANTS[j % len(_VARIANTS)]}"
        out.append((voice, int(r.integers(125, 206)), 21 + 2 * int(r.integers(0, 30))))
    return out


def english_voices(library: str | None = None, data: str | None = None) -> tuple[list[str], list[str]]:
    """``(languages, variants)`` usable for training corpora, enumerated through the espeak-ng
    binding: every English voice written in the Latin script (``en-shaw`` is Shavian), by its
    voice file's name (``"en"`` is British English, ``"en-us"`` American), and every
    variant without breath noise or spaces in its name, both minus the held-out ones, sorted."""
    from adtuning.speech.espeak import has_breath, synthesizer

    engine = synthesizer(library, data)
    names = {ident.rpartition("/")[2].lower() for ident, langs in engine.list_voices() if langs and langs[0].startswith("en")}
    languages = sorted(names - {"en-shaw"} - set(HELD_OUT_LANGUAGES))
    variants = sorted({ident.partition("/")[2] for ident, _ in engine.list_voices(variants=True)}, key=str.lower)
    variants = [v for v in variants if v and " " not in v and v not in HELD_OUT_VARIANTS and not has_breath(engine.data, "en+" + v)]
    return languages, variants


def pretraining_speakers_v2(n: int, seed: int = 0, *, library: str | None = None,
                            data: str | None = None) -> list[tuple[str, int, int, int]]:
    """``n`` deterministic ``(voice, rate, pitch, pitch_range)`` speakers of the v2 pre-training
    corpus: every pair of :func:`english_voices` language and variant in a seeded order (so that
    ``n`` >= their number covers all of them), rates 90-320 wpm, **odd** base pitches 1-99
    (disjoint from every :func:`default_speakers` triple) and intonation ranges 0-60 (espeak-ng
    crashes on some variants, rob and Annie, with ranges above 70)."""
    languages, variants = english_voices(library, data)
    pairs = [f"{lang}+{var}" for var in variants for lang in languages]
    r = rng("pretraining-speakers-v2", seed)
    order = [int(i) for i in r.permutation(len(pairs))]
    out = []
    for j in range(n):
        out.append((pairs[order[j % len(pairs)]], int(r.integers(90, 321)), 1 + 2 * int(r.integers(0, 50)),
                    int(r.integers(0, 61))))
    return out


def held_out_speakers(n: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """``n`` deterministic (voice, rate, pitch) triples of *out-of-domain* speakers, for checks
    only: every voice is a held-out one — a :data:`HELD_OUT_VARIANTS` variant of a downstream
    language, or any variant of a :data:`HELD_OUT_LANGUAGES` voice — with the downstream rates
    (135-195 wpm) and even base pitches (30-70), so that only the voice is new. No training
    corpus uses these voices (``tests/test_pretrain_v2.py`` checks it)."""
    voices = [f"{lang}+{var}" for var in HELD_OUT_VARIANTS for lang in DOWNSTREAM_LANGUAGES + HELD_OUT_LANGUAGES]
    voices += [f"{lang}+{var}" for var in DOWNSTREAM_VARIANTS for lang in HELD_OUT_LANGUAGES]
    r = rng("held-out-speakers", seed)
    order = [int(i) for i in r.permutation(len(voices))]
    return [(voices[order[j % len(voices)]], int(r.integers(135, 196)), 30 + 2 * int(r.integers(0, 21))) for j in range(n)]


def variant(voice: str) -> str:
    """The variant of an espeak voice name (``"en-us+f1"`` -> ``"f1"``), or the name itself without one."""
    return voice.partition("+")[2] or voice


def assign_speakers(triples: Sequence[tuple[str, int, int]], seed: int, held_out: float = 0.1) -> list[Speaker]:
    """Give each triple a unique hash whose Speech Commands split is the designated one:
    a fraction ``held_out`` of the speakers for validation, as many for testing (at least
    one each), the rest training."""
    n = len(triples)
    n_val = max(1, round(held_out * n))
    n_test = max(1, round(held_out * n))
    order = [int(j) for j in rng("splits", seed, n).permutation(n)]
    # Held-out speakers are new speakers, but not new voice variants: while possible, every
    # variant keeps at least half of its speakers in training (some espeak variants, such as
    # steph, are outlier timbres; held out without training speakers of their own, the
    # accuracy would measure which variants the draw happened to hold out).
    may_hold: dict[str, int] = {}
    for voice, _, _ in triples:
        may_hold[variant(voice)] = may_hold.get(variant(voice), 0) + 1
    may_hold = {v: count // 2 for v, count in may_hold.items()}
    held: list[int] = []
    for j in order:
        var = variant(triples[j][0])
        if len(held) < n_val + n_test and may_hold[var] > 0:
            may_hold[var] -= 1
            held.append(j)
    held += [j for j in order if j not in held][: n_val + n_test - len(held)]  # tiny corpora
    want = ["training"] * n
    for k, j in enumerate(held):
        want[j] = "validation" if k < n_val else "testing"
    used: set[str] = set()
    speakers = []
    for (voice, rate, pitch), split in zip(triples, want):
        salt = 0
        while True:
            h = hashlib.sha1(f"adtuning|{voice}|{rate}|{pitch}|{seed}|{salt}".encode()).hexdigest()[:8]
            if h not in used and speech_commands_split(h) == split:
                break
            salt += 1
        used.add(h)
        speakers.append(Speaker(voice, int(rate), int(pitch), h, split))
    return speakers


# --------------------------------------------------------------------------- audio
