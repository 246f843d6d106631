"""Measure the DKIM/DomainKeys stages under hostile input (figures for
docs/reliability.md): CPU to sign N headers, peak RSS of `qmqpd session` signing a
large message, and the time DKIMVERIFY takes on N signatures with a silent DNS server.

    python -m bench.signing_hostile headers 2500 10000 20000
    python -m bench.signing_hostile same-headers 2500 10000 20000
    python -m bench.signing_hostile rss 100
    python -m bench.signing_hostile silent 10
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import dkim as dkimpy

from qmqpd.config import load
from qmqpd.filters import dkim as fdkim
from qmqpd.filters import keys, signing
from qmqpd.message import Message, MessageData
from qmqpd.queue import create_queue
from tests.dnsstub import DnsStub

ROOT = Path(__file__).resolve().parents[1]


def _control(tmp: str) -> str:
    keys.keygen("example.org", "default", "rsa", 2048, os.path.join(tmp, "domainkeys"))
    return tmp


def headers_cpu(count: int, control: str, same: bool = False) -> tuple[float, int]:
    """CPU seconds of the DKIM stage signing a message with `count` distinct headers (or
    `count` Comments: headers)."""
    head = b"From: joe@example.org\nTo: a@example.net\nSubject: hi\n"
    head += b"".join((b"Comments: value %d\n" % i) if same else
                     (b"Comment-%d: value %d\n" % (i, i)) for i in range(count))
    data = head + b"\nbody\n"
    stage = fdkim.DkimStage(signs=[signing.KeySpec(os.path.join(control, "domainkeys/%/default"),
                                                   "DKIMSIGN", fdkim.SignOptions())],
                            controldir=control)
    message = Message(b"joe@example.org", [b"a@example.net"], MessageData(data=data))
    started = time.process_time()
    verdict = stage.process(message)
    spent = time.process_time() - started
    assert verdict.action == "accept" and verdict.headers, verdict
    return spent, len(verdict.headers[0])


def write_request(path: str, megabytes: int) -> None:
    """A QMQP request carrying a message of about this size, written without holding it:
    the measuring process stays small, so the child's ru_maxrss (which counts the parent's
    pages while the child is being started) measures the child."""
    line = b"0123456789abcdefghijklmnopqrstuvwxyz 0123456789abcdefghijklmnopqrstuvwxyz \n"
    head = b"From: joe@example.org\nTo: a@example.net\nSubject: big\n\n"
    lines = megabytes * (1 << 20) // len(line)
    size = len(head) + lines * len(line)
    tail = netstring(b"joe@example.org") + netstring(b"a@example.net")
    inner = len(str(size)) + 2 + size + len(tail)
    block = line * 1000
    with open(path, "wb") as out:
        out.write(b"%d:%d:" % (inner, size) + head)
        for _ in range(lines // 1000):
            out.write(block)
        out.write(line * (lines % 1000))
        out.write(b"," + tail + b",")


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def session_rss(request_path: str, control: str, queue: str,
                signing: dict[str, str]) -> tuple[int, str, float]:
    """Peak RSS (KiB) of one `qmqpd session` given this request, its answer, CPU seconds."""
    ours, theirs = socket.socketpair()
    env = {**os.environ, "QUEUEDIR": queue, "CONTROLDIR": control, **signing,
           "USE_FSYNC": "0", "USE_SYNCDIR": "0", "DATABYTES": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "qmqpd", "session"], stdin=theirs,
                            stdout=theirs, env=env)
    theirs.close()

    def send() -> None:
        with open(request_path, "rb") as source:
            while block := source.read(1 << 16):
                ours.sendall(block)
        ours.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=send)
    writer.start()
    answer = b""
    while block := ours.recv(4096):
        answer += block
    writer.join()
    ours.close()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    cpu = usage.ru_utime + usage.ru_stime
    return usage.ru_maxrss, answer.decode(errors="replace"), cpu


def silent_dns(count: int, control: str, timeout: float,
               stage_timeout: str | None) -> tuple[float, str]:
    """Seconds DKIMVERIFY spends on `count` signatures whose keys never get an answer."""
    key = keys.load_private_key(os.path.join(control, "domainkeys/example.org/default"))
    data = b"From: joe@example.org\nTo: a@example.net\nSubject: hi\n\nbody\n"
    headers = []
    for index in range(count):
        parsed, body = dkimpy.rfc822_parse(data)
        headers.append(fdkim.sign_message(parsed, body, b"example.org", b"s%d" % index, key,
                                          b"rsa-sha256", [b"from", b"to", b"subject"],
                                          fdkim.SignOptions(), int(time.time())))
    stub = DnsStub({f"s{i}._domainkey.example.org": None for i in range(count)})
    try:
        values = {"DKIMVERIFY": "", "DNS_SERVERS": stub.address, "DNS_TIMEOUT": str(timeout)}
        if stage_timeout is not None:
            values["DKIMVERIFY_TIMEOUT"] = stage_timeout
        config = load(None, values)
        stage = fdkim.from_config(config)
        message = Message(b"joe@example.org", [b"a@example.net"],
                          MessageData(data=b"".join(headers) + data))
        started = time.monotonic()
        verdict = stage.process(message)
        return time.monotonic() - started, repr(verdict.facts)
    finally:
        stub.close()


def main(argv: list[str]) -> int:
    what, *numbers = argv
    with tempfile.TemporaryDirectory() as tmp:
        control = _control(tmp)
        if what in ("headers", "same-headers"):
            for number in numbers:
                spent, length = headers_cpu(int(number), control, what == "same-headers")
                print(f"{what}={number} cpu_s={spent:.2f} signature_bytes={length}")
        elif what == "rss":
            queue = os.path.join(tmp, "queue")
            create_queue(queue)
            signing = dict(item.split("=", 1) for item in os.environ.get(
                "SIGNING", "DKIMSIGN= DKSIGN=").split())
            for number in numbers:
                request_path = os.path.join(tmp, "request")
                write_request(request_path, int(number))
                rss, answer, seconds = session_rss(request_path, control, queue, signing)
                print(f"signing={signing} message_mb={number} maxrss_mib={rss / 1024:.0f} "
                      f"cpu_s={seconds:.1f} answer={answer[:60]!r} "
                      f"parent_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}")
        elif what == "silent":
            for number in numbers:
                seconds, facts = silent_dns(int(number), control, 3.0, None)
                print(f"signatures={number} s={seconds:.1f} facts={facts}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
