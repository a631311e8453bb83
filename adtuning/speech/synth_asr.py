"""A generated LibriSpeech-layout corpus for ASR and PR, with an exact phoneme lexicon.

Synthesised with espeak-ng through :mod:`adtuning.speech.synthesis` (one fresh espeak-ng process per
speaker, so equal arguments give byte-identical files) and read unchanged by
:class:`~adtuning.speech.corpora.LibriSpeechDataset` (``task="asr"``, or ``task="pr"`` with
``lexicon=<root>/librispeech-lexicon.txt``). :func:`generate_librispeech` writes::

    <root>/                                          # the role of LibriSpeech/
        train-clean-100/<spk>/<chapter>/<spk>-<chapter>-<nnnn>.flac   # 16 kHz mono FLAC
        train-clean-100/<spk>/<chapter>/<spk>-<chapter>.trans.txt     # "<utt> WORD WORD ..."
        dev-clean/...  test-clean/...                # other speakers, same structure
        SPEAKERS.TXT                                 # ";ID|SEX|SUBSET|MINUTES|NAME", as LibriSpeech
        librispeech-lexicon.txt                      # "WORD PH1 PH2 ..." (s3prl format, CMU phones)
        adtuning_synth.json                          # manifest (parameters + version), written last

Sentences are 3-7 words drawn uniformly from the shipped vocabulary
(``assets/librispeech_words.txt``, :func:`librispeech_vocabulary`), upper-cased as LibriSpeech
transcripts. Speakers are :func:`~adtuning.speech.speakers.default_speakers` with American voices
only (even base pitches: disjoint from the embedded upstream's pre-training speakers), split
into train / dev / test speakers (disjoint, every voice variant keeping training speakers).

**Exact phone labels.** The lexicon is espeak-ng's own phonemisation (``espeak_TextToPhonemes``,
en-us) of each word, mapped to the CMU phone set of the PR recipe by the fixed table
:data:`ESPEAK_TO_CMU`. Every sentence is phonemised as a whole too, and kept only when that
equals the concatenation of its words' lexicon entries (else it is redrawn): espeak-ng links
words (a linking r, a liaison) and reduces function words in context, and the vocabulary
avoids that (consonant-initial content words), so the PR targets the reader builds from the
lexicon are exactly the phonemes the synthesiser spoke.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from adtuning.speech import espeak, synthesis
from adtuning.speech.speakers import assign_speakers, default_speakers, variant

__all__ = ["LIBRISPEECH_CORPUS_VERSION", "LEXICON_NAME", "SUBSETS", "ESPEAK_TO_CMU", "librispeech_vocabulary",
           "librispeech_speakers", "espeak_to_cmu", "phonemise_words", "generate_librispeech"]

LIBRISPEECH_CORPUS_VERSION = 1
"""Bumped whenever the corpus's bytes change for equal parameters; invalidates caches."""

LEXICON_NAME = "librispeech-lexicon.txt"
"""The lexicon written into the corpus root (pass it as the PR reader's ``lexicon``)."""

SUBSETS = {"training": "train-clean-100", "validation": "dev-clean", "testing": "test-clean"}
"""Folder of each speaker split (the reader's default subsets for train, dev and test)."""

LANGUAGE = "en-us"  # one phonemiser for every speaker: the lexicon must be what each voice says

