"""Prefix tuning (Li and Liang, "Prefix-tuning: Optimizing continuous prompts for generation", ACL
2021) as speech SSL studies use it (Chen et al., "Exploring efficient-tuning methods in
self-supervised speech models", SLT 2022: per-layer learnt prompt vectors, github.com/virginiakm1988/s3adapter).

Placement: every self-attention layer gets ``P`` learnt prefix vectors ``E_l`` (``[P, D]``, in the
attention's input space) whose keys and values, ``k_proj(E_l)`` and ``v_proj(E_l)`` through the
layer's frozen projections, are prepended to the layer's keys and values; every query attends to
them, they are never padding, and WavLM's relative position bias is zero on them. (Projecting
learnt vectors through the frozen k/v projections is the speech studies' per-layer prompt and a
reparametrisation of Li and Liang's free key/value prefixes that halves their count.) Attached
without editing transformers: for wav2vec2/HuBERT an attention function registered in transformers'
``AttentionInterface`` (``config._attn_implementation`` becomes ``adtuning_prefix_<base>`` and back
on detach) wraps the base implementation (eager or sdpa; flash attention is refused); for WavLM,
:mod:`adtuning.methods.wavlm_attention`.

Count: ``L * P * D``; wav2vec2-base with ``P = 11``: 101,376 (paper: 0.10M, +1.4 %; with 10 it
would be 0.092M). Initialisation ``N(0, 0.02^2)``; the prefixes take attention mass from the start,
so the attached model does NOT start as the base model (as in Li and Liang).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import nn

from adtuning.methods.base import AttachedMethod, MethodAttachError, MethodSpec, register_method
from adtuning.methods.modules import encoder_layers
from adtuning.methods.wavlm_attention import PREFIX_ATTR, install_module_attention, is_wavlm_attention

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class PrefixOptions:
    """Options of ``prefix``."""

    length: int = dataclasses.field(default=11, metadata={"help": "prefix vectors per self-attention layer"})


class LayerPrefix(nn.Module):
    """The ``[P, D]`` prefix states of one attention layer."""

    def __init__(self, length: int, hidden: int):
        super().__init__()
        self.prefix = nn.Parameter(torch.randn(length, hidden) * INIT_STD)

    def forward(self) -> torch.Tensor:
        return self.prefix


def _extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Prepend ``n`` always-visible key positions to an attention mask of any transformers format."""
    if mask is None:
        return None
    if mask.dim() == 4:  # [B, 1|H, T, S]: bool (True = attend) for sdpa, additive float for eager
        fill = torch.ones if mask.dtype == torch.bool else torch.zeros
        return torch.cat([fill(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device), mask], dim=-1)
    raise MethodAttachError(f"prefix: unsupported attention mask of shape {tuple(mask.shape)}")


def _prefixed(base_fn):
    def attention(module, query, key, value, attention_mask, **kwargs):
        prefix_fn = getattr(module, PREFIX_ATTR, None)
        if prefix_fn is not None:
            prefix = prefix_fn().to(key.dtype)
            n, bsz = prefix.shape[0], key.shape[0]
            heads, head_dim = key.shape[1], key.shape[3]

            def heads_first(x: torch.Tensor) -> torch.Tensor:  # [P, D] -> [B, H, P, hd]
                return x.view(n, heads, head_dim).transpose(0, 1).unsqueeze(0).expand(bsz, -1, -1, -1)

            key = torch.cat([heads_first(module.k_proj(prefix)), key], dim=2)
            value = torch.cat([heads_first(module.v_proj(prefix)), value], dim=2)
            attention_mask = _extend_mask(attention_mask, n)
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register_prefixed_implementation(base: str, attention_module: nn.Module) -> str:
    """Register ``adtuning_prefix_<base>`` in transformers' attention and mask interfaces."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"adtuning_prefix_{base}"
    if base == "eager":
        base_fn = getattr(sys.modules[type(attention_module).__module__], "eager_attention_forward", None)
        if base_fn is None:
            raise MethodAttachError(f"prefix: {type(attention_module).__module__} has no eager_attention_forward")
    elif base == "sdpa":
        base_fn = ALL_ATTENTION_FUNCTIONS[base]
    else:
        # flash attention unpads queries and keys with one [B, S] mask, which cannot describe keys
        # that are longer than the queries
        raise MethodAttachError(f"prefix: attention implementation {base!r} is not supported (use eager or sdpa)")
    if base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise MethodAttachError(f"prefix: no attention mask function for implementation {base!r}")
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _prefixed(base_fn))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


@register_method
class Prefix(MethodSpec):
    """Learnt key/value prefixes in every self-attention layer (see the module docstring)."""

    name = "prefix"
    options_type = PrefixOptions
    identity_at_init = False
    paper_count = 0.10e6

    @classmethod
    def validate(cls, options: PrefixOptions) -> None:
        if options.length < 1:
            raise ValueError(f"--prefix-length must be >= 1, got {options.length}")

    @classmethod
    def count(cls, config: Any, options: PrefixOptions) -> int:
        return int(config.num_hidden_layers) * options.length * int(config.hidden_size)

    @classmethod
    def _attach(cls, attached: AttachedMethod, options: PrefixOptions) -> None:
        model = attached.model
        layers = encoder_layers(model, cls.name)
        hidden = int(model.config.hidden_size)
        prefixes = attached.add_module("layers", nn.ModuleList([LayerPrefix(options.length, hidden) for _ in layers]))
        wavlm = [is_wavlm_attention(layer.attention) for layer in layers]
        for layer, prefix in zip(layers, prefixes):
            for proj in ("k_proj", "v_proj"):
                if not isinstance(getattr(layer.attention, proj, None), nn.Module):
                    raise MethodAttachError(f"method 'prefix' cannot attach to upstream {attached.upstream.name!r}: "
                                            f"its attention has no {proj}")
            attached.set_instance_attr(layer.attention, PREFIX_ATTR, prefix)
        if all(wavlm):
            for layer in layers:
                install_module_attention(attached, layer.attention)
            return
        if any(wavlm) or not all(hasattr(layer.attention, "config") for layer in layers):
            raise MethodAttachError(f"method 'prefix' cannot attach to upstream {attached.upstream.name!r}: "
                                    "its attention modules are neither WavLM's nor transformers' attention-interface ones")
        config = model.config
        original = config._attn_implementation
        config._attn_implementation = _register_prefixed_implementation(original or "eager", layers[0].attention)
        attached.on_undo(lambda: setattr(config, "_attn_implementation", original))
