"""CTC tasks: ASR (LibriSpeech characters), PR (LibriSpeech phonemes), SF (Audio SNIPS).

Heads follow s3prl: ASR and SF use ``Linear(D, 1024)`` then two bidirectional LSTM layers of
1024 units per direction (dropout 0.2 after each) and a ``Linear`` to the vocabulary
(``RNNs``); PR uses ``Linear(D, 256)`` then a frame-level ``Linear``. Padded frames are packed
away from the LSTMs, so a sample's output does not depend on the batch.

The recipe loss is ``nn.CTCLoss`` with ``reduction="mean"`` (each sample's loss divided by its
target length, averaged over the batch) and ``zero_infinity=True``; the per-sample NLL is the
unnormalised CTC loss ``-log p(y | x)``. Evaluation decodes greedily (merge repeats, then drop
blanks: standard CTC; s3prl's ``ctc`` expert drops blanks first, which also merges a phoneme
repeated across a blank -- a rare case that can only lower its PER). ASR and SF apply their recipes' SpecAugment to the featurizer output in training mode
(``specaug=False`` turns it off); in eval mode (evaluation, Fisher pass) features are clean.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from adtuning.speech import metrics as M
from adtuning.speech.specaug import ASR_SPECAUG, SF_SPECAUG, SpecAugment
from adtuning.speech.tasks.base import Task
from adtuning.speech.tasks.text import CharacterVocab, PhonemeVocab, SlotVocab, ctc_greedy


class BiLSTMStack(nn.Module):
    """s3prl ``RNNs`` body: bidirectional LSTM layers with dropout, on packed sequences."""

    def __init__(self, input_dim: int, dim: int, num_layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList()
        d = input_dim
        for _ in range(num_layers):
            self.layers.append(nn.LSTM(d, dim, num_layers=1, batch_first=True, bidirectional=True))
            d = 2 * dim
        self.dropout = nn.Dropout(dropout)
        self.output_dim = d

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, T, in]`` -> ``[B, T, 2 * dim]``; frames at or past ``lengths`` come out zero."""
        total = x.shape[1]
        for lstm in self.layers:
            packed = pack_padded_sequence(x, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
            out, _ = lstm(packed)
            x, _ = pad_packed_sequence(out, batch_first=True, total_length=total)
            x = self.dropout(x)
        return x


class CTCTask(Task):
    """Common CTC machinery. Batches carry ``"targets"`` ``[B, S]`` long (zero padded) and
    ``"target_lengths"`` ``[B]`` long."""

    blank = 0

    def __init__(self, *, upstream_dim: int, num_layers: int, vocab_size: int, project_dim: int,
                 rnn_dim: int | None, rnn_layers: int, dropout: float, normalize_features: bool,
                 specaug: dict | None = None):
        super().__init__(upstream_dim=upstream_dim, num_layers=num_layers, normalize_features=normalize_features)
        self.specaug = SpecAugment(**specaug) if specaug else None
        self.projector = nn.Linear(upstream_dim, project_dim)
        if rnn_layers > 0:
            self.rnn = BiLSTMStack(project_dim, rnn_dim, rnn_layers, dropout)
            out_dim = self.rnn.output_dim
        else:
            self.rnn = None
            out_dim = project_dim
        self.output = nn.Linear(out_dim, vocab_size)

    def head(self, features, frame_lengths, batch):
        if self.specaug is not None:
            features = self.specaug(features, frame_lengths)
        x = self.projector(features)
        if self.rnn is not None:
            x = self.rnn(x, frame_lengths)
        log_probs = F.log_softmax(self.output(x).float(), dim=-1)
        return {"log_probs": log_probs, "lengths": frame_lengths}

    def _ctc(self, outputs, batch, reduction):
        return F.ctc_loss(outputs["log_probs"].transpose(0, 1), batch["targets"], outputs["lengths"],
                          batch["target_lengths"], blank=self.blank, reduction=reduction, zero_infinity=True)

    def per_sample_nll(self, outputs, batch):
        return self._ctc(outputs, batch, "none")

    def loss(self, outputs, batch):
        return self._ctc(outputs, batch, "mean")

    # -- decoding -----------------------------------------------------------------------------
    def hypotheses(self, outputs) -> list[str]:
        """Greedy transcripts of a batch."""
        best = outputs["log_probs"].argmax(-1).cpu()
        lengths = outputs["lengths"].cpu()
        return [self.decode(ctc_greedy(best[b, : lengths[b]].tolist(), self.blank)) for b in range(best.shape[0])]

    def references(self, batch) -> list[str]:
        """Reference transcripts of a batch, decoded from its targets."""
        t = batch["targets"].cpu()
        n = batch["target_lengths"].cpu()
        return [self.decode(t[b, : n[b]].tolist()) for b in range(t.shape[0])]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a collapsed id sequence, in the task's vocabulary (``self.vocab``)."""
        return self.vocab.decode(ids)

    def new_eval_state(self):
        return {**super().new_eval_state(), "hyp": [], "ref": []}

    def eval_update(self, state, outputs, batch):
        super().eval_update(state, outputs, batch)
        state["hyp"] += self.hypotheses(outputs)
        state["ref"] += self.references(batch)


class ASRTask(CTCTask):
    """ASR: LibriSpeech characters, metric ``wer`` (lower is better) and ``cer``.

    ``specaug``: True (the recipe's, :data:`~adtuning.speech.specaug.ASR_SPECAUG`), False, or a
    dict of :class:`~adtuning.speech.specaug.SpecAugment` arguments.
    """

    name = "asr"
    metrics: ClassVar[dict[str, bool]] = {"wer": False, "cer": False}
    primary_metric = "wer"

    def __init__(self, *, upstream_dim: int, num_layers: int, project_dim: int = 1024, rnn_dim: int = 1024,
                 rnn_layers: int = 2, dropout: float = 0.2, normalize_features: bool = False,
                 specaug: dict | bool = True):
        self.vocab = CharacterVocab()
        super().__init__(upstream_dim=upstream_dim, num_layers=num_layers, vocab_size=len(self.vocab),
                         project_dim=project_dim, rnn_dim=rnn_dim, rnn_layers=rnn_layers, dropout=dropout,
                         normalize_features=normalize_features, specaug=ASR_SPECAUG if specaug is True else specaug)

    def eval_compute(self, state):
        out = super().eval_compute(state)
        out["wer"] = M.word_error_rate(state["hyp"], state["ref"])
        out["cer"] = M.char_error_rate(state["hyp"], state["ref"])
        return out


class PRTask(CTCTask):
    """PR: LibriSpeech phonemes from a lexicon, metric ``per`` (lower is better)."""

    name = "pr"
    metrics: ClassVar[dict[str, bool]] = {"per": False}
    primary_metric = "per"

    def __init__(self, *, upstream_dim: int, num_layers: int, project_dim: int = 256,
                 normalize_features: bool = False):
        self.vocab = PhonemeVocab()
        super().__init__(upstream_dim=upstream_dim, num_layers=num_layers, vocab_size=len(self.vocab),
                         project_dim=project_dim, rnn_dim=None, rnn_layers=0, dropout=0.0,
                         normalize_features=normalize_features)

    def eval_compute(self, state):
        out = super().eval_compute(state)
        out["per"] = M.word_error_rate(state["hyp"], state["ref"])
        return out


class SFTask(CTCTask):
    """SF: Audio SNIPS characters with slot tags.

    Metrics, those of s3prl's ``snips.yaml``, as s3prl computes them: ``slot_type_f1`` (primary,
    higher is better), ``slot_value_cer``, ``slot_value_wer``, ``slot_edit_f1_full`` and
    ``slot_edit_f1_part`` (in percent, as s3prl reports them), and ``wer`` / ``cer`` of the full
    tagged strings.

    Args:
        slots: slot names (``slots.txt`` of the corpus, see :class:`~adtuning.speech.corpora.snips.SnipsDataset`).
        specaug: True (the recipe's adaptive SpecAugment, :data:`~adtuning.speech.specaug.SF_SPECAUG`),
            False, or a dict of :class:`~adtuning.speech.specaug.SpecAugment` arguments.
    """

    name = "sf"
    metrics: ClassVar[dict[str, bool]] = {"slot_type_f1": True, "slot_value_cer": False, "slot_value_wer": False,
                                          "slot_edit_f1_full": True, "slot_edit_f1_part": True,
                                          "wer": False, "cer": False}
    primary_metric = "slot_type_f1"

    def __init__(self, *, upstream_dim: int, num_layers: int, slots: Sequence[str], project_dim: int = 1024,
                 rnn_dim: int = 1024, rnn_layers: int = 2, dropout: float = 0.2, normalize_features: bool = False,
                 specaug: dict | bool = True):
        self.vocab = SlotVocab(slots)
        super().__init__(upstream_dim=upstream_dim, num_layers=num_layers, vocab_size=len(self.vocab),
                         project_dim=project_dim, rnn_dim=rnn_dim, rnn_layers=rnn_layers, dropout=dropout,
                         normalize_features=normalize_features, specaug=SF_SPECAUG if specaug is True else specaug)

    def eval_compute(self, state):
        out = super().eval_compute(state)
        out["slot_type_f1"] = M.slot_type_f1(state["hyp"], state["ref"])
        out["slot_value_cer"] = M.slot_value_cer(state["hyp"], state["ref"])
        out["slot_value_wer"] = M.slot_value_wer(state["hyp"], state["ref"])
        out["slot_edit_f1_full"] = M.slot_edit_f1(state["hyp"], state["ref"], full=True)
        out["slot_edit_f1_part"] = M.slot_edit_f1(state["hyp"], state["ref"], full=False)
        out["wer"] = M.word_error_rate(state["hyp"], state["ref"])
        out["cer"] = M.char_error_rate(state["hyp"], state["ref"])
        return out
