#!/usr/bin/env python3
"""Latency of the queue commit alone: `Queue.write` of one message, no network, no parsing.

For each writer count it forks that many processes, each writing its share of the messages
into one fresh queue with fsync and syncdir on, and times every `Queue.write` call
(pid file → mess → intd → todo, syncs included). Prints msgs/s, p50/p99 per message and,
with --strace, the sync system calls per message from `strace -f -c` of a short extra run.

    .venv/bin/python bench/commit.py [--messages 2000] [--writers 1,8] [--dir /var/tmp]

Run it with PYTHONPATH pointing at another tree to measure that tree's writer. The queue
lives in a temporary directory under --dir: put it on the filesystem you want measured
(tmpfs measures nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_vs_postfix import (  # noqa: E402
    SYNC_CALLS,
    describe_filesystem,
    mount_of,
    parse_strace_counts,
    percentile,
)

from qmqpd.message import Message, MessageData  # noqa: E402
from qmqpd.queue import Queue, create_queue  # noqa: E402

RECEIVED = b"Received: from unknown (127.0.0.1)\n  by bench with QMQP; 1 Jan 2026 00:00:00 -0000\n"


def message_of_length(length: int) -> Message:
    head = b"From: <bench@example.com>\nTo: <sink@example.net>\nSubject: commit bench\n\n"
    line = b"x" * 71 + b"\n"
    body_length = max(0, length - len(head) - len(RECEIVED))
    body = (line * (body_length // len(line) + 1))[:body_length]
    return Message(b"bench@example.com", [b"sink@example.net"], MessageData(data=head + body),
                   received=RECEIVED)


class DeviceCounters:
    """Journal commits (ext4's /proc/fs/jbd2) and cache flushes (block layer) of the
    queue's device. They count every writer on that device, not only this bench: read
    them on a device nobody else writes to (e.g. a loop-mounted image)."""

    def __init__(self, device: str) -> None:
        name = os.path.basename(device)
        self.stat = Path(f"/sys/class/block/{name}/stat")
        self.journal = Path(f"/proc/fs/jbd2/{name}-8/info")

    def read(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with contextlib.suppress(OSError, IndexError, ValueError):
            # field 16 of the block stat: flush requests completed (Linux >= 5.5)
            counts["flushes"] = int(self.stat.read_text().split()[15])
        with contextlib.suppress(OSError, IndexError, ValueError):
            counts["journal commits"] = int(self.journal.read_text().split()[0])
        return counts


def empty_queue(queue: Path) -> None:
    for top in ("mess", "intd", "todo"):
        for directory, _, files in os.walk(queue / top):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))


def writer(queue: Path, count: int, length: int, out: int) -> None:
    """A child: write count messages, send their latencies (seconds) as JSON on out."""
    target = Queue(str(queue), fsync=True, syncdir=True)
    message = message_of_length(length)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        target.write(message)
        latencies.append(time.perf_counter() - started)
    with os.fdopen(out, "w") as pipe:
        json.dump(latencies, pipe)


def run_writers(queue: Path, messages: int, writers: int, length: int) -> tuple[float, list[float]]:
    """Fork the writers at once; wall seconds of the whole batch and every latency."""
    shares = [messages // writers + (index < messages % writers) for index in range(writers)]
    children: list[tuple[int, int]] = []
    started = time.perf_counter()
    for share in shares:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            code = 0
            try:
                writer(queue, share, length, write_end)
            except BaseException as error:  # a failed child must say why, then exit
                print(f"commit bench writer: {error}", file=sys.stderr)
                code = 1
            os._exit(code)
        os.close(write_end)
        children.append((pid, read_end))
    latencies: list[float] = []
    failed = 0
    for pid, read_end in children:
        with os.fdopen(read_end) as pipe:
            text = pipe.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or not text:
            failed += 1
            continue
        latencies += json.loads(text)
    seconds = time.perf_counter() - started
    if failed:
        raise SystemExit(f"commit bench: {failed} writer(s) failed")
    return seconds, latencies


def count_syncs(args: argparse.Namespace, queue_parent: Path, writers: int) -> dict[str, float]:
    """Sync calls per message: this script under `strace -f -c`, a short run, one count."""
    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("commit bench: --strace needs strace")
    with tempfile.TemporaryDirectory(dir=queue_parent) as scratch:
        summary = Path(scratch) / "strace.txt"
        command = [strace, "-f", "-c", "-o", str(summary), "-e",
                   "trace=" + ",".join((*SYNC_CALLS, "link", "rename")),
                   sys.executable, __file__, "--messages", str(args.strace_messages),
                   "--writers", str(writers), "--length", str(args.length),
                   "--dir", str(queue_parent), "--warmup", "0", "--quiet"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return {name: calls / args.strace_messages
                for name, calls in parse_strace_counts(summary.read_text()).items()}


def per_message(before: dict[str, int], after: dict[str, int], messages: int) -> str:
    return ", ".join(f"{name} {(after[name] - before[name]) / messages:.2f}"
                     for name in sorted(before) if name in after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--messages", type=int, default=2000)
    parser.add_argument("-w", "--writers", default="1,8",
                        help="concurrent writer processes, comma separated (default 1,8)")
    parser.add_argument("-l", "--length", type=int, default=2048, help="message bytes")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the temporary queue is made (default /var/tmp)")
    parser.add_argument("--strace", action="store_true",
                        help="also count sync calls per message (strace -f -c, extra run)")
    parser.add_argument("--strace-messages", type=int, default=200)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = [int(item) for item in args.writers.split(",") if item.strip()]
    if not counts or min(counts) < 1 or args.messages < 1:
        parser.error("--writers are integers >= 1 and --messages >= 1")

    import qmqpd.queue
    if not args.quiet:
        print(f"writer: {qmqpd.queue.__file__}")
        print(f"queue filesystem: {describe_filesystem(args.dir)}; load average "
              + " ".join(f"{value:.2f}" for value in os.getloadavg()))
        print("| writers | msgs | msgs/s | p50 ms | p99 ms | max ms | device per msg "
              "| syscalls per msg |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    counters = DeviceCounters(mount_of(args.dir)[0])
    for writers in counts:
        with tempfile.TemporaryDirectory(prefix="qmqpd-commit-", dir=args.dir) as scratch:
            queue = Path(scratch) / "queue"
            create_queue(str(queue))
            if args.warmup:
                run_writers(queue, args.warmup, writers, args.length)
                empty_queue(queue)
            before = counters.read()
            seconds, latencies = run_writers(queue, args.messages, writers, args.length)
            after = counters.read()
        if args.quiet:
            continue
        syncs = ""
        if args.strace:
            calls = count_syncs(args, args.dir, writers)
            syncs = ", ".join(f"{name} {value:.2f}" for name, value in sorted(calls.items()))
        print(f"| {writers} | {len(latencies)} | {len(latencies) / seconds:,.0f} "
              f"| {percentile(latencies, 0.5) * 1000:.2f} "
              f"| {percentile(latencies, 0.99) * 1000:.2f} | {max(latencies) * 1000:.2f} "
              f"| {per_message(before, after, len(latencies))} | {syncs} |", flush=True)
    if not args.quiet:
        print("load average after: " + " ".join(f"{value:.2f}" for value in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
