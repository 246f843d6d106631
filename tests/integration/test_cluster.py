"""A qmqpd cluster behind a real HAProxy (Debian haproxy), with the shipped example config
packaging/haproxy/qmqpd.cfg: HAProxy on 127.0.0.10 in front of three `qmqpd serve` on
127.0.0.11-13, a QMQP health check, a per-client limit in HAProxy's stick table.

127.0.0.x source addresses stand for different clients. Shown here:
- real client addresses through PROXY v2: own rules and per-IP limits per client;
- a node killed with -9 under load: clients keep getting K from the other two within a
  few seconds, every acknowledged message is in some node's queue, and the node's return
  is picked up by the health check;
- the per-client limit held cluster-wide by HAProxy's stick table;
- qmqpc with a qmqpservers file listing two HAProxy front ends fails over to the second.
All of them run through PROXY v2 over each node's PROXY_SOCKET (`server nodeN
unix@PATH send-proxy-v2`, PROXY_IN_CLUSTER_TESTS); switching that constant off runs the last
three over TCP with PROXY_PROTOCOL off and HAProxy without send-proxy-v2.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qmqpd.rules import compile_rules
from qmqpd.status import read_status
from tests.serve_process import ServeProcess
from tests.support import (
    free_port,
    port_clash,
    read_reply,
    request,
    stop_process,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CONFIG = ROOT / "packaging" / "haproxy" / "qmqpd.cfg"
BALANCER = "127.0.0.10"
SECOND_BALANCER = "127.0.0.20"
NODES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
PER_CLIENT = 4  # HAProxy: connections in progress per client, whole cluster
PROXY_IN_CLUSTER_TESTS = True
RULES = """\
127.0.0.2:allow,MAXPERIP="1"
127.0.0.3:allow,DATABYTES="200"
127.0.0.4:deny
127.0.0.10:allow,MAXPERIP="0"
127.0.0.20:allow,MAXPERIP="0"
127.:allow
:deny
"""


class Node(ServeProcess):
    """One `qmqpd serve` on its own loopback address with its own queue and log."""

    def __init__(self, address: str, tmp: Path, proxy: bool) -> None:
        self.address = address
        self.proxy = proxy
        self.dir = tmp / f"node-{address}"
        self.dir.mkdir()
        (self.dir / "tcp.qmqp").write_text(RULES)
        compile_rules(str(self.dir / "tcp.qmqp"), str(self.dir / "tcp.qmqp.cdb"))
        # the balancers on this host reach it through its PROXY_SOCKET
        through = {"proxy_socket": str(self.socket)} if proxy else {}
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
                   "ALLOW_ROOT": "1"}  # run as whoever runs the suite, root included
        super().__init__(self.dir, environ=environ, localip=address,
                         rules=str(self.dir / "tcp.qmqp.cdb"), use_fsync="0",
                         use_syncdir="0", prefork="3", maxdaemons="20", **through)

    @property
    def socket(self) -> Path:
        return self.dir / "lb.sock"

    @property
    def server(self) -> str:
        """The node as HAProxy's `server` line names it."""
        return f"unix@{self.socket}" if self.proxy else f"{self.address}:{self.port}"

    def kill(self) -> None:
        self.kill_master()

    def stop(self, seconds: float = 30) -> int | None:
        status = super().stop(seconds)
        self.reap_orphans(10)  # workers a kill left behind end with their session
        return status

    def queued_ids(self) -> set[str]:
        """The X-Test-Id of every message in this node's queue."""
        found = set()
        assert self.queue is not None
        for path in (self.queue / "mess").rglob("*"):
            if path.is_file():
                match = re.search(rb"X-Test-Id: (\S+)", path.read_bytes())
                if match:
                    found.add(match.group(1).decode())
        return found


