"""Messages per second through `qmqpd serve` with DKIM signing off and on.

Starts one prefork server per run on 127.0.0.1 with its own queue, drives it with Postfix's
qmqp-source (C, so the load generator is not the bottleneck) at N parallel sessions, and
prints msgs/s for: no signing, DKIM rsa-sha256 (RSA-2048), DKIM + DomainKeys, and
RSA + Ed25519 dual signatures. Also prints the per-signature cost of dkimpy's pure-Python
signer next to ours, on the same message.

    .venv/bin/python bench/dkim.py [--messages 3000] [--sessions 8] [--size 4096]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is named dkim.py: keep its directory off the path so `import dkim` is dkimpy.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path.insert(0, str(ROOT))

from bench.benchlib import QMQP_SOURCE, BenchError, qmqp_source, start_qmqpd  # noqa: E402
from qmqpd.filters import keys  # noqa: E402
from qmqpd.queue import create_queue  # noqa: E402


def run_case(work: Path, control: Path, settings: dict[str, str], args: argparse.Namespace
             ) -> tuple[float, int]:
    """(msgs/s, messages queued) for one server configuration."""
    queue = work / f"queue{time.monotonic_ns()}"
    create_queue(str(queue))
    # `qmqpd serve` loads the stage modules in the master before it forks
    server = start_qmqpd(work, name="serve", queuedir=str(queue), controldir=str(control),
                         prefork=args.sessions, maxdaemons=args.sessions * 2,
                         maxperip=args.sessions * 2, use_fsync=args.fsync,
                         use_syncdir=args.fsync, **settings)
    try:
        load(server.port, args, warmup(args))  # every worker has loaded its key
        started = time.monotonic()
        load(server.port, args, args.messages)
        elapsed = time.monotonic() - started
    finally:
        server.stop()
    queued = len(os.listdir(queue / "todo"))
    shutil.rmtree(queue)
    if args.keep_log:
        shutil.copy(server.log_path, args.keep_log)
    return args.messages / elapsed, queued


def warmup(args: argparse.Namespace) -> int:
    return args.sessions * 50


def load(port: int, args: argparse.Namespace, count: int) -> None:
    qmqp_source(port, count, args.sessions, args.size, "sender@example.org", "rcpt@example.net")


def per_signature_ms(control: Path, size: int) -> tuple[float, float]:
    """Median ms per rsa-sha256 relaxed/relaxed signature: dkimpy alone vs ours."""
    import dkim as dkimpy

    from qmqpd.filters import dkim as fdkim

    message = (b"From: a@example.org\nTo: b@example.net\nSubject: bench\n\n"
               + (b"x" * 70 + b"\n") * (size // 71))
    path = control / "domainkeys" / "example.org" / "default"
    key = keys.load_private_key(str(path))
    pem = path.read_bytes()
    headers, body = dkimpy.rfc822_parse(message)
    include = fdkim.headers_to_sign(headers, ())

    def median(func) -> float:
        times = []
        for _ in range(60):
            started = time.perf_counter()
            func()
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2] * 1000

    theirs = median(lambda: dkimpy.sign(message, b"default", b"example.org", pem,
                                        canonicalize=(b"relaxed", b"relaxed"),
                                        include_headers=include, linesep=b"\n"))
    ours = median(lambda: fdkim.sign_message(headers, body, b"example.org", b"default", key,
                                             b"rsa-sha256", include, fdkim.SignOptions(),
                                             int(time.time())))
    return theirs, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096, help="message body bytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep-log", help="copy the last server log here")
    parser.add_argument("--fsync", action="store_true", help="fsync/syncdir on (default off)")
    args = parser.parse_args()
    if not os.path.exists(QMQP_SOURCE):
        print("needs Postfix's qmqp-source (apt-get install postfix)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        control = work / "control"
        keys.keygen("example.org", "default", "rsa", 2048, str(control / "domainkeys"))
        keys.keygen("example.org", "ed", "ed25519", 0, str(control / "domainkeys"))
        cases = [
            ("no signing", {}),
            ("DKIM rsa-sha256 (RSA-2048)", {"dkimsign": ""}),
            ("DKIM + DomainKeys", {"dkimsign": "", "dksign": ""}),
            ("DKIM RSA + Ed25519", {"dkimsign": "", "dkimsignextra": "domainkeys/%/ed"}),
        ]
        print(f"{args.messages} messages of {args.size} bytes, {args.sessions} sessions, "
              f"fsync {'on' if args.fsync else 'off'}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}, {args.rounds} interleaved rounds")
        rates: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _ in range(args.rounds):
            for name, settings in cases:
                try:
                    rate, queued = run_case(work, control, settings, args)
                except BenchError as error:
                    print(f"dkim: {error}", file=sys.stderr)
                    return 111
                if queued != args.messages + warmup(args):
                    print(f"  warning: {queued} messages queued", file=sys.stderr)
                rates[name].append(rate)
        base = statistics.median(rates[cases[0][0]])
        print(f"{'case':<30} {'median msgs/s':>14} {'vs unsigned':>12}  rounds")
        for name, _ in cases:
            median = statistics.median(rates[name])
            each = " ".join(f"{r:.0f}" for r in rates[name])
            print(f"{name:<30} {median:>14.0f} {median / base:>11.0%}   {each}")
        theirs, ours = per_signature_ms(control, args.size)
        print(f"per signature, median: dkimpy {theirs:.2f} ms, qmqpd {ours:.2f} ms "
              f"({theirs / ours:.0f}x)")
        log = (work / "serve.log").read_text(errors="replace")
        errors = [line for line in log.splitlines() if re.search(r"answer=[ZD]", line)]
        if errors:
            print(f"  {len(errors)} Z/D answers, first: {errors[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
