"""The module-adding methods of the paper's Table 2: LoRA (peft), Houlsby adapters, AdapterBias,
prefix tuning, CHAPTER's CNN adapters and CHAPTER, attached to an
:class:`~adtuning.speech.upstream.Upstream` by hooks and module wrapping (transformers' code is not
edited).

Usage (what the recipe does)::

    attached = attach("houlsby", upstream, {"bottleneck": 32})
    trainable = attached.parameters()          # {name: nn.Parameter}; the upstream's own weights are frozen
    ...train trainable + the head...
    tensors = attached.state_dict()            # the delta's method tensors
    attached.load_state_dict(tensors)          # on a freshly built upstream after attach(...)
    attached.merge()                           # lora only; the others raise MethodNotMergeableError
    attached.detach()                          # the base model again, bit for bit

Where the added parameters live: hook-based methods register their modules under
``upstream.method`` (``upstream.named_parameters()`` lists them as ``method.<name>``; every
``model.*`` name and tensor is untouched, so the base fingerprint over ``model.*`` is unchanged).
LoRA is peft's and lives inside ``upstream.model`` (peft renames a wrapped Linear's weights to
``<proj>.base_layer.*``; :meth:`AttachedMethod.base_named_parameters` gives the base names).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adtuning.methods import adapterbias, chapter, cnn_adapter, houlsby, lora, prefix  # noqa: F401  (register)
from adtuning.methods.base import (
    CONTAINER_NAME,
    METHODS,
    AttachedMethod,
    MethodAttachError,
    MethodNotMergeableError,
    MethodSpec,
    MethodStateError,
    OptionField,
    register_method,
)


def method_spec(name: str) -> type[MethodSpec]:
    """The registered spec of ``name``.

    Raises:
        MethodAttachError: unknown name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise MethodAttachError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def attach(name: str, upstream: Any, options: Mapping[str, Any] | None = None) -> AttachedMethod:
    """Attach method ``name`` to ``upstream`` with ``options`` (field name -> value, e.g.
    ``{"rank": 8, "targets": ["q_proj", "v_proj"]}``; strings are parsed as on the command line).

    The upstream's own parameters get ``requires_grad=False``; the method's are created on the
    upstream's device and in its dtype.

    Raises:
        MethodAttachError: unknown method, an upstream the method cannot attach to (not
            wav2vec2/HuBERT/WavLM, missing modules), or one that already has a method attached.
        ValueError: an unknown option or a bad option value (the message names the flag).
    """
    return method_spec(name).attach(upstream, options)


def expected_trainable_count(name: str, config: Any, options: Mapping[str, Any] | None = None) -> int:
    """Closed-form trainable upstream parameter count of method ``name`` for a transformers
    ``config`` (``Wav2Vec2Config``, ``HubertConfig``, ``WavLMConfig``) and ``options``."""
    spec = method_spec(name)
    return int(spec.count(config, spec.parse_options(options)))


def method_option_fields(name: str | None = None) -> dict[str, list[OptionField]]:
    """``{method: [OptionField, ...]}`` for every method (or just ``name``): what the CLI turns into
    ``--<method>-<option>`` flags (``--lora-rank``, ``--lora-alpha``, ``--lora-dropout``,
    ``--lora-targets``, ``--houlsby-bottleneck``, ``--prefix-length``, ``--cnn-adapter-scale``,
    ``--chapter-bottleneck``, ``--chapter-scale``)."""
    names = [name] if name is not None else list(METHODS)
    return {n: method_spec(n).option_fields() for n in names}


__all__ = [
    "CONTAINER_NAME",
    "METHODS",
    "AttachedMethod",
    "MethodAttachError",
    "MethodNotMergeableError",
    "MethodSpec",
    "MethodStateError",
    "OptionField",
    "attach",
    "expected_trainable_count",
    "method_option_fields",
    "method_spec",
    "register_method",
]
