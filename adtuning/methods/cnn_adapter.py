"""CNN adapters in the feature extractor, from CHAPTER (Chen, Sung and Lee, "CHAPTER: Exploiting
convolutional neural network adapters for self-supervised speech models", ICASSP 2023; the
authors' code, github.com/virginiakm1988/s3adapter, ``ConvFeatureExtractionModel``).

Placement: one adapter per CNN feature-encoder layer, in parallel with it: ``x_out = conv_i(x) +
scale * adapter_i(x)`` where ``adapter_i`` is a copy of the layer's block (Conv1d with the same
channels/kernel/stride/bias, the same normalisation, the activation) whose convolution starts at
zero (a forward hook on ``feature_extractor.conv_layers[i]``). ``scale`` is 0.01 in the authors'
zero-initialised version. The base CNN stays frozen.

Count: the CNN's convolutions again plus the normalisations' affine parameters; wav2vec2-base
(512 channels, kernels 10,3,3,3,3,2,2, group norm on layer 0): 4,200,448 (paper: 4.07M, +3.2 %).
The adapters start at zero, so the attached model starts as the base model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from adtuning.methods.base import AttachedMethod, MethodSpec, conv_specs, register_method
from adtuning.methods.modules import ConvAdapterBlock, conv_layers, conv_norm_kinds


@dataclasses.dataclass(frozen=True)
class CnnAdapterOptions:
    """Options of ``cnn-adapter`` (and of CHAPTER's CNN part)."""

    scale: float = dataclasses.field(default=0.01, metadata={"help": "factor on the CNN adapters' output (CHAPTER's code: 0.01)"})


def validate_scale(flag: str, value: float) -> None:
    """``ValueError`` naming ``flag`` unless ``value`` is finite and > 0."""
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{flag} must be a finite number > 0, got {value}")


def cnn_adapter_count(config: Any) -> int:
    """Closed form: one block per CNN layer."""
    bias = bool(config.conv_bias)
    return sum(ConvAdapterBlock.count(i, o, k, bias=bias, norm=n)
               for (i, o, k), n in zip(conv_specs(config), conv_norm_kinds(config)))


def attach_cnn_adapters(attached: AttachedMethod, scale: float) -> None:
    """Add the adapters as ``method.conv_layers.<i>`` and hook every CNN layer."""
    layers = conv_layers(attached.model, attached.name)
    activation = attached.model.config.feat_extract_activation
    blocks = attached.add_module("conv_layers", nn.ModuleList([ConvAdapterBlock(layer, activation) for layer in layers]))
    for layer, block in zip(layers, blocks):
        def hook(module, args, output, block=block):
            return output + scale * block(args[0])

        attached.add_forward_hook(layer, hook)


@register_method
class CnnAdapter(MethodSpec):
    """CHAPTER's CNN adapters alone (see the module docstring)."""

    name = "cnn-adapter"
    options_type = CnnAdapterOptions
    paper_count = 4.07e6

    @classmethod
    def validate(cls, options: CnnAdapterOptions) -> None:
        validate_scale("--cnn-adapter-scale", options.scale)

    @classmethod
    def count(cls, config: Any, options: CnnAdapterOptions) -> int:
        return cnn_adapter_count(config)

    @classmethod
    def _attach(cls, attached: AttachedMethod, options: CnnAdapterOptions) -> None:
        attach_cnn_adapters(attached, options.scale)
