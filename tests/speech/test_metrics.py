"""Metric functions on hand-computed cases."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from adtuning.speech import build_task
from adtuning.speech import metrics as M
from adtuning.speech.tasks.text import CharacterVocab, PhonemeVocab, SlotVocab, ctc_greedy


@pytest.mark.parametrize("hyp, ref, d", [
    ("", "", 0), ("abc", "abc", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3),
    ("flaw", "lawn", 2), (["a", "b"], ["b"], 1), ("abcdef", "azced", 3),
])
def test_edit_distance(hyp, ref, d):
    assert M.edit_distance(hyp, ref) == d
    assert M.edit_distance(ref, hyp) == d


def _reference_edit_distance(a, b) -> int:
    """Textbook full-table Levenshtein DP: the oracle the production distance must equal."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


# 0, 1, primes, and 2^k +- 1 around the sizes where a machine word or a bit mask would wrap
AWKWARD_LENGTHS = (0, 1, 2, 3, 5, 7, 13, 31, 33, 63, 64, 65, 127, 129, 257)


@pytest.mark.parametrize("alphabet", ["AB", "ABCDEFGHIJKLMNOPQRSTUVWXYZ '", ["THE", "CAT", "SAT", "ON"], [0, 1, 2]])
def test_edit_distance_equals_reference_dp(alphabet):
    rng = random.Random(str(alphabet))
    for n, m in itertools.product(AWKWARD_LENGTHS, repeat=2):
        a = [rng.choice(alphabet) for _ in range(n)]
        b = [rng.choice(alphabet) for _ in range(m)]
        if isinstance(alphabet, str):  # strings as well as lists, as CER passes them
            a, b = "".join(a), "".join(b)
        want = _reference_edit_distance(a, b)
        assert M.edit_distance(a, b) == want, (n, m)
        assert M.edit_distance(b, a) == want, (m, n)
    # a long shared core with edits near both ends, where an off-by-one in a mask would show
    core = [rng.choice(alphabet) for _ in range(300)]
    a = [alphabet[0]] + core + [alphabet[-1]]
    b = core[1:] + [alphabet[0], alphabet[-1]]
    assert M.edit_distance(a, b) == _reference_edit_distance(a, b)


def test_wer_is_corpus_level():
    # 1 substitution over 3 words + 1 deletion over 2 words = 2 / 5
    hyp = ["THE CAT SAT", "HELLO"]
    ref = ["THE BAT SAT", "HELLO WORLD"]
    assert M.word_error_rate(hyp, ref) == pytest.approx(2 / 5)


def test_cer_counts_spaces():
    assert M.char_error_rate(["AB C"], ["ABC"]) == pytest.approx(1 / 3)
    assert M.char_error_rate(["XY"], ["AB"]) == pytest.approx(1.0)


def test_per_on_phoneme_strings():
    # PER is a WER over space-separated phonemes: one insertion, one substitution over 4
    hyp = ["K AE1 T T", "D AO1 G"]
    ref = ["K AE1 T", "D AH0 G"]
    assert M.word_error_rate(hyp, ref) == pytest.approx(2 / 6)
    assert M.token_error_rate([h.split() for h in hyp], [r.split() for r in ref]) == pytest.approx(2 / 6)


def test_empty_reference_set_is_an_error():
    with pytest.raises(ValueError):
        M.char_error_rate([], [])


def test_slot_type_f1_hand_computed():
    ref = ["B-city paris E-city in B-date june E-date", "play music", "B-genre jazz E-genre"]
    hyp = ["B-city paris E-city in june", "play music", "B-artist jazz E-artist"]
    # utt 1: ref types {city, date}, hyp {city}: P = 1, R = 1/2, F1 = 2/3
    # utt 2: no slots on either side: 1;  utt 3: disjoint types: P = R = 0 -> 0
    assert M.slot_type_f1(hyp, ref) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_slot_value_cer_hand_computed():
    ref = ["B-city paris E-city and B-city rome E-city", "B-date june E-date"]
    hyp = ["B-city pari E-city and B-city rime E-city", "nothing"]
    # paris: best hyp 'pari' (1 edit / 5); rome: best 'rime' (1/4); june: missing type -> '' (4/4)
    assert M.slot_value_cer(hyp, ref) == pytest.approx((1 + 1 + 4) / (5 + 4 + 4))
    assert M.slot_value_cer(["x"], ["no slots here"]) == 0.0


