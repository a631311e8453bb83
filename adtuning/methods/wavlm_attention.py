"""WavLM self-attention computed through its projection modules.

transformers' ``WavLMAttention.torch_multi_head_self_attention`` hands the *weights* of ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` to ``F.multi_head_attention_forward``, so anything that wraps
those modules (peft's LoRA) or adds keys and values (prefix tuning) would be bypassed. The methods
that need it install :func:`module_attention` as an instance attribute of the attention module
(transformers' code is not edited; :meth:`AttachedMethod.detach` deletes the attribute again). It
computes the same function as PyTorch's (same scaling, the gated relative position bias and the key
padding mask as an additive mask, softmax, dropout), calling the modules instead of their weights,
and prepends the key/value prefix of :mod:`adtuning.methods.prefix` when the module has one.
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

PREFIX_ATTR = "_adtuning_prefix"
"""Instance attribute of an attention module: a callable returning its ``[P, D]`` prefix states."""


def module_attention(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                     gated_position_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``WavLMAttention.torch_multi_head_self_attention`` (bound to the module).

    Args:
        hidden_states: ``[B, T, D]``.
        attention_mask: ``[B, T]``, 1 at valid frames (or ``None``).
        gated_position_bias: ``[B*H, T, T]`` additive bias.

    Returns:
        ``([B, T, D] output, [B, H, T, S] attention weights)`` with ``S = T`` plus the prefix length.
    """
    bsz, tgt, dim = hidden_states.shape
    heads = self.num_heads
    head_dim = dim // heads
    q = self.q_proj(hidden_states)
    k = self.k_proj(hidden_states)
    v = self.v_proj(hidden_states)
    bias = gated_position_bias.to(q.dtype)
    pad = None if attention_mask is None else attention_mask.ne(1)
    prefix_fn = getattr(self, PREFIX_ATTR, None)
    if prefix_fn is not None:
        prefix = prefix_fn().to(hidden_states.dtype)
        n = prefix.shape[0]
        k = torch.cat([self.k_proj(prefix).unsqueeze(0).expand(bsz, -1, -1), k], dim=1)
        v = torch.cat([self.v_proj(prefix).unsqueeze(0).expand(bsz, -1, -1), v], dim=1)
        bias = torch.cat([bias.new_zeros(bias.shape[0], tgt, n), bias], dim=-1)
        if pad is not None:
            pad = torch.cat([pad.new_zeros(bsz, n), pad], dim=1)
    src = k.shape[1]

    def split(x: torch.Tensor, length: int) -> torch.Tensor:  # [B, L, D] -> [B*H, L, hd], index b*H + h
        return x.view(bsz, length, heads, head_dim).transpose(1, 2).reshape(bsz * heads, length, head_dim)

    q, k, v = split(q, tgt), split(k, src), split(v, src)
    if pad is not None:
        bias = bias.view(bsz, heads, tgt, src).masked_fill(pad[:, None, None, :], float("-inf"))
        bias = bias.view(bsz * heads, tgt, src)
    weights = torch.baddbmm(bias, q * math.sqrt(1.0 / head_dim), k.transpose(-2, -1))
    weights = F.softmax(weights, dim=-1)
    if self.training and self.dropout > 0:
        weights = F.dropout(weights, p=self.dropout)
    out = torch.bmm(weights, v).view(bsz, heads, tgt, head_dim).transpose(1, 2).reshape(bsz, tgt, dim)
    return self.out_proj(out), weights.view(bsz, heads, tgt, src)


def is_wavlm_attention(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' WavLM attention (weights handed to ``F.multi_head_attention_forward``)."""
    return type(module).__name__ == "WavLMAttention" and hasattr(module, "torch_multi_head_self_attention")


def install_module_attention(attached, attention: nn.Module) -> None:
    """Make a WavLM attention module compute through its projection modules (undone on detach)."""
    if "torch_multi_head_self_attention" not in attention.__dict__:
        attached.set_instance_attr(attention, "torch_multi_head_self_attention", types.MethodType(module_attention, attention))
