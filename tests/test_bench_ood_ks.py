"""bench/ood_ks.py: the out-of-domain KS sets are written in the training corpus's clip format.

Oracles: festival's ``text2wave`` reads one expression per ``-eval`` (checked by hand: two written side
by side drop the second, so the speaking rate was never applied), and the clip format of the embedded
corpus, whose statistics are written out here (1 s, peak 0.25-0.8, a noise floor everywhere, words
at different offsets). The festival set itself needs festival (not installed here); the espeak-ng
held-out set is written for real with one speaker.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ood_ks  # noqa: E402


def test_festival_expression_sets_voice_and_rate_in_one_form():
    expr = ood_ks.festival_eval("kal_diphone", 1.2)
    assert expr == "(begin (voice_kal_diphone) (Parameter.set 'Duration_Stretch 1.2))"
    assert expr.count("(") == expr.count(")") and not expr.endswith(")(")
    # Each voice's speakers get distinct rates.
    speakers = ood_ks.festival_speakers(("a", "b", "c"), 12)
    assert len(set(speakers)) == 12
    assert sorted(s for v, s in speakers if v == "a") == pytest.approx([0.8, 0.8 + 0.4 / 3, 0.8 + 0.8 / 3, 1.2])


def test_trim_cuts_silence_and_keeps_at_most_099_s():
    x = np.zeros(40_000)
    x[10_000:12_000] = 0.3
    y = ood_ks._trim(x)
    assert len(y) == 2_000 + 2 * 320 - 1 and np.abs(y).max() == 0.3
    assert len(ood_ks._trim(np.full(30_000, 0.1))) == 16_000 - 160


def test_held_out_espeak_set_is_placed_like_the_training_clips(tmp_path):
    root = ood_ks.write_test_set("espeak-held-out", tmp_path / "set", speakers=1)
    test = root.parent / "speech_commands_test_set_v0.01"
    words = sorted(p for p in test.rglob("*.wav") if p.parent.name != "_silence_")
    assert len(words) == len(ood_ks.KEYWORDS) + len(ood_ks.FILLERS)
    onsets = set()
    for path in words:
        x, rate = sf.read(str(path))
        assert rate == 16_000 and len(x) == 16_000
        peak = np.abs(x).max()
        assert 0.25 * 0.9 <= peak <= 0.8 * 1.2  # the drawn peak, give or take the noise floor
        quiet = x[np.abs(x) < 0.02 * peak]
        assert quiet.std() > 0  # a noise floor, never digital silence as the old clips had
        onsets.add(int(np.flatnonzero(np.abs(x) > 0.1 * peak)[0]) // 1600)
    assert len(onsets) > 3  # words at different offsets (the old sets centred every word)
    # A second call reuses the set.
    assert ood_ks.write_test_set("espeak-held-out", tmp_path / "set", speakers=1) == root