def test_slot_value_wer_hand_computed():
    ref = ["B-city new york E-city or B-city paris E-city", "B-date next june E-date"]
    hyp = ["B-city new yolk E-city or B-city paris E-city", "nothing"]
    # 'new york': best hyp 'new yolk' (1 of 2 words; 'paris' would be 2 of 2); 'paris': exact (0);
    # 'next june': missing type -> '' is one empty word: 1 substitution + 1 deletion of 2 words
    assert M.slot_value_wer(hyp, ref) == pytest.approx((1 + 0 + 2) / (2 + 1 + 2))
    assert M.slot_value_wer(["B-city x E-city"], ["no slots here"]) == 0.0


def test_slot_value_cer_picks_the_closest_value_under_s3prls_cap():
    ref = ["B-a xyz E-a"]
    # 'xy' (1 edit of 3) beats 'ab' (3 of 3), whichever comes first
    assert M.slot_value_cer(["B-a ab E-a B-a xy E-a"], ref) == pytest.approx(1 / 3)
    assert M.slot_value_cer(["B-a xy E-a B-a ab E-a"], ref) == pytest.approx(1 / 3)
    # s3prl's search starts at a rate of 100: a value more than 100x too long (202 edits over 2
    # characters) is never picked, and the reference counts against '' instead (2 of 2)
    assert M.slot_value_cer(["B-a " + "q" * 202 + " E-a"], ["B-a zz E-a"]) == pytest.approx(2 / 2)


def test_slot_edit_f1_s3prl_example():
    # utterance 1: ref city {paris, rome}, date {june}; hyp city {paris, london}, artist {adele}
    #   city: paris matches (TP), rome has no equal value (FN + FP); london is not counted on its own
    #   date: absent from the hypothesis (FN); artist: hypothesis-only (FP in 'full' only)
    # utterance 2: ref genre {jazz}, hyp genre {JAZZ}: no exact match (FN + FP)
    # utterance 3: no reference slots; hyp playlist {chill}: FP in 'full' only
    ref = ["B-city paris E-city and B-city rome E-city in B-date june E-date",
           "play B-genre jazz E-genre",
           "hello there"]
    hyp = ["B-city paris E-city and B-city london E-city in june by B-artist adele E-artist",
           "play B-genre JAZZ E-genre",
           "hello B-playlist chill E-playlist"]
    # TP = 1, FN = 3 (rome, june, jazz); FP = 2 (rome, jazz) in 'part', 4 in 'full'
    assert M.slot_edit_f1(hyp, ref, full=False) == pytest.approx(100 * 2 / (2 + 2 + 3))  # 28.57
    assert M.slot_edit_f1(hyp, ref, full=True) == pytest.approx(100 * 2 / (2 + 4 + 3))  # 22.22


def test_slot_edit_f1_repeated_types_and_values():
    # two reference 'city' values equal to one hypothesis value: both are true positives
    assert M.slot_edit_f1(["B-city rome E-city"], ["B-city rome E-city to B-city rome E-city"], full=True) == 100.0
    # extra hypothesis values of a reference type cost nothing: P is not penalised
    hyp = ["B-city rome E-city B-city oslo E-city B-city bern E-city"]
    assert M.slot_edit_f1(hyp, ["B-city rome E-city"], full=True) == 100.0
    # hypothesis values are compared with their nested tags removed, reference values as written
    assert M.slot_edit_f1(["B-city new B-x york E-city"], ["B-city new york E-city"], full=False) == 100.0


def test_slot_edit_f1_without_slots():
    # no slots in the hypothesis: every reference value is a miss
    assert M.slot_edit_f1(["play jazz"], ["play B-genre jazz E-genre"], full=True) == 0.0
    assert M.slot_edit_f1(["play jazz"], ["play B-genre jazz E-genre"], full=False) == 0.0
    # no slots in the reference: 'part' counts nothing (100); 'full' counts the false alarm (0)
    assert M.slot_edit_f1(["play B-genre jazz E-genre"], ["play jazz"], full=False) == 100.0
    assert M.slot_edit_f1(["play B-genre jazz E-genre"], ["play jazz"], full=True) == 0.0
    # no slots anywhere: nothing counted, 100 where s3prl would divide by zero
    assert M.slot_edit_f1(["a", "b"], ["a", "c"], full=True) == 100.0
    with pytest.raises(ValueError):
        M.slot_edit_f1(["a"], [], full=True)


