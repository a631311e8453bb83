"""The shared base of the module-adding methods: errors, option declarations, the registry and
:class:`AttachedMethod`.

A method is a :class:`MethodSpec` subclass that registers itself in :data:`METHODS` with
:func:`register_method`. Its options are a frozen dataclass (``options_type``) whose fields carry
``metadata={"help": ...}``; :func:`method_option_fields` turns them into CLI flag descriptions
(``--lora-rank``, ``--houlsby-bottleneck``, ...). ``spec.attach(upstream, options)`` adds the method's
modules to an :class:`~adtuning.speech.upstream.Upstream` and returns an :class:`AttachedMethod`,
which owns everything it changed and can undo it (:meth:`AttachedMethod.detach`).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

CONTAINER_NAME = "method"
"""Attribute of the :class:`Upstream` under which the added modules of the hook-based methods live
(so ``upstream.named_parameters()`` shows them as ``method.<name>``, next to ``model.*``, which is
left untouched)."""


class MethodAttachError(RuntimeError):
    """A method cannot attach to an upstream (unknown method, unsupported model, missing modules,
    already attached)."""


class MethodNotMergeableError(RuntimeError):
    """:meth:`AttachedMethod.merge` on a method that adds modules a plain transformers model lacks."""


class MethodStateError(ValueError):
    """A method state dict that does not fit the attached method (missing/unexpected names, shapes,
    non-finite values)."""


@dataclasses.dataclass(frozen=True)
class OptionField:
    """One option of a method, as the CLI shows it.

    Attributes:
        method: the method's name (``lora``).
        name: the field name, the key of ``options`` (``rank``).
        flag: the generated flag (``--lora-rank``).
        type: ``int``, ``float``, ``str`` or ``tuple`` (a comma-separated list of strings).
        default: the default value (JSON-able; tuples for lists).
        help: one line for ``--help``.
    """

    method: str
    name: str
    flag: str
    type: type
    default: Any
    help: str

    def parse(self, text: str) -> Any:
        """Convert a command-line string to the option's value (raises ``ValueError`` naming the flag)."""
        try:
            if self.type is tuple:
                items = tuple(s.strip() for s in text.split(",") if s.strip())
                if not items:
                    raise ValueError("empty list")
                return items
            return self.type(text)
        except ValueError as exc:
            raise ValueError(f"{self.flag}: cannot parse {text!r} as {self.type.__name__} ({exc})") from None


