"""Metrics of the SUPERB tasks, as s3prl computes them.

Edit-distance rates are corpus level (total edits over total reference length). Slot-filling
metrics follow ``s3prl/downstream/ctc/metric.py``: hypotheses and references are strings in
which a slot value is written ``B-type value E-type``. Diarization error counts follow the
EEND/s3prl frame-level scorer with the best speaker permutation per sample.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def edit_distance(hyp: Sequence, ref: Sequence) -> int:
    """Levenshtein distance between two sequences (unit cost substitution/insertion/deletion).

    Tokens are compared as dictionary keys, so they must be hashable with equal tokens hashing
    equal (characters, words, ints), which is what the CER/WER/PER callers pass.
    """
    # Bit-parallel DP (Myers 1999, in Hyyrö's 2001 form): one column of the DP table is kept as
    # bit masks of its +1 / -1 vertical steps along the longer sequence, so each token of the
    # shorter one costs a dozen big-integer operations instead of a Python loop over the other
    # sequence. (torchaudio.functional.edit_distance is itself a pure-Python double loop.)
    if len(hyp) > len(ref):
        hyp, ref = ref, hyp
    m = len(ref)
    if not hyp:
        return m
    match: dict = {}  # token -> bit i set where ref[i] is that token
    for i, tok in enumerate(ref):
        match[tok] = match.get(tok, 0) | (1 << i)
    mask = (1 << m) - 1
    last = 1 << (m - 1)
    plus, minus, dist = mask, 0, m  # column 0 of the table is 0, 1, ..., m: every step is +1
    for tok in hyp:
        eq = match.get(tok, 0)
        xv = eq | minus
        xh = (((eq & plus) + plus) ^ plus) | eq
        h_plus = minus | (~(xh | plus) & mask)
        h_minus = plus & xh
        if h_plus & last:
            dist += 1
        elif h_minus & last:
            dist -= 1
        # row 0 of the table is 0, 1, ..., n, so the carry into the first row is a +1 step
        h_plus = ((h_plus << 1) | 1) & mask
        h_minus = (h_minus << 1) & mask
        plus = h_minus | (~(xv | h_plus) & mask)
        minus = h_plus & xv
    return dist


def _rate(pairs) -> float:
    err = tot = 0
    for h, r in pairs:
        err += edit_distance(h, r)
        tot += len(r)
    if tot == 0:
        raise ValueError("error rate of an empty reference set")
    return err / tot


def word_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER: words are separated by single spaces (s3prl splits on ``' '``)."""
    return _rate((h.split(" "), r.split(" ")) for h, r in zip(hypotheses, references, strict=True))


def char_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus CER over characters (spaces included), as s3prl's ``cer``."""
    return _rate(zip(hypotheses, references, strict=True))


def token_error_rate(hypotheses: Sequence[Sequence], references: Sequence[Sequence]) -> float:
    """Corpus error rate over token sequences (PER over phoneme lists)."""
    return _rate(zip(hypotheses, references, strict=True))


_SLOT = re.compile(r"B\-(\S+) (.+?) E\-\1")


def _clean(text: str) -> str:
    text = re.sub(r"B\-(\S+) ", "", text)
    return re.sub(r" E\-(\S+)", "", text)


def _slots(text: str, clean_values: bool) -> dict[str, list[str]]:
    text = re.sub(r" +", " ", text)
    out: dict[str, list[str]] = {}
    for slot_type, value in _SLOT.findall(text):
        out.setdefault(slot_type, []).append(_clean(value) if clean_values else value)
    return out


def _utterance_slots(hypotheses: Sequence[str], references: Sequence[str]):
    """Per utterance, (hypothesis slots, reference slots) as ``{type: [values]}``. As in s3prl,
    hypothesis values are stripped of nested tags and reference values are kept as written."""
    for hyp, ref in zip(hypotheses, references, strict=True):
        yield _slots(hyp, True), _slots(ref, False)


