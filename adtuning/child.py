"""Child networks: which entries of which tensors are trained, as compressed index sets.

A :class:`ChildNetwork` maps each tensor name to a sorted, unique, flat ``int32`` index vector
(``int64`` only for tensors of 2^31 entries or more). Task-driven children (CHILD-TUNING_D)
rank the Fisher scores of *all* scored entries together and keep the best; two count rules
say how many:

* ``"round"`` (default, DESIGN.md): exactly ``k = round(P * N)`` (at least 1) entries; ties are
  broken deterministically (earlier tensor in the score mapping's order, then lower flat index,
  wins).
* ``"percentile"`` (the published CHILD-TUNING / AD-TUNING code): the threshold is
  ``numpy.percentile(all_scores, (1 - P) * 100)`` (linear interpolation) and every entry with
  ``score >= threshold`` is kept: ``1 + floor(P * (N - 1))`` entries, plus any ties with the
  threshold (and, when the interpolation rounds onto the lower neighbour, that neighbour).

Either way the children for several P taken from one ranking are nested.

Selection never sorts: a radix select finds the k-th largest score on the order-preserving
integer image of the fp32 scores in four histogram passes, tensor by tensor, so the extra
memory is a few temporaries the size of the largest tensor, not a sort of all N entries.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adtuning.atomic import atomic_write_files, check_fields, read_json_object, remove_stale_temporaries, sha256_hex

INT32_LIMIT = 2**31
FORMAT_VERSION = 1
_LAYER_PATTERN = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
_CHECKSUM = re.compile(r"^sha256:[0-9a-f]{64}$")

# <path>.json of a saved child: key -> (allowed JSON types, required). Unlisted keys are allowed.
METADATA_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "version": ((int,), True),
    "method": ((str,), True),
    "p": ((float,), True),
    "k": ((int,), True),
    "n": ((int,), False),
    "threshold": ((float, type(None)), False),
    "seed": ((int, type(None)), False),
    "shapes": ((dict,), True),
    "extra": ((dict,), False),
    "indices_sha256": ((str,), False),
}


class ChildError(ValueError):
    """A saved child network cannot be read or does not fit the model; the message names the file."""


def index_set_problem(idx: torch.Tensor, numel: int) -> str | None:
    """Why ``idx`` is not a compressed index set of a ``numel``-entry tensor (None: it is one).

    An index set is int32 or int64, 1-D, strictly increasing (sorted, unique) and within
    ``[0, numel)``.
    """
    if idx.dtype not in (torch.int32, torch.int64):
        return f"has dtype {idx.dtype}; expected int32 or int64"
    if idx.dim() != 1:
        return f"must be 1-D, got shape {tuple(idx.shape)}"
    if idx.numel() == 0:
        return None
    if int(idx.min()) < 0 or int(idx.max()) >= numel:
        return f"has indices outside [0, {numel})"
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        return "is not sorted and unique"
    return None


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int64 if numel >= INT32_LIMIT else torch.int32


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < float(p) <= 1) or math.isnan(float(p)):
        raise ValueError(f"child network ratio p must be in (0, 1], got {p!r}")
    return float(p)


COUNT_RULES = ("round", "percentile")


def _k_for(p: float, total: int) -> int:
    return max(1, min(total, int(math.floor(p * total + 0.5))))


def _check_count_rule(count_rule: str) -> str:
    if count_rule not in COUNT_RULES:
        raise ValueError(f"child selection: unknown count rule {count_rule!r}; choose one of {', '.join(COUNT_RULES)}")
    return count_rule


def percentile_position(p: float, total: int) -> tuple[int, int, float]:
    """Where ``numpy.percentile(scores, (1 - p) * 100)`` (method ``"linear"``) reads a sorted
    ``total``-entry score vector: ``(lower index, upper index, gamma)`` in ascending order.

    The arithmetic is numpy's own (NumPy >= 2): the percentile is divided by 100 in float64,
    the virtual index is ``(total - 1) * q``, the neighbours are its floor and floor + 1 (both
    ``total - 1`` at or beyond the end), gamma is the fractional part.
    """
    q = float(np.true_divide((1.0 - p) * 100, 100))  # the published code's (1-p)*100, as numpy divides it
    virtual = (total - 1) * q
    if virtual >= total - 1:
        return total - 1, total - 1, 0.0
    lower = int(math.floor(virtual))
    return lower, lower + 1, virtual - lower


def percentile_threshold(lower: float, upper: float, gamma: float) -> float:
    """numpy's linear interpolation between two fp32 order statistics (``numpy.lib`` ``_lerp``
    under NEP 50 promotion: fp32 arithmetic, and from the upper end when ``gamma >= 0.5``).

    Rounding can land the threshold on ``lower`` although ``gamma > 0``; the published rule
    then keeps ``lower`` too, so this must be numpy's arithmetic, not the exact real value.
    """
    a, b = np.float32(lower), np.float32(upper)
    diff = b - a
    value = b - diff * np.float32(1 - gamma) if gamma >= 0.5 else a + diff * np.float32(gamma)
    return float(np.float32(value))


def _order_key(scores: torch.Tensor) -> torch.Tensor:
    """int32 whose signed order equals the float order of ``scores`` (-0.0 counted as 0.0).

    For fp32 scores without negative values or -0.0 (squared gradients) this is a zero-copy view.
    """
    s = scores.detach().reshape(-1)
    if s.dtype != torch.float32:
        s = s.float()
    bits = s.view(torch.int32)
    if not bool((bits < 0).any()):
        return bits
    bits = (s + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: equal scores, equal keys
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _key_to_float(key: int) -> float:
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def _float_to_key(value: float) -> int:
    return int(_order_key(torch.tensor([value], dtype=torch.float32))[0])


def _validated_scores(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not scores:
        raise ValueError("child selection: the score set is empty")
    checked = {}
    for name, value in scores.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"child selection: score of {name!r} is not a tensor")
        if value.numel() == 0:
            raise ValueError(f"child selection: score tensor {name!r} is empty")
        if not value.is_floating_point():
            raise TypeError(f"child selection: score of {name!r} has dtype {value.dtype}; expected a float tensor")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"child selection: score tensor {name!r} has {bad} NaN/inf entries")
        checked[name] = value
    return checked


def _kth_largest_key(keys: Sequence[torch.Tensor], k: int) -> tuple[int, int]:
    """The k-th largest key (k >= 1) and how many entries equal to it belong to the top k,
    by a most-significant-byte-first radix select.

    Four passes, one per byte of the int32 key: each histograms the next byte of the keys in
    the range chosen so far and narrows the range to the byte holding the k-th largest key.
    Temporaries are per tensor, never of all N entries.
    """
    lo: int | None = None
    remaining = k
    for shift in (24, 16, 8, 0):
        counts = torch.zeros(256, dtype=torch.int64)
        for key in keys:
            if lo is None:
                digits = (key >> 24) + 128  # top byte, signed order mapped to 0..255
            else:
                inside = key[(key >= lo) & (key <= lo + (1 << (shift + 8)) - 1)]
                digits = (inside - lo) >> shift  # < 256: the range spans 2**(shift+8) keys
            if digits.numel():
                counts += torch.bincount(digits.cpu(), minlength=256)
        above = 0
        for digit in range(255, -1, -1):
            if above + int(counts[digit]) >= remaining:
                break
            above += int(counts[digit])
        remaining -= above
        lo = ((digit - 128) << 24) if lo is None else lo + (digit << shift)
    # Every key above ``lo`` was counted in some pass; ``remaining`` are ties at ``lo``.
    assert lo is not None  # set by the first of the four passes
    return lo, remaining


def _select(keys: dict[str, torch.Tensor], threshold: int, ties_left: int) -> dict[str, torch.Tensor]:
    """Indices of all entries above ``threshold`` plus the first ``ties_left`` entries equal to it
    (earlier tensors, then lower flat indices, win ties)."""
    indices = {}
    for name, key in keys.items():
        chosen = key > threshold
        if ties_left > 0:
            tied = (key == threshold).nonzero().flatten()[:ties_left]
            chosen[tied] = True
            ties_left -= tied.numel()
        flat = chosen.nonzero().flatten()
        if flat.numel():
            indices[name] = flat.to(_index_dtype(key.numel())).cpu()
    return indices


def _file_pair(path: str | os.PathLike[str], strip: tuple[str, ...]) -> tuple[Path, Path]:
    """``(<base>.safetensors, <base>.json)`` for ``path`` given with or without one of ``strip``.

    The suffixes are appended to the name, not substituted for its last dotted part, so
    ``children/p0.01`` and ``children/p0.1`` stay two children (``with_suffix`` made both ``p0``).
    """
    base = Path(path)
    if base.suffix in strip:
        base = base.with_suffix("")
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


@dataclass
class ChildNetwork:
    """A fixed child network: per-tensor sorted unique flat indices of the trained entries.

    Attributes:
        indices: ``{name: 1-D int32 (int64 for >= 2^31-entry tensors) sorted unique indices}``;
            tensors without child entries are absent.
        shapes: ``{name: shape}`` of every tensor the child was chosen from (in ranking order).
        p: the requested ratio (for Bernoulli children, the draw probability).
        k: number of child entries.
        threshold: the score of the k-th best entry (count rule ``"round"``), or the percentile
            every kept score is at or above (``"percentile"``); ``None`` for Bernoulli children.
        method: ``"fisher"`` (CHILD-TUNING_D) or ``"bernoulli"`` (CHILD-TUNING_F).
        seed: the seed of a Bernoulli child.
    """

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    p: float
    k: int
    threshold: float | None = None
    method: str = "fisher"
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def from_scores(cls, scores: Mapping[str, torch.Tensor], p: float, *, count_rule: str = "round") -> "ChildNetwork":
        """The best-scored entries over all tensors together.

        ``count_rule="round"`` keeps exactly ``k = round(p * N)`` (at least 1), ties broken by
        tensor order then flat index. ``count_rule="percentile"`` is the published code's rule:
        keep every entry with ``score >= numpy.percentile(all scores, (1 - p) * 100)`` --
        ``1 + floor(p * (N - 1))`` entries plus any ties (see the module docstring).
        """
        return cls.nested(scores, [p], count_rule=count_rule)[0]

    @classmethod
    def nested(cls, scores: Mapping[str, torch.Tensor], ps: Iterable[float], *,
               count_rule: str = "round") -> list["ChildNetwork"]:
        """Children for several ratios from one ranking; each contains every smaller one.

        ``count_rule``: ``"round"`` or ``"percentile"`` as in :meth:`from_scores`. Returned in
        the order of ``ps``; ``threshold`` is the k-th best score (``"round"``) or the
        percentile value entries were compared with (``"percentile"``).
        """
        ps = [_check_p(p) for p in ps]
        count_rule = _check_count_rule(count_rule)
        if not ps:
            raise ValueError("child selection: no ratios given")
        scores = _validated_scores(scores)
        keys = {name: _order_key(value) for name, value in scores.items()}
        shapes = {name: tuple(value.shape) for name, value in scores.items()}
        total = sum(v.numel() for v in scores.values())
        children = []
        for p in ps:
            if count_rule == "round":
                k = _k_for(p, total)
                threshold, ties = _kth_largest_key(list(keys.values()), k)
                indices = _select(keys, threshold, ties)
                value = _key_to_float(threshold)
            else:
                # Order statistics by radix select (the j-th smallest is the (N - j)-th largest),
                # then numpy's interpolation between them; every entry at or above it is kept.
                lower, upper, gamma = percentile_position(p, total)
                low_key, _ = _kth_largest_key(list(keys.values()), total - lower)
                high_key, _ = _kth_largest_key(list(keys.values()), total - upper)
                value = percentile_threshold(_key_to_float(low_key), _key_to_float(high_key), gamma)
                indices = _select(keys, _float_to_key(value), total)
                k = sum(int(v.numel()) for v in indices.values())
            children.append(cls(indices=indices, shapes=dict(shapes), p=p, k=k, threshold=value))
        return children

    @classmethod
    def bernoulli(
        cls, named_params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], p: float, seed: int = 0
    ) -> "ChildNetwork":
        """CHILD-TUNING_F: each entry joins the child independently with probability ``p``."""
        p = _check_p(p)
        named = dict(named_params)
        if not named:
            raise ValueError("bernoulli child: no parameters given")
        generator = torch.Generator().manual_seed(seed)
        indices, shapes, k = {}, {}, 0
        for name, tensor in named.items():
            shapes[name] = tuple(tensor.shape)
            keep = torch.rand(tensor.numel(), generator=generator) < p
            flat = keep.nonzero().flatten()
            if flat.numel():
                indices[name] = flat.to(_index_dtype(tensor.numel()))
                k += flat.numel()
        return cls(indices=indices, shapes=shapes, p=p, k=k, method="bernoulli", seed=seed)

    # ---- statistics ---------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Number of entries the child was chosen from."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def names(self) -> list[str]:
        """Names of the tensors with at least one child entry."""
        return list(self.indices)

    def tensor_ratios(self) -> dict[str, float]:
        """Fraction of each tensor's entries in the child."""
        return {
            name: (self.indices[name].numel() if name in self.indices else 0) / max(1, math.prod(shape))
            for name, shape in self.shapes.items()
        }

    def layer_ratios(self, pattern: re.Pattern[str] | str = _LAYER_PATTERN) -> dict[str, float]:
        """Fraction of child entries per layer (paper Fig. 7).

        Tensors whose name matches ``pattern`` (default ``layers.<i>.``) are grouped by the
        captured layer number; everything else is grouped under ``"other"``.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        chosen: dict[str, int] = {}
        totals: dict[str, int] = {}
        for name, shape in self.shapes.items():
            match = regex.search(name)
            layer = match.group(1) if match else "other"
            totals[layer] = totals.get(layer, 0) + math.prod(shape)
            chosen[layer] = chosen.get(layer, 0) + (self.indices[name].numel() if name in self.indices else 0)
        ordered = sorted(totals, key=lambda s: (s == "other", int(s) if s.isdigit() else 0))
        return {layer: chosen[layer] / totals[layer] for layer in ordered}

    def contains(self, other: "ChildNetwork") -> bool:
        """True when every entry of ``other`` is in this child."""
        for name, idx in other.indices.items():
            mine = self.indices.get(name)
            if mine is None or not bool(torch.isin(idx.long(), mine.long()).all()):
                return False
        return True

    def index_bytes(self) -> int:
        """Bytes held by the index vectors."""
        return sum(idx.numel() * idx.element_size() for idx in self.indices.values())

    def __repr__(self) -> str:
        threshold = "" if self.threshold is None else f", threshold={self.threshold:.4g}"
        return f"ChildNetwork(method={self.method}, p={self.p}, k={self.k}, n={self.n}, tensors={len(self.indices)}/{len(self.shapes)}{threshold})"

    # ---- values of the child entries ----------------------------------------------------

    def gather(self, named_params: Mapping[str, torch.Tensor], *, alias: bool = False) -> dict[str, torch.Tensor]:
        """Current values of the child entries: ``{name: 1-D tensor}`` in the parameter's
        dtype and device (a copy, independent of later updates).

        With ``alias``, a tensor whose child holds every entry (FT's) comes back as a flat view
        of the parameter instead of a copy: valid only until the parameter changes (for a file
        written at once)."""
        out = {}
        for name, idx in self.indices.items():
            flat = named_params[name].detach().reshape(-1)
            out[name] = flat if alias and self.holds_all(name) else flat.index_select(0, idx.to(flat.device).long())
        return out

    def holds_all(self, name: str) -> bool:
        """Whether the child holds every entry of tensor ``name`` (sorted unique indices as many
        as the entries: all of them, in order)."""
        return self.indices[name].numel() == math.prod(self.shapes[name])

    @torch.no_grad()
    def scatter_(self, named_params: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
        """Write ``values`` (as returned by :meth:`gather`) into the child entries, in place."""
        for name, idx in self.indices.items():
            flat = named_params[name].data.view(-1)
            flat.index_copy_(0, idx.to(flat.device).long(), values[name].to(flat.device, flat.dtype))

    # ---- validation ---------------------------------------------------------------------

    def check_against(self, named_params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], where: str = "the model") -> None:
        """Raise a clear error unless every child tensor exists in ``named_params`` with its shape."""
        named = dict(named_params)
        missing = [n for n in self.shapes if n not in named]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise KeyError(f"child network tensors not in {where}: {shown}")
        for name, shape in self.shapes.items():
            if tuple(named[name].shape) != tuple(shape):
                raise ValueError(
                    f"child network tensor {name!r} has shape {tuple(shape)} but {where} has {tuple(named[name].shape)}"
                )

    # ---- persistence --------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description (everything but the indices)."""
        return {
            "format": "adtuning.child",
            "version": FORMAT_VERSION,
            "method": self.method,
            "p": self.p,
            "k": self.k,
            "n": self.n,
            "threshold": self.threshold,
            "seed": self.seed,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``<path>.safetensors`` (indices) and ``<path>.json`` (metadata with the indices'
        checksum), both complete or neither replaced.

        ``path`` may be given with or without the ``.safetensors`` suffix. Returns the
        safetensors path.

        Raises:
            ChildError: an index vector is not a valid index set (never written).
            adtuning.atomic.WriteError: disk full or another OS error; the previous files stay
                valid and no temporary file is left.
        """
        tensor_path, meta_path = _file_pair(path, (".safetensors",))
        for name, idx in self.indices.items():
            problem = index_set_problem(idx, math.prod(self.shapes[name]) if name in self.shapes else 0)
            if problem:
                raise ChildError(f"refusing to write {tensor_path}: indices of {name!r} {problem}")
        tensors = {f"indices.{name}": idx.contiguous() for name, idx in self.indices.items()}
        meta = self.metadata()
        blob = save_safetensors(tensors, metadata={"adtuning": json.dumps(meta)})
        meta["indices_sha256"] = sha256_hex(blob)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        for target in (tensor_path, meta_path):
            remove_stale_temporaries(target)  # left by a writer that was killed
        atomic_write_files({tensor_path: blob, meta_path: json.dumps(meta, indent=2).encode()})
        return tensor_path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        named_params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
    ) -> "ChildNetwork":
        """Read a child written by :meth:`save`; with ``named_params``, check names and shapes.

        Raises:
            FileNotFoundError: one of the two files is missing.
            ChildError: naming the file: invalid JSON or a metadata key missing or of the wrong
                type, indices that do not match the checksum in the JSON, a safetensors file
                that cannot be parsed, an index tensor that is not a valid index set of its
                tensor (see :func:`index_set_problem`), a count other than ``k``, or (with
                ``named_params``) a tensor the model lacks or has with another shape.
        """
        tensor_path, meta_path = _file_pair(path, (".safetensors", ".json"))
        for needed in (tensor_path, meta_path):
            if not needed.is_file():
                raise FileNotFoundError(f"child network file missing: {needed}")
        meta = read_json_object(meta_path, ChildError)
        if meta.get("format") != "adtuning.child":
            raise ChildError(f"{meta_path} is not an adtuning child network (format={meta.get('format')!r:.80})")
        if meta.get("version") != FORMAT_VERSION or isinstance(meta.get("version"), bool):
            raise ChildError(f"{meta_path}: unsupported child network version {meta.get('version')!r:.80} "
                             f"(this adtuning reads {FORMAT_VERSION})")
        check_fields(meta, METADATA_FIELDS, str(meta_path), ChildError)
        if meta["method"] not in ("fisher", "bernoulli"):
            raise ChildError(f"{meta_path}: method must be 'fisher' or 'bernoulli', got {meta['method'][:80]!r}")
        if not 0 < meta["p"] <= 1:
            raise ChildError(f"{meta_path}: p must be in (0, 1], got {meta['p']!r}")
        shapes = {}
        for name, shape in meta["shapes"].items():
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ChildError(f"{meta_path}: shapes[{name[:80]!r}] must be a list of non-negative integers")
            shapes[name] = tuple(shape)
        n = sum(math.prod(shape) for shape in shapes.values())
        if "n" in meta and meta["n"] != n:
            raise ChildError(f"{meta_path}: n={meta['n']} but the shapes hold {n} entries")
        if not 0 <= meta["k"] <= n:
            raise ChildError(f"{meta_path}: k={meta['k']} is not between 0 and n={n}")
        try:
            blob = tensor_path.read_bytes()
        except OSError as err:
            raise ChildError(f"child network indices {tensor_path} cannot be read: {err.strerror or err}") from err
        expected = meta.get("indices_sha256")
        if expected is not None and (not _CHECKSUM.match(expected) or sha256_hex(blob) != expected):
            raise ChildError(f"{tensor_path} does not match {meta_path} (indices_sha256): a write was torn or one "
                             "of the files was replaced")
        try:
            tensors = load_safetensors(blob)
        except Exception as err:  # safetensors raises its own error types for malformed files
            raise ChildError(f"child network indices {tensor_path} could not be read: {err}") from err
        indices = {}
        for key, idx in tensors.items():
            if not key.startswith("indices."):
                raise ChildError(f"{tensor_path}: unexpected tensor {key[:80]!r} (expected indices.<name>)")
            name = key[len("indices."):]
            if name not in shapes:
                raise ChildError(f"{tensor_path}: index tensor {name!r} has no shape in {meta_path}")
            problem = index_set_problem(idx, math.prod(shapes[name]))
            if problem:
                raise ChildError(f"{tensor_path}: indices of {name!r} {problem} (tensor shape {shapes[name]})")
            indices[name] = idx
        ordered = {name: indices[name] for name in shapes if name in indices}
        child = cls(
            indices=ordered,
            shapes=shapes,
            p=float(meta["p"]),
            k=int(meta["k"]),
            threshold=meta.get("threshold"),
            method=meta["method"],
            seed=meta.get("seed"),
            extra=meta.get("extra", {}),
        )
        if sum(i.numel() for i in ordered.values()) != child.k:
            raise ChildError(f"{tensor_path}: holds {sum(i.numel() for i in ordered.values())} indices but k={child.k}")
        if named_params is not None:
            try:
                child.check_against(named_params)
            except (KeyError, ValueError) as err:
                raise ChildError(f"{tensor_path}: {err.args[0] if err.args else err}") from None
        return child