def _field_type(options_type: type, field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(options_type)[field.name]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple
    if hint in (int, float, str):
        return hint
    raise TypeError(f"unsupported option type {hint!r} for {options_type.__name__}.{field.name}")


class MethodSpec:
    """A module-adding method. Subclasses set the class attributes and implement :meth:`_attach` and
    :meth:`count`.

    Attributes:
        name: registry key and CLI name (``cnn-adapter``).
        options_type: frozen dataclass of the options (``None``: no options).
        mergeable: whether :meth:`AttachedMethod.merge` can fold the method into the base weights.
        identity_at_init: whether the attached model computes the base function before training.
        paper_count: the method's upstream trainable count in Table 2 of the AD-TUNING paper at
            wav2vec2-base size (``None`` if not in the table).
    """

    name: ClassVar[str] = ""
    options_type: ClassVar[type | None] = None
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    paper_count: ClassVar[float | None] = None

    # -- options ------------------------------------------------------------------------------
    @classmethod
    def option_fields(cls) -> list[OptionField]:
        """The method's options as :class:`OptionField` (flag ``--<method>-<field>``)."""
        if cls.options_type is None:
            return []
        out = []
        for f in dataclasses.fields(cls.options_type):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append(OptionField(method=cls.name, name=f.name, flag=f"--{cls.name}-{f.name.replace('_', '-')}",
                                   type=_field_type(cls.options_type, f), default=default,
                                   help=str(f.metadata.get("help", ""))))
        return out

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | None) -> Any:
        """Validate ``options`` (field name -> value) into an ``options_type`` instance.

        Raises:
            ValueError: an unknown option (naming it and the method's options) or a bad value
                (naming the option's flag).
        """
        options = dict(options or {})
        fields = {f.name: f for f in cls.option_fields()}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            known = ", ".join(f"{f.name} ({f.flag})" for f in fields.values()) or "none"
            raise ValueError(f"method {cls.name!r} has no option {unknown[0]!r}; its options: {known}")
        values = {}
        for key, value in options.items():
            field = fields[key]
            if isinstance(value, str) and field.type is not str:
                value = field.parse(value)
            elif field.type is tuple:
                if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                    value = tuple(value)
                else:
                    raise ValueError(f"{field.flag}: expected a non-empty list of names, got {value!r}")
            elif field.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, field.type) or isinstance(value, bool):
                raise ValueError(f"{field.flag}: expected {field.type.__name__}, got {value!r}")
            values[key] = value
        parsed = cls.options_type(**values) if cls.options_type is not None else None
        if parsed is not None:
            cls.validate(parsed)
        return parsed

    @classmethod
    def validate(cls, options: Any) -> None:
        """Check option values (override; raise ``ValueError`` naming the flag)."""

    @classmethod
    def options_dict(cls, options: Any) -> dict[str, Any]:
        """JSON-able form of parsed options (tuples become lists)."""
        if options is None:
            return {}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(options).items()}

    # -- counts and attaching -----------------------------------------------------------------
    @classmethod
    def count(cls, config: Any, options: Any) -> int:
        """Closed-form trainable upstream parameter count for a transformers ``config``."""
        raise NotImplementedError

    @classmethod
    def attach(cls, upstream: nn.Module, options: Mapping[str, Any] | None = None) -> AttachedMethod:
        """Attach to ``upstream`` (see :func:`adtuning.methods.attach`)."""
        parsed = cls.parse_options(options)
        model = getattr(upstream, "model", None)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ("wav2vec2", "hubert", "wavlm"):
            raise MethodAttachError(f"method {cls.name!r} cannot attach to upstream "
                                    f"{getattr(upstream, 'name', type(upstream).__name__)!r}: model type "
                                    f"{model_type!r} is not wav2vec2, hubert or wavlm")
        if getattr(upstream, "_adtuning_attached_method", None) is not None:
            raise MethodAttachError(f"method {cls.name!r} cannot attach to upstream {upstream.name!r}: method "
                                    f"{upstream._adtuning_attached_method!r} is already attached (detach it first)")
        attached = AttachedMethod(cls, upstream, parsed)
        try:
            cls._attach(attached, parsed)
        except Exception:
            attached.detach()
            raise
        attached._finish_attach()
        return attached

    @classmethod
    def _attach(cls, attached: AttachedMethod, options: Any) -> None:
        raise NotImplementedError

    @classmethod
    def merge(cls, attached: AttachedMethod) -> nn.Module:
        """Fold the method into the base weights (mergeable methods override)."""
        raise MethodNotMergeableError(f"method {cls.name!r} cannot be merged")


METHODS: dict[str, type[MethodSpec]] = {}
"""Registry of the module-adding methods: name -> :class:`MethodSpec` subclass (filled by the method
modules as they are imported)."""


def register_method(spec: type[MethodSpec]) -> type[MethodSpec]:
    """Class decorator: add ``spec`` to :data:`METHODS` under ``spec.name``."""
    if not spec.name or spec.name in METHODS:
        raise ValueError(f"method name {spec.name!r} is empty or already registered")
    METHODS[spec.name] = spec
    return spec


