"""atomic_write: all or nothing, with the permissions a plain open() would give."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from adtuning.atomic import atomic_write


def test_atomic_write_replaces_whole_files_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text("first"))
    assert target.read_text() == "first"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    atomic_write(target, lambda tmp: Path(tmp).write_text("second"))
    assert target.read_text() == "second"


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
