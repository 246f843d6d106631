"""`qmqpd serve` as a real process: limits, rules, crashes, memory cap, reload, drain.

Clients are real TCP sockets on 127.0.0.0/8 (127.0.0.2.. as source addresses stand for
different client IPs). Who is in service is read from the workers' process titles.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmqpd.lobby import HANDOFF_BYTES
from tests.serve_process import ServeProcess
from tests.support import (
    free_port,
    process_title,
    read_reply,
    request,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
TOO_MANY = b"43:Ztoo many connections from your IP (#4.3.2),"
MESSAGE = b"Subject: test\n\nhello\n"


class Server(ServeProcess):
    """One `qmqpd serve --config FILE` with its own queue and log (tmp/queue, made if
    missing), 2 prefork workers and no fsync unless the test says otherwise."""

    def __init__(self, tmp: Path, **settings: object) -> None:
        super().__init__(tmp, **{"use_fsync": False, "use_syncdir": False, "prefork": 2,
                                 **settings})


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def make(**settings: object) -> Server:
        server = Server(tmp_path, **settings)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))
    return sock


def answer_within(sock: socket.socket, seconds: float) -> bytes | None:
    """Bytes the server sent by itself within seconds; None if it stayed silent."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""
    return data


def send_message(sock: socket.socket, body: bytes = MESSAGE) -> bytes:
    sock.settimeout(20)
    try:
        sock.sendall(request(body, b"sender@example.org", [b"rcpt@example.org"]))
        sock.shutdown(socket.SHUT_WR)
    except OSError as error:
        # The server may close first (a denied client): then only what it sent counts.
        if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            raise
    return read_reply(sock)


def deliver(port: int, source: str = "127.0.0.1") -> bytes:
    with connect(port, source) as sock:
        return send_message(sock)


def is_ok(reply: bytes) -> bool:
    return b":Kok " in reply


PAYLOAD = request(MESSAGE, b"sender@example.org", [b"rcpt@example.org"])
# A request a little bigger than the master's handoff mark: a worker takes the connection
# once HANDOFF_BYTES of it are in the socket (a smaller start waits in the master).
LONG_PAYLOAD = request(b"Subject: long\n\n" + b"0123456789abcde\n" * 4400, b"sender@example.org",
                       [b"rcpt@example.org"])


