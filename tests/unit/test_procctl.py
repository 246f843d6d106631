"""Privilege drop, memory cap and parent-death signal, each tried in a real forked child."""

from __future__ import annotations

import os
import pwd
import signal
import time
from collections.abc import Callable

import pytest

from qmqpd import procctl
from tests.support import wait_until


def in_child(body: Callable[[], int]) -> int:
    """Run body in a forked child; its return value is the child's exit code."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_memory_limit_turns_a_big_allocation_into_memory_error() -> None:
    def body() -> int:
        procctl.set_memory_limit(512 << 20)
        try:
            bytearray(1 << 30)
        except MemoryError:
            return 7
        return 0

    assert in_child(body) == 7


def test_memory_limit_zero_leaves_limits_alone() -> None:
    import resource

    def body() -> int:
        before = resource.getrlimit(resource.RLIMIT_AS)
        procctl.set_memory_limit(0)
        return 3 if resource.getrlimit(resource.RLIMIT_AS) == before else 4

    assert in_child(body) == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_drop_privileges_to_nobody_sticks() -> None:
    nobody = pwd.getpwnam("nobody")

    def body() -> int:
        procctl.drop_privileges("nobody", "")
        ok = os.getuid() == nobody.pw_uid and os.getgid() == nobody.pw_gid
        ok = ok and 0 not in os.getgroups()
        try:
            os.setuid(0)
        except PermissionError:
            return 5 if ok else 6
        return 6

    assert in_child(body) == 5


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_drop_privileges_to_numeric_ids() -> None:
    def body() -> int:
        procctl.drop_privileges("4242", "4343,4344")
        same = (os.getuid(), os.getgid(), sorted(os.getgroups())) == (4242, 4343, [4343, 4344])
        return 5 if same else 6

    assert in_child(body) == 5


def test_unknown_user_or_group_is_named() -> None:
    with pytest.raises(procctl.ProcError, match="no-such-user-qmqpd"):
        procctl.drop_privileges("no-such-user-qmqpd", "")
    with pytest.raises(procctl.ProcError, match="no-such-group-qmqpd"):
        procctl.resolve_groups("no-such-group-qmqpd")


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_child_dies_with_its_parent() -> None:
    """A middle process forks a grandchild that asks for PDEATHSIG, then dies."""
    read_fd, write_fd = os.pipe()
    armed_r, armed_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(read_fd)
        grandchild = os.fork()
        if grandchild == 0:
            procctl.die_with_parent(signal.SIGKILL)
            os.write(write_fd, b"%d\n" % os.getpid())
            os.write(armed_w, b"!")
            time.sleep(30)
            os._exit(0)
        # die only once the grandchild has asked: dying before would test nothing
        os.read(armed_r, 1)
        os._exit(0)
    os.close(write_fd)
    os.close(armed_r)
    os.close(armed_w)
    grandchild_pid = int(os.read(read_fd, 64).split()[0])
    os.close(read_fd)
    os.waitpid(middle, 0)
    wait_until(lambda: _gone_or_zombie(grandchild_pid), 10,
               "the grandchild to die with its parent")


def test_parent_alive_and_title() -> None:
    assert procctl.parent_alive(os.getppid())
    assert not procctl.parent_alive(os.getppid() + 1)

    def body() -> int:
        procctl.set_title("qmqpd: test title")
        with open("/proc/self/cmdline", "rb") as cmdline:
            return 5 if cmdline.read().startswith(b"qmqpd: test title") else 6

    assert in_child(body) == 5


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    import resource

    def body() -> int:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        now = procctl.raise_fd_limit()
        soft_after, hard_after = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            return 0 if now == soft_after and now > 64 else 1
        return 0 if now == soft_after == hard == hard_after else 1

    assert in_child(body) == 0
