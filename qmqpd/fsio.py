"""Writing bytes whole: to a descriptor, and to a file that readers see old or new.

Owns the two loops every writer needs: `write_all` (os.write may write less than asked, to
a pipe or a socket) and `atomic_file` (a new file beside the target, renamed over it, so a
reader never sees half of one; optionally synced first, or linked when the target must not
exist yet). Called by message, backlog, rules and keys (and the queue writer, the status
file and the service writer have the same loops). Stdlib only, importing nothing of the
project; it never decides paths, names or modes: its callers do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO


def write_all(fd: int, data: bytes) -> None:
    """Every byte of data to fd, however many writes it takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: str) -> None:
    """Make the directory's entries (a rename, a link) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, mode: int = 0o644, *, exact_mode: bool = True, sync: bool = False,
                owner: tuple[int, int] | None = None,
                replace: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write path's new content to; on a clean exit it becomes path.

    The file is created beside path, never through a symlink, with `mode` (exactly, or as
    the umask leaves it when not exact_mode) and `owner` from the start, so it is never
    readable by others or named while another user owns it. sync: its bytes are on disk
    before it is named. replace=False: path must not exist (FileExistsError). On an error
    the new file is removed and path is untouched.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:  # left by a process of the same pid that died mid-write
        os.unlink(tmp)
        fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            if exact_mode:
                os.fchmod(fd, mode)  # the umask may have removed bits
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            yield out
            out.flush()
            if sync:
                os.fsync(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not replace:
        os.unlink(tmp)


def replace_file(path: str, data: bytes, mode: int = 0o644, *, exact_mode: bool = True,
                 sync: bool = False) -> None:
    """atomic_file with data as the whole content."""
    with atomic_file(path, mode, exact_mode=exact_mode, sync=sync) as out:
        out.write(data)
