"""Houlsby adapters (Houlsby et al., "Parameter-efficient transfer learning for NLP", ICML 2019) as
the SUPERB efficient-tuning study uses them in speech SSL models (Chen et al., "Exploring
efficient-tuning methods in self-supervised speech models", SLT 2022; the authors' s3prl/fairseq
code, github.com/virginiakm1988/s3adapter, ``TransformerSentenceEncoderLayer``).

Placement: ONE bottleneck adapter per transformer layer, on the feed-forward output, before the
feed-forward's residual sum: ``h + FFN(h)`` becomes ``h + A(FFN(h))`` with
``A(y) = y + up(gelu(down(y)))`` (a forward hook on ``layer.feed_forward``). Houlsby et al. also put
one after the attention; the speech study (whose 0.60M Table 2 of the AD-TUNING paper reports) keeps
only the feed-forward one -- two per layer would be 1.20M at base size.

Count: ``L * (D*b + b + b*D + D)``; wav2vec2-base (L=12, D=768, b=32): 599,424 (paper: 0.60M).
``up`` starts at zero, so the attached model starts as the base model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from adtuning.methods.base import AttachedMethod, MethodSpec, register_method
from adtuning.methods.modules import BottleneckAdapter, encoder_layers, output_replacer


@dataclasses.dataclass(frozen=True)
class HoulsbyOptions:
    """Options of ``houlsby`` (and of CHAPTER's transformer adapters)."""

    bottleneck: int = dataclasses.field(default=32, metadata={"help": "adapter bottleneck width (the paper: 32)"})


def validate_bottleneck(flag: str, value: int) -> None:
    """``ValueError`` naming ``flag`` unless ``value >= 1``."""
    if value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")


def houlsby_count(config: Any, bottleneck: int) -> int:
    """Closed form: one adapter per transformer layer."""
    d, b = int(config.hidden_size), bottleneck
    return int(config.num_hidden_layers) * (d * b + b + b * d + d)


def attach_houlsby_adapters(attached: AttachedMethod, bottleneck: int) -> None:
    """Add the adapters as ``method.layers.<i>`` and hook every layer's feed-forward."""
    layers = encoder_layers(attached.model, attached.name)
    hidden = int(attached.model.config.hidden_size)
    adapters = attached.add_module("layers", nn.ModuleList([BottleneckAdapter(hidden, bottleneck) for _ in layers]))
    for layer, adapter in zip(layers, adapters):
        attached.add_forward_hook(layer.feed_forward, output_replacer(adapter))


@register_method
class Houlsby(MethodSpec):
    """Houlsby adapters, one per transformer layer after the feed-forward (see the module docstring)."""

    name = "houlsby"
    options_type = HoulsbyOptions
    paper_count = 0.60e6

    @classmethod
    def validate(cls, options: HoulsbyOptions) -> None:
        validate_bottleneck("--houlsby-bottleneck", options.bottleneck)

    @classmethod
    def count(cls, config: Any, options: HoulsbyOptions) -> int:
        return houlsby_count(config, options.bottleneck)

    @classmethod
    def _attach(cls, attached: AttachedMethod, options: HoulsbyOptions) -> None:
        attach_houlsby_adapters(attached, options.bottleneck)
