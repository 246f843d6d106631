"""Writing bytes whole: write_all through a pipe, atomic_file old-or-new, never half."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from qmqpd.fsio import atomic_file, replace_file, write_all


def test_write_all_writes_past_a_full_pipe() -> None:
    data = os.urandom(1 << 20)  # far more than a pipe holds: os.write returns short
    rfd, wfd = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(rfd, 65536):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        write_all(wfd, data)
    finally:
        os.close(wfd)
        reader.join(10)
        os.close(rfd)
    assert bytes(got) == data


def test_replace_file_sets_the_exact_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        replace_file(str(target), b"new", 0o644, sync=True)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["file"]


def test_without_exact_mode_the_umask_applies(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        replace_file(str(tmp_path / "file"), b"x", 0o644, exact_mode=False)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "file").stat().st_mode & 0o777 == 0o600


def test_an_error_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(str(target)) as out:
        out.write(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file"]


def test_without_replace_an_existing_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "key"
    replace_file(str(target), b"first")
    with pytest.raises(FileExistsError), atomic_file(str(target), replace=False) as out:
        out.write(b"second")
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["key"]
    with atomic_file(str(tmp_path / "new"), 0o600, replace=False) as out:
        out.write(b"made")
    assert (tmp_path / "new").read_bytes() == b"made"
    assert sorted(os.listdir(tmp_path)) == ["key", "new"]


def test_a_stale_temporary_of_the_same_pid_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / f".file.{os.getpid()}.tmp"
    stale.symlink_to(tmp_path / "elsewhere")  # never written through
    replace_file(str(tmp_path / "file"), b"new")
    assert (tmp_path / "file").read_bytes() == b"new"
    assert not (tmp_path / "elsewhere").exists()
    assert os.listdir(tmp_path) == ["file"]
