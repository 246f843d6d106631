"""Listening sockets: opening, pausing, closing.

Owns: the sockets the server accepts on (PORT on each LOCALIP, and PROXY_SOCKET), bound
before the privilege drop, which setting to fix when one cannot be bound, and whether they
are registered in the master's selector (accepting or paused). `open_socket` is the one
way a listening TCP socket is made, METRICS's too; SHORTAGE, the accept errors that mean
out of descriptors or memory (pause, never exit).
Called by: the master (open at start, pause/resume each turn, close at stop and in a
child) and the metrics endpoint (`open_socket`, SHORTAGE).
Never touches: clients (it accepts them and hands them on at once, knowing nothing of them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import stat
from collections.abc import Callable, Iterator

from qmqpd import log, procctl
from qmqpd.config import Config, problem
from qmqpd.errors import TemporaryError

# The kernel's queue of connections not yet accepted: the master accepts eagerly (idle
# ones wait in the master without a worker), so this only absorbs bursts of connects.
LISTEN_BACKLOG = 1024
# Connections accepted in one go before the loop looks at timers and signals again.
ACCEPT_BATCH = 256
# "Out of descriptors or memory": the caller sheds load or pauses, never spins or exits.
SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ListenError(TemporaryError):
    def __init__(self, address: str, port: int, error: OSError) -> None:
        super().__init__(f"cannot listen on {address} port {port}: {error.strerror or error}")
        self.address_problem = not isinstance(error, socket.gaierror) and error.errno in (
            errno.EADDRINUSE, errno.EACCES)
        self.setting = "PORT" if self.address_problem else "LOCALIP"  # the one to fix


def open_socket(address: str, port: int, backlog: int, v6only: bool = True) -> socket.socket:
    """One non-blocking listening TCP socket; ListenError names the address and port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ListenError(address, port, error) from None
    return sock


def open_listeners(addresses: tuple[str, ...], port: int, backlog: int) -> list[socket.socket]:
    """One socket per address; `::` also takes IPv4 unless 0.0.0.0 is listed too."""
    listeners: list[socket.socket] = []
    for address in addresses:
        v6only = address != "::" or "0.0.0.0" in addresses
        try:
            listeners.append(open_socket(address, port, backlog, v6only))
        except ListenError:
            for opened in listeners:
                opened.close()
            raise
    return listeners


def open_unix(path: str, backlog: int, uid: int = -1, gid: int = -1,
              mode: int = 0o660) -> socket.socket:
    """A listening unix socket at path with that owner and mode (PROXY_SOCKET). A stale
    socket left by a previous run is replaced; one another process listens on is not."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ListenError(path, 0, OSError(errno.EEXIST, "exists and is not a socket"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                raise ListenError(path, 0, OSError(errno.EADDRINUSE, "in use"))
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # never reachable by others between bind and chmod
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ListenError(path, 0, error) from None
    return sock


def name(sock: socket.socket) -> str:
    """host:port (or [v6]:port, or the path) of a bound socket."""
    if sock.family == socket.AF_UNIX:
        return str(sock.getsockname())
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listeners:
    """The server's listening sockets and whether the master's selector watches them."""

    def __init__(self, selector: selectors.BaseSelector, tag: object) -> None:
        self.selector = selector
        self.tag = tag  # the selector data the master dispatches on
        self.sockets: list[socket.socket] = []
        self.names: list[str] = []  # what is bound (a reload cannot change it)
        self.watching = False
        self.failure: OSError | None = None  # what ended the last accept batch, if not EAGAIN

    def open(self, cfg: Config) -> None:
        """PORT on each LOCALIP, and PROXY_SOCKET when set (owned by PROXY_SOCKET_USER and
        _GROUP, ProcError when they do not exist, with PROXY_SOCKET_MODE); a ConfigError
        names the setting to fix."""
        backlog = max(LISTEN_BACKLOG, cfg.maxdaemons)
        owner = (procctl.identity(cfg.proxy_socket_user, cfg.proxy_socket_group)[:2]
                 if cfg.proxy_socket else (-1, -1))
        try:
            self.sockets = open_listeners(cfg.localip, cfg.port, backlog)
            if cfg.proxy_socket:
                try:
                    self.sockets.append(open_unix(cfg.proxy_socket, backlog, *owner,
                                                  int(cfg.proxy_socket_mode, 8)))
                except ListenError as error:
                    self.close_fds()
                    error.setting = "PROXY_SOCKET"
                    raise
        except ListenError as error:
            raise problem(error.setting, cfg.source(error.setting), str(error)) from None
        self.names = [name(sock) for sock in self.sockets]

    def log(self, **fields: object) -> None:
        for sock in self.sockets:
            if sock.family == socket.AF_UNIX:
                log.event("listen", path=sock.getsockname(), proxy="required", **fields)
                continue
            host, port = sock.getsockname()[:2]
            log.event("listen", addr=host, port=port, **fields)

    def watch(self, want: bool) -> None:
        """Accept (want) or pause; the kernel's backlog holds connects while paused."""
        if want == self.watching:
            return
        for sock in self.sockets:
            if want:
                self.selector.register(sock, selectors.EVENT_READ, self.tag)
            else:
                self.selector.unregister(sock)
        self.watching = want

    def accept(self, listener: socket.socket,
               room: Callable[[], bool]) -> Iterator[tuple[socket.socket, tuple]]:
        """Up to ACCEPT_BATCH connections while `room()` says one more may be taken; a
        client that gave up before its accept is skipped. Another error ends the batch and
        is left in `failure` for the caller (out of descriptors: it sheds load)."""
        self.failure = None
        for _ in range(ACCEPT_BATCH):
            if not room():
                return
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self.failure = error
                return
            yield conn, peer

    def close(self) -> None:
        self.watch(False)
        for sock in self.sockets:
            if sock.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(sock.getsockname())
            sock.close()
        self.sockets = []

    def close_fds(self) -> None:
        """In a forked worker: close, touching no selector."""
        for sock in self.sockets:
            sock.close()
