"""The paper's Baseline (``--method frozen``): the upstream frozen, no weighted sum, the last hidden
state only. It adds no module to the upstream (it is not in :data:`adtuning.methods.METHODS`); it
changes the task's featurizer to :class:`~adtuning.speech.featurizer.Featurizer`'s ``last`` mode.
"""
from __future__ import annotations

from torch import nn

from adtuning.speech.featurizer import Featurizer


def use_last_layer(task: nn.Module) -> nn.Module:
    """Replace ``task.featurizer`` (a weighted-sum :class:`Featurizer`) by one that returns the last
    hidden state (same ``num_layers`` and ``normalize``, no parameters, on the old one's device).
    Returns ``task``.

    Raises:
        TypeError: ``task`` has no :class:`Featurizer` named ``featurizer``.
    """
    old = getattr(task, "featurizer", None)
    if not isinstance(old, Featurizer):
        raise TypeError(f"{type(task).__name__} has no Featurizer 'featurizer' to switch to the last layer")
    new = Featurizer(old.num_layers, normalize=old.normalize, mode="last")
    task.featurizer = new
    return task