def begin(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A session under way: connected and HANDOFF_BYTES of a longer request sent, so a
    worker has taken it and waits for the rest."""
    sock = connect(port, source)
    sock.sendall(LONG_PAYLOAD[:HANDOFF_BYTES])
    return sock


def finish(sock: socket.socket) -> bytes:
    """The rest of a request `begin` started; the answer."""
    sock.settimeout(20)
    sock.sendall(LONG_PAYLOAD[HANDOFF_BYTES:])
    sock.shutdown(socket.SHUT_WR)
    return read_reply(sock)


def finish_if_served(sock: socket.socket) -> bytes:
    """finish(), for a session that may have had to give way (its socket shut)."""
    try:
        return finish(sock)
    except OSError:
        return b""


def test_serves_and_titles(server_factory: Callable[..., Server]) -> None:
    server = server_factory(prefork=3).start()
    assert len(server.wait_idle(3)) == 3
    assert is_ok(deliver(server.port))
    assert server.queued() == 1
    with open(f"/proc/{server.pid}/cmdline", "rb") as cmdline:
        assert cmdline.read().startswith(f"qmqpd: master 127.0.0.1:{server.port} busy=".encode())
    assert "RULES is not set" in server.log()


def test_maxperip_one_ip_sixty_slow_clients(server_factory: Callable[..., Server]) -> None:
    server = server_factory(maxperip=5, maxdaemons=20, prefork=5).start()
    server.wait_idle(5)
    clients = [begin(server.port) for _ in range(60)]
    try:
        answers = [answer_within(sock, 0.5 if i < 10 else 0.05) for i, sock in enumerate(clients)]
        # anything refused got its Z at once; re-check the silent ones a little longer
        answers = [a if a is not None else answer_within(s, 0.3)
                   for a, s in zip(answers, clients, strict=True)]
        silent = [s for a, s in zip(answers, clients, strict=True) if a is None]
        refused = [a for a in answers if a is not None]
        assert len(silent) == 5
        assert refused == [TOO_MANY] * 55
        assert len(server.titled("127.0.0.1 receiving")) == 5
        for sock in silent:
            assert is_ok(finish(sock))
    finally:
        for sock in clients:
            sock.close()
    assert server.queued() == 5
    # the slots came back: five more in service at once, the sixth refused
    wait_until(lambda: len(server.titled("worker idle")) >= 5, what="idle again")
    again = [connect(server.port) for _ in range(6)]
    try:
        late = [answer_within(sock, 0.4) for sock in again]
        assert late.count(None) == 5 and late.count(TOO_MANY) == 1
    finally:
        for sock in again:
            sock.close()
    assert server.log().count("event=perip_limit") == 56


def test_maxdaemons_holds_across_ips(server_factory: Callable[..., Server]) -> None:
    """Six stalled sessions from six IPs, MAXDAEMONS 3: never more than three in service,
    the others wait in the master. A stalled session gives way (Z, nothing queued) to one
    that has waited, so in the end each is answered K or that Z."""
    server = server_factory(maxperip=0, maxdaemons=3, prefork=3).start()
    server.wait_idle(3)
    sources = [f"127.0.0.{n}" for n in range(2, 8)]
    clients = [begin(server.port, source) for source in sources]
    replies: list[bytes] = []
    try:
        busy = wait_until(lambda: len(server.titled("receiving")) == 3 and
                          server.titled("receiving"), what="3 busy workers")
        served = {title.split()[2] for title in busy.values()}  # type: ignore[union-attr]
        assert served <= set(sources) and len(served) == 3
        wait_until(lambda: "setting=MAXDAEMONS" in server.log(), what="the warning")
        for _ in range(10):  # while they give way to each other, three at most are served
            assert len(server.titled("receiving")) <= 3 and len(server.workers()) == 3
            time.sleep(0.1)
        replies = [finish_if_served(sock) for sock in clients]
        # K, or the give-way Z (lost to the reset when the rest of the request follows it)
        assert all(is_ok(reply) or b"too slow" in reply or reply == b""
                   for reply in replies), replies
        assert "event=give_way" in server.log() or all(map(is_ok, replies))
    finally:
        for sock in clients:
            sock.close()
    assert server.queued() == sum(map(is_ok, replies))
    assert "event=perip_limit" not in server.log()


def tcprules(tmp: Path, text: str, name: str = "tcp.qmqp") -> Path:
    """Compile rules with Debian's tcprules (atomic rename over the cdb)."""
    cdb = tmp / f"{name}.cdb"
    subprocess.run(["tcprules", str(cdb), str(tmp / f"{name}.tmp")], input=text.encode(),
                   check=True)
    return cdb


def test_rule_maxperip_overrides_global(server_factory: Callable[..., Server],
                                        tmp_path: Path) -> None:
    cdb = tcprules(tmp_path, '127.0.0.3:allow,MAXPERIP="1"\n127.0.0.4:allow,MAXPERIP="3"\n'
                             ":allow\n")
    server = server_factory(maxperip=2, maxdaemons=20, prefork=4, rules=str(cdb)).start()
    server.wait_idle(4)
    opened: list[socket.socket] = []
    try:
        def silent_then(source: str, count: int) -> list[bytes | None]:
            socks = [connect(server.port, source) for _ in range(count)]
            opened.extend(socks)
            return [answer_within(sock, 0.4) for sock in socks]

        assert silent_then("127.0.0.3", 2) == [None, TOO_MANY]
        assert silent_then("127.0.0.4", 4) == [None, None, None, TOO_MANY]
        assert silent_then("127.0.0.2", 3) == [None, None, TOO_MANY]
    finally:
        for sock in opened:
            sock.close()
    assert "maxperip=1" in server.log() and "maxperip=3" in server.log()


def test_swapped_cdb_changes_decisions_without_restart(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    cdb = tcprules(tmp_path, "127.0.0.1:allow\n:deny\n")
    server = server_factory(rules=str(cdb)).start()
    server.wait_idle(2)
    assert is_ok(deliver(server.port))
    assert deliver(server.port, "127.0.0.5") == b""  # denied: closed, nothing sent
    assert re.search(r"event=deny pid=\d+ ip=127\.0\.0\.5 ", server.log())
    tcprules(tmp_path, '127.0.0.5:allow,DATABYTES="10"\n:deny\n')
    assert deliver(server.port) == b""
    reply = deliver(server.port, "127.0.0.5")  # allowed now, with the rule's DATABYTES
    assert reply.startswith(b"") and b":Dmessage too big" in reply, reply
    workers_before = set(server.workers())
    tcprules(tmp_path, "127.0.0.5:allow\n:deny\n")
    assert is_ok(deliver(server.port, "127.0.0.5"))
    assert set(server.workers()) == workers_before  # no restart, no reload
    assert server.queued() == 2


def test_kill_busy_worker_frees_slot_and_ip(server_factory: Callable[..., Server]) -> None:
    server = server_factory(maxperip=1, maxdaemons=1, prefork=1).start()
    server.wait_idle(1)
    victim_client = connect(server.port)
    try:
        victim_client.sendall(LONG_PAYLOAD[:HANDOFF_BYTES])  # a worker has it
        busy = wait_until(lambda: server.titled("receiving"), what="a busy worker")
        (victim,) = busy  # type: ignore[misc]
        os.kill(victim, signal.SIGKILL)
        reply = read_reply(victim_client)
        assert b"K" not in reply
    finally:
        victim_client.close()
    wait_until(lambda: "worker died during a session" in server.log(), what="the reap")
    assert f"worker={victim}" in server.log()
    server.wait_idle(1)
    # the one slot and the one per-IP count are free again
    assert is_ok(deliver(server.port))
    assert server.queued() == 1
    def names(sub: str) -> list[str]:
        return sorted(p.name for p in (server.queue / sub).rglob("*") if p.is_file())

    # nothing partial: no pid file left, one mess file, its todo (and intd) entry only
    assert names("pid") == []
    assert len(names("mess")) == 1 and names("todo") == names("mess")
    assert set(names("intd")) <= set(names("todo"))


def test_term_drains_session_in_progress(server_factory: Callable[..., Server]) -> None:
    server = server_factory(prefork=2).start()
    server.wait_idle(2)
    client = begin(server.port)
    try:
        wait_until(lambda: server.titled("receiving"), what="a busy worker")
        server.signal(signal.SIGTERM)
        wait_until(lambda: "phase=drain" in server.log(), what="the drain")
        with pytest.raises(OSError):
            connect(server.port, timeout=2).close()
        assert server.proc is not None and server.proc.poll() is None
        assert is_ok(finish(client))
    finally:
        client.close()
    assert server.wait() == 0
    assert server.queued() == 1
    assert "event=exit" in server.log()


def test_hup_with_broken_config_keeps_serving(server_factory: Callable[..., Server]) -> None:
    server = server_factory(prefork=2, maxperip=2).start()
    first = server.wait_idle(2)
    good = server.config_path.read_text()
    server.config_path.write_text(good.replace("maxperip = 2", 'maxperip = "lots"'))
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in server.log(), what="the reload error")
    assert "MAXPERIP" in server.log()
    assert is_ok(deliver(server.port))
    assert set(first) <= set(server.workers())  # nothing was replaced
    assert "event=reload" not in server.log()
    # a good config on HUP: new workers replace the old ones, the new limit applies
    server.config_path.write_text(good.replace("maxperip = 2", "maxperip = 1"))
    server.signal(signal.SIGHUP)
    wait_until(lambda: "event=reload" in server.log(), what="the reload")
    wait_until(lambda: len(server.titled("worker idle")) == 2 and
               not set(server.titled("worker idle")) & set(first), what="new workers")
    with connect(server.port) as one, connect(server.port) as two:
        assert answer_within(one, 0.3) is None
        assert answer_within(two, 0.3) == TOO_MANY
    assert server.proc is not None and server.proc.poll() is None
    # PORT cannot change on HUP: the title and status keep showing the port still bound
    other = free_port()
    server.config_path.write_text(good.replace(f"port = {server.port}", f"port = {other}"))
    server.signal(signal.SIGHUP)
    wait_until(lambda: "settings=PORT" in server.log(), what="the restart-only warning")
    wait_until(lambda: server.log().count("event=reload") == 2, what="the second reload")
    title = process_title(server.proc.pid)
    assert f"127.0.0.1:{server.port} " in title and str(other) not in title, title
    assert is_ok(deliver(server.port))


def test_memory_cap_answers_z_and_master_lives(server_factory: Callable[..., Server],
                                               tmp_path: Path) -> None:
    probe = server_factory(prefork=1).start()
    (worker,) = probe.wait_idle(1)
    with open(f"/proc/{worker}/status") as status:
        vm_size = next(int(line.split()[1]) * 1024 for line in status
                       if line.startswith("VmSize:"))
    probe.stop()
    server = server_factory(prefork=1, soft_mem=vm_size + (24 << 20))
    server.log_path.write_text("")
    server.start()
    server.wait_idle(1)
    assert is_ok(deliver(server.port))
    # a 12 MB envelope (within ENVELOPE_MAX) held in memory blows a 24 MB margin
    recipients = [b"r%06d@" % n + b"x" * 980 for n in range(12000)]
    with connect(server.port) as sock:
        sock.sendall(request(MESSAGE, b"a@example.org", recipients))
        sock.shutdown(socket.SHUT_WR)
        reply = read_reply(sock)
    assert reply.startswith(b"") and b":Zqq out of memory" in reply, reply
    assert server.proc is not None and server.proc.poll() is None
    server.wait_idle(1)
    assert is_ok(deliver(server.port))
    assert server.queued() == 2


def test_max_requests_recycles_workers(server_factory: Callable[..., Server]) -> None:
    server = server_factory(prefork=1, maxdaemons=1, max_requests=2).start()
    server.wait_idle(1)
    for _ in range(5):
        assert is_ok(deliver(server.port))
    served_by = [line.split()[1] for line in server.log().splitlines()
                 if line.startswith("event=session")]
    # two sessions per worker (no jitter below 10), then a fresh one
    assert len(served_by) == 5 and len(set(served_by)) == 3
    assert served_by[0] == served_by[1] != served_by[2] == served_by[3] != served_by[4]


def test_workers_exit_when_master_dies(server_factory: Callable[..., Server]) -> None:
    server = server_factory(prefork=3).start()
    workers = set(server.wait_idle(3))
    server.signal(signal.SIGKILL)
    server.wait()
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}/cmdline") and
                               process_title(pid).startswith("qmqpd: worker") for pid in workers),
               what="the workers to exit")




