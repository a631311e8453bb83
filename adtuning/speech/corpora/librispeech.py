"""ASR and PR: LibriSpeech as the SUPERB recipes read it.

Layout: ``root/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` with lines
``<utterance-id> <TRANSCRIPT>`` next to ``<utterance-id>.flac``. Default subsets: train
``train-clean-100``, dev ``dev-clean``, test ``test-clean``; any folder with that structure
(e.g. the Libri-Light ``librispeech_finetuning/1h``) can be passed with ``subsets``.

PR maps words to phonemes with a lexicon in the s3prl format (one ``WORD PH1 PH2 ...`` per
line, tab or spaces; the first pronunciation of a word wins), which the user provides.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adtuning.speech.audio import (
    CorpusError,
    MissingDataError,
    audio_options,
    plain_name,
    read_audio,
    read_lines,
    require_dir,
    require_file,
)
from adtuning.speech.data import SpeechDataset
from adtuning.speech.tasks.text import CharacterVocab, PhonemeVocab

DEFAULT_SUBSETS = {"train": ("train-clean-100",), "dev": ("dev-clean",), "test": ("test-clean",)}


def read_librispeech(root: Path, subsets: Sequence[str]) -> list[tuple[str, Path, str]]:
    """``(utterance id, audio path, transcript)`` of every utterance of ``subsets``, sorted by id.

    Raises:
        CorpusError: naming the transcript file and line: a line without transcript, an
            utterance id that is not a plain file name (``../x`` would read outside the
            corpus), an id listed twice, a missing audio file; or a subset without transcripts.
    """
    out = []
    first: dict[str, str] = {}
    for subset in subsets:
        folder = require_dir(root / subset, "LibriSpeech subset")
        trans = sorted(folder.rglob("*.trans.txt"))
        if not trans:
            raise MissingDataError(f"LibriSpeech: no *.trans.txt under {folder}")
        for t in trans:
            for n, line in enumerate(read_lines(t), start=1):
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                where = f"{t} line {n}"
                plain_name(utt, where, "utterance id")
                if not text.strip():
                    raise CorpusError(f"{where}: no transcript for {utt!r}")
                if utt in first:
                    raise CorpusError(f"{where}: utterance {utt} is listed twice (first in {first[utt]})")
                first[utt] = where
                candidates = (t.parent / f"{utt}{ext}" for ext in (".flac", ".wav"))
                audio = next((c for c in candidates if c.is_file()), None)
                if audio is None:
                    raise CorpusError(f"LibriSpeech: audio file not found: {t.parent / (utt + '.flac')} "
                                      f"(listed in {where})")
                out.append((utt, audio, text.strip()))
    return sorted(out)


def read_lexicon(paths: str | Path | Sequence[str | Path], vocab: PhonemeVocab) -> dict[str, list[str]]:
    """Word -> phonemes from one or more s3prl-format lexicon files (first pronunciation wins)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    lexicon: dict[str, list[str]] = {}
    for path in paths:
        path = require_file(path, "PR lexicon")
        for n, line in enumerate(read_lines(path), start=1):
            parts = line.split()
            if not parts:
                continue
            word, phonemes = parts[0], parts[1:]
            if not phonemes:
                raise CorpusError(f"{path} line {n}: word {word!r} has no phonemes")
            bad = [p for p in phonemes if p not in vocab.index or vocab.index[p] < 3]
            if bad:
                raise CorpusError(f"{path} line {n}: unknown phoneme(s) {bad} for {word!r}")
            lexicon.setdefault(word, phonemes)
    if not lexicon:
        raise CorpusError(f"PR lexicon {', '.join(map(str, paths))} is empty")
    return lexicon


class LibriSpeechDataset(SpeechDataset):
    """LibriSpeech for ASR (characters) or PR (phonemes).

    Args:
        root: the ``LibriSpeech`` folder.
        split: ``train``, ``dev`` or ``test``.
        task: ``asr`` or ``pr``.
        subsets: subset folders to read (default: :data:`DEFAULT_SUBSETS` of ``split``).
        lexicon: PR only (required): lexicon file(s) in the s3prl format.
        resample, downmix: :func:`~adtuning.speech.audio.read_audio` policy for files that are
            not 16 kHz mono (default: such files are errors).

    Raises:
        CorpusError: a transcript character outside the ASR inventory, a word missing from
            the lexicon, a malformed or duplicate transcript line, or a missing audio file
            (named; see :func:`read_librispeech`).
    """

    def __init__(self, root: str | Path, split: str, *, task: str = "asr", subsets: str | Sequence[str] | None = None,
                 lexicon: str | Path | Sequence[str | Path] | None = None, resample: bool = False, downmix: bool = False):
        super().__init__(split)
        self.audio = audio_options(resample, downmix)
        if task not in ("asr", "pr"):
            raise ValueError(f"LibriSpeechDataset task must be 'asr' or 'pr', got {task!r}")
        self.task = task
        self.root = require_dir(root, "LibriSpeech")
        if isinstance(subsets, str):
            subsets = [subsets]
        utts = read_librispeech(self.root, subsets or DEFAULT_SUBSETS[split])
        self.items: list[tuple[str, Path, list[int]]] = []
        if task == "asr":
            vocab = CharacterVocab()
            for utt, path, text in utts:
                try:
                    self.items.append((utt, path, vocab.encode(text)))
                except KeyError as exc:
                    raise CorpusError(f"LibriSpeech utterance {utt} ({path.parent}): {exc.args[0]}") from None
        else:
            if lexicon is None:
                raise CorpusError("PR needs a lexicon (lexicon=path or list of paths, s3prl format: WORD PH1 PH2 ...)")
            vocab = PhonemeVocab()
            table = read_lexicon(lexicon, vocab)
            for utt, path, text in utts:
                missing = [w for w in text.split() if w not in table]
                if missing:
                    raise CorpusError(f"LibriSpeech utterance {utt} ({path.parent}): word(s) {missing} "
                                      "not in the lexicon")
                phonemes = [p for w in text.split() for p in table[w]]
                self.items.append((utt, path, vocab.encode(phonemes)))

    def __len__(self) -> int:
        return len(self.items)

    def audio_path(self, index: int) -> str:
        return str(self.items[index][1])

    def load(self, index, rng=None):
        utt, path, targets = self.items[index]
        return {"wav": read_audio(path, **self.audio), "targets": targets, "id": utt}
