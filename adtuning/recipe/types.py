"""Value types of the run configuration's fields that the command line spells as text.

Each is a class (so ``transformers.HfArgumentParser`` uses it as the argparse ``type`` of its field):
called with the flag's text it parses it, called with a parsed value (from a ``--config`` file or
from code) it checks it. A bad value raises ``argparse.ArgumentTypeError``, which argparse reports
as ``argument --flag: <message>`` and a config file as ``<file>: <key>: <message>``.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable


def _items(value: str | Iterable[Any]) -> list[Any]:
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return list(value)


class Floats(tuple[float, ...]):
    """Comma-separated numbers (``0.001,0.01,0.1``) or a sequence of numbers."""

    def __new__(cls, value: str | Iterable[float] = ()) -> "Floats":
        try:
            return super().__new__(cls, (float(x) for x in _items(value)))
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


class Ints(tuple[int, ...]):
    """Comma-separated integers (``2,1``) or a sequence of integers."""

    def __new__(cls, value: str | Iterable[int] = ()) -> "Ints":
        items = _items(value)
        try:
            parsed = [int(x) for x in items]
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
        if any(isinstance(x, float) and not x.is_integer() for x in items):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}")
        return super().__new__(cls, parsed)


class Names(tuple[str, ...]):
    """Comma-separated names (``head-only,full``) or a sequence of names; the field's check
    names the flag and the unknown value."""

    def __new__(cls, value: str | Iterable[str] = ()) -> "Names":
        return super().__new__(cls, (str(x).strip() for x in _items(value) if str(x).strip()))


class ScoredChoice(str):
    """``--scored``: one of :data:`adtuning.fisher.SCORED_SETS` or a regular expression."""

    def __new__(cls, value: str) -> "ScoredChoice":
        from adtuning.fisher import check_scored_choice

        try:
            return super().__new__(cls, check_scored_choice(str(value)))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


class FisherGroups(str):
    """``--fisher-groups``: a positive integer G or ``auto``."""

    def __new__(cls, value: str | int) -> "FisherGroups":
        text = str(value).strip()
        if text != "auto":
            try:
                ok = int(text) >= 1
            except ValueError:
                ok = False
            if not ok:
                raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
        return super().__new__(cls, text)

    @property
    def count(self) -> int | None:
        """G, or ``None`` for ``auto``."""
        return None if self == "auto" else int(self)