BROKEN_LAUNCHER = textwrap.dedent("""
    import sys
    from qmqpd import config, master
    from qmqpd.cli import planner

    def broken_worker(channel, plans):
        raise RuntimeError("worker cannot boot")

    cfg = config.load(sys.argv[1])
    sys.exit(master.run(cfg, broken_worker, lambda: cfg, planner))
""")


def test_worker_that_cannot_boot_stops_master(server_factory: Callable[..., Server],
                                              tmp_path: Path) -> None:
    server = server_factory(prefork=2)
    launcher = tmp_path / "launch.py"
    launcher.write_text(BROKEN_LAUNCHER)
    server.spawn([sys.executable, str(launcher), str(server.config_path)])
    assert server.wait(20) == 111
    log = server.log()
    assert "worker cannot boot" in log
    assert "cannot start workers" in log and "died before becoming ready" in log
    assert not server.workers()


# A qmail-queue stand-in: reads message (fd 0) and envelope (fd 1), records its env.
DUMP_ENV = """#!/bin/sh
cat > /dev/null
cat <&1 > /dev/null
env | grep -E '^(TCP|PROTO|MARK)' | sort > "{out}"
exit 0
"""


def test_handoff_facts_and_rule_env_reach_the_session(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    program = tmp_path / "dump-env"
    program.write_text(DUMP_ENV.format(out=out))
    program.chmod(0o755)
    cdb = tcprules(tmp_path, f'127.0.0.6:allow,QMAILQUEUE="{program}",MARK="six"\n:allow\n')
    server = server_factory(rules=str(cdb)).start()
    server.wait_idle(2)
    assert is_ok(deliver(server.port, "127.0.0.6"))
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert env["TCPREMOTEIP"] == "127.0.0.6" and env["PROTO"] == "TCP"
    assert env["TCPLOCALIP"] == "127.0.0.1" and env["TCPLOCALPORT"] == str(server.port)
    assert env["TCPLOCALHOST"] == socket.gethostname()
    assert env["MARK"] == "six" and int(env["TCPREMOTEPORT"]) > 0
    out.unlink()
    assert is_ok(deliver(server.port, "127.0.0.7"))  # other clients: the native queue
    assert not out.exists()
    assert server.queued() == 1


def test_listen_on_all_ipv6_folds_mapped_clients(server_factory: Callable[..., Server]) -> None:
    server = server_factory(localip="::", prefork=1).start()
    server.wait_idle(1)
    assert is_ok(deliver(server.port))  # IPv4 client on a dual-stack socket
    with socket.create_connection(("::1", server.port), timeout=10) as sock:
        assert is_ok(send_message(sock))
    log = server.log()
    assert re.search(r"event=session pid=\d+ ip=127\.0\.0\.1 ", log), log
    assert re.search(r"event=session pid=\d+ ip=::1 ", log), log


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_drops_to_user_before_forking(server_factory: Callable[..., Server]) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    # nobody cannot reach a queue under the test's private tmp: a program stands in
    server = server_factory(user="nobody", prefork=1, qmailqueue="/bin/true")
    server.start()
    (worker,) = server.wait_idle(1)
    for pid in (server.pid, worker):
        with open(f"/proc/{pid}/status") as status:
            uids = next(line.split()[1:] for line in status if line.startswith("Uid:"))
        assert uids == [str(nobody.pw_uid)] * 4
