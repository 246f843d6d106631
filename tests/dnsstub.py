"""A DNS responder serving TXT key records on loopback, for offline DKIM tests; its packets
are read and built by dnspython.

Names map to a TXT value (answered), to None (never answered: the client times out), and
anything else is NXDOMAIN. Run as a script it is also the driver that checks a message with
OpenDKIM inside a private network and mount namespace (see `opendkim_in_namespace`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT


def answer(packet: bytes, records: dict[str, str | None]) -> bytes | None:
    """The response to one query packet, built with dnspython; None = no answer at all."""
    try:
        query = dns.message.from_wire(packet)
    except dns.exception.DNSException:
        return None
    if not query.question:
        return None
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    if name in records and records[name] is None:
        return None  # simulate a server that does not answer
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    value = records.get(name)
    if value is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif question.rdtype in (dns.rdatatype.TXT, dns.rdatatype.ANY):
        data = value.encode()
        strings = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        rdata = TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
        response.answer.append(dns.rrset.from_rdata(question.name, 60, rdata))
    return response.to_wire()


class DnsStub:
    """The responder on a UDP socket in a thread of this process."""

    def __init__(self, records: dict[str, str | None], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            reply = answer(packet, self.records)
            if reply is not None:
                self.sock.sendto(reply, peer)

    def close(self) -> None:
        self.sock.close()


def opendkim_in_namespace(message: bytes, records: dict[str, str | None]) -> tuple[int, str]:
    """Run `opendkim-testmsg` on message with only our records resolvable: (exit, output).

    `unshare -mn` gives a network namespace with nothing but loopback and a mount namespace
    where a private resolv.conf is bind-mounted; nothing can leave, nothing global changes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        records_path = os.path.join(tmp, "records.json")
        with open(records_path, "w") as handle:
            json.dump(records, handle)
        message_path = os.path.join(tmp, "message")
        with open(message_path, "wb") as handle:
            handle.write(message)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run(
            ["unshare", "-mn", sys.executable, "-m", "tests.dnsstub", records_path, message_path,
             tmp],
            cwd=root, capture_output=True, timeout=60)
        return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def _namespace_main(records_path: str, message_path: str, tmp: str) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open(records_path) as handle:
        stub = DnsStub(json.load(handle), port=53)
    resolv = os.path.join(tmp, "resolv.conf")
    with open(resolv, "w") as handle:
        handle.write("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    subprocess.run(["mount", "--bind", resolv, "/etc/resolv.conf"], check=True)
    with open(message_path, "rb") as handle:
        proc = subprocess.run(["opendkim-testmsg"], stdin=handle, capture_output=True,
                              timeout=30)
    stub.close()
    sys.stdout.write((proc.stdout + proc.stderr).decode(errors="replace"))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(_namespace_main(*sys.argv[1:4]))
