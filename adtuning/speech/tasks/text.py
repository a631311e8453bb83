"""Token inventories of the CTC tasks (ASR characters, PR phonemes, SF characters + slots).

Index 0 is always the CTC blank.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

# LibriSpeech characters in the order of s3prl's downstream/asr/char.dict; "|" is the word
# boundary.
ASR_CHARACTERS = ("|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C",
                  "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z")

# s3prl downstream/ctc/vocab/phoneme.txt (CMUdict phones with stress, plus SIL and SPN).
PHONEMES = ("SIL", "SPN", "AA0", "AA1", "AA2", "AE0", "AE1", "AE2", "AH0", "AH1", "AH2", "AO0", "AO1",
            "AO2", "AW0", "AW1", "AW2", "AY0", "AY1", "AY2", "B", "CH", "D", "DH", "EH0", "EH1", "EH2",
            "ER0", "ER1", "ER2", "EY0", "EY1", "EY2", "F", "G", "HH", "IH0", "IH1", "IH2", "IY0", "IY1",
            "IY2", "JH", "K", "L", "M", "N", "NG", "OW0", "OW1", "OW2", "OY0", "OY1", "OY2", "P", "R",
            "S", "SH", "T", "TH", "UH0", "UH1", "UH2", "UW0", "UW1", "UW2", "V", "W", "Y", "Z", "ZH")

# s3prl downstream/ctc/vocab/character.txt (used by the SF recipe).
SF_CHARACTERS = (" ", "A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "N", "O", "P",
                 "Q", "R", "S", "T", "U", "V", "W", "X", "Y", "Z", "'")

# s3prl's text encoders: <pad> (the CTC blank), <eos>, <unk>, then the vocabulary.
PAD, EOS, UNK = 0, 1, 2


def ctc_greedy(ids: Sequence[int], blank: int = 0) -> list[int]:
    """Greedy CTC collapse of a frame-level argmax path: merge repeats, then drop blanks."""
    out, prev = [], None
    for i in ids:
        if i != prev and i != blank:
            out.append(int(i))
        prev = i
    return out


class CharacterVocab:
    """ASR characters: ``<blank>`` then :data:`ASR_CHARACTERS`.

    A transcript ``"HELLO WORLD"`` becomes ``H E L L O | W O R L D |`` (s3prl's ASR recipe
    writes a trailing word boundary). Characters outside the inventory raise ``KeyError``.
    """

    def __init__(self, characters: Sequence[str] = ASR_CHARACTERS):
        self.tokens = ("<blank>",) + tuple(characters)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Ids of an upper-case transcript (words separated by spaces)."""
        words = text.split()
        seq = "|".join(words) + "|"
        missing = sorted({c for c in seq if c not in self.index})
        if missing:
            raise KeyError(f"characters not in the ASR vocabulary: {missing}")
        return [self.index[c] for c in seq]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of collapsed ids (no blanks): ``|`` becomes a space."""
        s = "".join(self.tokens[i] for i in ids if i != 0)
        return " ".join(w for w in s.split("|") if w)


class PhonemeVocab:
    """PR phonemes: ``<pad>``(blank), ``<eos>``, ``<unk>`` then :data:`PHONEMES` (s3prl ``word`` encoder).

    Targets end with ``<eos>`` as in s3prl's CTC recipes; decoding stops at it.
    """

    def __init__(self, phonemes: Sequence[str] = PHONEMES):
        self.tokens = ("<pad>", "<eos>", "<unk>") + tuple(phonemes)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, phonemes: Sequence[str]) -> list[int]:
        """Ids of a phoneme sequence plus ``<eos>``; unknown phonemes raise ``KeyError``."""
        missing = sorted({p for p in phonemes if p not in self.index})
        if missing:
            raise KeyError(f"phonemes not in the PR vocabulary: {missing}")
        return [self.index[p] for p in phonemes] + [EOS]

    def decode(self, ids: Iterable[int]) -> str:
        """Space-separated phonemes, stopping at ``<eos>``, dropping ``<pad>``."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i != PAD:
                out.append(self.tokens[i])
        return " ".join(out)


class SlotVocab:
    """SF characters and slot tags (s3prl ``CharacterTextSlotEncoder``).

    ``<pad>``(blank), ``<eos>``, ``<unk>``, :data:`SF_CHARACTERS`, then ``B-slot``/``E-slot`` for
    every slot. Decoded slot tags render as ``"B-slot "`` and ``" E-slot"``, the format the
    slot metrics parse.
    """

    def __init__(self, slots: Sequence[str], characters: Sequence[str] = SF_CHARACTERS):
        self.slots = tuple(slots)
        tags = []
        for s in self.slots:
            tags += ["B-" + s, "E-" + s]
        self.tokens = ("<pad>", "<eos>", "<unk>") + tuple(characters) + tuple(tags)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.first_tag = 3 + len(characters)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, words: Sequence[str], tags: Sequence[str]) -> tuple[list[int], int]:
        """Encode one IOB line exactly as s3prl does.

        Args:
            words, tags: the words and tags *without* the BOS/EOS positions; tags are slot
                names or ``"O"``; a run of equal tags is one slot value.

        Returns:
            ``(ids, unknown)``: token ids (punctuation words skipped, ``&`` read as ``AND``,
            space between words, ``<eos>`` after the last word) and the number of characters
            mapped to ``<unk>``.

        Raises:
            KeyError: a tag names a slot not in the slot list.
        """
        ids: list[int] = []
        unknown = 0
        n = len(words)
        for i, (word, tag) in enumerate(zip(words, tags, strict=True)):
            if word in "?!.,;-":
                continue
            if word == "&":
                word = "AND"
            if tag != "O" and (i == 0 or tags[i - 1] != tag):
                ids.append(self._tag("B-" + tag))
            for ch in word:
                j = self.index.get(ch)
                if j is None or j >= self.first_tag:
                    unknown += 1
                    j = UNK
                ids.append(j)
            if tag != "O" and (i == n - 1 or tags[i + 1] != tag):
                ids.append(self._tag("E-" + tag))
            ids.append(EOS if i == n - 1 else self.index[" "])
        return ids, unknown

    def _tag(self, tag: str) -> int:
        if tag not in self.index:
            raise KeyError(f"slot tag {tag!r} is not in the slot list")
        return self.index[tag]

    def decode(self, ids: Iterable[int]) -> str:
        """Text with slot tags, stopping at ``<eos>``, dropping ``<pad>``."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i == PAD:
                continue
            t = self.tokens[i]
            if i >= self.first_tag:
                t = t + " " if t.startswith("B-") else " " + t
            out.append(t)
        return "".join(out)
