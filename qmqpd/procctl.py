"""Process control: privilege drop, resource limits, titles, dying with the parent.

Called by the master, the workers and `qmqpd check` (which drops to the service's user in
a child to test file access as that user); it never opens files or sockets of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import os
import pwd
import resource
import signal
import sys

import setproctitle

from qmqpd.errors import TemporaryError

PR_SET_PDEATHSIG = 1


class ProcError(TemporaryError):
    """A user, group or limit that cannot be applied; the message says which and why.

    `setting` names the setting at fault (USER or GROUP); `missing` is true when the user
    or group does not exist at all (there is no one to act as)."""

    def __init__(self, message: str, setting: str = "USER", missing: bool = False) -> None:
        super().__init__(message)
        self.setting = setting
        self.missing = missing


def resolve_user(user: str) -> tuple[int, int, str]:
    """(uid, primary gid, name) for a user name or numeric uid."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        if user.isdigit():  # a bare uid without a passwd entry: no primary group known
            return int(user), -1, ""
        raise ProcError(f"USER {user!r}: no such user", "USER", missing=True) from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def resolve_groups(group: str) -> list[int]:
    """Group ids for `name`, `gid` or a comma list of them (tcpserver -g gid,gid)."""
    gids = []
    for item in (part.strip() for part in group.split(",")):
        if not item:
            continue
        if item.isdigit():
            gids.append(int(item))
            continue
        try:
            gids.append(grp.getgrnam(item).gr_gid)
        except KeyError:
            raise ProcError(f"GROUP {item!r}: no such group", "GROUP",
                            missing=True) from None
    return gids


def identity(user: str = "", group: str = "") -> tuple[int, int, list[int], str]:
    """(uid, primary gid, every gid, name) a process has after drop_privileges(user, group):
    GROUP's list if given, else the user's groups (initgroups); -1 = left as it is."""
    uid, gid, name = resolve_user(user) if user else (-1, -1, "")
    gids = resolve_groups(group) if group else []
    primary = gids[0] if gids else gid
    if not gids and name:
        gids = os.getgrouplist(name, primary)
    elif not gids and user:
        gids = [primary] if primary >= 0 else []
    return uid, primary, gids, name


def drop_privileges(user: str = "", group: str = "") -> None:
    """Switch to user/group for good (groups first, uid last, like setuidgid)."""
    if not user and not group:
        return
    uid, primary, gids, _name = identity(user, group)
    if _already(uid, primary, gids):
        return  # started as that user (e.g. by systemd's User=): nothing to drop
    try:
        os.setgroups(gids)
        if primary >= 0:
            os.setgid(primary)
        if uid >= 0:
            os.setuid(uid)
    except PermissionError as error:
        raise ProcError(f"cannot drop privileges to {user or '-'}:{group or '-'}: "
                        f"{error.strerror}") from None
    if uid > 0 and _can_regain_root():
        raise ProcError("privilege drop did not stick: root can be regained")


def _already(uid: int, primary: int, gids: list[int]) -> bool:
    """True when this process already has exactly that identity and is not root."""
    if os.geteuid() == 0 or uid not in (-1, os.geteuid()):
        return False
    if primary >= 0 and primary != os.getegid():
        return False
    return not gids or set(gids) <= {os.getegid(), *os.getgroups()}


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except PermissionError:
        return False
    return True


def _lower_soft(limit: int, value: int) -> None:
    _soft, hard = resource.getrlimit(limit)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(limit, (value, hard))


def set_memory_limit(max_bytes: int) -> None:
    """softlimit -m: cap address space and data segment (0 = leave as is)."""
    if max_bytes <= 0:
        return
    for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        _lower_soft(limit, max_bytes)


# Above the measured need: a session's smallest buffers (a message body is spooled to disk
# above 1 MiB). Bigger messages need more: a cap near the floor answers them Z.
SESSION_HEADROOM = 4 << 20
# Threads a worker starts: the queue writer's two sync threads.
WORKER_THREADS = 2
M_ARENA_MAX = -8  # mallopt(3)
_floor_cache: dict[int, int] = {}


def memory_floor(threads: int = WORKER_THREADS, headroom: int = SESSION_HEADROOM) -> int:
    """The smallest SOFT_MEM (RLIMIT_AS) a worker forked from this process can serve in:
    measured, not guessed. A forked child starts `threads` threads (each with its stack)
    and reports its address-space size (VmSize); the floor is that plus `headroom`,
    rounded up to 8 MiB. glibc's per-thread arenas are left out of the measure (the child
    sets M_ARENA_MAX to 1): under a cap a thread whose arena does not fit uses the main
    one. Call it where workers are forked from (every module imported)."""
    if threads not in _floor_cache:
        _floor_cache[threads] = _measure(threads)
    need = _floor_cache[threads] + headroom
    # In 8 MiB steps: `qmqpd check` measures in its own process, the master in its own
    # (about a MiB apart), and both must name the same floor.
    return ((need + (8 << 20) - 1) >> 23) << 23


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _measure(threads: int) -> int:
    """VmSize of a forked child once its threads run."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            import threading

            libc_name = ctypes.util.find_library("c")
            if libc_name:
                ctypes.CDLL(libc_name).mallopt(M_ARENA_MAX, 1)
            done = threading.Event()
            running = threading.Barrier(threads + 1)

            def thread_main() -> None:
                running.wait()
                done.wait()

            for _ in range(threads):
                threading.Thread(target=thread_main, daemon=True).start()
            running.wait(10)
            os.write(write_end, str(_vm_size()).encode())
            done.set()
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    stack = 8 << 20 if stack == resource.RLIM_INFINITY else stack
    return int(text) if text.strip() else _vm_size() + threads * stack


def set_title(title: str) -> None:
    setproctitle.setproctitle(title)


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to signal us when the parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def parent_alive(expected_ppid: int) -> bool:
    """The getppid check that covers the race before PR_SET_PDEATHSIG took effect."""
    return os.getppid() == expected_ppid



def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as nr_open:
            return int(nr_open.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # an unlimited hard limit still stops at fs.nr_open on Linux
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY:
        return target
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