def slot_type_f1(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """s3prl ``slot_type_f1``: per utterance, F1 between the sets of slot *types* in hypothesis
    and reference (1 if both have none, 0 if only one has none), averaged over utterances."""
    scores = []
    for h, r in _utterance_slots(hypotheses, references):
        if not h and not r:
            scores.append(1.0)
        elif not h or not r:
            scores.append(0.0)
        else:
            recall = sum(1 for k in r if k in h) / len(r)
            precision = sum(1 for k in h if k in r) / len(h)
            scores.append(2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0)
    if not scores:
        raise ValueError("slot_type_f1 of an empty set")
    return sum(scores) / len(scores)


def _chars(text: str) -> str:
    return text


def _words(text: str) -> list[str]:
    return text.split(" ")


def _matched_values(hypotheses: Sequence[str], references: Sequence[str], tokens) -> list[tuple[str, str]]:
    """(hypothesis value, reference value) for every reference slot value: the hypothesis value
    of the same type with the lowest error rate over ``tokens(value)``, "" if the type is absent."""
    pairs = []
    for h, r in _utterance_slots(hypotheses, references):
        for slot_type, values in r.items():
            for ref_v in values:
                ref_t = tokens(ref_v)
                # s3prl starts from a rate of 100 and keeps the first strictly lower one, so ties
                # go to the earliest hypothesis value
                best, best_rate = "", 100.0
                for hyp_v in h.get(slot_type, ()):
                    rate = edit_distance(tokens(hyp_v), ref_t) / len(ref_t)
                    if rate < best_rate:
                        best, best_rate = hyp_v, rate
                pairs.append((best, ref_v))
    return pairs


def slot_value_cer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """s3prl ``slot_value_cer``: for every reference slot value, the hypothesis value of the same
    type with the lowest CER (empty if the type is absent); corpus CER over those pairs
    (0 when the references hold no slot values)."""
    pairs = _matched_values(hypotheses, references, _chars)
    if not pairs:
        return 0.0  # no reference slot values: nothing to get wrong
    return char_error_rate([h for h, _ in pairs], [r for _, r in pairs])


def slot_value_wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """s3prl ``slot_value_wer``: :func:`slot_value_cer` with words (split on ``' '``) for
    characters, both when picking the closest hypothesis value and in the corpus rate; a
    missing type counts as the one-word value ``""``. 0 when the references hold no slot values."""
    pairs = _matched_values(hypotheses, references, _words)
    if not pairs:
        return 0.0
    return word_error_rate([h for h, _ in pairs], [r for _, r in pairs])


def slot_edit_f1(hypotheses: Sequence[str], references: Sequence[str], *, full: bool) -> float:
    """s3prl ``slot_edit_f1_full`` (``full=True``) / ``slot_edit_f1_part`` (``full=False``), in
    percent (0-100, s3prl's scale, unlike :func:`slot_type_f1`).

    Counts over the corpus, per utterance and reference slot type: a type missing from the
    hypothesis makes each of its reference values a false negative; otherwise a reference value
    equal to some hypothesis value of its type is a true positive, and one that is not is a false
    negative *and* a false positive (extra hypothesis values of that type count nothing).
    ``full`` also counts every value of a type only the hypothesis has as a false positive.
    Returns ``100 * 2TP / (2TP + FP + FN)``; 100 when nothing was counted (no reference slots,
    and for ``full`` no hypothesis slots either), where s3prl would divide by zero.
    """
    tp = fn = fp = 0
    for h, r in _utterance_slots(hypotheses, references):
        for slot_type, ref_values in r.items():
            hyp_values = h.get(slot_type)
            if hyp_values is None:
                fn += len(ref_values)
                continue
            for ref_v in ref_values:
                if ref_v in hyp_values:
                    tp += 1
                else:  # a wrong value is both a miss and a false alarm
                    fn += 1
                    fp += 1
        if full:
            fp += sum(len(values) for slot_type, values in h.items() if slot_type not in r)
    if tp + fn + fp == 0:
        return 100.0
    return 100.0 * 2 * tp / (2 * tp + fp + fn)


def strip_slot_tags(text: str) -> str:
    """Remove ``B-type `` / `` E-type`` markers, leaving the words (for WER/CER of SF)."""
    return _clean(re.sub(r" +", " ", text))


@dataclass
class DiarizationCounts:
    """Frame-level diarization error counts (sums over frames and samples)."""

    speaker_scored: float = 0.0
    speaker_miss: float = 0.0
    speaker_falarm: float = 0.0
    speaker_error: float = 0.0
    correct: float = 0.0
    frames: float = 0.0

    def __iadd__(self, other: DiarizationCounts) -> DiarizationCounts:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    @property
    def der(self) -> float:
        """(miss + false alarm + confusion) / reference speaker frames."""
        if self.speaker_scored == 0:
            return 0.0
        return (self.speaker_miss + self.speaker_falarm + self.speaker_error) / self.speaker_scored

    @property
    def accuracy(self) -> float:
        """Fraction of (frame, speaker) activity decisions that are right."""
        return self.correct / self.frames if self.frames else 0.0


def diarization_counts(pred: torch.Tensor, label: torch.Tensor, lengths: torch.Tensor) -> DiarizationCounts:
    """Counts for binary activities ``pred``/``label`` ``[B, T, S]`` (label already permuted to
    match ``pred``), over the first ``lengths[b]`` frames of each sample (EEND scorer)."""
    pred = pred.detach().cpu().numpy().astype(int)
    label = label.detach().cpu().numpy().astype(int)
    lengths = lengths.detach().cpu().numpy()
    c = DiarizationCounts()
    for b in range(pred.shape[0]):
        p = pred[b, : lengths[b]]
        t = label[b, : lengths[b]]
        n_ref = t.sum(1)
        n_sys = p.sum(1)
        n_map = np.logical_and(t == 1, p == 1).sum(1)
        c.speaker_scored += float(n_ref.sum())
        c.speaker_miss += float(np.maximum(n_ref - n_sys, 0).sum())
        c.speaker_falarm += float(np.maximum(n_sys - n_ref, 0).sum())
        c.speaker_error += float((np.minimum(n_ref, n_sys) - n_map).sum())
        c.correct += float((t == p).sum()) / t.shape[1]
        c.frames += float(lengths[b])
    return c


def best_permutation_der(pred: np.ndarray, label: np.ndarray) -> float:
    """DER of binary activities ``[T, S]`` under the speaker permutation of ``label`` that
    gives the lowest DER (a scorer independent of the training loss, for checks)."""
    best = None
    for perm in itertools.permutations(range(label.shape[1])):
        c = diarization_counts(torch.as_tensor(pred)[None], torch.as_tensor(label[:, list(perm)])[None],
                               torch.tensor([pred.shape[0]]))
        best = c.der if best is None else min(best, c.der)
    return float(best)
