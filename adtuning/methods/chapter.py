"""CHAPTER (Chen, Sung and Lee, ICASSP 2023): the CNN adapters of :mod:`adtuning.methods.cnn_adapter`
in the feature extractor plus the Houlsby adapters of :mod:`adtuning.methods.houlsby` in the
transformer (one per layer, after the feed-forward).

Count: CNN adapters + Houlsby; wav2vec2-base: 4,200,448 + 599,424 = 4,799,872 (paper: 4.67M, +2.8 %).
Both parts start at zero, so the attached model starts as the base model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from adtuning.methods.base import AttachedMethod, MethodSpec, register_method
from adtuning.methods.cnn_adapter import attach_cnn_adapters, cnn_adapter_count, validate_scale
from adtuning.methods.houlsby import attach_houlsby_adapters, houlsby_count, validate_bottleneck


@dataclasses.dataclass(frozen=True)
class ChapterOptions:
    """Options of ``chapter``."""

    bottleneck: int = dataclasses.field(default=32, metadata={"help": "Houlsby adapter bottleneck width (the paper: 32)"})
    scale: float = dataclasses.field(default=0.01, metadata={"help": "factor on the CNN adapters' output (CHAPTER's code: 0.01)"})


@register_method
class Chapter(MethodSpec):
    """CNN adapters + Houlsby adapters (see the module docstring)."""

    name = "chapter"
    options_type = ChapterOptions
    paper_count = 4.67e6

    @classmethod
    def validate(cls, options: ChapterOptions) -> None:
        validate_bottleneck("--chapter-bottleneck", options.bottleneck)
        validate_scale("--chapter-scale", options.scale)

    @classmethod
    def count(cls, config: Any, options: ChapterOptions) -> int:
        return cnn_adapter_count(config) + houlsby_count(config, options.bottleneck)

    @classmethod
    def _attach(cls, attached: AttachedMethod, options: ChapterOptions) -> None:
        attach_cnn_adapters(attached, options.scale)
        attach_houlsby_adapters(attached, options.bottleneck)
