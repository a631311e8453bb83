"""The small modules the methods add, and where they find their places in a transformers
wav2vec2 / HuBERT / WavLM model (no transformers code is edited: the methods hook these modules).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from adtuning.methods.base import MethodAttachError


# -- places in the model --------------------------------------------------------------------------
def encoder_layers(model: nn.Module, method: str) -> list[nn.Module]:
    """The transformer layers ``model.encoder.layers`` (each with ``attention`` and ``feed_forward``)."""
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise MethodAttachError(f"method {method!r} cannot attach to {type(model).__name__}: no encoder.layers")
    for i, layer in enumerate(layers):
        for part in ("attention", "feed_forward"):
            if not isinstance(getattr(layer, part, None), nn.Module):
                raise MethodAttachError(f"method {method!r} cannot attach to {type(model).__name__}: "
                                        f"encoder.layers.{i} has no {part} module")
    return list(layers)


def conv_layers(model: nn.Module, method: str) -> list[nn.Module]:
    """The CNN feature-encoder layers ``model.feature_extractor.conv_layers`` (each with ``conv``)."""
    layers = getattr(getattr(model, "feature_extractor", None), "conv_layers", None)
    if layers is None or len(layers) == 0:
        raise MethodAttachError(f"method {method!r} cannot attach to {type(model).__name__}: "
                                "no feature_extractor.conv_layers")
    for i, layer in enumerate(layers):
        if not isinstance(getattr(layer, "conv", None), nn.Conv1d):
            raise MethodAttachError(f"method {method!r} cannot attach to {type(model).__name__}: "
                                    f"feature_extractor.conv_layers.{i} has no Conv1d 'conv'")
    return list(layers)


# -- modules ---------------------------------------------------------------------------------------
class BottleneckAdapter(nn.Module):
    """Houlsby et al. (2019) adapter: ``x + up(gelu(down(x)))``.

    ``down``: ``hidden -> bottleneck`` (PyTorch's default Linear initialisation); ``up``:
    ``bottleneck -> hidden``, initialised to zero so that the adapter starts as the identity
    (Houlsby et al.'s near-identity initialisation, made exact). ``hidden*b + b + b*hidden + hidden``
    parameters.
    """

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(nn.functional.gelu(self.down(x)))


class AdapterBiasShift(nn.Module):
    """AdapterBias (Fu et al., 2022): a token-dependent shift ``x + alpha(x) * v``.

    ``v``: one vector of the hidden size (initialised to ones, as in the authors' code); ``alpha``: a
    linear scorer ``hidden -> 1`` (PyTorch's default Linear initialisation). ``2*hidden + 1``
    parameters. Not the identity at initialisation (neither is the authors' code).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.vector = nn.Parameter(torch.ones(hidden))
        self.alpha = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha(x) * self.vector


class ConvAdapterBlock(nn.Module):
    """CHAPTER's CNN adapter for one feature-encoder layer: a parallel copy of the layer's block
    (Conv1d with the same channels, kernel, stride and bias, then the same normalisation -- group
    norm, layer norm over channels, or none -- then the activation), whose convolution starts at
    zero, so the adapter's output is 0 at initialisation.
    """

    def __init__(self, layer: nn.Module, activation: str):
        super().__init__()
        conv: nn.Conv1d = layer.conv
        self.conv = nn.Conv1d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size[0],
                              stride=conv.stride[0], bias=conv.bias is not None)
        nn.init.zeros_(self.conv.weight)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        norm = getattr(layer, "layer_norm", None)
        self.norm_kind = "none"
        if isinstance(norm, nn.GroupNorm):
            self.layer_norm: nn.Module = nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=True)
            self.norm_kind = "group"
        elif isinstance(norm, nn.LayerNorm):
            self.layer_norm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=True)
            self.norm_kind = "layer"
        self.activation = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.norm_kind == "group":
            y = self.layer_norm(y)
        elif self.norm_kind == "layer":
            y = self.layer_norm(y.transpose(-2, -1)).transpose(-2, -1)
        return self.activation(y)

    @staticmethod
    def count(in_ch: int, out_ch: int, kernel: int, *, bias: bool, norm: str) -> int:
        """Parameters of one block (``norm``: ``group``, ``layer`` or ``none``)."""
        return in_ch * out_ch * kernel + (out_ch if bias else 0) + (2 * out_ch if norm != "none" else 0)


def conv_norm_kinds(config: Any) -> list[str]:
    """Normalisation of every CNN layer of a config: ``group`` (layer 0 of ``feat_extract_norm="group"``),
    ``layer`` (every layer of ``"layer"``) or ``none``."""
    n = len(config.conv_dim)
    if config.feat_extract_norm == "layer":
        return ["layer"] * n
    return ["group"] + ["none"] * (n - 1)


def output_replacer(fn):
    """A forward hook that replaces a module's output (or the first element of a tuple output) by
    ``fn(output)``."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    return hook
