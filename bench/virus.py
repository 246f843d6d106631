#!/usr/bin/env python3
"""What the virus stage costs: `qmqpd serve` with QHPSI on vs off at N concurrent sessions.

A private clamd (test database: one EICAR signature, so the scan cost is clamd's parsing
and hashing, not the size of the official database) listens on a unix socket in a
temporary directory. Every message is different (counter in the Subject and body), so
clamd's clean-result cache never answers for it. The client is qmqpd's own QMQP client
(`qmqpd.client.send`) in N threads, one connection per message. qmqpd runs with its
limits on: a tcprules rule gives 127.0.0.1 the sessions of the run, MAXPERIP keeps its
default for every other client.

Printed side by side: msgs/s and p50/p99 latency with the stage off and on, and clamd's
own scan time for the same kind of message measured directly (raw INSTREAM, one message
at a time), so that "stage cost = added latency - clamd's scan time" can be read off.

Everything runs on 127.0.0.1 and is stopped by PID at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import BenchError, loopback_rules, start_qmqpd  # noqa: E402
from bench.benchlib import cpu_seconds as user_system_seconds  # noqa: E402
from qmqpd.client import Server, send  # noqa: E402
from qmqpd.filters import virus  # noqa: E402
from qmqpd.message import Message, MessageData  # noqa: E402
from tests.clamd import Clamd  # noqa: E402
from tests.serve_process import ServeProcess  # noqa: E402

RECEIVED = b"Received: from unknown (127.0.0.1)\n  by bench with QMQP; 1 Jan 2024 00:00:00 -0000\n"

SENDER = b"bench@example.com"
RECIPIENTS = [b"sink@example.net"]


def message(number: int, size: int) -> bytes:
    head = (f"From: bench@example.com\nTo: sink@example.net\nSubject: bench {number} "
            f"{time.time_ns()}\nMessage-ID: <{number}.{os.getpid()}@bench>\n\n").encode()
    line = f"line of message {number} in a benchmark of the virus stage, padded out.\n"
    body = (line * (size // len(line) + 1)).encode()[: max(0, size - len(head))]
    return head + body


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def start_serve(tmp: Path, name: str, sessions: int, settings: dict[str, str]) -> ServeProcess:
    """`qmqpd serve` with its own queue, prefork workers for every session, all of them up.
    The per-IP limit stays on: a rule gives 127.0.0.1 (the client) the run's sessions."""
    directory = tmp / name
    directory.mkdir()
    rules = loopback_rules([sys.executable, "-m", "qmqpd"], directory, sessions)
    server = start_qmqpd(directory,  # its queue, config and log in directory
                         maxdaemons=str(sessions + 2), prefork=str(sessions), rules=str(rules),
                         max_requests="0",  # no recycling: the workers' CPU time stays readable
                         **settings)
    server.wait_idle(sessions)  # the master forks its prefork workers after it listens
    return server


def drive(port: int, count: int, sessions: int, size: int, first: int) -> dict[str, float]:
    """Send `count` distinct messages with `sessions` in flight; all must get K."""
    server = [Server("127.0.0.1", port)]

    def one(number: int) -> tuple[float, str]:
        body = message(number, size)
        started = time.monotonic()
        result = send(body, SENDER, RECIPIENTS, server, timeout=60)
        return time.monotonic() - started, result.status or result.error

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=sessions) as pool:
        results = list(pool.map(one, range(first, first + count)))
    wall = time.monotonic() - started
    bad = [status for _, status in results if status != "K"]
    if bad:
        raise SystemExit(f"{len(bad)} messages not accepted, e.g. {bad[0]!r}")
    latencies = [latency for latency, _ in results]
    return {"rate": count / wall, "p50": percentile(latencies, 0.5) * 1000,
            "p99": percentile(latencies, 0.99) * 1000}


