"""The methods one recipe trains: the rows of the paper's Table 2.

A method decides which parameters train and what is added to the upstream; the data, schedule,
seed, data order, evaluation, resume, artifacts and summary are the recipe's and the same for every
method, so rows compare. This module is the registry of the recipe's method names (``--method``,
``--baselines``); the modules that LoRA, adapters, prefixes and CHAPTER add to an upstream are
:mod:`adtuning.methods`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecipeMethod:
    """One ``--method`` value.

    ``kind``: ``"search"`` (AD-TUNING: child networks of several P, the adaptive early stop),
    ``"child"`` (CHILD-TUNING_D / _F: one child network), ``"dense"`` (FT: every scored upstream
    entry), ``"head"`` (the upstream frozen, only the head and the layer weights train) or
    ``"module"`` (small modules added to the frozen upstream train with the head).
    """

    name: str
    kind: str
    row: str  # the row's name in the paper's Table 2
    summary: str


METHODS: dict[str, RecipeMethod] = {}


def _register(name: str, kind: str, row: str, summary: str) -> None:
    METHODS[name] = RecipeMethod(name, kind, row, summary)


_register("ad-tuning", "search", "AD-TUNING", "Fisher child networks of every --candidates P, the adaptive early-stop search picks one")
_register("child-tuning-d", "child", "CHILD-TUNING_D", "one Fisher child network of ratio P (--candidates P)")
_register("child-tuning-f", "child", "CHILD-TUNING_F", "one Bernoulli(P) child network (--candidates P), task-free")
_register("full", "dense", "FT", "every scored upstream entry (AdamW) and the head")
_register("frozen", "head", "Baseline", "frozen upstream, the head on the last layer (no weighted sum)")
_register("weighted-sum", "head", "Weighted-sum", "frozen upstream, the head on learnt layer weights (s3prl's weighted sum)")
_register("lora", "module", "LoRA", "peft's LoRA on the attention projections")
_register("houlsby", "module", "Houlsby", "Houlsby bottleneck adapters in the transformer layers")
_register("adapterbias", "module", "AdapterBias", "a token-dependent shift per transformer layer")
_register("prefix", "module", "Prefix", "learnt key/value prefixes in every self-attention layer")
_register("cnn-adapter", "module", "CNN adapter", "CNN adapters in the feature extractor (CHAPTER paper)")
_register("chapter", "module", "CHAPTER", "CNN adapters in the feature extractor and Houlsby adapters in the transformer")

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

#: Older spellings still accepted.
ALIASES = {"head-only": "weighted-sum"}

#: What ``--baselines`` accepts: every method but the search itself and the one-P child methods
#: (their P would be a second --candidates), plus the aliases.
BASELINE_NAMES: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind not in ("search", "child")) + tuple(ALIASES)


def canonical_method(name: str) -> str | None:
    """The registered name of ``name`` (aliases resolved), or ``None`` when it is unknown."""
    name = ALIASES.get(name, name)
    return name if name in METHODS else None


def prepare_task(method: str, task: Any) -> None:
    """What ``method`` changes in a freshly built task head: ``frozen`` (the paper's Baseline) reads
    the last hidden state, without the layer weights of the weighted sum."""
    if canonical_method(method) == "frozen":
        task.use_featurizer_mode("last")


def adds_modules(method: str) -> bool:
    """Whether ``method`` attaches modules to the upstream (:mod:`adtuning.methods`)."""
    name = canonical_method(method)
    return name is not None and METHODS[name].kind == "module"
