"""AdapterBias (Fu et al., "AdapterBias: Parameter-efficient token-dependent representation shift
for adapters in NLP tasks", Findings of NAACL 2022), as in the SUPERB efficient-tuning study (Chen et
al., SLT 2022).

Placement: per transformer layer, a token-dependent shift of the feed-forward output, before its
residual sum: ``y = FFN(h)`` becomes ``y + alpha(y) * v`` with ``v`` one hidden-size vector and
``alpha`` a linear scorer ``hidden -> 1`` (a forward hook on ``layer.feed_forward``). The speech
study's code scores the 3072-wide intermediate activation instead (0.046M at base size); the
AdapterBias paper's scorer reads the hidden-size representation, which gives Table 2's 0.02M.

Count: ``L * (2*D + 1)``; wav2vec2-base: 18,444 (paper: 0.02M). Initialisation as the authors'
code: ``v`` = ones, ``alpha`` PyTorch's default -- so the attached model does NOT start as the base.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from adtuning.methods.base import AttachedMethod, MethodSpec, register_method
from adtuning.methods.modules import AdapterBiasShift, encoder_layers, output_replacer


@register_method
class AdapterBias(MethodSpec):
    """AdapterBias: one vector and one linear scorer per layer (see the module docstring)."""

    name = "adapterbias"
    options_type = None
    identity_at_init = False
    paper_count = 0.02e6

    @classmethod
    def count(cls, config: Any, options: None) -> int:
        return int(config.num_hidden_layers) * (2 * int(config.hidden_size) + 1)

    @classmethod
    def _attach(cls, attached: AttachedMethod, options: None) -> None:
        layers = encoder_layers(attached.model, cls.name)
        hidden = int(attached.model.config.hidden_size)
        shifts = attached.add_module("layers", nn.ModuleList([AdapterBiasShift(hidden) for _ in layers]))
        for layer, shift in zip(layers, shifts):
            attached.add_forward_hook(layer.feed_forward, output_replacer(shift))