# espeak-ng en-us phoneme names -> CMU phones (without stress). A vowel takes the stress of the
# mark before it ("'" 1, "," 2, none 0) on its first phone; r-coloured and syllabic phonemes
# become two phones as in CMUdict ("A@" car AA R, "@L" bottle AH L, "n-" button AH N).
ESPEAK_TO_CMU: dict[str, tuple[str, ...]] = {
    # vowels
    "a": ("AE",), "aa": ("AE",), "a#": ("AH",), "A:": ("AA",), "A@": ("AA", "R"), "0": ("AA",),
    "aI": ("AY",), "aI@": ("AY", "ER"), "aU": ("AW",), "aU@": ("AW", "ER"),
    "E": ("EH",), "e@": ("EH", "R"), "eI": ("EY",), "3": ("ER",), "3:": ("ER",),
    "@": ("AH",), "@2": ("AH",), "@5": ("AH",), "@L": ("AH", "L"), "@-": ("AH",), "V": ("AH",),
    "I": ("IH",), "I2": ("IH",), "I#": ("IH",), "i": ("IY",), "i:": ("IY",), "i@": ("IH", "R"),
    "O:": ("AO",), "O2": ("AO",), "O@": ("AO", "R"), "o@": ("AO", "R"), "OI": ("OY",), "oU": ("OW",),
    "U": ("UH",), "U@": ("UH", "R"), "u:": ("UW",),
    # syllabic consonants
    "n-": ("AH", "N"), "l-": ("AH", "L"),
    # consonants
    "b": ("B",), "d": ("D",), "D": ("DH",), "dZ": ("JH",), "f": ("F",), "g": ("G",), "h": ("HH",),
    "j": ("Y",), "k": ("K",), "l": ("L",), "m": ("M",), "n": ("N",), "N": ("NG",), "p": ("P",),
    "r": ("R",), "s": ("S",), "S": ("SH",), "t": ("T",), "t#": ("T",), "t2": ("T",), "?": ("T",),
    "T": ("TH",), "tS": ("CH",), "v": ("V",), "w": ("W",), "z": ("Z",), "Z": ("ZH",),
}
"""espeak-ng (en-us) phoneme -> CMU phones; the vowels among them take a stress digit."""

_FEMALE_VARIANTS = {"f1", "f4", "linda", "belinda", "steph", "aunty", "Annie"}  # for SPEAKERS.TXT
_VOWELS = {"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"}
_STRESS = {"'": "1", ",": "2"}


def librispeech_vocabulary() -> list[str]:
    """The shipped word list (``adtuning/speech/assets/librispeech_words.txt``), in file order."""
    text = resources.files("adtuning.speech").joinpath("assets/librispeech_words.txt").read_text()
    words = [w for line in text.splitlines() if not line.startswith("#") for w in line.split()]
    if len(set(words)) != len(words):
        raise ValueError("librispeech_words.txt holds duplicate words")
    return words


def espeak_to_cmu(phonemes: list[str], where: str = "") -> list[str]:
    """CMU phones with stress digits of espeak-ng phoneme names (stress marks attached).

    Raises:
        ValueError: a phoneme without an entry in :data:`ESPEAK_TO_CMU` (``where`` names the text).
    """
    out = []
    for name in phonemes:
        stress = "0"
        while name[:1] in ("'", ",", "%", "="):  # stress marks (% and = mean unstressed)
            stress = _STRESS.get(name[0], "0")
            name = name[1:]
        try:
            phones = ESPEAK_TO_CMU[name]
        except KeyError:
            raise ValueError(f"espeak-ng phoneme {name!r}{' of ' + where if where else ''} has no CMU "
                             "phone in ESPEAK_TO_CMU") from None
        first_vowel = True
        for ph in phones:
            if ph in _VOWELS:
                out.append(ph + (stress if first_vowel else "0"))
                first_vowel = False
            else:
                out.append(ph)
    return out


def phonemise_words(words: list[str]) -> dict[str, list[str]]:
    """Lexicon entry (CMU phones) of each word: espeak-ng's en-us phonemisation of the word alone."""
    engine = espeak.synthesizer(None, None)
    lexicon = {}
    for w in words:
        flat = [p for group in engine.phonemes(w, LANGUAGE) for p in group]
        lexicon[w] = espeak_to_cmu(flat, repr(w))
    return lexicon


def librispeech_speakers(n: int, seed: int) -> list[tuple[str, int, int]]:
    """The first ``n`` American-English (``en-us``) :func:`~adtuning.speech.speakers.default_speakers`
    of ``seed``: one phonemiser for all, so the lexicon holds for every voice."""
    pool = default_speakers(2 * n + 28, seed)
    out = [t for t in pool if t[0].partition("+")[0] == LANGUAGE][:n]
    if len(out) < n:  # pragma: no cover - default_speakers alternates languages
        raise ValueError(f"default_speakers({2 * n + 28}, {seed}) holds fewer than {n} {LANGUAGE} speakers")
    return out


