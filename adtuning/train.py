"""``python -m adtuning.train``: fine-tune a speech SSL upstream on a SUPERB task.

The recipe lives in :mod:`adtuning.recipe` (typed configuration, command line, problem, run,
summary); this module is its entry point and keeps the names earlier code imported from it.
Without ``--data-dir`` it runs the embedded default: keyword spotting on a corpus synthesised with
espeak-ng (cached) and the shipped pre-trained upstream ``adtuning-hubert-mini``, no downloads.
"""
from __future__ import annotations

import sys

from adtuning.recipe.cli import build_parser, config_from_namespace, main, parse_config
from adtuning.recipe.config import RunConfig, UsageError
from adtuning.recipe.problem import SpeechProblem
from adtuning.recipe.run import Recipe, choose_threads, optional_split
from adtuning.recipe.summary import print_summary
from adtuning.speech.upstream import DEFAULT_UPSTREAM

_print_summary = print_summary
_optional_split = optional_split

__all__ = ["DEFAULT_UPSTREAM", "Recipe", "RunConfig", "SpeechProblem", "UsageError", "build_parser", "choose_threads",
           "config_from_namespace", "main", "parse_config", "print_summary"]

if __name__ == "__main__":
    sys.exit(main())
