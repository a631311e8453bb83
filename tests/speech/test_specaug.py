"""SpecAugment of the ASR/SF recipes."""
from __future__ import annotations

import pytest
import torch

from adtuning.speech import build_task
from adtuning.speech.specaug import ASR_SPECAUG, SF_SPECAUG, SpecAugment


def _features(lengths=(60, 37, 11), dim=16):
    x = torch.zeros(len(lengths), max(lengths), dim)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randn(n, dim) + 3.0  # no exact zeros in valid frames
    return x, torch.tensor(lengths)


def test_identity_in_eval_mode():
    aug = SpecAugment(**ASR_SPECAUG).eval()
    x, n = _features()
    assert aug(x, n) is x


def test_masks_only_zero_and_padding_stays_zero():
    torch.manual_seed(0)
    aug = SpecAugment(apply_time_warp=False, freq_mask_width_range=(2, 5), num_freq_mask=1,
                      time_mask_width_range=(3, 6), num_time_mask=1).train()
    x, n = _features()
    y = aug(x, n)
    changed = y != x
    assert (y[changed] == 0).all()  # masking only writes zeros
    for b in range(3):
        zero_dims = (y[b, : n[b]] == 0).all(dim=0)  # one frequency band of 2-4 dims per sample
        assert 2 <= int(zero_dims.sum()) <= 4
        assert (y[b, n[b]:] == 0).all()


def test_time_warp_keeps_shape_and_endpoints():
    torch.manual_seed(1)
    aug = SpecAugment(apply_freq_mask=False, apply_time_mask=False, time_warp_window=5).train()
    x, n = _features((60, 37, 10))
    y = aug(x, n)
    assert y.shape == x.shape
    assert (y[0, 60:] == 0).all() and (y[1, 37:] == 0).all()
    torch.testing.assert_close(y[2, :10], x[2, :10])  # 10 <= 2 * window: not warped
    assert any(not torch.allclose(aug(x, n)[0, :60], x[0, :60]) for _ in range(5))  # warps (unless warped == centre)


def test_adaptive_time_masks_scale_with_length():
    torch.manual_seed(2)
    aug = SpecAugment(apply_time_warp=False, apply_freq_mask=False, **{
        k: v for k, v in SF_SPECAUG.items() if k.startswith(("adaptive", "max_n", "time_mask", "num_time"))}).train()
    short, n = _features((20,))
    assert torch.equal(aug(short, n), short)  # 0.04 * 20 -> no mask
    long, n = _features((500,))
    masked = (aug(long, n) == 0).all(dim=2).sum()
    assert 0 < masked <= 20 * 19  # up to min(0.04*500, 20) = 20 masks of width < min(40, 20)


def test_recipes_enable_it():
    asr = build_task("asr", upstream_dim=8, num_layers=2, project_dim=8, rnn_dim=4)
    sf = build_task("sf", upstream_dim=8, num_layers=2, slots=["a"], project_dim=8, rnn_dim=4)
    pr = build_task("pr", upstream_dim=8, num_layers=2, project_dim=8)
    assert asr.specaug is not None and not asr.specaug.adaptive
    assert sf.specaug is not None and sf.specaug.adaptive
    assert pr.specaug is None
    assert build_task("asr", upstream_dim=8, num_layers=2, specaug=False, project_dim=8, rnn_dim=4).specaug is None


def test_bad_ranges():
    with pytest.raises(ValueError):
        SpecAugment(time_mask_width_range=(5, 5))