def raw_scan(path: str, data: bytes) -> None:
    """One INSTREAM written in a single sendall: clamd's own cost plus the least client."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(b"zINSTREAM\0" + struct.pack("!L", len(data)) + data + b"\0\0\0\0")
        answer = sock.recv(256)
    if not answer.startswith(b"stream: OK"):
        raise SystemExit(f"clamd answered {answer!r}")


def stage_vs_raw_ms(path: str, count: int, size: int, first: int) -> tuple[float, float]:
    """Medians, one message at a time, interleaved: the stage's process() and a raw scan of
    a message of the same size (distinct messages both)."""
    stage = virus.VirusStage(virus.UnixScanner(path=path, timeout=30))
    stage_ms, raw_ms = [], []
    for number in range(first, first + 2 * count, 2):
        msg = Message(SENDER, list(RECIPIENTS), MessageData(message(number, size)),
                      received=RECEIVED)
        started = time.perf_counter()
        if stage.process(msg).action != "accept":
            raise SystemExit("the stage did not accept a clean message")
        stage_ms.append((time.perf_counter() - started) * 1000)
        data = RECEIVED + message(number + 1, size)
        started = time.perf_counter()
        raw_scan(path, data)
        raw_ms.append((time.perf_counter() - started) * 1000)
    return statistics.median(stage_ms), statistics.median(raw_ms)


def raw_concurrent_ms(path: str, count: int, sessions: int, size: int, first: int) -> float:
    """Median raw scan time with `sessions` scans in flight, as the workers see clamd."""

    def one(number: int) -> float:
        data = RECEIVED + message(number, size)
        started = time.perf_counter()
        raw_scan(path, data)
        return (time.perf_counter() - started) * 1000

    with ThreadPoolExecutor(max_workers=sessions) as pool:
        return statistics.median(pool.map(one, range(first, first + count)))


def logged_stage_ms(log: Path, skip: int) -> float:
    """Median virus_ms of the session lines after the first `skip` (the warm-up run)."""
    values = [float(field.split("=", 1)[1]) for line in log.read_text().splitlines()
              for field in line.split() if field.startswith("virus_ms=")]
    return statistics.median(values[skip:])


def cpu_seconds(pid: int) -> float:
    return sum(user_system_seconds(pid))


def tree_cpu_seconds(server: ServeProcess) -> float:
    """CPU time of a `qmqpd serve` master and its live workers."""
    return cpu_seconds(server.pid) + sum(cpu_seconds(pid) for pid in server.workers())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--count", type=int, default=2000, help="messages per run")
    parser.add_argument("--size", type=int, default=10_000, help="bytes per message")
    parser.add_argument("--fsync", action="store_true",
                        help="fsync the queue (off by default: measure the stage, not the disk)")
    parser.add_argument("--clamd-tmp", type=Path, default=None,
                        help="clamd's TemporaryDirectory (it writes each stream there); "
                             "default: the scratch directory, e.g. /dev/shm for tmpfs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-virus-") as scratch:
        tmp = Path(scratch)
        clamd = Clamd(tmp / "clamd", temporary_directory=args.clamd_tmp).start()
        servers: dict[str, ServeProcess] = {}
        try:
            sync = "1" if args.fsync else "0"
            base = {"use_fsync": sync, "use_syncdir": sync}
            servers["off"] = start_serve(tmp, "off", args.sessions, base)
            servers["on"] = start_serve(tmp, "on", args.sessions, {
                **base, "qhpsi": "1", "clamd_socket": str(clamd.socket_path)})
            figures: dict[str, dict[str, float]] = {}
            number = 0
            clamd_cpu = 0.0
            serve_cpu: dict[str, float] = {}
            for label in ("off", "on", "off", "on"):  # warm-up, measured
                server = servers[label]
                before = cpu_seconds(clamd.pid), tree_cpu_seconds(server)
                figures[label] = drive(server.port, args.count, args.sessions, args.size,
                                       number)
                clamd_cpu = cpu_seconds(clamd.pid) - before[0]
                serve_cpu[label] = tree_cpu_seconds(server) - before[1]
                number += args.count
            path = str(clamd.socket_path)
            in_worker = logged_stage_ms(servers["on"].log_path, args.count)
            under_load = raw_concurrent_ms(path, args.count, args.sessions, args.size, number)
            alone_stage, alone_raw = stage_vs_raw_ms(path, 300, args.size, number + args.count)
        except BenchError as error:
            raise SystemExit(f"virus: {error}") from None
        finally:
            for server in servers.values():
                server.stop()
            clamd.stop()

    off, on = figures["off"], figures["on"]
    print(f"# virus stage, {args.sessions} sessions, {args.count} distinct {args.size} B "
          f"messages, fsync {'on' if args.fsync else 'off'}, clamd TemporaryDirectory "
          f"{args.clamd_tmp or 'on disk'}; {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| QHPSI | msgs/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- |")
    for label, row in (("off", off), ("on", on)):
        print(f"| {label} | {row['rate']:.0f} | {row['p50']:.2f} | {row['p99']:.2f} |")
    print(f"\nthroughput on/off {on['rate'] / off['rate']:.2f}; added p50 latency "
          f"{on['p50'] - off['p50']:.2f} ms")
    per = 1000 / args.count
    print(f"CPU per message: qmqpd {serve_cpu['off'] * per:.2f} ms (off) vs "
          f"{serve_cpu['on'] * per:.2f} ms (on); clamd {clamd_cpu * per:.2f} ms")
    print("\n| median per message | stage (process) | clamd alone (raw INSTREAM) | difference |")
    print("| --- | --- | --- | --- |")
    print(f"| one at a time | {alone_stage:.2f} ms | {alone_raw:.2f} ms | "
          f"{alone_stage - alone_raw:+.2f} ms |")
    print(f"| {args.sessions} in flight | {in_worker:.2f} ms (virus_ms in the workers' log) | "
          f"{under_load:.2f} ms | {in_worker - under_load:+.2f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
