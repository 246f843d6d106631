#!/usr/bin/env python3
"""The queue commit alone: `Queue.write` of one message, no network, no parsing.

For each commit mode, queue state and writer count it forks that many processes, each
writing its share of the messages into one queue with fsync and syncdir on, and times
every `Queue.write` call (pid file → mess → intd → todo, syncs included). Prints msgs/s,
p50/p99 per message, the device's cache flushes and journal commits per message (from
/sys/class/block/DEV/stat and /proc/fs/jbd2), the writers' CPU per message (user +
system, from getrusage of the reaped writers) and, with --strace, the system calls per
message from `strace -f -c` of a short extra run.

    .venv/bin/python bench/commit.py [--messages 2000] [--writers 1,8] [--modes each,syncfs]
        [--dir /var/tmp | --loop ext4 | --loop ext4-nojournal] [--drained 200000]
        [--repeat 3]

Run it with PYTHONPATH pointing at another tree to measure that tree's writer. The queue
lives in a temporary directory under --dir: put it on the filesystem you want measured
(tmpfs measures nothing). --loop makes a 2 GB image in a temporary directory under --dir,
formats it (ext4 with or without a journal), loop-mounts it for the run (root only) and
unmounts and removes it afterwards: its device counts nobody's writes but the bench's.
--drained N also runs every case on a queue whose mess/, intd/ and todo/ directories once
held N entries that were all removed (ext4 directories do not shrink), the fresh and the
drained queue in alternation, --repeat times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_vs_postfix import (  # noqa: E402
    describe_filesystem,
    mount_of,
    parse_strace_counts,
    percentile,
)

from qmqpd.message import Message, MessageData  # noqa: E402
from qmqpd.queue import Queue, create_queue  # noqa: E402

SPLIT = 23
LINKS_PER_FILE = 20_000

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


def drain(queue: Path, count: int) -> None:
    """Make mess/<n>/, intd/ and todo/ hold count entries each, then remove them all: the
    directories keep the size they grew to (hard links of one file: names, not inodes)."""
    names = [(queue / "mess" / str(n % SPLIT) / str(n), queue / "intd" / str(n),
              queue / "todo" / str(n)) for n in range(1, count + 1)]
    sources = []
    for index, group in enumerate(names):
        if index % LINKS_PER_FILE == 0:  # ext4 allows 65000 links to one inode
            sources.append(queue / "pid" / f"drain{len(sources)}")
            sources[-1].write_bytes(b"")
        for name in group:
            os.link(sources[-1], name)
    for group in names:
        for name in group:
            os.unlink(name)
    for source in sources:
        source.unlink()
    os.sync()


def writer(queue: Path, count: int, length: int, out: int, mode: str) -> None:
    """A child: write count messages, send their latencies (seconds) as JSON on out."""
    target = Queue(str(queue), fsync=True, syncdir=True, commit_mode=mode)
    message = message_of_length(length)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        target.write(message)
        latencies.append(time.perf_counter() - started)
    with os.fdopen(out, "w") as pipe:
        json.dump(latencies, pipe)


def run_writers(queue: Path, messages: int, writers: int, length: int,
                mode: str) -> tuple[float, list[float]]:
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
                writer(queue, share, length, write_end, mode)
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


def count_calls(args: argparse.Namespace, directory: Path, writers: int, mode: str,
                drained: int) -> dict[str, float]:
    """System calls per message: this script under `strace -f -c`, a short run, one
    count (the bench's own set-up calls included: a few per message at 500 messages)."""
    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("commit bench: --strace needs strace")
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        summary = Path(scratch) / "strace.txt"
        command = [strace, "-f", "-c", "-o", str(summary),
                   sys.executable, __file__, "--messages", str(args.strace_messages),
                   "--writers", str(writers), "--length", str(args.length),
                   "--modes", mode, "--dir", str(directory), "--warmup", "0",
                   "--drained", str(drained), "--quiet",
                   *(["--only-drained"] if drained else [])]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return {name: calls / args.strace_messages
                for name, calls in parse_strace_counts(summary.read_text()).items()}


@contextlib.contextmanager
def loop_filesystem(parent: Path, kind: str, size: str = "2G") -> Iterator[Path]:
    """A loop-mounted ext4 image (with or without a journal) for one run; unmounted and
    removed afterwards, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="qmqpd-commit-fs-", dir=parent) as scratch:
        image, mount = Path(scratch) / "image", Path(scratch) / "mnt"
        mount.mkdir()
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        features = ["-O", "^has_journal"] if kind == "ext4-nojournal" else []
        # inode tables and journal zeroed now, not by a kernel thread during the runs
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        *features, str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=False)


class Case:
    """One row: a commit mode, a queue state and a writer count, over repeats."""

    def __init__(self, mode: str, state: str, writers: int) -> None:
        self.mode, self.state, self.writers = mode, state, writers
        self.rates: list[float] = []
        self.latencies: list[float] = []
        self.device: dict[str, list[float]] = {}
        self.cpu_us: list[float] = []

    def add(self, seconds: float, latencies: list[float], before: dict[str, int],
            after: dict[str, int], cpu: float) -> None:
        count = len(latencies)
        self.rates.append(count / seconds)
        self.latencies += latencies
        for name in before:
            if name in after:
                self.device.setdefault(name, []).append((after[name] - before[name]) / count)
        self.cpu_us.append(cpu * 1e6 / count)

    def row(self, calls: str) -> str:
        device = ", ".join(f"{name} {statistics.median(values):.2f}"
                           for name, values in sorted(self.device.items()))
        return (f"| {self.mode} | {self.state} | {self.writers} | {len(self.latencies)} "
                f"| {statistics.median(self.rates):,.0f} "
                f"| {percentile(self.latencies, 0.5) * 1000:.2f} "
                f"| {percentile(self.latencies, 0.99) * 1000:.2f} | {device} "
                f"| {statistics.median(self.cpu_us):,.0f} | {calls} |")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(case: Case, queue: Path, args: argparse.Namespace,
            counters: DeviceCounters) -> None:
    if args.warmup:
        run_writers(queue, args.warmup, case.writers, args.length, case.mode)
        empty_queue(queue)
    os.sync()
    before, cpu = counters.read(), children_cpu()
    seconds, latencies = run_writers(queue, args.messages, case.writers, args.length,
                                     case.mode)
    cpu = children_cpu() - cpu
    after = counters.read()
    empty_queue(queue)
    case.add(seconds, latencies, before, after, cpu)


def run(args: argparse.Namespace, directory: Path) -> None:
    import qmqpd.queue
    counts = [int(item) for item in args.writers.split(",") if item.strip()]
    modes = [item.strip() for item in args.modes.split(",") if item.strip()]
    if not args.quiet:
        print(f"writer: {qmqpd.queue.__file__}")
        print(f"queue filesystem: {describe_filesystem(directory)}; load average "
              + " ".join(f"{value:.2f}" for value in os.getloadavg()))
    counters = DeviceCounters(mount_of(directory)[0])
    with contextlib.ExitStack() as stack:
        queues: dict[str, Path] = {}
        states = [] if args.only_drained else ["fresh"]
        if args.drained:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="qmqpd-commit-drained-", dir=directory)))
            queues["drained"] = scratch / "queue"
            create_queue(str(queues["drained"]))
            started = time.perf_counter()
            drain(queues["drained"], args.drained)
            if not args.quiet:
                print(f"drained queue: {args.drained} entries in mess/, intd/, todo/ made "
                      f"and removed in {time.perf_counter() - started:.0f} s")
            states.append("drained")
        cases = [Case(mode, state, writers) for mode in modes for writers in counts
                 for state in states]
        for repeat in range(args.repeat):
            # interleaved: every case once per repeat, the order reversed every other time
            for case in cases if repeat % 2 == 0 else cases[::-1]:
                if case.state == "drained":
                    measure(case, queues["drained"], args, counters)
                    continue
                with tempfile.TemporaryDirectory(prefix="qmqpd-commit-", dir=directory) as fresh:
                    queue = Path(fresh) / "queue"
                    create_queue(str(queue))
                    measure(case, queue, args, counters)
    if args.quiet:
        return
    print("| mode | queue | writers | msgs | msgs/s | p50 ms | p99 ms | device per msg "
          "| writer CPU µs/msg | syscalls per msg |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for case in cases:
        calls = ""
        if args.strace:
            counted = count_calls(args, directory, case.writers, case.mode,
                                  args.drained if case.state == "drained" else 0)
            top = sorted(counted.items(), key=lambda item: -item[1])
            calls = (f"{sum(counted.values()):.1f}: "
                     + ", ".join(f"{name} {value:.2f}" for name, value in top
                                 if value >= 0.5))
        print(case.row(calls), flush=True)
    print("load average after: " + " ".join(f"{value:.2f}" for value in os.getloadavg()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--messages", type=int, default=2000)
    parser.add_argument("-w", "--writers", default="1,8",
                        help="concurrent writer processes, comma separated (default 1,8)")
    parser.add_argument("--modes", default="each,syncfs",
                        help="COMMIT_MODE values, comma separated (default each,syncfs)")
    parser.add_argument("-l", "--length", type=int, default=2048, help="message bytes")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=1, help="runs of every case (medians)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the temporary queue is made (default /var/tmp)")
    parser.add_argument("--loop", choices=("ext4", "ext4-nojournal"),
                        help="make the queue on a loop-mounted image of this kind under --dir")
    parser.add_argument("--drained", type=int, default=0,
                        help="also measure a queue whose directories once held this many "
                             "entries (0: fresh queues only)")
    parser.add_argument("--strace", action="store_true",
                        help="also count system calls per message (strace -f -c, extra run)")
    parser.add_argument("--strace-messages", type=int, default=500)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only-drained", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = [int(item) for item in args.writers.split(",") if item.strip()]
    if not counts or min(counts) < 1 or args.messages < 1:
        parser.error("--writers are integers >= 1 and --messages >= 1")
    if args.loop:
        with loop_filesystem(args.dir, args.loop) as mount:
            run(args, mount)
    else:
        run(args, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
