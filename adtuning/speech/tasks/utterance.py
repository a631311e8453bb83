"""Utterance-level tasks: KS (Speech Commands), IC (Fluent Speech Commands), SID (VoxCeleb1).

SUPERB head: ``Linear(D, 256)`` projector, mean pooling over the valid frames, ``Linear`` to
the classes (s3prl ``UtteranceLevel`` with ``MeanPooling``); cross-entropy.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adtuning.speech.tasks.base import Task, masked_mean


class UtteranceClassification(Task):
    """Single-label utterance classification (KS, SID): metric ``accuracy``.

    Args:
        upstream_dim, num_layers, normalize_features: see :class:`Task`.
        num_classes: number of classes.
        projector_dim: width of the projector (256 in SUPERB).

    Batches carry ``"label"``: ``[B]`` long class indices.
    """

    metrics: ClassVar[dict[str, bool]] = {"accuracy": True}
    primary_metric = "accuracy"

    def __init__(self, *, upstream_dim: int, num_layers: int, num_classes: int, projector_dim: int = 256,
                 normalize_features: bool = False, name: str = "cls"):
        super().__init__(upstream_dim=upstream_dim, num_layers=num_layers, normalize_features=normalize_features)
        self.name = name
        self.num_classes = num_classes
        self.projector = nn.Linear(upstream_dim, projector_dim)
        self.classifier = nn.Linear(projector_dim, num_classes)

    def head(self, features, frame_lengths, batch):
        pooled = masked_mean(self.projector(features), frame_lengths)
        return {"logits": self.classifier(pooled)}

    def per_sample_nll(self, outputs, batch):
        return F.cross_entropy(outputs["logits"], batch["label"], reduction="none")

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs["logits"], batch["label"])

    def new_eval_state(self):
        return {**super().new_eval_state(), "correct": 0}

    def eval_update(self, state, outputs, batch):
        super().eval_update(state, outputs, batch)
        state["correct"] += int((outputs["logits"].argmax(-1) == batch["label"]).sum())

    def eval_compute(self, state):
        out = super().eval_compute(state)
        out["accuracy"] = state["correct"] / state["count"]
        return out


class IntentClassification(Task):
    """IC (Fluent Speech Commands): one logit block per slot (action, object, location).

    The loss is the sum over slots of the mean cross-entropy (s3prl ``fluent_commands``); the
    per-sample NLL is the sum over slots of the sample's cross-entropies. ``accuracy`` counts
    an utterance right only when all slots are right.

    Args:
        values_per_slot: number of values of each slot, in the order of ``batch["labels"]``.
        projector_dim: width of the projector (256 in SUPERB).

    Batches carry ``"labels"``: ``[B, num_slots]`` long.
    """

    name = "ic"
    metrics: ClassVar[dict[str, bool]] = {"accuracy": True}
    primary_metric = "accuracy"

    def __init__(self, *, upstream_dim: int, num_layers: int, values_per_slot: Sequence[int],
                 projector_dim: int = 256, normalize_features: bool = False):
        super().__init__(upstream_dim=upstream_dim, num_layers=num_layers, normalize_features=normalize_features)
        self.values_per_slot = [int(v) for v in values_per_slot]
        if not self.values_per_slot or min(self.values_per_slot) < 1:
            raise ValueError(f"values_per_slot must be positive counts, got {values_per_slot}")
        self.projector = nn.Linear(upstream_dim, projector_dim)
        self.classifier = nn.Linear(projector_dim, sum(self.values_per_slot))

    def head(self, features, frame_lengths, batch):
        pooled = masked_mean(self.projector(features), frame_lengths)
        return {"logits": self.classifier(pooled)}

    def _slot_logits(self, logits):
        return torch.split(logits, self.values_per_slot, dim=-1)

    def per_sample_nll(self, outputs, batch):
        return sum(F.cross_entropy(lg, batch["labels"][:, i], reduction="none")
                   for i, lg in enumerate(self._slot_logits(outputs["logits"])))

    def loss(self, outputs, batch):
        return sum(F.cross_entropy(lg, batch["labels"][:, i])
                   for i, lg in enumerate(self._slot_logits(outputs["logits"])))

    def new_eval_state(self):
        return {**super().new_eval_state(), "correct": 0}

    def eval_update(self, state, outputs, batch):
        super().eval_update(state, outputs, batch)
        pred = torch.stack([lg.argmax(-1) for lg in self._slot_logits(outputs["logits"])], dim=1)
        state["correct"] += int((pred == batch["labels"]).all(dim=1).sum())

    def eval_compute(self, state):
        out = super().eval_compute(state)
        out["accuracy"] = state["correct"] / state["count"]
        return out


def build_ks(*, upstream_dim: int, num_layers: int, num_classes: int = 12, **kw: Any) -> UtteranceClassification:
    """KS: 12 classes (10 words, ``_unknown_``, ``_silence_``)."""
    return UtteranceClassification(upstream_dim=upstream_dim, num_layers=num_layers, num_classes=num_classes,
                                   name="ks", **kw)


def build_sid(*, upstream_dim: int, num_layers: int, num_classes: int = 1251, **kw: Any) -> UtteranceClassification:
    """SID: VoxCeleb1 identification, 1251 speakers."""
    return UtteranceClassification(upstream_dim=upstream_dim, num_layers=num_layers, num_classes=num_classes,
                                   name="sid", **kw)
