"""``python -m adtuning.train``: the command line, generated from the run configuration.

The parser is ``transformers.HfArgumentParser`` over the dataclasses of
:mod:`adtuning.recipe.config` (a flag's help lives on its field), plus ``--config FILE``: a JSON or
YAML file of field values (flat, ``{"steps": 300, ...}``, or by group, ``{"optim": {"steps": 300}}``,
or a run folder's ``config.json``, whose ``"args"`` re-run that run) under which the flags on the
command line still apply::

    python -m adtuning.train --config outputs/adtuning/config.json --output-dir outputs/rerun

Under ``torchrun --nproc_per_node W -m adtuning.train ...`` the same recipe runs data parallel
(:mod:`adtuning.distributed`): ``--batch-size B`` is per process and W processes train exactly
like one process with ``--batch-size W*B``; rank 0 writes the run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from adtuning.cli_format import DefaultsOnceHelpFormatter
from adtuning.recipe.config import GROUP_FIELDS, GROUPS, RunConfig, UsageError, field_types

DESCRIPTION = (
    "Fine-tune a speech SSL upstream on a SUPERB task with AD-TUNING (Fisher-selected child networks and the adaptive early-stop "
    "search over P) or another method of the paper's Table 2 (--method). Without --data-dir, runs the task's embedded corpus "
    "(generated, cached) with the shipped pre-trained upstream. Data parallel on several GPUs or nodes: torchrun "
    "--nproc_per_node W -m adtuning.train ... (batch sizes are per process)."
)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per configuration field, plus ``--config``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(GROUPS, prog="python -m adtuning.train", description=DESCRIPTION,
                              formatter_class=DefaultsOnceHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="JSON or YAML file of flag values (a run folder's config.json re-runs that run); flags given on the "
                             "command line override it")
    # HfArgumentParser also accepts --field_name for --field-name: usage and help show the
    # hyphenated spelling first.
    for action in parser._actions:
        action.option_strings = sorted(action.option_strings, key=lambda o: "_" in o)
    return parser


def read_config_file(path: Path) -> dict[str, Any]:
    """The field values of a ``--config`` file, by field name, checked against the fields."""
    where = f"--config: {path}"
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UsageError(f"{where}: cannot read it ({err.strerror or err})") from None
    try:
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise UsageError(f"{where}: not valid {'YAML' if Path(path).suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping of flag names to values, got {type(data).__name__}")
    if isinstance(data.get("args"), dict):  # a run folder's config.json
        data = data["args"]
    known = field_types()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in GROUP_FIELDS and isinstance(value, dict) and key not in known:
            flat.update(value)
        else:
            flat[key] = value
    values: dict[str, Any] = {}
    for key, value in flat.items():
        name = key.replace("-", "_")
        if name in ("resume", "overwrite", "config"):
            continue
        if name not in known:
            raise UsageError(f"{where}: unknown key {key!r} (not a flag of python -m adtuning.train)")
        values[name] = _coerce(known[name][0], known[name][1], value, f"{where}: {key}")
    return values


def _coerce(group: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    """A config-file value as the field's type (what argparse's ``type`` does to a flag's text)."""
    if value is None:
        return None
    hint = typing.get_type_hints(group)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and args else hint
    try:
        if typing.get_origin(target) is typing.Literal:
            if value not in typing.get_args(target):
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, typing.get_args(target)))}, got {value!r}")
            return value
        if target is bool:
            if not isinstance(value, bool):
                raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
            return value
        if typing.get_origin(target) is list:
            if not isinstance(value, list):
                raise argparse.ArgumentTypeError(f"expected a list, got {value!r}")
            return [str(v) for v in value]
        if target in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
        if target is int and isinstance(value, float) and not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}")
        return target(value)
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"{where}: {err}") from None


def parse_namespace(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (under a ``--config`` file's values) as a namespace of field values.
    Bad flag syntax exits like argparse (status 2); a bad config file raises :class:`UsageError`."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**read_config_file(known.config))
    return parser.parse_args(argv)


def config_from_namespace(ns: argparse.Namespace) -> RunConfig:
    """The checked :class:`RunConfig` of parsed flags (raises :class:`UsageError` naming the flag)."""
    values = vars(ns)
    groups = {}
    for name, group in zip(GROUP_FIELDS, GROUPS):
        groups[name] = group(**{f.name: values[f.name] for f in dataclasses.fields(group) if f.name in values})
    return RunConfig(**groups)


def parse_config(argv: Sequence[str] | None = None) -> RunConfig:
    """``parse_namespace`` then ``config_from_namespace``."""
    return config_from_namespace(parse_namespace(argv))


def launched_world() -> int:
    """The WORLD_SIZE torchrun set (1 without torchrun); a bad value is a :class:`UsageError`."""
    from adtuning.distributed import launched_world_size

    try:
        return launched_world_size()
    except ValueError as err:
        raise UsageError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe; returns the process exit code (0 ok, 2 usage or input error: a flag, a corpus
    file, the upstream; 1 failure).

    Under torchrun every process runs this; a process that fails prints its error with its
    rank and exits, and torchrun stops the others.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    from adtuning.distributed import DataParallel
    from adtuning.methods.base import MethodAttachError
    from adtuning.recipe.run import Recipe
    from adtuning.recipe.summary import print_summary
    from adtuning.speech.audio import CorpusError
    from adtuning.speech.upstream import UpstreamLoadError

    try:
        world = launched_world()
        ns = parse_namespace(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK") if world > 1 else None
    where = "" if rank is None else f"[rank {rank}] "
    level = getattr(logging, ns.log_level)
    if rank not in (None, "0") and level < logging.WARNING:
        level = logging.WARNING  # one copy of the log: rank 0's
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {where}%(message)s", datefmt="%H:%M:%S")
    dp = None
    try:
        config = config_from_namespace(ns)
        try:
            dp = DataParallel.from_env(config.engine.device, config.engine.dist_timeout)
        except ValueError as err:
            raise UsageError(str(err)) from err
        recipe = Recipe(config, dp)
        # Log lines go through tqdm.write, so they never cut a progress bar in two.
        with logging_redirect_tqdm():
            recipe.setup()
            recipe.fisher()
            recipe.search()
            recipe.compare()
            recipe.evaluate()
            summary = recipe.save()
    except UsageError as err:
        # Usage errors are raised alike on every rank (rank 0's checks are broadcast).
        if dp is not None:
            dp.close()
        print(f"{where}error: {err}", file=sys.stderr)
        return 2
    except (CorpusError, UpstreamLoadError, MethodAttachError) as err:
        # Bad input (a corpus file, the upstream, a method the upstream cannot take), named in the
        # message: an input error like a bad flag. Possibly this rank alone, as below.
        print(f"{where}error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        # Possibly this rank alone: leave the group as it is (the others may be inside a
        # collective) and exit; torchrun then stops the other ranks.
        print(f"{where}error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if dp is not None:
        dp.barrier()  # nobody tears down its connections while rank 0 may still be saving
        dp.close()
    if summary is not None:
        print_summary(summary)
    return 0
