"""LoRA (Hu et al., "LoRA: Low-rank adaptation of large language models", ICLR 2022) through peft.

peft's ``LoraModel`` (``peft.LoraConfig``) wraps the targeted ``nn.Linear`` modules of the
transformers model in place; nothing of LoRA is written here. Placement: the ``targets`` projections
of every transformer layer (default ``q_proj`` and ``v_proj``, the LoRA paper's choice; the speech
efficient-tuning study's code used ``q_proj`` and ``k_proj``, same count). peft initialises
``lora_B`` to zero, so the attached model starts as the base model. :meth:`AttachedMethod.merge`
is peft's ``merge_and_unload`` (the result is a plain transformers model); ``detach`` is peft's
``unload`` (the base Linear modules come back untouched).

Names: the parameters are ``encoder.layers.<i>.attention.<proj>.lora_A.weight`` / ``lora_B.weight``
(peft's names relative to ``upstream.model``, without the adapter name). While attached, peft holds the
wrapped base weights as ``<proj>.base_layer.weight``; :meth:`AttachedMethod.base_named_parameters`
gives them under their base names. WavLM hands its projection weights straight to
``F.multi_head_attention_forward``; for it the attention is computed through the (wrapped) modules
(:mod:`adtuning.methods.wavlm_attention`).

Count: ``L * sum_t r * (in_t + out_t)``; wav2vec2-base, r=8 on q and v: 294,912 (paper: 0.29M).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from adtuning.methods.base import AttachedMethod, MethodAttachError, MethodSpec, register_method
from adtuning.methods.modules import encoder_layers
from adtuning.methods.wavlm_attention import install_module_attention, is_wavlm_attention

TARGETS = {
    "q_proj": "attention.q_proj",
    "k_proj": "attention.k_proj",
    "v_proj": "attention.v_proj",
    "out_proj": "attention.out_proj",
    "intermediate_dense": "feed_forward.intermediate_dense",
    "output_dense": "feed_forward.output_dense",
}
"""LoRA target names -> module path inside a transformer layer."""

ADAPTER = "default"


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """Options of ``lora``."""

    rank: int = dataclasses.field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = dataclasses.field(default=8.0, metadata={"help": "LoRA alpha (peft's lora_alpha; scale alpha/r)"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout on the LoRA input (peft's lora_dropout)"})
    targets: tuple[str, ...] = dataclasses.field(
        default=("q_proj", "v_proj"),
        metadata={"help": "comma list of the projections of every layer to adapt: " + ",".join(TARGETS)})


def _shape(config: Any, target: str) -> tuple[int, int]:
    d, f = int(config.hidden_size), int(config.intermediate_size)
    return {"intermediate_dense": (d, f), "output_dense": (f, d)}.get(target, (d, d))


@register_method
class Lora(MethodSpec):
    """peft's LoRA on the chosen projections of every transformer layer (see the module docstring)."""

    name = "lora"
    options_type = LoraOptions
    mergeable = True
    paper_count = 0.29e6

    @classmethod
    def validate(cls, options: LoraOptions) -> None:
        if options.rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, got {options.rank}")
        if not math.isfinite(options.alpha) or options.alpha <= 0:
            raise ValueError(f"--lora-alpha must be a finite number > 0, got {options.alpha}")
        if not 0.0 <= options.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {options.dropout}")
        bad = [t for t in options.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"--lora-targets: unknown target {bad[0]!r}; known: {', '.join(TARGETS)}")
        if len(set(options.targets)) != len(options.targets):
            raise ValueError(f"--lora-targets lists a target twice: {','.join(options.targets)}")

    @classmethod
    def count(cls, config: Any, options: LoraOptions) -> int:
        per_layer = sum(options.rank * sum(_shape(config, t)) for t in options.targets)
        return int(config.num_hidden_layers) * per_layer

    @classmethod
    def _attach(cls, attached: AttachedMethod, options: LoraOptions) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        model = attached.model
        layers = encoder_layers(model, cls.name)
        names = []
        for i, layer in enumerate(layers):
            for t in options.targets:
                path = TARGETS[t]
                if not isinstance(layer.get_submodule(path), nn.Linear):
                    raise MethodAttachError(f"method 'lora' cannot attach to upstream {attached.upstream.name!r}: "
                                            f"encoder.layers.{i}.{path} is not an nn.Linear")
                names.append(f"encoder.layers.{i}.{path}")
        config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                            target_modules=names, bias="none")
        lora_model = LoraModel(model, config, ADAPTER)
        attached.lora_model = lora_model  # type: ignore[attr-defined]
        attached.on_undo(lambda: lora_model.unload() if attached._state != "merged" else None)
        for layer in layers:
            if is_wavlm_attention(layer.attention):
                install_module_attention(attached, layer.attention)

        def collect() -> dict[str, nn.Parameter]:
            marker = f".{ADAPTER}."
            return {n.replace(marker, "."): p for n, p in model.named_parameters()
                    if (".lora_A." in n or ".lora_B." in n)}

        attached.collector = collect

    @classmethod
    def merge(cls, attached: AttachedMethod) -> nn.Module:
        return attached.lora_model.merge_and_unload()  # type: ignore[attr-defined]
