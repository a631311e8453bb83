"""The ``--help`` layout shared by the command-line tools (train, export, pretrain)."""
from __future__ import annotations

import argparse


class DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` to a flag's help only when it adds something: not when the help
    already states its default, and not for ``None`` / ``False`` (an unset option or a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)
