"""docs/operator-guide.md run as written: each of its `sh` blocks, unchanged and in order,
as root, in private mount, network and PID namespaces (tests/guide_runner.py), so the
blocks use the real paths, the real port 628 and the guide's own addresses, and nothing
they do reaches the host.

No text is substituted. What differs from an operator's Debian host, and why:
- the namespace's network is loopback only, with the guide's addresses on it: 10.1.0.10
  (the server), 10.1.0.20 (the balancer) and 10.1.2.7 (a client the test sends from);
  10.1.0.11 and 10.1.0.12, the other servers, are absent, as servers that are down;
- /etc, /var, /run, /opt, /usr, /srv, /root, /home, /tmp and the source checkout (the
  blocks' working directory) are overlays whose writes go to a tmpfs: the users the guide
  creates, /opt/qmqpd, the queues, services, logs and units vanish with the namespace;
- pip has no network there: the blocks' environment points it at a directory of the
  dependencies' wheels, fetched by the test first (PIP_NO_INDEX, PIP_FIND_LINKS);
- svscanboot supervises an empty /etc/service, as Debian's daemontools-run starts it;
- between blocks the test waits as an operator does for what the guide says to look
  for: after `svc -u` or `svc -t` a new `event=listen` in the service's log, after
  `svc -h` a new `event=reload` (a failed reload fails the test);
- `sh norun` blocks are not run (the guide says why before each).

Every block must exit 0. After the blocks the test checks what each recipe promised: the
qmail users made in the namespace and not on the host; the messages queued by the server
running as qmailq; the reload applying MAXPERIP; keys 0600 in 0750 directories owned by the
service user, and `qmqpd check` reporting one that user cannot read; the signed message
verified by Mail::DKIM (tests/peers/dkim-verify.pl) with the record keygen printed; the
metrics scraped; the unit's user and its man page (qmqpd's, not Postfix's qmqpd(8)); node1
UP and the absent nodes DOWN in HAProxy, and a client at 10.1.2.7 seen as 10.1.2.7 through
it; the removed service stopped with its log; the checkout unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.guide_runner import (
    OVERLAID,
    Block,
    Namespace,
    login_env,
    offline_pip,
    shell_blocks,
    wheelhouse,
)
from tests.support import need

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operator-guide.md"
VERIFIER = ROOT / "tests" / "peers" / "dkim-verify.pl"
ADDRESSES = ("10.1.0.10", "10.1.0.20", "10.1.2.7")
SERVICE = "/etc/service/qmqpd.628"
LOG = "/var/log/qmqpd.628/current"
USERS = ("alias", "qmaild", "qmaill", "qmailp", "qmailq", "qmailr", "qmails")
HOST_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")
# What the namespace and the guide's blocks run besides qmqpd (Debian: util-linux,
# iproute2, daemontools, haproxy, socat, systemd, curl, libmail-dkim-perl, man-db).
PROGRAMS = ("unshare", "nsenter", "setpriv", "ip", "svscanboot", "svok", "tai64nlocal",
            "haproxy", "socat", "systemd-analyze", "curl", "perl", "man")
SVC = re.compile(r"^\s*svc -([uth]) (\S+)", re.M)


def test_guide_blocks_are_found() -> None:
    blocks = shell_blocks(GUIDE.read_text())
    assert len(blocks) >= 15
    bodies = "\n".join(block.body for block in blocks)
    for needed in ("useradd -r", "qmqpd service create", "svc -u", "dkim keygen", "DKIMSIGN",
                   "systemd-analyze verify", "haproxy -D", "curl", "--rmsvc"):
        assert needed in bodies, needed


def test_guide_has_no_unfenced_commands() -> None:
    """Commands are in fenced blocks, so none escapes the test: no indented code block."""
    inside = False
    for number, line in enumerate(GUIDE.read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            assert not line.startswith("    "), f"operator-guide.md:{number}: indented code"


@pytest.fixture(scope="module")
def wheels() -> str:
    if os.geteuid() != 0:
        pytest.skip("the guide runs as root, in namespaces only root may create")
    for program in PROGRAMS:
        need(program)  # says which Debian package is missing rather than a block failing
    return wheelhouse(ROOT)


class Operator:
    """Runs the guide's blocks in the namespace and keeps what each printed."""

    def __init__(self, ns: Namespace, wheels: str) -> None:
        self.ns = ns
        self.env = login_env(**offline_pip(wheels))
        self.done: list[tuple[Block, str]] = []

    def sh(self, script: str, timeout: float = 60) -> str:
        """A command of the test's own (a probe), not of the guide."""
        result = self.ns.run(script, self.env, cwd=str(ROOT), timeout=timeout)
        assert result.returncode == 0, f"probe failed: {script}\n{result.stderr}"
        return result.stdout

    def log(self) -> str:
        return self.sh(f"cat {LOG} 2>/dev/null || true")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def run(self, block: Block) -> None:
        control = SVC.findall(block.body)
        before = {"listen": self.count("event=listen"), "reload": self.count("event=reload")}
        result = self.ns.run(block.body, self.env, cwd=str(ROOT), timeout=180)
        assert result.returncode == 0, (
            f"operator-guide.md:{block.line}: the block failed (exit {result.returncode}):\n"
            f"{block.body}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
            f"service log:\n{self.log()[-3000:]}")
        self.done.append((block, result.stdout))
        for action, _ in control:
            event = "reload" if action == "h" else "listen"
            self.wait_for(event, before[event])

    def wait_for(self, event: str, before: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            log = self.log()
            assert "reload failed" not in log, log[-3000:]
            if len(re.findall(f"event={event}", log)) > before:
                return
            time.sleep(0.3)
        raise AssertionError(f"no new event={event} in {LOG}:\n{self.log()[-3000:]}")

    def output(self, marker: str) -> str:
        """What the one block containing `marker` printed."""
        found = [out for block, out in self.done if marker in block.body]
        assert len(found) == 1, f"{len(found)} blocks contain {marker!r}"
        return found[0]


def test_operator_guide_as_written(wheels: str) -> None:
    host_users = users_on_host()
    checkout = checkout_state()
    started = time.monotonic()
    with Namespace(addresses=ADDRESSES, overlaid=(*OVERLAID, str(ROOT))) as ns:
        operator = Operator(ns, wheels)
        for block in shell_blocks(GUIDE.read_text()):
            if "--rmsvc" in block.body:
                check_balancer(operator)
                check_key_checked_as_service_user(operator)
            operator.run(block)
        check_users(operator)
        check_deploy(operator)
        check_limits(operator)
        check_signing(operator)
        check_metrics(operator)
        check_unit(operator)
        check_removed(operator)
    assert time.monotonic() - started < 240
    assert users_on_host() == host_users, "the guide's users reached the host"
    assert checkout_state() == checkout, "the guide's `pip install .` wrote into the checkout"


def users_on_host() -> set[str]:
    """Which of the guide's users and groups the host's files name (other tests may change
    the files meanwhile, so only these names are compared)."""
    names = {*USERS, "qmail", "nofiles"}
    found = set()
    for path in HOST_FILES:
        if Path(path).exists():
            found |= {f"{path}:{line.split(':')[0]}" for line in Path(path).read_text().splitlines()
                      if line.split(":")[0] in names}
    return found


def checkout_state() -> str:
    """Every changed, new and ignored path of the checkout (build/ would show here)."""
    return subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--ignored"],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def check_users(op: Operator) -> None:
    for user in USERS:
        op.sh(f"id -u {user}")


def check_deploy(op: Operator) -> None:
    stat = op.output("qmqpd queue stat")
    todo = [int(n) for n in re.findall(r" todo=(\d+)", stat)]
    assert len(todo) == 5 and sum(todo) == 1, stat
    assert "listening on 10.1.0.10:628" in stat, stat
    owners = op.sh("find /var/indimail/queue -path '*/todo/*' -type f -printf '%u\\n'")
    # every message of the guide (and the test's one through the balancer) was written by
    # the server running as qmailq
    assert owners.split() == ["qmailq"] * 5, owners
    assert re.search(r"event=session .*ip=10\.1\.0\.10 .*answer=\"Kok", op.output(
        "grep event=session")), op.output("grep event=session")


def check_limits(op: Operator) -> None:
    rule = op.output("rules check --rules /etc/qmqpd/tcp.qmqp.cdb 10.1.2.7")
    assert "MAXPERIP" in rule and "60" in rule, rule
    reload_line = op.output("grep event=reload")
    assert "maxperip=30" in reload_line, reload_line


def published_records(keygen_output: str) -> dict[str, str]:
    """name -> TXT value, from the zone lines keygen printed (the strings joined)."""
    records = {}
    for name, strings in re.findall(r"^(\S+)\s+IN\s+TXT\s+\((.*)\)\s*$", keygen_output, re.M):
        records[name.rstrip(".")] = "".join(re.findall(r'"([^"]*)"', strings))
    return records


def check_signing(op: Operator) -> None:
    records = published_records(op.output("dkim keygen"))
    assert set(records) == {"s2026._domainkey.example.org", "e2026._domainkey.example.org"}
    path = op.sh("grep -l '^Subject: signed' $(find /var/indimail/queue -path '*/mess/*' "
                 "-type f)").strip()
    message = op.ns.read_bytes(path)
    assert message.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"), message[:200]
    tmp = Path(tempfile.mkdtemp(prefix="qmqpd-dkim-"))
    try:
        keys = tmp / "records.json"
        keys.write_text(json.dumps(records))
        verified = subprocess.run(["perl", str(VERIFIER), str(keys)],
                                  input=message.replace(b"\n", b"\r\n"), capture_output=True,
                                  timeout=60, check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = verified.stdout.decode().splitlines()
    assert "DKIM example.org s2026 pass (pass)" in lines, (lines, verified.stderr)
    assert "overall pass" in lines, lines
    assert "dkim=accept" in op.output("dkim=' | tail")
    # keygen's files: the key for the service user only, its directory for that user
    for selector in ("s2026", "e2026"):
        mode = op.sh(f"stat -c '%U %G %a' /etc/qmqpd/domainkeys/example.org/{selector}")
        assert mode.split()[0] == "qmailq" and mode.split()[2] == "600", (selector, mode)
    directory = op.sh("stat -c '%U %a' /etc/qmqpd/domainkeys/example.org").split()
    assert directory[0] == "qmailq" and directory[1] == "750", directory


def check_metrics(op: Operator) -> None:
    scraped = op.output("curl ")
    answers = dict(re.findall(r'^qmqpd_answers_total\{answer="(\w+)"\} (\S+)$', scraped, re.M))
    assert float(answers.get("K", 0)) >= 1, scraped
    assert re.search(r"^qmqpd_maxperip 30(\.0)?$", scraped, re.M), scraped
    assert re.search(r"^qmqpd_accepting 1(\.0)?$", scraped, re.M), scraped


def check_unit(op: Operator) -> None:
    unit = op.sh("cat /etc/systemd/system/qmqpd.service")
    assert "User=qmailq" in unit and "QUEUE_BASE=/var/spool/qmqpd" in unit, unit
    owner = op.sh("stat -c %U /var/spool/qmqpd/queue1/todo").strip()
    assert owner == "qmailq", owner  # the unit's user writes the queue it was given
    documented = re.findall(r"^Documentation=man:(\S+)\((\d)\)$", unit, re.M)
    for page, section in documented:
        where = op.sh(f"man -w {section} {page}")
        assert "postfix" not in where, f"man:{page}({section}) opens {where}"


def check_balancer(op: Operator) -> None:
    """Before the service is removed: the guide's `show stat` had node1 UP; the absent
    nodes go DOWN; a client at 10.1.2.7 sends through the balancer and the node sees
    10.1.2.7 (from the PROXY header), not the balancer's 10.1.0.20."""
    stat = op.output("show stat")
    assert re.search(r"^qmqpd,node1,UP,L7OK$", stat, re.M), stat
    deadline = time.monotonic() + 30
    while not re.search(r"^qmqpd,node2,DOWN", stat, re.M):
        assert time.monotonic() < deadline, stat
        time.sleep(0.5)
        stat = op.sh("echo 'show stat' | socat stdio /run/haproxy/admin.sock | cut -d, -f1,2,18")
    op.sh(f"printf 'From: me@example.org\\nSubject: via\\n\\nx\\n' | {sys.executable} -c '"
          "import sys; from tests.support import exchange, request; "
          "answer = exchange(628, request(sys.stdin.buffer.read(), b\"me@example.org\", "
          "[b\"you@example.net\"]), host=\"10.1.0.20\", source=\"10.1.2.7\"); "
          "assert b\":K\" in answer, answer'")
    assert re.search(r"event=session .*ip=10\.1\.2\.7 .*answer=\"Kok", op.log()), op.log()


def check_key_checked_as_service_user(op: Operator) -> None:
    """The guide says `qmqpd check` reports a key the service's user cannot read (root
    can: the check reads it as qmailq)."""
    key = "/etc/qmqpd/domainkeys/example.org/s2026"
    done = op.ns.run(f"mode=$(stat -c %a {key}); chmod 0 {key}; qmqpd check --envdir "
                     f"{SERVICE}/variables && echo exit=0 || echo exit=$?; chmod $mode {key}",
                     op.env, cwd="/")
    assert "exit=111" in done.stdout and key in done.stderr, (done.stdout, done.stderr)


def check_removed(op: Operator) -> None:
    """--rmsvc stopped the server and its log before removing the directory."""
    assert op.sh(f"test -e {SERVICE} && echo present || echo gone").strip() == "gone"
    processes = op.sh("ps -eo args")
    left = [line for line in processes.splitlines()
            if line.startswith(("qmqpd: ", "supervise qmqpd.628", "supervise log", "multilog"))]
    assert left == [], processes
