"""Artifact files: atomic writes (nothing is ever half-written), checksums, checked JSON reads.

Every file the package writes goes through :func:`atomic_write` (or :func:`atomic_write_files`
for files that belong together): the data goes to a temporary file beside the target, is
flushed to disk, and only then renamed over the target. A failure at any point (disk full,
I/O error, an exception in the writer) removes the temporary and leaves the previous file as
it was; an OS-level failure is raised as :class:`WriteError` naming the file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from safetensors import SafetensorError
from safetensors.torch import save_file

# JSON artifacts are configs and metadata; a file this large is not one of ours (and would be
# read into memory whole).
MAX_JSON_BYTES = 64 << 20


class WriteError(OSError, RuntimeError):
    """Writing a file failed at the OS level (``errno`` kept: ``ENOSPC`` for a full disk).

    The message names the file and says the previous version is unchanged. It is also a
    :class:`RuntimeError` so that command-line entry points report it as a one-line error.
    """


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (setting it to
    read it back would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk; folders that cannot be opened are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # e.g. platforms without directory handles
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not directory or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _temporary_for(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp creates the file private (0600); give it the permissions a plain open() would.
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` with ``os.write`` until all of it is written (short writes retried)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


def atomic_write_files(writes: Mapping[str | os.PathLike, bytes | Callable[[str], object]]) -> list[Path]:
    """Write several files all or nothing: every temporary is complete before any rename.

    Args:
        writes: ``{target path: bytes or write(tmp_path) callable}``; renamed in this order.

    A failure while writing (disk full included) removes every temporary and leaves every
    previous file as it was. Only a crash *between* the renames can leave a new file beside an
    old one; readers of such pairs store a checksum of one file in the other to detect it.

    Raises:
        WriteError: an OS-level failure, naming the file being written.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for target, content in writes.items():
            target = Path(target)
            try:
                tmp = _temporary_for(target)
                staged.append((tmp, target))
                if isinstance(content, (bytes, bytearray, memoryview)):
                    write_bytes(tmp, bytes(content))
                else:
                    content(tmp)
                _fsync_path(tmp)
            except WriteError:
                raise
            except OSError as err:
                reason = os.strerror(err.errno) if err.errno else str(err)
                message = f"writing {target} failed: {reason}; the previous {target.name} is unchanged"
                raise (WriteError(err.errno, message) if err.errno else WriteError(message)) from err
        for tmp, target in staged:
            os.replace(tmp, target)
        for parent in {target.parent for _, target in staged}:
            _fsync_path(parent, directory=True)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return [target for _, target in staged]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is flushed to disk before the rename and removed if anything fails, so a
    reader sees the old file or the complete new one, never a partial one.

    Raises:
        WriteError: an OS-level failure (e.g. ``ENOSPC``), naming ``path``. Other exceptions of
            ``write`` propagate unchanged.
    """
    return atomic_write_files({path: write})[0]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of a bytes object."""
    return atomic_write_files({path: data})[0]


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Delete temporaries of ``path`` left by a writer that was killed; returns how many.

    ``path``'s name may be a glob pattern (``search-*.safetensors``), for targets whose names
    change from write to write. Only for targets with a single writer (a run's own output
    folder): a concurrent writer's temporary would be removed too.
    """
    path = Path(path)
    removed = 0
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the complete folder ``new`` to ``target``, replacing a previous ``target``.

    The previous folder is renamed aside first and deleted only after ``new`` is in place, so a
    failure leaves either the old or the new folder (a crash between the two renames leaves the
    old one under ``.<name>.old-*``).
    """
    new, target = Path(new), Path(target)
    _fsync_path(new, directory=True)
    if not target.exists():
        os.replace(new, target)
        _fsync_path(target.parent, directory=True)
        return target
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, aside / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside / target.name, target)
        aside.rmdir()
        raise
    _fsync_path(target.parent, directory=True)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def sha256_hex(data: bytes) -> str:
    """``"sha256:<hex digest>"`` of ``data`` (the checksum format stored in JSON artifacts)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_safetensors_file(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, straight from the tensors (no in-memory copy of the file),
    with the library's I/O failures raised as :class:`OSError` (its errno kept), so that
    :func:`atomic_write` and :func:`atomic_write_files` report a full disk as a
    :class:`WriteError` naming the file, as they do for every other write. (The library raises its
    own ``SafetensorError``, ``... I/O error: No space left on device (os error 28)``.)"""
    try:
        save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))
    except SafetensorError as err:
        found = _OS_ERROR.search(str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from err


def file_sha256(path: str | os.PathLike) -> str:
    """:func:`sha256_hex` of a file's bytes, read in chunks (checkpoints and deltas can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def read_json_object(path: str | os.PathLike, error: type[Exception]) -> dict[str, Any]:
    """Read a JSON object from ``path``, raising ``error`` (naming the file) for anything else.

    Refused: unreadable files, files over :data:`MAX_JSON_BYTES`, bytes that are not UTF-8,
    invalid or too deeply nested JSON, and top-level values other than an object.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{path} is {path.stat().st_size} bytes, over the {MAX_JSON_BYTES} bytes a JSON artifact may have")
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{path} cannot be read: {err.strerror or err}") from err
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise error(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object", type(None): "null"}


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
            and value not in (float("inf"), float("-inf"))
    return isinstance(value, kind)


def check_fields(meta: Mapping[str, Any], fields: Mapping[str, tuple[tuple[type, ...], bool]], where: str,
                 error: type[Exception]) -> None:
    """Check the keys and value types of a JSON object.

    Args:
        meta: the parsed object.
        fields: ``{key: (allowed types, required)}``; ``int`` excludes booleans, ``float``
            accepts integers and excludes NaN/inf. Keys not listed are allowed.
        where: the file, for the message.
        error: the exception type to raise.
    """
    for key, (kinds, required) in fields.items():
        if key not in meta:
            if required:
                raise error(f"{where}: missing key {key!r}")
            continue
        if not any(_is_kind(meta[key], kind) for kind in kinds):
            shown = repr(meta[key])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise error(f"{where}: {key!r} must be {' or '.join(_KIND_NAMES[k] for k in kinds)}, got {shown}")