@dataclass
class Balancer:
    """HAProxy running the shipped config with its ${...} values from the environment."""

    address: str
    nodes: list[Node]
    tmp: Path
    proxy: bool
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    stats: Path = field(init=False)

    def __post_init__(self) -> None:
        self.port = free_port(self.address)
        self.stats = self.tmp / f"haproxy-{self.address}.sock"
        text = HAPROXY_CONFIG.read_text()
        if not self.proxy:
            text = text.replace(" send-proxy-v2 check-send-proxy", "")
        self.config = self.tmp / f"haproxy-{self.address}.cfg"
        self.config.write_text(text)

    def start(self) -> Balancer:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(haproxy):
            raise RuntimeError("haproxy is not installed: run tests/install-and-run.sh")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "QMQP_BIND": f"{self.address}:{self.port}", "QMQP_SOURCE": self.address,
               "QMQP_PER_CLIENT": str(PER_CLIENT), "HAPROXY_STATS_SOCKET": str(self.stats),
               **{f"QMQPD_NODE{n}": node.server for n, node in enumerate(self.nodes, 1)}}
        self.log_path = self.tmp / f"haproxy-{self.address}.log"
        for _attempt in range(10):
            with open(self.log_path, "ab") as log:
                mark = log.tell()
                self.proc = subprocess.Popen([haproxy, "-db", "-f", str(self.config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             env=env, cwd=self.tmp)
            wait_until(lambda: self.proc.poll() is not None or self.up() == len(self.nodes),
                       seconds=30, what=f"HAProxy {self.address} to see every node up")
            if self.proc.poll() is None:
                return self
            said = self.log_path.read_bytes()[mark:].decode(errors="replace")
            assert port_clash(said), said
            # another process took the port since free_port chose it: a fresh one
            self.port = free_port(self.address)
            env["QMQP_BIND"] = f"{self.address}:{self.port}"
        raise AssertionError(f"HAProxy {self.address}: its port was taken 10 times in a row")

    def ask(self, command: str) -> str:
        """One command on HAProxy's stats socket; "" when it cannot be asked."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.stats))
                sock.sendall(command.encode() + b"\n")
                return read_reply(sock, 1 << 20).decode()
        except OSError:
            return ""

    def node_rows(self) -> list[dict[str, str]]:
        rows = csv.DictReader(self.ask("show stat").lstrip("# ").splitlines())
        return [row for row in rows
                if row["pxname"] == "qmqpd" and row["svname"].startswith("node")]

    def server_states(self) -> dict[str, str]:
        """node name -> UP/DOWN/... from HAProxy's stats socket."""
        return {row["svname"]: row["status"] for row in self.node_rows()}

    def node_sessions(self) -> int:
        """Sessions HAProxy has open to the nodes now (its leastconn counts these)."""
        return sum(int(row["scur"] or 0) for row in self.node_rows())

    def tracked(self, source: str) -> int:
        """conn_cur of source in the frontend's stick table (PER_CLIENT is checked on it)."""
        table = self.ask("show table qmqp")
        found = re.search(rf"key={re.escape(source)} .*?conn_cur=(\d+)", table)
        return int(found.group(1)) if found else 0

    def up(self) -> int:
        return sum(state.startswith("UP") for state in self.server_states().values())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@dataclass
class Cluster:
    nodes: list[Node]
    balancer: Balancer
    tmp: Path

    def send(self, source: str, body: bytes = b"hello\n", test_id: str = "",
             balancer: Balancer | None = None) -> bytes:
        """One QMQP request through the balancer from source; the raw answer."""
        via = balancer or self.balancer
        message = f"X-Test-Id: {test_id}\nSubject: cluster\n\n".encode() + body
        try:
            with socket.create_connection((via.address, via.port), timeout=30,
                                          source_address=(source, 0)) as sock:
                sock.sendall(request(message, b"ops@example.org", [b"rcpt@example.net"]))
                sock.shutdown(socket.SHUT_WR)
                return read_reply(sock)
        except (ConnectionResetError, BrokenPipeError):  # refused by the balancer
            return b""
        except OSError as error:  # closed by the balancer before our half-close
            if error.errno == errno.ENOTCONN:
                return b""
            raise

    def hold_open(self, source: str) -> socket.socket:
        """A session through the balancer that has begun its request and goes quiet."""
        sock = socket.create_connection((self.balancer.address, self.balancer.port),
                                        timeout=30, source_address=(source, 0))
        sock.sendall(b"1000:")
        return sock


def start_cluster(tmp: Path, proxy: bool) -> Cluster:
    """Three nodes and the balancer; if any fails to start, what did start is stopped."""
    nodes = [Node(address, tmp, proxy) for address in NODES]
    balancer = Balancer(BALANCER, nodes, tmp, proxy)
    try:
        for node in nodes:
            node.start()
        return Cluster(nodes, balancer.start(), tmp)
    except BaseException:
        stop_cluster(Cluster(nodes, balancer, tmp))
        raise


def stop_cluster(cluster: Cluster) -> None:
    cluster.balancer.stop()
    for node in cluster.nodes:
        node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    started = start_cluster(tmp_path, PROXY_IN_CLUSTER_TESTS)
    yield started
    stop_cluster(started)


def is_k(answer: bytes) -> bool:
    return re.fullmatch(rb"\d+:K.*,", answer, flags=re.DOTALL) is not None


# ---- PROXY v2: the real client drives rules and limits -------------------------------
def test_real_clients_get_their_own_rules_and_limits(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, proxy=True)
    held: list[socket.socket] = []
    try:
        assert is_k(cluster.send("127.0.0.2", test_id="two"))
        # 127.0.0.3's rule: DATABYTES=200, so a bigger message is refused with D.
        assert re.fullmatch(rb"\d+:D.*,", cluster.send("127.0.0.3", b"x" * 500),
                            flags=re.DOTALL)
        assert is_k(cluster.send("127.0.0.3", b"small\n"))
        assert cluster.send("127.0.0.4") == b""  # denied: closed without a word
        nodes_log = "".join(node.log() for node in cluster.nodes)
        assert re.search(r"event=session pid=\d+ ip=127\.0\.0\.2 ", nodes_log), nodes_log
        assert re.search(r"event=deny pid=\d+ ip=127\.0\.0\.4 ", nodes_log), nodes_log
        # MAXPERIP=1 for 127.0.0.2 on each node: leastconn spreads three held sessions
        # one per node, so the fourth (within HAProxy's PER_CLIENT) meets a node already
        # serving 127.0.0.2 and gets its Z.
        for count in range(1, len(NODES) + 1):
            held.append(cluster.hold_open("127.0.0.2"))
            wait_until(lambda count=count: cluster.balancer.node_sessions() == count, 30,
                       "HAProxy to pass the held session on to a node")
        answer = cluster.send("127.0.0.2")
        assert b"Ztoo many connections from your IP" in answer, answer
        # Only HAProxy's health checks (PROXY LOCAL, empty envelope) show the balancer.
        client_sessions = [line for line in "".join(n.log() for n in cluster.nodes).splitlines()
                           if "event=session" in line and "sender=ops@example.org" in line]
        assert client_sessions and not any(f"ip={BALANCER} " in line
                                           for line in client_sessions)
        # HAProxy's checks (PROXY LOCAL, then the empty probe, every second) are health
        # checks: counted and logged as such, never as sessions or D answers.
        def checked() -> list[dict] | None:
            found = [read_status(str(node.dir / "status.json")) for node in cluster.nodes]
            return found if all(s.get("health_checks", 0) >= 2 for s in found) else None

        statuses = wait_until(checked, 30, "health checks counted on every node")
        assert isinstance(statuses, list)
        assert sum(s["answers"]["rejected"] for s in statuses) == 1  # 127.0.0.3's big one
        assert sum(s["connections"]["dropped"] for s in statuses) == 0
        nodes_log = "".join(node.log() for node in cluster.nodes)
        assert re.search(r"event=health pid=\d+ ip=127\.0\.0\.1 .*answer=\"Dno recipients",
                         nodes_log), nodes_log[-2000:]
        assert not re.search(r"event=session .*ip=127\.0\.0\.1 ", nodes_log)
    finally:
        for sock in held:
            sock.close()
        stop_cluster(cluster)


# ---- a node lost under load, and its return ------------------------------------------
@dataclass
class Load:
    """Clients sending through the balancer until stopped (bounded in count)."""

    cluster: Cluster
    sources: tuple[str, ...] = ("127.0.0.5", "127.0.0.6")
    limit: int = 3000
    pause: float = 0.01  # between one client's messages: steady load, bounded count
    results: list[tuple[float, str, bool]] = field(default_factory=list)  # (time, id, K)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, source: str) -> None:
        n = 0
        while not self.stop.is_set() and len(self.results) < self.limit:
            test_id = f"{source}-{n}"
            n += 1
            try:
                ok = is_k(self.cluster.send(source, test_id=test_id))
            except OSError:
                ok = False
            self.results.append((time.monotonic(), test_id, ok))
            self.stop.wait(self.pause)

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        threads = [threading.Thread(target=self.run, args=(source,), daemon=True)
                   for source in self.sources]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(60)


def test_a_node_killed_under_load_loses_no_acknowledged_message(cluster: Cluster) -> None:
    victim = cluster.nodes[1]
    with Load(cluster).running() as load:
        wait_until(lambda: sum(ok for _, _, ok in load.results) >= 20, seconds=60,
                   what="the first 20 K under load")
        killed_at = time.monotonic()
        victim.kill()
        # Generous for 2 loaded cores: HAProxy marks the node down after 2 failed checks
        # 1 s apart; until then a refused connect is retried on another node at once.
        wait_until(lambda: sum(ok for t, _, ok in load.results if t > killed_at + 5) >= 20,
                   seconds=60, what="20 K more, 5 s after the kill")
    acknowledged = {test_id for _, test_id, ok in load.results if ok}
    queued = set().union(*(node.queued_ids() for node in cluster.nodes))
    assert acknowledged <= queued, sorted(acknowledged - queued)
    late_failures = [t - killed_at for t, _, ok in load.results if not ok and t > killed_at + 5]
    assert not late_failures, late_failures
    assert cluster.balancer.server_states()["node2"].startswith("DOWN")

    before = len(victim.queued_ids())
    victim.start()
    wait_until(lambda: cluster.balancer.up() == len(NODES), seconds=30,
               what="HAProxy to see the node back")
    for n in range(30):  # leastconn takes turns among idle nodes: a few reach it
        assert is_k(cluster.send("127.0.0.7", test_id=f"back-{n}"))
        if len(victim.queued_ids()) > before:
            break
    assert len(victim.queued_ids()) > before, "the returned node got no message"


# ---- the per-client limit in HAProxy's stick table -----------------------------------
def test_per_client_limit_is_held_by_the_balancer_for_the_cluster(cluster: Cluster) -> None:
    held = [cluster.hold_open("127.0.0.8") for _ in range(PER_CLIENT)]
    try:
        wait_until(lambda: cluster.balancer.tracked("127.0.0.8") == PER_CLIENT, 30,
                   "HAProxy to count the held sessions in its stick table")
        # Spread over three nodes, yet the next one from the same client is refused.
        assert cluster.send("127.0.0.8") == b""
        assert is_k(cluster.send("127.0.0.9"))  # another client is not limited
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: is_k(cluster.send("127.0.0.8")), seconds=15,
                      what="the client's slots to be freed")


# ---- qmqpc over two front ends -------------------------------------------------------
def test_qmqpc_fails_over_between_two_front_ends(cluster: Cluster) -> None:
    second = Balancer(SECOND_BALANCER, cluster.nodes, cluster.tmp,
                      PROXY_IN_CLUSTER_TESTS).start()
    try:
        servers = cluster.tmp / "qmqpservers"
        servers.write_text(f"{cluster.balancer.address}:{cluster.balancer.port}\n"
                           f"{second.address}:{second.port}\n")
        cluster.balancer.stop()  # the first front end is down

        def qmqpc(test_id: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [sys.executable, "-m", "qmqpd.client", "--servers", str(servers), "--from",
                 "ops@example.org", "--to", "rcpt@example.net"],
                input=f"X-Test-Id: {test_id}\nSubject: failover\n\nhi\n".encode(),
                capture_output=True, timeout=60, check=False,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)})

        sent = qmqpc("failover-1")
        assert sent.returncode == 0, sent.stderr
        assert "failover-1" in set().union(*(node.queued_ids() for node in cluster.nodes))
    finally:
        second.stop()
