#!/usr/bin/env python3
"""Filtering head to head: qmqpd's DKIM or virus stage against Postfix's qmqpd with the milter
an operator would pick instead.

--case dkim: DKIM RSA-2048 signing. qmqpd signs in its DKIM stage (DKIMSIGN, a key made by
`qmqpd dkim keygen`); Postfix's qmqpd passes every message to OpenDKIM (`non_smtpd_milters`,
a unix socket: on an inet socket the milter protocol stalls on Nagle and delayed ACKs), a
private OpenDKIM in signing mode with the same key, relaxed/relaxed as qmqpd signs.
Printed beside the table: what one RSA-2048 signature alone costs on this machine, the
floor of either side's CPU per signed message.

--case virus: one clamd with the test signature database (tests/clamd.py) serves both:
qmqpd's virus stage (QHPSI=1, CLAMD_SOCKET) and Postfix + clamav-milter. clamd caches clean
results by content, so no message is sent twice in the whole run, on either side.

Every message is distinct (a token unique to the run in the Subject, Message-ID and first
body line) and has the length given with -l, headers included. The client is this
script's own QMQP load generator: N sessions, one connection per message, each message
timed from connect to answer, so p50/p99 are of every message of the timed runs.

Both sides fsync (qmqpd: USE_FSYNC and USE_SYNCDIR; Postfix always) and run with limits
on (qmqpd: a tcprules rule with MAXPERIP for 127.0.0.1). Rounds are interleaved (the order
of the two sides alternates), the table shows medians; it refuses to start above
--max-load unless --force, and prints the load average with the figures.

Before the timed runs the bench checks its peers: a sample of signed messages from both
sides (qmqpd's queue; Postfix's hold queue, filled through a second QMQP listener whose
cleanup holds everything) must pass an independent verifier (tests/peers/dkim-verify.pl,
Perl Mail::DKIM, with the public key); for the virus case a clean sample must carry each
scanner's clean mark and an EICAR message must be refused by both.

Everything runs on 127.0.0.1 in a temporary directory and is stopped by PID (Postfix with
`postfix -c DIR stop`), also on Ctrl-C or error. Must run as root (Postfix).

    .venv/bin/python bench/filter_vs_milter.py --case dkim|virus [-l 2048|20480] [-m 2000]
        [--repeat 3] [-s 1,8,32] [--max-load 1.0] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import email.utils
import json
import os
import re
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # tests.clamd: the suite's private clamd
# serve_vs_postfix sits beside this file. Its directory is on the path only while it is
# imported: bench/dkim.py would stand in for dkimpy's `dkim` in an importer's process.
sys.path.insert(0, str(BENCH_DIR))
from serve_vs_postfix import (  # noqa: E402
    POSTFIX,
    START_TIMEOUT,
    STOP_TIMEOUT,
    BenchError,
    PostfixTarget,
    Progress,
    QmqpdTarget,
    RunResult,
    _stop_process,
    bench_main,
    bench_options,
    fmt,
    free_port,
    load_text,
    machine_busy_seconds,
    machine_facts,
    percentile,
    stable_count,
    summarise_runs,
    tree_cpu_seconds,
    version_of,
)

sys.path.remove(str(BENCH_DIR))
from tests.clamd import Clamd, eicar  # noqa: E402

VERIFIER = ROOT / "tests" / "peers" / "dkim-verify.pl"
OPENDKIM = "/usr/sbin/opendkim"
CLAMAV_MILTER = "/usr/sbin/clamav-milter"
POSTCAT = "/usr/sbin/postcat"
DOMAIN = "example.com"
SELECTOR = "default"
SENDER = f"bench@{DOMAIN}"
RECIPIENT = "sink@example.net"
ANSWER_TIMEOUT = 60.0
CASES = {"dkim": "DKIM RSA-2048 signing", "virus": "virus scanning (one clamd, test database)"}
CPU_COUNTED = {"dkim": "qmqpd's master and workers; Postfix's processes and OpenDKIM",
               "virus": "qmqpd's master and workers and clamd; Postfix's processes, "
                        "clamav-milter and clamd"}
SIDE_NAMES = {"dkim": ("qmqpd (DKIM stage)", "Postfix + OpenDKIM"),
              "virus": ("qmqpd (virus stage)", "Postfix + clamav-milter")}


# -- distinct messages ----------------------------------------------------------------------
class Messages:
    """Messages of one length that never repeat within the process: a serial number plus
    a stamp of this run in the Subject, Message-ID and first body line (so their bodies
    differ too: DKIM hashes the body, clamd caches clean results by content)."""

    FILLER_LINE = "line {:05d} of a message of the filtering benchmark, padded to length.\n"

    def __init__(self, length: int) -> None:
        self.length = length
        self.stamp = f"{os.getpid()}.{time.time_ns()}"
        self.serial = 0
        self.date = email.utils.formatdate(localtime=False)
        lines = (self.FILLER_LINE.format(n) for n in range(length // 60 + 2))
        self.filler = "".join(lines).encode()

    def make(self, extra_body: bytes = b"") -> bytes:
        self.serial += 1
        token = f"{self.stamp}.{self.serial}"
        head = (f"From: <{SENDER}>\nTo: <{RECIPIENT}>\nSubject: bench message {token}\n"
                f"Date: {self.date}\nMessage-ID: <{token}@bench.{DOMAIN}>\n\n"
                f"message {token}\n").encode() + extra_body
        return head + self.filler[:max(0, self.length - len(head))]

    def request(self, extra_body: bytes = b"") -> bytes:
        return qmqp_request(self.make(extra_body))


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def qmqp_request(message: bytes) -> bytes:
    return netstring(netstring(message) + netstring(SENDER.encode())
                     + netstring(RECIPIENT.encode()))


def reply_status(buffer: bytes) -> str | None:
    """The status letter of a complete QMQP answer netstring; None while incomplete."""
    length, colon, rest = buffer.partition(b":")
    if not colon or not length.isdigit():
        return None if len(buffer) < 12 else "?"
    if len(rest) < int(length) + 1:
        return None
    return rest[:1].decode(errors="replace") or "?"


# -- the load generator ---------------------------------------------------------------------
@dataclass
class Load:
    seconds: float
    client_cpu: float
    latencies: list[float]
    answers: collections.Counter[str]
    errors: list[str] = field(default_factory=list)


class _Session:
    __slots__ = ("reply", "request", "sent", "sock", "started")

    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock = sock
        self.request = memoryview(request)
        self.sent = 0
        self.reply = b""
        self.started = time.monotonic()


def drive(port: int, count: int, sessions: int, make: Callable[[], bytes],
          progress: Progress | None = None) -> Load:
    """Send `count` requests from make() over `sessions` concurrent connections to
    127.0.0.1:port, one message per connection; every message timed connect → answer."""
    selector = selectors.DefaultSelector()
    answers: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    errors: list[str] = []
    started = time.monotonic()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    opened = done = 0

    def open_one() -> None:
        nonlocal opened
        opened += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        session = _Session(sock, make())
        sock.connect_ex(("127.0.0.1", port))  # EINPROGRESS: writable once connected
        selector.register(sock, selectors.EVENT_WRITE, session)

    def finish(session: _Session, status: str) -> None:
        nonlocal done
        done += 1
        selector.unregister(session.sock)
        session.sock.close()
        answers[status] += 1
        if status == "K":
            latencies.append(time.monotonic() - session.started)
        elif len(errors) < 5:
            errors.append(f"{status}: {session.reply[:100]!r}")
        if progress is not None and (done % 50 == 0 or done == count):
            progress.update(done)
        if opened < count:
            open_one()

    for _ in range(min(sessions, count)):
        open_one()
    while done < count:
        events = selector.select(ANSWER_TIMEOUT)
        if not events:
            raise BenchError(f"no answer from 127.0.0.1:{port} in {ANSWER_TIMEOUT:.0f}s "
                             f"({done} of {count} answered)")
        for key, mask in events:
            session: _Session = key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    session.sent += session.sock.send(session.request[session.sent:])
                    if session.sent == len(session.request):
                        selector.modify(session.sock, selectors.EVENT_READ, session)
                    continue
                chunk = session.sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError as error:
                finish(session, f"error {error.strerror or type(error).__name__}")
                continue
            session.reply += chunk
            status = reply_status(session.reply) if chunk else "closed without an answer"
            if status is not None:
                finish(session, status)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    selector.close()
    return Load(seconds=time.monotonic() - started,
                client_cpu=(usage.ru_utime + usage.ru_stime
                            - usage_before.ru_utime - usage_before.ru_stime),
                latencies=latencies, answers=answers, errors=errors)


# -- the milters and the scanner -------------------------------------------------------------
class Helper:
    """A peer daemon run in the foreground as our child, stopped by PID."""

    name = ""
    socket: Path  # where Postfix's cleanup reaches the milter

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.log = directory / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not start: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-5:])
        return ""

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process, STOP_TIMEOUT)

    def main_pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def cpu_seconds(self) -> float:
        pid = self.main_pid()
        return tree_cpu_seconds(pid) if pid else 0.0


def unix_socket_answers(path: Path) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(path))
        return True
    return False


class OpenDkim(Helper):
    """OpenDKIM in signing mode on a unix socket that Postfix's cleanup (group postfix)
    may use; it runs as user opendkim, with its own copy of the key (it refuses a key
    another user owns)."""

    name = "opendkim"

    def __init__(self, directory: Path, private_key: Path) -> None:
        directory.mkdir()
        super().__init__(directory)
        self.socket = directory / "opendkim.sock"
        self.key = directory / f"{SELECTOR}.private"
        shutil.copyfile(private_key, self.key)
        self.key.chmod(0o600)
        shutil.chown(self.key, user="opendkim", group="opendkim")
        shutil.chown(directory, user="opendkim", group="postfix")
        directory.chmod(0o750)
        self.conf = directory / "opendkim.conf"
        self.conf.write_text(
            "Syslog no\n"
            "Mode s\n"
            f"Domain {DOMAIN}\n"
            f"Selector {SELECTOR}\n"
            f"KeyFile {self.key}\n"
            f"Socket local:{self.socket}\n"
            "UserID opendkim:postfix\n"
            "UMask 007\n"
            "Canonicalization relaxed/relaxed\n"
            "SignatureAlgorithm rsa-sha256\n"
            # Postfix presents non-SMTP mail (qmqpd's) as coming from localhost 127.0.0.1
            "InternalHosts 127.0.0.1\n"
            # the key sits below /tmp, which others may write: OpenDKIM refuses such a
            # path unless told (the key file itself is opendkim's, mode 600)
            "RequireSafeKeys no\n")

    def command(self) -> list[str]:
        return [OPENDKIM, "-f", "-x", str(self.conf)]

    def ready(self) -> bool:
        return unix_socket_answers(self.socket)


class ClamavMilter(Helper):
    """clamav-milter on a unix socket for Postfix, scanning through the shared clamd;
    rejects infected mail and marks clean mail (X-Virus-Status), as qmqpd's stage does
    (X-QHPSI: clean)."""

    name = "clamav-milter"

    def __init__(self, directory: Path, clamd_socket: Path) -> None:
        directory.mkdir()
        super().__init__(directory)
        self.socket = directory / "clamav-milter.sock"
        self.conf = directory / "clamav-milter.conf"
        self.conf.write_text(
            f"MilterSocket unix:{self.socket}\n"
            "MilterSocketGroup postfix\n"
            "MilterSocketMode 660\n"
            "FixStaleSocket yes\n"
            "Foreground yes\n"
            f"ClamdSocket unix:{clamd_socket}\n"
            "OnClean Accept\n"
            "OnInfected Reject\n"
            "OnFail Defer\n"
            "AddHeader Replace\n"
            f"LogFile {directory / 'clamav-milter.scan.log'}\n")

    def command(self) -> list[str]:
        return [CLAMAV_MILTER, "-c", str(self.conf)]

    def ready(self) -> bool:
        return unix_socket_answers(self.socket)


class SharedClamd:
    """tests/clamd.py's clamd (own directory, socket and test database) with the
    interface the bench's peers have."""

    name = "clamd"

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.clamd = Clamd(directory)
        self.socket = self.clamd.socket_path

    def start(self) -> None:
        try:
            self.clamd.start()
        except (RuntimeError, AssertionError) as error:
            raise BenchError(f"clamd did not start: {str(error)[-500:]}") from None

    def stop(self) -> None:
        self.clamd.stop()

    def main_pid(self) -> int | None:
        proc = self.clamd.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def cpu_seconds(self) -> float:
        pid = self.main_pid()
        return tree_cpu_seconds(pid) if pid else 0.0


