"""SD: two-speaker diarization on LibriMix (s3prl ``diarization`` recipe).

Head: one unidirectional LSTM layer (512 units) and a ``Linear`` to one activity logit per
speaker. Labels are at ``frame_shift`` samples (160 = 10 ms); upstream frames (320 samples)
are repeated ``stride // frame_shift`` times and the last valid frame is repeated to reach the
label length, as s3prl's ``_match_length`` does. Loss: permutation-invariant BCE (s3prl
``pit_loss``: per sample the permutation with the lowest loss; the batch loss is the sum over
samples of the per-frame mean over speakers, divided by the number of label frames).
``der`` is frame level without collar, summed over the whole evaluation set (s3prl logs the mean
of per-batch DERs during training and scores its published numbers on RTTMs with dscore).
"""
from __future__ import annotations

import itertools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adtuning.speech import metrics as M
from adtuning.speech.tasks.base import Task, valid_mask


class DiarizationTask(Task):
    """SD task; metric ``der`` (lower is better), also ``accuracy``.

    Args:
        num_speakers: speakers per recording (2 for LibriMix 2-speaker).
        hidden_size, rnn_layers: LSTM size (512, 1 in SUPERB).
        frame_shift: label frame shift in samples (160 in SUPERB).

    Batches carry ``"activity"`` ``[B, T, S]`` float {0, 1} and ``"label_lengths"`` ``[B]``.
    """

    name = "sd"
    metrics: ClassVar[dict[str, bool]] = {"der": False, "accuracy": True}
    primary_metric = "der"

    def __init__(self, *, upstream_dim: int, num_layers: int, num_speakers: int = 2, hidden_size: int = 512,
                 rnn_layers: int = 1, frame_shift: int = 160, normalize_features: bool = False):
        super().__init__(upstream_dim=upstream_dim, num_layers=num_layers, normalize_features=normalize_features)
        self.num_speakers = num_speakers
        self.frame_shift = frame_shift
        self.repeat = 1
        self.rnn = nn.LSTM(upstream_dim, hidden_size, num_layers=rnn_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, num_speakers)
        self.register_buffer("permutations",
                             torch.tensor(list(itertools.permutations(range(num_speakers))), dtype=torch.long),
                             persistent=False)

    def bind_upstream(self, upstream):
        """Set the repeat factor from the upstream frame stride (must be a multiple of ``frame_shift``)."""
        stride = int(upstream.frame_stride)
        if stride % self.frame_shift:
            raise ValueError(f"sd: upstream frame stride {stride} is not a multiple of frame_shift {self.frame_shift}")
        self.repeat = stride // self.frame_shift

    def head(self, features, frame_lengths, batch):
        label_len = batch["activity"].shape[1]
        # label frame j reads upstream frame min(j // repeat, length - 1)
        j = torch.arange(label_len, device=features.device)[None, :] // self.repeat
        idx = torch.minimum(j, (frame_lengths - 1).clamp(min=0)[:, None])
        x = torch.gather(features, 1, idx.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        hidden, _ = self.rnn(x)
        return {"logits": self.linear(hidden).float()}

    def _perm_losses(self, outputs, batch):
        """``[B, P]`` summed BCE of every speaker permutation over the valid frames."""
        logits, label = outputs["logits"], batch["activity"].to(outputs["logits"].dtype)
        mask = valid_mask(batch["label_lengths"], label.shape[1]).to(logits.dtype)[:, :, None]
        losses = []
        for perm in self.permutations:
            bce = F.binary_cross_entropy_with_logits(logits, label[:, :, perm], reduction="none")
            losses.append((bce * mask).sum(dim=(1, 2)))
        return torch.stack(losses, dim=1)

    def per_sample_nll(self, outputs, batch):
        return self._perm_losses(outputs, batch).min(dim=1).values

    def loss(self, outputs, batch):
        nll = self.per_sample_nll(outputs, batch)
        return nll.sum() / self.num_speakers / batch["label_lengths"].sum().to(nll.dtype)

    loss_is_sample_mean = False

    def loss_normalizer(self, batch):
        """The loss is a mean over label frames (and speakers): this batch's label frames."""
        return float(batch["label_lengths"].sum())

    def new_eval_state(self):
        return {**super().new_eval_state(), "counts": M.DiarizationCounts()}

    def eval_update(self, state, outputs, batch):
        super().eval_update(state, outputs, batch)
        best = self._perm_losses(outputs, batch).argmin(dim=1)
        label = torch.stack([batch["activity"][b][:, self.permutations[best[b]]] for b in range(best.shape[0])])
        state["counts"] += M.diarization_counts(outputs["logits"] > 0, label, batch["label_lengths"])

    def eval_compute(self, state):
        out = super().eval_compute(state)
        out["der"] = state["counts"].der
        out["accuracy"] = state["counts"].accuracy
        return out
