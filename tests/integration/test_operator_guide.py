"""The operator guide's deploy section, run as written: its ```sh deploy``` blocks in order,
as root, under real daemontools supervise, then the message its qmqpc line sends is queued.

The commands are the guide's text with these substitutions and nothing else:

- paths under a scratch root ROOT: /service, /etc/qmqpd, /var/indimail, /var/qmail and
  /var/log become ROOT/service, ROOT/etc/qmqpd, ...;
- the port 628 (also in the service's name qmqpd.628) becomes a free port;
- the server address 10.1.0.10 becomes 127.0.0.1:PORT and `--localip=0` becomes
  `--localip=127.0.0.1`, so nothing listens beyond loopback.

What svscan would do between the guide's blocks, the test does by hand: once the service
directory exists it starts `supervise` on the service and on its log, joined by a pipe.
The qmail users the guide expects (qmailq, qmails, qmailr, qmaill; group qmail; and qmaild
with group nofiles, qmail-qmqpd's account) are created with useradd/groupadd --system when
missing, and removed again at the end, as is the status directory the service names
(/run/qmqpd.PORT/, from its free port).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import BIN, free_port, need, wait_until

ROOT_DIR = Path(__file__).resolve().parents[2]
GUIDE = ROOT_DIR / "docs" / "operator-guide.md"
MARK = "sh deploy"
PREFIXES = ("/service", "/etc/qmqpd", "/var/indimail", "/var/qmail", "/var/log")
GROUPS = ("qmail", "nofiles")
# user -> its group
USERS = {"qmailq": "qmail", "qmails": "qmail", "qmailr": "qmail", "qmaill": "nofiles",
         "qmaild": "nofiles"}


def deploy_blocks(text: str) -> list[str]:
    """The bodies of the fenced blocks whose info string is `sh deploy`, in order."""
    return re.findall(r"^```" + re.escape(MARK) + r"\n(.*?)^```$", text, re.M | re.S)


def rewrite(block: str, root: Path, port: int) -> str:
    for prefix in PREFIXES:
        # a path prefix only: /service and /service/..., not /services
        block = re.sub(re.escape(prefix) + r"(?=[/\s'\"]|$)", str(root) + prefix, block,
                       flags=re.M)
    block = block.replace("10.1.0.10", f"127.0.0.1:{port}")
    block = block.replace("--localip=0 ", "--localip=127.0.0.1 ")
    return re.sub(r"(?<!\d)628(?!\d)", str(port), block)


@pytest.fixture
def accounts() -> Iterator[None]:
    """The qmail users and groups, created when missing and removed again afterwards (with
    qmail's users present, `qmqpd queue create` run as root elsewhere gives them the queue)."""
    if os.geteuid() != 0:
        pytest.skip("the guide deploys as root (port 628, qmail users, queue owners): "
                    "run this test as root")
    made_users: list[str] = []
    made_groups: list[str] = []
    try:
        for group in GROUPS:
            try:
                grp.getgrnam(group)
            except KeyError:
                subprocess.run([need("groupadd"), "--system", group], check=True,
                               capture_output=True, timeout=60)
                made_groups.append(group)
        for user, group in USERS.items():
            try:
                pwd.getpwnam(user)
            except KeyError:
                subprocess.run([need("useradd"), "--system", "--gid", group,
                                "--no-create-home", "--home-dir", "/var/qmail",
                                "--shell", "/usr/sbin/nologin", user],
                               check=True, capture_output=True, timeout=60)
                made_users.append(user)
        yield
    finally:
        for user in made_users:
            subprocess.run([need("userdel"), user], capture_output=True, timeout=60)
        for group in made_groups:
            subprocess.run([need("groupdel"), group], capture_output=True, timeout=60)


@pytest.fixture
def root() -> Iterator[Path]:
    """A scratch root every service user can traverse (pytest's own tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="qmqpd-guide-"))
    path.chmod(0o755)
    (path / "var" / "qmail" / "control").mkdir(parents=True)  # a qmail install has it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_block(block: str, root: Path, log=lambda: "") -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "HOME": str(root), "LANG": "C.UTF-8"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        f"the guide's block failed (exit {result.returncode}):\n{block}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nservice log:\n{log()}")
    return result


def supervise(service: Path) -> list[subprocess.Popen[bytes]]:
    """What svscan does for a new service with a log/: two supervise joined by a pipe."""
    read_end, write_end = os.pipe()
    env = {"PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    try:
        log = subprocess.Popen([need("supervise"), str(service / "log")], stdin=read_end,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
        server = subprocess.Popen([need("supervise"), str(service)], stdin=subprocess.DEVNULL,
                                  stdout=write_end, stderr=subprocess.DEVNULL, env=env,
                                  start_new_session=True)
    finally:
        os.close(read_end)
        os.close(write_end)
    wait_until(lambda: (service / "supervise" / "control").exists()
               and (service / "log" / "supervise" / "control").exists(),
               what="supervise to take the service")
    return [server, log]


def unsupervise(service: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """svc -dx each (the server first, so the log reads to its end), then wait by PID."""
    for path, proc in zip((service, service / "log"), processes, strict=True):
        subprocess.run([need("svc"), "-dx", str(path)], capture_output=True, timeout=10)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def log_text(root: Path, port: int) -> str:
    current = root / "var" / "log" / f"qmqpd.{port}" / "current"
    return current.read_text(errors="replace") if current.exists() else "(no log yet)"


def todo_entries(root: Path) -> list[Path]:
    return [entry for queue in sorted((root / "var" / "indimail" / "queue").glob("queue*"))
            for entry in (queue / "todo").rglob("*") if entry.is_file()]


def test_blocks_are_found() -> None:
    blocks = deploy_blocks(GUIDE.read_text())
    assert len(blocks) >= 5
    assert any("qmqpd service create" in block for block in blocks)
    assert any("qmqpc" in block for block in blocks)


def test_rewrite_touches_only_the_documented_parts() -> None:
    root = Path("/R")
    text = "qmqpd service create --qmqp=628 --servicedir=/service --localip=0 --memory=104857628"
    assert rewrite(text, root, 7000) == (
        "qmqpd service create --qmqp=7000 --servicedir=/R/service --localip=127.0.0.1 "
        "--memory=104857628")
    assert rewrite("qmqpc --server 10.1.0.10 > /var/qmail/control/x", root, 7000) == (
        "qmqpc --server 127.0.0.1:7000 > /R/var/qmail/control/x")


def test_deploy_section_as_written(accounts: None, root: Path) -> None:
    port = free_port()
    service = root / "service" / f"qmqpd.{port}"
    processes: list[subprocess.Popen[bytes]] = []
    status_dir: Path | None = None
    try:
        outputs = []
        for block in deploy_blocks(GUIDE.read_text()):
            command = rewrite(block, root, port)
            if command.lstrip().startswith("svc ") and not processes:
                processes = supervise(service)  # svscan's part
                status_dir = Path((service / "variables" / "STATUS_FILE")
                                  .read_text().strip()).parent
            outputs.append(run_block(command, root, lambda: log_text(root, port)).stdout)
            if command.lstrip().startswith("svc -u"):
                # An operator waits for `event=listen` in the log before the next step.
                wait_until(lambda: listening(port), what="the supervised server to listen",
                           explain=lambda: log_text(root, port))
        assert processes, "the guide never starts the service with svc"
        queued = todo_entries(root)
        assert len(queued) == 1, f"expected the guide's message in one todo/, found {queued}"
        owner = pwd.getpwuid(queued[0].stat().st_uid).pw_name
        assert owner == "qmailq"  # written by the server running as the guide's --user
        # The guide's `queue stat` and `status` lines, run with the service's settings.
        stat_lines = [line for line in outputs[-1].splitlines() if " todo=" in line]
        assert len(stat_lines) == 5, outputs[-1]
        assert sum(int(re.search(r" todo=(\d+)", line)[1]) for line in stat_lines) == 1
        assert f"listening on 127.0.0.1:{port}" in outputs[-1], outputs[-1]
        wait_until(lambda: 'answer="Kok' in log_text(root, port),
                   what="the session's log line in multilog's current",
                   explain=lambda: log_text(root, port))
    finally:
        if processes:
            unsupervise(service, processes)
        if status_dir is not None and status_dir.name == f"qmqpd.{port}":
            shutil.rmtree(status_dir, ignore_errors=True)