class MilterPostfix(PostfixTarget):
    """The bench's Postfix with a milter for all non-SMTP mail (qmqpd's is that), and a
    second QMQP listener whose cleanup puts everything on hold: the bench's check reads
    signed mail there, while the timed listener's mail is discarded as usual."""

    def __init__(self, root: Path, milter_socket: Path) -> None:
        super().__init__(root)
        self.check_port = free_port()
        self.main_cf_extra = (
            f"non_smtpd_milters = unix:{milter_socket}\n"
            "milter_protocol = 6\n"
            # a milter that fails must show as failed answers, not as unfiltered mail
            "milter_default_action = tempfail\n")
        self.master_cf_extra = (
            f"127.0.0.1:{self.check_port} inet n - n - - qmqpd "
            "-o syslog_name=postfix/checkqmqpd -o cleanup_service_name=holdcleanup\n"
            "holdcleanup unix n - n - 0 cleanup -o syslog_name=postfix/holdcleanup "
            "-o header_checks=static:HOLD\n")

    def held(self) -> list[Path]:
        return sorted(path for path in (self.queue / "hold").rglob("*") if path.is_file())

    def held_message(self, path: Path) -> bytes:
        """The held message as it would be delivered: header and body (postcat -bh)."""
        result = subprocess.run([POSTCAT, "-c", str(self.conf), "-bh", str(path)],
                                capture_output=True, timeout=STOP_TIMEOUT, check=False)
        if result.returncode != 0:
            raise BenchError(f"postcat {path.name}: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def settle(self) -> None:
        super().settle()
        # Postfix's qmqpd logs `client=` before the milter had its say: a message the
        # milter refused is no accepted one.
        problems = self.milter_problems()
        if problems:
            raise BenchError(f"postfix milter: {problems[0]}")

    def milter_problems(self) -> list[str]:
        with contextlib.suppress(OSError):
            return [line for line in self.maillog.read_text(errors="replace").splitlines()
                    if " postfix/cleanup[" in line and "milter" in line]
        return []


# -- one side of the comparison --------------------------------------------------------------
@dataclass
class Side:
    """A server under test and the peer processes whose CPU is its filtering's."""

    name: str
    target: QmqpdTarget | MilterPostfix
    helpers: list[Helper | SharedClamd]

    @property
    def port(self) -> int:
        return self.target.port

    def cpu_seconds(self) -> float | None:
        own = self.target.cpu_seconds()
        if own is None:
            return None
        return own + sum(helper.cpu_seconds() for helper in self.helpers)


def measure(side: Side, messages: Messages, count: int, sessions: int,
            warmup: int) -> RunResult:
    if warmup:
        load = drive(side.port, warmup, sessions, messages.request)
        if load.answers["K"] != warmup:
            raise BenchError(f"{side.name} warm-up: {load.errors[:3]}")
    side.target.settle()
    accepted_before = stable_count(side.target.accepted)
    cpu_before = side.cpu_seconds()
    machine_before = machine_busy_seconds()
    progress = Progress(f"{side.target.name} s={sessions}", count)
    try:
        load = drive(side.port, count, sessions, messages.request, progress)
    finally:
        progress.finish()
    cpu_after = side.cpu_seconds()
    machine_cpu = machine_busy_seconds() - machine_before
    side.target.settle()
    accepted_after = stable_count(side.target.accepted)
    accepted = None
    if accepted_before is not None and accepted_after is not None:
        accepted = accepted_after - accepted_before
    errors = load.errors if load.answers["K"] != count else []
    p50, p99 = percentile(load.latencies, 0.50), percentile(load.latencies, 0.99)
    return RunResult(
        target=side.target.name, sessions=sessions, messages=count, seconds=load.seconds,
        rate=count / load.seconds, p50_ms=p50 * 1000 if p50 is not None else None,
        p99_ms=p99 * 1000 if p99 is not None else None, probes=len(load.latencies),
        probe_failures={}, accepted=accepted,
        server_cpu=(cpu_after - cpu_before) if cpu_before is not None
        and cpu_after is not None else None,
        client_cpu=load.client_cpu, machine_cpu=machine_cpu, client_errors=errors,
        samples=load.latencies)


# -- the bench's own check -------------------------------------------------------------------
def dns_record(zone_line: str) -> str:
    """The TXT value of the zone-file line `qmqpd dkim keygen` writes beside the key (its
    quoted strings joined), checked to hold an RSA public key."""
    value = "".join(re.findall(r'"([^"]*)"', zone_line))
    key = re.search(r"\bp=([A-Za-z0-9+/=]+)", value)
    if "k=rsa" not in value or key is None:
        raise BenchError(f"no RSA public key in {zone_line!r}")
    base64.b64decode(key[1], validate=True)
    return value


def verify_dkim(message: bytes, records: Path) -> list[str]:
    """Mail::DKIM's verdict lines for one message (tests/peers/dkim-verify.pl)."""
    result = subprocess.run(["perl", str(VERIFIER), str(records)],
                            input=message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
                            capture_output=True, timeout=60, check=False)
    if result.returncode != 0:
        raise BenchError(f"dkim-verify.pl failed: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode().splitlines()


def rsa_sign_ms(key_path: Path, rounds: int = 200) -> float:
    """Median ms of one RSA PKCS#1 v1.5 SHA-256 signature with the bench's key: the floor
    of a signed message's CPU on either side."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BenchError(f"{key_path} is not an RSA key")
    times = []
    for number in range(rounds):
        started = time.perf_counter()
        key.sign(b"header hash input %d" % number, padding.PKCS1v15(), hashes.SHA256())
        times.append(time.perf_counter() - started)
    return sorted(times)[rounds // 2] * 1000


def queued_messages(queue: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((queue / "mess").rglob("*")) if path.is_file()]


def wait_for(what: str, ready: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise BenchError(f"check: {what} not seen within {timeout:.0f}s")
        time.sleep(0.1)


def sample_both(qmqpd: Side, postfix: Side, messages: Messages, count: int,
                extra_body: bytes = b"") -> tuple[list[bytes], list[bytes]]:
    """Send `count` messages to each side (Postfix's check listener, which holds them) and
    return what each queued: qmqpd's queue files and Postfix's held messages."""
    target = postfix.target
    assert isinstance(target, MilterPostfix)
    for port, name in ((qmqpd.port, qmqpd.name), (target.check_port, postfix.name)):
        load = drive(port, count, 1, lambda: messages.request(extra_body))
        if load.answers["K"] != count:
            raise BenchError(f"check: {name} did not take the sample: {load.errors[:3]}")
    queue = qmqpd.target.queue
    wait_for("qmqpd's sample in its queue", lambda: len(queued_messages(queue)) >= count)
    wait_for("Postfix's sample on hold", lambda: len(target.held()) >= count)
    found = queued_messages(queue), [target.held_message(path) for path in target.held()]
    qmqpd.target.settle()  # empties qmqpd's queue; Postfix's hold queue is left alone
    for path in target.held():
        path.unlink()
    return found


def check_dkim(qmqpd: Side, postfix: Side, messages: Messages, count: int,
               records: Path) -> dict[str, list[str]]:
    """Every sampled message from both sides has one DKIM signature by d=DOMAIN s=SELECTOR
    that Mail::DKIM verifies with the public key."""
    verdicts: dict[str, list[str]] = {}
    ours, theirs = sample_both(qmqpd, postfix, messages, count)
    for side, found in ((qmqpd, ours), (postfix, theirs)):
        verdicts[side.name] = []
        for message in found:
            lines = verify_dkim(message, records)
            wanted = f"DKIM {DOMAIN} {SELECTOR} pass"
            if not any(line.startswith(wanted) for line in lines) or "overall pass" not in lines:
                raise BenchError(f"check: a message signed by {side.name} does not verify: "
                                 f"{lines} {message[:300]!r}")
            verdicts[side.name].append(lines[0])
    return verdicts


def check_virus(qmqpd: Side, postfix: Side, messages: Messages, count: int
                ) -> dict[str, list[str]]:
    """Clean samples carry each scanner's clean mark; an EICAR message is refused by both."""
    marks = {qmqpd.name: b"\nX-QHPSI: clean\n", postfix.name: b"\nX-Virus-Status: Clean\n"}
    verdicts: dict[str, list[str]] = {}
    ours, theirs = sample_both(qmqpd, postfix, messages, count)
    for side, found in ((qmqpd, ours), (postfix, theirs)):
        unmarked = [message for message in found if marks[side.name] not in b"\n" + message]
        if unmarked:
            raise BenchError(f"check: {side.name} queued a message without "
                             f"{marks[side.name].strip()!r}: {unmarked[0][:300]!r}")
        verdicts[side.name] = [f"{len(found)} clean, marked"]
    target = postfix.target
    assert isinstance(target, MilterPostfix)
    for port, side in ((qmqpd.port, qmqpd), (target.check_port, postfix)):
        load = drive(port, 1, 1, lambda: messages.request(eicar() + b"\n"))
        answer = next(iter(load.answers))
        if answer == "K":
            raise BenchError(f"check: {side.name} accepted an EICAR message")
        verdicts[side.name].append(f"EICAR answered {answer}: {load.errors[0][:80]}")
    return verdicts


# -- the run ---------------------------------------------------------------------------------
def missing_tools(args: argparse.Namespace) -> str | None:
    """Why this case cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return ("must run as root (Postfix's master needs it); "
                "try: sudo .venv/bin/python bench/filter_vs_milter.py")
    needed = {"dkim": [OPENDKIM], "virus": [CLAMAV_MILTER]}[args.case]
    for tool in (POSTFIX, POSTCAT, *needed):
        if not os.access(tool, os.X_OK):
            return (f"{tool} not found (Debian packages postfix, opendkim, clamav-milter, "
                    "clamav-daemon)")
    if args.case == "dkim" and shutil.which("perl") is None:
        return "perl with Mail::DKIM (libmail-dkim-perl) is needed"
    return None


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = bench_options(__doc__, 2000, "side", repeat=3, probe=False)
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--check", type=positive, default=5,
                        help="messages per side in the check before the runs (default 5)")
    return parser


def started(stack: contextlib.ExitStack, thing: Helper | SharedClamd | QmqpdTarget
            | MilterPostfix) -> None:
    stack.callback(thing.stop)  # registered first, so a failed start is cleaned up too
    thing.start()
    print(f"started {thing.name} pid {thing.main_pid()}", file=sys.stderr, flush=True)


def make_sides(args: argparse.Namespace, root: Path, command: list[str],
               stack: contextlib.ExitStack) -> tuple[Side, Side, Path | None]:
    """Start both sides of the case; (qmqpd's, Postfix's, the DKIM records file or None)."""
    ours, theirs = SIDE_NAMES[args.case]
    if args.case == "dkim":
        control = root / "control"
        subprocess.run([*command, "dkim", "keygen", "--domain", DOMAIN, "--selector", SELECTOR,
                        "--keydir", str(control / "domainkeys")], check=True,
                       capture_output=True, cwd=root)
        key = control / "domainkeys" / DOMAIN / SELECTOR
        records = root / "records.json"
        records.write_text(json.dumps({f"{SELECTOR}._domainkey.{DOMAIN}": dns_record(
            key.with_suffix(".pub").read_text())}))
        settings = [f'controldir = "{control}"', 'dkimsign = ""']
        milter: Helper = OpenDkim(root / "opendkim", key)
        shared: list[Helper | SharedClamd] = []
    else:
        clamd = SharedClamd(root / "clamd")
        started(stack, clamd)
        settings = ['qhpsi = "1"', f'clamd_socket = "{clamd.socket}"']
        milter = ClamavMilter(root / "clamav-milter", clamd.socket)
        shared = [clamd]
        records = None
    qmqpd = QmqpdTarget(root, command, args.maxdaemons, args.prefork, max(args.sessions),
                        [*settings, *args.qmqpd_setting])
    postfix = MilterPostfix(root, milter.socket)
    for thing in (milter, qmqpd, postfix):
        started(stack, thing)
    return (Side(ours, qmqpd, shared), Side(theirs, postfix, [milter, *shared]), records)


def peer_versions(case: str) -> dict[str, str]:
    if case == "dkim":
        return {"opendkim": version_of([OPENDKIM, "-V"])}
    return {"clamav-milter": version_of([CLAMAV_MILTER, "--version"]),
            "clamd": version_of(["clamd", "--version"])}


def run(args: argparse.Namespace, root: Path, stack: contextlib.ExitStack) -> int:
    command = args.qmqpd
    qmqpd, postfix, records = make_sides(args, root, command, stack)
    facts = {**machine_facts(command, root), **peer_versions(args.case)}
    print("machine: " + "; ".join(f"{key} {value}" for key, value in facts.items()))
    print(f"run: {CASES[args.case]}, {args.messages} distinct messages of {args.length} "
          f"bytes per run, sessions {','.join(map(str, args.sessions))}, {args.repeat} "
          f"interleaved rounds, warm-up {args.warmup}, fsync on both sides")

    messages = Messages(args.length)
    if args.case == "dkim":
        assert records is not None
        verdicts = check_dkim(qmqpd, postfix, messages, args.check, records)
    else:
        verdicts = check_virus(qmqpd, postfix, messages, args.check)
    print("check (before the runs):")
    for name, lines in verdicts.items():
        print(f"  {name}: " + "; ".join(f"{count} x {line}" for line, count
                                        in collections.Counter(lines).items()))
    floor = None
    if args.case == "dkim":
        floor = rsa_sign_ms(root / "control" / "domainkeys" / DOMAIN / SELECTOR)
        print(f"RSA-2048 signature alone (cryptography, one core, median of 200): "
              f"{floor:.2f} ms")

    results: list[RunResult] = []
    round_loads: list[str] = []
    for repeat in range(args.repeat):
        round_loads.append(load_text())
        print(f"round {repeat + 1}: load average {round_loads[-1]}", file=sys.stderr)
        for sessions in args.sessions:
            # alternate the order so neither side always runs right after the other
            for side in (qmqpd, postfix) if repeat % 2 == 0 else (postfix, qmqpd):
                results.append(measure(side, messages, args.messages, sessions,
                                       args.warmup))
    load_after = load_text()
    print(f"\nload average (1, 5, 15 min): before {facts['load before']}, at the start of "
          f"each round {' / '.join(round_loads)}, after the timed runs {load_after}")
    print_table(args, results, {qmqpd.target.name: qmqpd.name,
                                postfix.target.name: postfix.name})
    return report(args, results, {
        "machine": facts, "case": args.case, "check": verdicts, "round_loads": round_loads,
        "load_after": load_after, "rsa_sign_ms": floor,
        "pids": {thing.name: thing.main_pid() for side in (qmqpd, postfix)
                 for thing in (side.target, *side.helpers)}})


def print_table(args: argparse.Namespace, results: list[RunResult],
                labels: dict[str, str]) -> None:
    print(f"\n{CASES[args.case]}, {args.length} bytes, {args.messages} messages per run, "
          f"medians of {args.repeat} rounds; latency per message (connect → answer) of "
          f"all rounds; server CPU: {CPU_COUNTED[args.case]}")
    print("\n| sessions | server | msgs/s (median) | runs msgs/s | p50 ms | p99 ms "
          "| server CPU ms/msg | client CPU ms/msg | machine CPU ms/msg | qmqpd / Postfix |")
    print("| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for count in args.sessions:
        rows = {name: [row for row in results if row.sessions == count and row.target == name]
                for name in labels}
        summaries = {name: summarise_runs(found) for name, found in rows.items() if found}
        theirs = summaries.get("postfix", {}).get("rate")
        for name, summary in summaries.items():
            rate = summary["rate"] or 0.0
            runs = ", ".join(f"{row.rate:,.0f}" for row in rows[name])
            ratio = f"{rate / theirs:.2f}" if theirs and name == "qmqpd" else ""
            print(f"| {count} | {labels[name]} | {rate:,.0f} | {runs} "
                  f"| {fmt(summary['p50_ms'])} | {fmt(summary['p99_ms'])} "
                  f"| {fmt(summary['server_ms_per_msg'], 2)} "
                  f"| {fmt(summary['client_ms_per_msg'], 2)} "
                  f"| {fmt(summary['machine_ms_per_msg'], 2)} | {ratio} |")


def problems_of(result: RunResult) -> list[str]:
    """Every timed message must have been answered K, and counted by the server."""
    problems = []
    if result.client_errors or result.probes != result.messages:
        problems.append(f"{result.target} s={result.sessions}: {result.probes} of "
                        f"{result.messages} answered K; {result.client_errors[:3]}")
    if result.accepted is not None and result.accepted != result.messages:
        problems.append(f"{result.target} s={result.sessions}: server accepted "
                        f"{result.accepted} of {result.messages}")
    return problems


def report(args: argparse.Namespace, results: list[RunResult],
           figures: dict[str, object]) -> int:
    problems = [problem for result in results for problem in problems_of(result)]
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            **figures,
            "args": {key: str(value) for key, value in vars(args).items()},
            "summary": {f"{name} s={count}": summarise_runs(
                [row for row in results if row.target == name and row.sessions == count])
                for name in ("qmqpd", "postfix") for count in args.sessions},
            "results": [{**asdict(result), "samples": len(result.samples)}
                        for result in results],
            "problems": problems}, indent=2))
    return 1 if problems else 0


def _readable_by_postfix(root: Path) -> None:
    root.chmod(0o755)  # Postfix daemons and OpenDKIM run as their users below it


def main(argv: list[str] | None = None) -> int:
    return bench_main("filter_vs_milter", build_parser(), argv, missing_tools, run,
                      "qmqpd-filter-bench-", _readable_by_postfix)



if __name__ == "__main__":
    sys.exit(main())
