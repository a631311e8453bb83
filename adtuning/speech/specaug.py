"""SpecAugment on downstream features, as s3prl's runner applies it to the featurizer output
of the ASR and SF recipes (``s3prl/downstream/specaug.py``, from ESPnet).

Per sample: a time warp of its valid frames (bicubic interpolation around a random centre);
per batch: frequency masks and time masks (positions drawn over the padded length, as in
s3prl), masked values set to zero. The adaptive variant (SF) scales the number and width of
the time masks with the padded length. Randomness comes from torch's global generator, like
dropout. Only active in training mode; evaluation and the Fisher pass see clean features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpecAugment(nn.Module):
    """Time warp, frequency masks and time masks on ``[B, T, D]`` features.

    Args:
        apply_time_warp, time_warp_window: warp each sample's frames around a random centre
            by up to ``time_warp_window`` frames (skipped for samples of ``<= 2 * window`` frames).
        apply_freq_mask, freq_mask_width_range, num_freq_mask: feature-dimension masks.
        apply_time_mask, time_mask_width_range, num_time_mask: time masks.
        adaptive, adaptive_number_ratio, adaptive_size_ratio, max_n_time_masks: adaptive
            time masks (number ``min(ratio * T, max)`` and width ``min(max_width, ratio * T)``).
    """

    def __init__(self, *, apply_time_warp: bool = True, time_warp_window: int = 5, apply_freq_mask: bool = True,
                 freq_mask_width_range: tuple[int, int] = (0, 20), num_freq_mask: int = 2,
                 apply_time_mask: bool = True, time_mask_width_range: tuple[int, int] = (0, 100),
                 num_time_mask: int = 2, adaptive: bool = False, adaptive_number_ratio: float = 0.04,
                 adaptive_size_ratio: float = 0.04, max_n_time_masks: int = 20):
        super().__init__()
        for name, (lo, hi) in (("freq_mask_width_range", freq_mask_width_range),
                               ("time_mask_width_range", time_mask_width_range)):
            if not 0 <= lo < hi:
                raise ValueError(f"SpecAugment: {name} must be (low, high) with 0 <= low < high, got {(lo, hi)}")
        self.apply_time_warp, self.time_warp_window = apply_time_warp, time_warp_window
        self.apply_freq_mask, self.freq_mask_width_range, self.num_freq_mask = (
            apply_freq_mask, tuple(freq_mask_width_range), num_freq_mask)
        self.apply_time_mask, self.time_mask_width_range, self.num_time_mask = (
            apply_time_mask, tuple(time_mask_width_range), num_time_mask)
        self.adaptive, self.adaptive_number_ratio = adaptive, adaptive_number_ratio
        self.adaptive_size_ratio, self.max_n_time_masks = adaptive_size_ratio, max_n_time_masks

    def time_warp(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Warp the valid frames of every sample (frames past its length stay zero)."""
        w = self.time_warp_window
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            n = int(lengths[b])
            y = x[b, :n]
            if n - w > w:
                center = int(torch.randint(w, n - w, (1,)))
                warped = int(torch.randint(center - w, center + w, (1,))) + 1
                img = y[None, None]
                left = F.interpolate(img[:, :, :center], (warped, y.shape[1]), mode="bicubic", align_corners=False)
                right = F.interpolate(img[:, :, center:], (n - warped, y.shape[1]), mode="bicubic",
                                      align_corners=False)
                y = torch.cat([left, right], dim=2)[0, 0]
            out[b, :n] = y
        return out

    @staticmethod
    def _mask(x: torch.Tensor, dim: int, low: int, high: int, num: int) -> torch.Tensor:
        size = x.shape[dim]
        width = torch.randint(low, high, (x.shape[0], num), device=x.device).unsqueeze(2)
        pos = torch.randint(0, max(1, size - int(width.max())), (x.shape[0], num), device=x.device).unsqueeze(2)
        aran = torch.arange(size, device=x.device)[None, None, :]
        mask = ((pos <= aran) & (aran < pos + width)).any(dim=1)
        mask = mask.unsqueeze(2) if dim == 1 else mask.unsqueeze(1)
        return x.masked_fill(mask, 0.0)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Augmented copy of ``x`` ``[B, T, D]`` in training mode; ``x`` itself otherwise."""
        if not self.training:
            return x
        if self.apply_time_warp:
            x = self.time_warp(x, lengths)
        if self.apply_freq_mask:
            x = self._mask(x, 2, *self.freq_mask_width_range, self.num_freq_mask)
        if self.apply_time_mask:
            low, high = self.time_mask_width_range
            num = self.num_time_mask
            if self.adaptive:
                t = x.shape[1]
                if self.adaptive_number_ratio > 0:
                    num = min(int(self.adaptive_number_ratio * t), self.max_n_time_masks)
                if self.adaptive_size_ratio > 0:
                    high = min(high, int(self.adaptive_size_ratio * t))
            if num > 0 and high > low:
                x = self._mask(x, 1, low, high, num)
        return x


ASR_SPECAUG = {"apply_time_warp": True, "time_warp_window": 5, "apply_freq_mask": True,
               "freq_mask_width_range": (0, 50), "num_freq_mask": 4, "apply_time_mask": True,
               "time_mask_width_range": (0, 40), "num_time_mask": 2, "adaptive": False}
"""``specaug`` block of s3prl's ``downstream/asr/config.yaml``."""

SF_SPECAUG = {**ASR_SPECAUG, "adaptive": True, "adaptive_number_ratio": 0.04, "adaptive_size_ratio": 0.04,
              "max_n_time_masks": 20}
"""``specaug`` block of s3prl's ``downstream/ctc/snips.yaml``."""