def test_sf_task_reports_the_snips_yaml_metrics():
    task = build_task("sf", upstream_dim=4, num_layers=2, slots=["city", "date"], project_dim=4, rnn_dim=2)
    ref = ["B-city paris E-city in B-date june E-date", "hello"]
    hyp = ["B-city paris E-city in june", "hello"]
    out = task.eval_compute({"count": 2, "nll_sum": 1.0, "hyp": hyp, "ref": ref})
    assert set(out) == set(task.metric_directions) == {
        "nll", "slot_type_f1", "slot_value_cer", "slot_value_wer", "slot_edit_f1_full", "slot_edit_f1_part",
        "wer", "cer"}
    assert task.primary_metric == "slot_type_f1" and task.higher_is_better
    assert out["slot_value_cer"] == pytest.approx(4 / 9)  # paris exact; june missing: 4 of 4 chars
    assert out["slot_value_wer"] == pytest.approx(1 / 2)
    assert out["slot_edit_f1_full"] == out["slot_edit_f1_part"] == pytest.approx(100 * 2 / 3)
    assert not task.metric_directions["slot_value_wer"] and task.metric_directions["slot_edit_f1_full"]


def test_strip_slot_tags():
    assert M.strip_slot_tags("play B-genre jazz  music E-genre now") == "play jazz music now"


def test_der_with_permutation():
    # reference: speaker 0 active frames 0-3, speaker 1 frames 2-5 (8 speaker-frames)
    ref = np.zeros((6, 2), dtype=int)
    ref[0:4, 0] = 1
    ref[2:6, 1] = 1
    # prediction with swapped speaker order and one missed frame (frame 5 of speaker 1)
    pred = np.zeros((6, 2), dtype=int)
    pred[0:4, 1] = 1
    pred[2:5, 0] = 1
    assert M.best_permutation_der(pred, ref) == pytest.approx(1 / 8)
    # without permuting, every reference frame is wrong somewhere
    c = M.diarization_counts(torch.tensor(pred)[None], torch.tensor(ref)[None], torch.tensor([6]))
    # frames 0,1: ref {0}, sys {1}: confusion 1 each; frames 2,3: both active: n_map = 2 -> 0;
    # frame 4: ref {1}, sys {0}: confusion 1; frame 5: ref {1}, sys {}: miss 1
    assert (c.speaker_miss, c.speaker_falarm, c.speaker_error, c.speaker_scored) == (1, 0, 3, 8)
    assert c.der == pytest.approx(4 / 8)


def test_der_ignores_padding_and_counts_false_alarm():
    ref = torch.tensor([[[1, 0], [0, 0], [9, 9]]])  # third frame is padding
    pred = torch.tensor([[[1, 0], [1, 1], [1, 1]]])
    c = M.diarization_counts(pred, ref, torch.tensor([2]))
    assert (c.speaker_scored, c.speaker_falarm, c.speaker_miss, c.speaker_error) == (1, 2, 0, 0)
    assert c.der == pytest.approx(2.0)
    assert c.accuracy == pytest.approx(2 / 4)  # frame 0: both decisions right, frame 1: none


def test_ctc_greedy():
    assert ctc_greedy([0, 3, 3, 0, 3, 4, 4, 0]) == [3, 3, 4]
    assert ctc_greedy([]) == []
    assert ctc_greedy([0, 0]) == []


def test_character_vocab_round_trip():
    v = CharacterVocab()
    ids = v.encode("IT'S A DOG")
    assert [v.tokens[i] for i in ids] == list("IT'S|A|DOG|")
    assert v.decode(ids) == "IT'S A DOG"
    with pytest.raises(KeyError, match="3"):
        v.encode("ROOM 3")


def test_phoneme_vocab_appends_eos():
    v = PhonemeVocab()
    ids = v.encode(["K", "AE1", "T"])
    assert ids[-1] == 1 and len(ids) == 4 and len(v) == 74
    assert v.decode(ids + [5, 6]) == "K AE1 T"


def test_slot_vocab_matches_s3prl_encoding():
    v = SlotVocab(["genre", "city"])
    ids, unk = v.encode(["PLAY", "JAZZ", "MUSIC", "?"], ["O", "genre", "genre", "O"])
    # s3prl: B- before the first word of a run, E- after its last, a space after every word;
    # a trailing punctuation word is skipped, so the last token is the space (no <eos>)
    assert v.decode(ids) == "PLAY B-genre JAZZ MUSIC E-genre "
    assert unk == 0
    ids, unk = v.encode(["IN", "PARIS"], ["O", "city"])
    assert ids[-1] == 1 and v.decode(ids) == "IN B-city PARIS E-city"
    _, unk = v.encode(["CAFÉ"], ["O"])
    assert unk == 1
    with pytest.raises(KeyError, match="B-artist"):
        v.encode(["X"], ["artist"])