class AttachedMethod:
    """A method attached to one upstream: the added parameters, and everything needed to undo it.

    Created by :func:`adtuning.methods.attach`. While attached, every base parameter of the upstream
    has ``requires_grad=False`` and keeps its values bit for bit; the method's parameters
    (:meth:`parameters`) require grad. :meth:`detach` restores the upstream exactly (modules, hooks,
    ``requires_grad`` flags).

    Attributes:
        name: the method's name.
        options: its options as a JSON-able dict (for the delta's metadata).
        mergeable: whether :meth:`merge` is possible (LoRA only).
        upstream: the upstream it is attached to.
    """

    def __init__(self, spec: type[MethodSpec], upstream: nn.Module, options: Any):
        self.spec = spec
        self.name = spec.name
        self.options = spec.options_dict(options)
        self.mergeable = spec.mergeable
        self.upstream = upstream
        self._params: dict[str, nn.Parameter] = {}
        self._undo: list[Callable[[], None]] = []
        self.collector: Callable[[], dict[str, nn.Parameter]] = self._container_params
        self._requires_grad = {n: p.requires_grad for n, p in upstream.named_parameters()}
        self._state = "attaching"
        object.__setattr__(upstream, "_adtuning_attached_method", spec.name)
        self._undo.append(lambda: object.__setattr__(upstream, "_adtuning_attached_method", None))

    # -- building (used by the method modules) ------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The transformers model inside the upstream."""
        return self.upstream.model

    def container(self) -> nn.Module:
        """The module under ``upstream.method`` holding the added modules (created on first use)."""
        existing = self.upstream._modules.get(CONTAINER_NAME)
        if existing is not None:
            return existing
        if hasattr(self.upstream, CONTAINER_NAME):
            raise MethodAttachError(f"method {self.name!r} cannot attach to upstream {self.upstream.name!r}: it already "
                                    f"has an attribute {CONTAINER_NAME!r}")
        box = nn.Module()
        self.upstream.add_module(CONTAINER_NAME, box)
        self._undo.append(lambda: self.upstream._modules.pop(CONTAINER_NAME, None))
        return box

    def add_module(self, name: str, module: nn.Module) -> nn.Module:
        """Register ``module`` as ``upstream.method.<name>``, on the upstream's device and dtype."""
        ref = next(self.model.parameters())
        module.to(device=ref.device, dtype=ref.dtype)
        self.container().add_module(name, module)
        return module

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on :meth:`detach` (last registered runs first)."""
        self._undo.append(fn)

    def add_forward_hook(self, module: nn.Module, hook: Callable, **kwargs: Any) -> None:
        """``module.register_forward_hook(hook)``, removed on :meth:`detach`."""
        handle = module.register_forward_hook(hook, **kwargs)
        self._undo.append(handle.remove)

    def set_instance_attr(self, obj: Any, attr: str, value: Any) -> None:
        """Set a plain (non-module) instance attribute, deleted again on :meth:`detach`."""
        if attr in obj.__dict__:
            raise MethodAttachError(f"method {self.name!r}: {type(obj).__name__} already has an instance attribute {attr!r}")
        object.__setattr__(obj, attr, value)
        self._undo.append(lambda: obj.__dict__.pop(attr, None))

    def _finish_attach(self) -> None:
        base = self.spec.name
        mine = {id(p) for p in self.collector().values()}
        for n, p in self.upstream.named_parameters():
            if id(p) not in mine:
                p.requires_grad_(False)
        self._params = self.collector()
        for p in self._params.values():
            p.requires_grad_(True)
        if not self._params:
            raise MethodAttachError(f"method {base!r} added no parameters to upstream {self.upstream.name!r}")
        self._state = "attached"

    def _container_params(self) -> dict[str, nn.Parameter]:
        box = self.upstream._modules.get(CONTAINER_NAME)
        return dict(box.named_parameters()) if box is not None else {}

    # -- public API ---------------------------------------------------------------------------
    def _check(self) -> None:
        if self._state != "attached":
            raise RuntimeError(f"method {self.name!r} is {self._state}")

    def parameters(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of everything the method trains (stable, unique names)."""
        self._check()
        return dict(self._params)

    def trainable_count(self) -> int:
        """Number of trainable entries the method added."""
        self._check()
        return sum(p.numel() for p in self._params.values())

    def base_named_parameters(self) -> dict[str, nn.Parameter]:
        """The upstream's own parameters under their base names (what
        :func:`adtuning.checkpoint.weights_fingerprint` of the untouched upstream saw); the method's
        parameters are not included."""
        mine = {id(p) for p in self._params.values()}
        # peft's LoRA moves a wrapped Linear's weights to ``<module>.base_layer.*``
        return {n.replace(".base_layer.", "."): p for n, p in self.upstream.named_parameters() if id(p) not in mine}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of :meth:`parameters`."""
        self._check()
        return {n: p.detach().clone() for n, p in self._params.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy ``tensors`` (names as in :meth:`parameters`) into the method's parameters.

        Raises:
            MethodStateError: with ``strict``, a missing or unexpected name; always, a shape mismatch
                or a non-finite value (nothing is copied then).
        """
        self._check()
        missing = sorted(set(self._params) - set(tensors))
        unexpected = sorted(set(tensors) - set(self._params))
        if strict and (missing or unexpected):
            raise MethodStateError(f"method {self.name!r} state: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                                   f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        for n, t in tensors.items():
            if n not in self._params:
                continue
            if tuple(t.shape) != tuple(self._params[n].shape):
                raise MethodStateError(f"method {self.name!r} state: {n} has shape {tuple(t.shape)}, "
                                       f"expected {tuple(self._params[n].shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MethodStateError(f"method {self.name!r} state: {n} holds NaN/inf")
        with torch.no_grad():
            for n, t in tensors.items():
                if n in self._params:
                    self._params[n].copy_(t.to(device=self._params[n].device, dtype=self._params[n].dtype))

    def merge(self) -> nn.Module:
        """Fold the method into the base weights and return the plain transformers model.

        Raises:
            MethodNotMergeableError: for every method but LoRA (they add modules that a plain
                transformers checkpoint cannot hold).
        """
        self._check()
        if not self.mergeable:
            raise MethodNotMergeableError(
                f"method {self.name!r} adds modules ({', '.join(sorted({n.split('.')[0] for n in self._params}))}) "
                "that a plain transformers checkpoint cannot hold, so it cannot be merged; only lora can. "
                "Export the delta and load it with the method attached instead")
        model = self.spec.merge(self)
        self._state = "merged"
        self._run_undo(restore_grad=True)
        return model

    def detach(self) -> None:
        """Remove everything the method added; the upstream is the base model again (same modules,
        same ``requires_grad`` flags, same outputs bit for bit). Idempotent."""
        if self._state in ("detached", "merged"):
            return
        self._state = "detached"
        self._run_undo(restore_grad=True)

    def _run_undo(self, *, restore_grad: bool) -> None:
        while self._undo:
            self._undo.pop()()
        if restore_grad:
            for n, p in self.upstream.named_parameters():
                if n in self._requires_grad:
                    p.requires_grad_(self._requires_grad[n])
        self._params = {}


def round_to_paper(count: int) -> float:
    """``count`` in millions rounded as Table 2 prints it (two decimals)."""
    return round(count / 1e6, 2)


def layer_count(config: Any) -> int:
    """Transformer layers of a wav2vec2/HuBERT/WavLM config."""
    return int(config.num_hidden_layers)


def conv_specs(config: Any) -> Iterable[tuple[int, int, int]]:
    """``(in_channels, out_channels, kernel)`` of every CNN feature-encoder layer of ``config``."""
    dims = list(config.conv_dim)
    in_dims = [1] + dims[:-1]
    return list(zip(in_dims, dims, list(config.conv_kernel)))


def isclose_rel(a: float, b: float, rel: float) -> bool:
    """``|a - b| <= rel * |b|``."""
    return math.isclose(a, b, rel_tol=rel)