def _sentence(seed: int, speaker: int, index: int, vocabulary: list[str], lexicon: dict[str, list[str]],
              engine, words: tuple[int, int]) -> str:
    """A sentence whose whole-sentence phonemisation equals its words' lexicon entries."""
    expected = None
    for attempt in range(100):
        r = synthesis.rng("asr-sentence", seed, speaker, index, attempt)
        chosen = [vocabulary[int(i)] for i in r.integers(0, len(vocabulary), int(r.integers(words[0], words[1] + 1)))]
        text = " ".join(chosen)
        expected = [p for w in chosen for p in lexicon[w]]
        spoken = [p for group in engine.phonemes(text, LANGUAGE) for p in group]
        if ";" not in spoken and espeak_to_cmu(spoken, repr(text)) == expected:
            return text
    raise ValueError(f"no sentence of the vocabulary keeps its words' pronunciations in 100 draws "
                     f"(speaker {speaker}, utterance {index}, seed {seed}); last: {text!r}")


def generate_librispeech(
    root: str | os.PathLike,
    *,
    speakers: int = 32,
    held_out_speakers: float = 0.125,
    chapters_per_speaker: int = 2,
    utterances_per_chapter: int = 16,
    words: tuple[int, int] = (3, 7),
    vocabulary_size: int | None = None,
    seed: int = 3,
    progress: bool = True,
    jobs: int | None = None,
) -> Path:
    """Synthesise a LibriSpeech-layout ASR/PR corpus with its lexicon into ``root`` (cached:
    nothing is done when ``root`` holds a complete corpus with equal parameters).

    Args:
        root: the folder to create (the role of ``LibriSpeech``; replaced only if this module
            made it, or it is empty).
        speakers: number of :func:`librispeech_speakers` of ``seed``.
        held_out_speakers: fraction of the speakers in dev-clean, as many in test-clean (at
            least one each); the others are train-clean-100.
        chapters_per_speaker, utterances_per_chapter: each speaker reads this many chapters of
            this many utterances (a chapter is a folder with its ``.trans.txt``).
        words: (fewest, most) words per sentence.
        vocabulary_size: draw the sentences from this many words of the shipped vocabulary (a
            subset chosen by ``seed``; the lexicon lists them); default: all of it.
        seed: speakers, their split, ids, sentences, jitter and gains derive from it.
        progress: a tqdm bar.
        jobs: parallel espeak-ng processes (default: CPU count, at most 4); output unchanged.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: bad counts, or an espeak-ng phoneme missing from :data:`ESPEAK_TO_CMU`.
        RuntimeError: espeak-ng cannot be loaded (names the library path).
        FileExistsError: ``root`` exists with content this module did not write.
    """
    import numpy as np

    root = Path(root).absolute()
    if speakers < 3 or not 0 < held_out_speakers < 0.5 or chapters_per_speaker < 1 or utterances_per_chapter < 1:
        raise ValueError(f"need >= 3 speakers, 0 < held_out_speakers < 0.5 and >= 1 chapter and utterance; got "
                         f"speakers={speakers}, held_out_speakers={held_out_speakers}, "
                         f"chapters_per_speaker={chapters_per_speaker}, utterances_per_chapter={utterances_per_chapter}")
    if not 1 <= words[0] <= words[1]:
        raise ValueError(f"words must be (fewest, most) with 1 <= fewest <= most, got {words}")
    vocabulary = librispeech_vocabulary()
    if vocabulary_size is not None:
        if not 1 <= vocabulary_size <= len(vocabulary):
            raise ValueError(f"vocabulary_size must be in [1, {len(vocabulary)}], got {vocabulary_size}")
        keep = synthesis.rng("asr-vocabulary", seed).choice(len(vocabulary), vocabulary_size, replace=False)
        vocabulary = [vocabulary[int(i)] for i in sorted(keep)]
    spk = assign_speakers(librispeech_speakers(speakers, seed), seed, held_out_speakers)
    ids = sorted(int(i) for i in synthesis.rng("asr-speaker-ids", seed).choice(np.arange(100, 10000), speakers, replace=False))
    id_order = [int(k) for k in synthesis.rng("asr-id-order", seed).permutation(speakers)]
    params = {"speakers": [[s.voice, s.rate, s.pitch, s.split] for s in spk], "held_out_speakers": float(held_out_speakers),
              "chapters_per_speaker": int(chapters_per_speaker), "utterances_per_chapter": int(utterances_per_chapter),
              "words": [int(words[0]), int(words[1])], "seed": int(seed), "vocabulary": vocabulary,
              "espeak_to_cmu": {k: list(v) for k, v in ESPEAK_TO_CMU.items()}, "sample_rate": synthesis.SAMPLE_RATE}
    key = {"generator": "adtuning.speech.synth_asr.generate_librispeech", "version": LIBRISPEECH_CORPUS_VERSION,
           "params": params}
    manifest = synthesis.read_manifest(root)
    if manifest is not None and {k: manifest.get(k) for k in key} == key:
        return root  # cached: skip the phonemisation below

    lexicon = phonemise_words(vocabulary)
    engine = espeak.synthesizer(None, None)
    plans, meta = [], []  # meta[j][i] = (subset, speaker id, chapter id, utterance id, transcript)
    for j, s in enumerate(spk):
        sid = ids[id_order[j]]
        chapters = sorted(int(c) for c in synthesis.rng("asr-chapters", seed, j).choice(
            np.arange(1000, 200000), chapters_per_speaker, replace=False))
        plan, info = [], []
        for c, chapter in enumerate(chapters):
            for u in range(utterances_per_chapter):
                i = c * utterances_per_chapter + u
                text = _sentence(seed, j, i, vocabulary, lexicon, engine, tuple(words))
                plan.append((s.voice, *synthesis.jitter(("asr", seed, j, i), s.rate, s.pitch, 1.0, 0.06, 2), text))
                info.append((SUBSETS[s.split], sid, chapter, f"{sid}-{chapter}-{u:04d}", text.upper()))
        plans.append(plan)
        meta.append(info)

    def write(tmp: Path, j: int, i: int, pcm: bytes) -> None:
        subset, sid, chapter, utt, _ = meta[j][i]
        # A low silence threshold: a weak final consonant stays in the audio of its label.
        y = synthesis.render_utterance(pcm, synthesis.rng("asr-gain", seed, j, i), None, (32.0, 45.0), threshold=0.002)
        path = tmp / subset / str(sid) / str(chapter) / f"{utt}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_flac(path, y)

    def finish(tmp: Path) -> int:
        for info in meta:
            chapters: dict[tuple, list[str]] = {}
            for subset, sid, chapter, utt, text in info:
                chapters.setdefault((subset, sid, chapter), []).append(f"{utt} {text}\n")
            for (subset, sid, chapter), lines in chapters.items():
                (tmp / subset / str(sid) / str(chapter) / f"{sid}-{chapter}.trans.txt").write_text("".join(lines))
        rows = [";ID  |SEX |SUBSET           |MINUTES|NAME\n"]
        for j, s in enumerate(spk):
            sid, subset = meta[j][0][1], meta[j][0][0]
            minutes = sum(_flac_seconds(tmp / subset / str(sid) / str(ch) / f"{utt}.flac") for _, _, ch, utt, _ in meta[j]) / 60
            sex = "F" if variant(s.voice) in _FEMALE_VARIANTS else "M"
            rows.append(f"{sid:<5}| {sex}  | {subset:<17}| {minutes:5.2f} | {s.voice} rate {s.rate} pitch {s.pitch}\n")
        (tmp / "SPEAKERS.TXT").write_text("".join(rows[:1] + sorted(rows[1:])))
        (tmp / LEXICON_NAME).write_text("".join(f"{w.upper()} {' '.join(lexicon[w])}\n" for w in sorted(vocabulary)))
        return sum(map(len, meta))

    return synthesis.synthesise_corpus(root, key, plans, write, finish, desc="synthesising ASR/PR corpus (LibriSpeech layout)",
                                   progress=progress, jobs=jobs)


def _write_flac(path: Path, samples) -> None:
    import soundfile as sf

    sf.write(str(path), samples, synthesis.SAMPLE_RATE, subtype="PCM_16", format="FLAC")


def _flac_seconds(path: Path) -> float:
    import soundfile as sf

    return sf.info(str(path)).frames / synthesis.SAMPLE_RATE
