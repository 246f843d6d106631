"""A configuration that cannot work is refused before any client meets it.

Each case is one way an operator gets a setting wrong. `qmqpd serve` must refuse to start
with it (exit 111, one line naming the setting, where it came from and why), `qmqpd check`
must print the same and exit non-zero, and a HUP to a running server must keep the running
configuration (one log line saying what was wrong) while mail keeps flowing. Real
`qmqpd serve` processes on loopback with their own ports, queues and keys.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmqpd.filters import keys
from qmqpd.queue import create_queue
from qmqpd.rules import compile_rules
from tests.serve_process import ServeProcess
from tests.support import (
    command,
    exchange,
    free_port,
    request,
    toml_text,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"From: a@example.org\nTo: b@example.net\nSubject: plan\n\nhello\n"
# Start-up, a HUP and the log line after it: generous, the machine may be busy.
WAIT = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    """No setting inherited from the caller's environment: only the config file counts."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
            "ALLOW_ROOT": "1", **extra}  # serve runs as whoever runs the suite


def send(port: int) -> bytes:
    return exchange(port, request(MESSAGE, b"a@example.org", [b"b@example.net"]))


def todo_count(queue: Path) -> int:
    return sum(len(files) for _top, _dirs, files in os.walk(queue / "todo"))


@dataclass
class World:
    """What the cases build on: a good queue, usable keys, a scratch dir."""

    tmp: Path
    queue: Path
    key: Path  # a usable RSA key (mode 0600)
    open_queue: Path  # a queue that user nobody can reach but not write

    def base(self) -> dict[str, object]:
        return {"port": free_port(), "queuedir": str(self.queue), "prefork": 1,
                "use_fsync": False, "use_syncdir": False,
                "status_file": str(self.tmp / "status.json")}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("plan")
    queue = tmp / "queue"
    create_queue(str(queue))
    keydir = tmp / "keys"
    path, _record = keys.keygen("example.org", "default", "rsa", 1024, str(keydir))
    os.chmod(path, 0o600)
    # The test's tmp is private (0700): a queue nobody can traverse to needs its own dir.
    shared = Path(tempfile.mkdtemp(prefix="qmqpd-plan-"))
    shared.chmod(0o755)
    create_queue(str(shared / "queue"))
    try:
        yield World(tmp, queue, Path(path), shared / "queue")
    finally:
        shutil.rmtree(shared)


# ---- the cases: settings on top of a good base, and what the refusal must say ------------

Case = Callable[[World], tuple[dict[str, object], str]]


def queuedir_missing(w: World) -> tuple[dict[str, object], str]:
    return {"queuedir": str(w.tmp / "nope")}, (
        f"QUEUEDIR (queuedir) from config file {{config}}: {w.tmp / 'nope'}: "
        "No such file or directory")


def queue_not_writable_by_user(w: World) -> tuple[dict[str, object], str]:
    # create_queue gives the queue to the qmail users where they exist, else to root
    owner = os.stat(w.open_queue)
    return {"queuedir": str(w.open_queue), "user": "nobody"}, (
        "USER (user) from config file {config}: user nobody (uid 65534) cannot write queue "
        f"{w.open_queue}: {w.open_queue} is owned by uid {owner.st_uid} gid {owner.st_gid} "
        f"mode {owner.st_mode & 0o7777:o}")


def no_queue(w: World) -> tuple[dict[str, object], str]:
    return {"queuedir": ""}, "QUEUEDIR (queuedir) from config file {config}: no queue configured"


def dkimsignoptions_bogus(w: World) -> tuple[dict[str, object], str]:
    return {"dkimsign": str(w.key), "dkimsignoptions": "-c bogus"}, (
        "DKIMSIGNOPTIONS (dkimsignoptions) from config file {config}: -c takes r, s, t or u, "
        "not 'bogus'")


def dksignoptions_bogus(w: World) -> tuple[dict[str, object], str]:
    return {"dksign": str(w.key), "dksignoptions": "-c bogus"}, (
        "DKSIGNOPTIONS (dksignoptions) from config file {config}: -c takes nofws or simple")


def dkimsignoptionsextra_bogus(w: World) -> tuple[dict[str, object], str]:
    return {"dkimsign": str(w.key), "dkimsignextra": str(w.key),
            "dkimsignoptionsextra": "-z 9"}, (
        "DKIMSIGNOPTIONSEXTRA (dkimsignoptionsextra) from config file {config}: -z takes 1, "
        "2, 3 or 4")


def split_disagrees(w: World) -> tuple[dict[str, object], str]:
    return {"split": 7}, (
        f"SPLIT (split) from config file {{config}}: 7, but {w.queue} is laid out with 23")


def qmailqueue_missing(w: World) -> tuple[dict[str, object], str]:
    return {"qmailqueue": str(w.tmp / "no-qmail-queue")}, (
        f"QMAILQUEUE (qmailqueue) from config file {{config}}: program "
        f"{w.tmp / 'no-qmail-queue'} does not exist")


def qmailqueue_not_executable(w: World) -> tuple[dict[str, object], str]:
    program = w.tmp / "not-executable"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o644)
    return {"qmailqueue": f"{program} -v"}, (
        f"QMAILQUEUE (qmailqueue) from config file {{config}}: program {program} is not "
        "executable")


def dkim_key_missing(w: World) -> tuple[dict[str, object], str]:
    return {"dkimsign": str(w.tmp / "no-key")}, (
        f"DKIMSIGN (dkimsign) from config file {{config}}: key file {w.tmp / 'no-key'} "
        "does not exist")


def dkim_key_world_readable(w: World) -> tuple[dict[str, object], str]:
    loose = w.tmp / "loose-key"
    shutil.copy(w.key, loose)
    loose.chmod(0o644)
    return {"dkimsign": str(loose)}, (
        f"DKIMSIGN (dkimsign) from config file {{config}}: key file {loose}: readable by "
        "everyone")


def dkim_key_unparsable(w: World) -> tuple[dict[str, object], str]:
    garbage = w.tmp / "garbage-key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    return {"dkimsign": str(garbage)}, (
        f"DKIMSIGN (dkimsign) from config file {{config}}: key file {garbage}")


def dk_key_missing(w: World) -> tuple[dict[str, object], str]:
    return {"dksign": str(w.tmp / "no-dk-key")}, (
        f"DKSIGN (dksign) from config file {{config}}: key file {w.tmp / 'no-dk-key'} "
        "does not exist")


def rules_missing(w: World) -> tuple[dict[str, object], str]:
    return {"rules": str(w.tmp / "no-rules.cdb")}, (
        f"RULES (rules) from config file {{config}}: unable to read {w.tmp / 'no-rules.cdb'}")


def rule_with_bad_value(w: World) -> tuple[dict[str, object], str]:
    text = w.tmp / "bad-rule.txt"
    text.write_text('127.0.0.9:allow,DATABYTES="lots"\n:allow\n')
    cdb = w.tmp / "bad-rule.cdb"
    compile_rules(str(text), str(cdb))
    return {"rules": str(cdb)}, (
        f"DATABYTES (databytes) from rule 127.0.0.9 in {cdb}: bad value 'lots'")


def rule_with_bad_signing_options(w: World) -> tuple[dict[str, object], str]:
    text = w.tmp / "bad-sign-rule.txt"
    text.write_text(f'127.0.0.8:allow,DKIMSIGN="{w.key}",DKIMSIGNOPTIONS="-c bogus"\n:allow\n')
    cdb = w.tmp / "bad-sign-rule.cdb"
    compile_rules(str(text), str(cdb))
    return {"rules": str(cdb)}, (
        f"DKIMSIGNOPTIONS (dkimsignoptions) from rule 127.0.0.8 in {cdb}: -c takes r, s, t "
        "or u")


CASES: list[Case] = [
    queuedir_missing, queue_not_writable_by_user, no_queue, dkimsignoptions_bogus,
    dksignoptions_bogus, dkimsignoptionsextra_bogus, split_disagrees, qmailqueue_missing,
    qmailqueue_not_executable, dkim_key_missing, dkim_key_world_readable, dkim_key_unparsable,
    dk_key_missing, rules_missing, rule_with_bad_value, rule_with_bad_signing_options,
]


def unescaped(log: str) -> str:
    return log.replace('\\"', '"')


def refusal_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if 'msg="cannot start"' in line]


def serve_refuses(config: Path) -> list[str]:
    """Run `qmqpd serve` on config; it must exit 111 at once. Its refusal lines."""
    done = subprocess.run([*command("qmqpd"), "serve", "--config", str(config)],
                          env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=WAIT, cwd=config.parent)
    assert done.returncode == 111, done.stderr
    return refusal_lines(unescaped(done.stderr))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_config_refuses_start_and_check_says_the_same(world: World, case: Case,
                                                          tmp_path: Path) -> None:
    settings, expected = case(world)
    config = tmp_path / "qmqpd.toml"
    config.write_text(toml_text({**world.base(), **settings}))
    expected = expected.format(config=config)
    (line,) = serve_refuses(config)
    assert expected in line, line
    checked = subprocess.run([*command("qmqpd"), "check", "--config", str(config)],
                             env=clean_env(), capture_output=True, text=True, timeout=WAIT)
    assert checked.returncode != 0
    assert f"qmqpd check: {expected}" in checked.stderr, checked.stderr


def test_port_in_use_names_port_and_address(world: World, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "qmqpd.toml"
        config.write_text(toml_text({**world.base(), "port": port}))
        (line,) = serve_refuses(config)
    assert (f"PORT (port) from config file {config}: cannot listen on 127.0.0.1 port {port}: "
            "Address already in use") in line


def test_address_not_on_this_host_names_localip(world: World, tmp_path: Path) -> None:
    config = tmp_path / "qmqpd.toml"
    base = world.base()
    config.write_text(toml_text({**base, "localip": "192.0.2.1"}))  # TEST-NET: never local
    (line,) = serve_refuses(config)
    assert (f"LOCALIP (localip) from config file {config}: cannot listen on 192.0.2.1 port "
            f"{base['port']}: Cannot assign requested address") in line


def test_shipped_sample_config_passes_check(world: World) -> None:
    """conf/qmqpd.toml sets nothing itself: with a queue from the environment (as an
    envdir gives it) it has no problem; without any queue, check says so."""
    sample = ROOT / "conf" / "qmqpd.toml"
    ok = subprocess.run([*command("qmqpd"), "check", "--config", str(sample)],
                        env=clean_env(QUEUEDIR=str(world.queue)), capture_output=True,
                        text=True, timeout=WAIT)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: 1 session plan(s)")
    none = subprocess.run([*command("qmqpd"), "check", "--config", str(sample)],
                          env=clean_env(), capture_output=True, text=True, timeout=WAIT)
    assert none.returncode != 0 and "QUEUEDIR (queuedir) from default" in none.stderr


def test_config_command_warns_with_the_same_problems(world: World, tmp_path: Path) -> None:
    settings, expected = split_disagrees(world)
    config = tmp_path / "qmqpd.toml"
    config.write_text(toml_text({**world.base(), **settings}))
    shown = subprocess.run([*command("qmqpd"), "config", "--config", str(config)],
                           env=clean_env(), capture_output=True, text=True, timeout=WAIT)
    assert shown.returncode == 0
    assert "SPLIT=7  # config file" in shown.stdout
    assert f"qmqpd config: warning: {expected.format(config=config)}" in shown.stderr


# ---- the same cases on HUP: the running configuration stays --------------------------------

class Running(ServeProcess):
    """One `qmqpd serve` whose config file the test rewrites before each HUP."""

    def __init__(self, world: World, tmp: Path, **settings: object) -> None:
        base = {key: value for key, value in world.base().items() if key != "port"}
        super().__init__(tmp, name="running", environ=clean_env(), **{**base, **settings})
        self.start()
        # Served once (an empty request: D, nothing queued): the master's loop runs and
        # handles HUP; a HUP before that would end it (SIGHUP's default action).
        wait_until(lambda: b":D" in exchange(self.port, b"6:0:,0:,,")[:6],
                   what="the first answer", explain=self.log)

    @property
    def config(self) -> Path:
        assert self.config_path is not None
        return self.config_path

    def log(self) -> str:
        return unescaped(super().log())

    def hup_with(self, settings: dict[str, object]) -> str:
        """Write settings over the good ones, HUP, return the reload's log line."""
        before = self.log().count("event=error")
        self.config.write_text(toml_text({**self.settings, **settings}))
        self.signal(signal.SIGHUP)
        wait_until(lambda: self.log().count("event=error") > before, what="the reload's error")
        return [line for line in self.log().splitlines() if "event=error" in line][-1]


@pytest.fixture(scope="module")
def running(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    server = Running(world, tmp_path_factory.mktemp("running"))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_config_on_hup_keeps_the_running_one(world: World, running: Running,
                                                 case: Case) -> None:
    settings, expected = case(world)
    line = running.hup_with(settings)
    assert 'msg="reload failed; keeping the running config"' in line
    assert expected.format(config=running.config) in line, line
    assert "event=reload " not in running.log()  # never accepted
    assert re.match(rb"\d+:K", send(running.port)), running.log()


def test_hup_with_bad_config_under_load_loses_no_session(world: World,
                                                         tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    create_queue(str(queue))
    server = Running(world, tmp_path, queuedir=str(queue), prefork=2, maxdaemons=6)
    senders, per_sender = 4, 30
    answers: list[bytes] = []
    lock = threading.Lock()

    def sender() -> None:
        for _ in range(per_sender):
            answer = send(server.port)
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    try:
        for thread in threads:
            thread.start()
        bad = [split_disagrees(world)[0], dkim_key_missing(world)[0], no_queue(world)[0],
               rules_missing(world)[0]]
        for settings in bad:
            line = server.hup_with(settings)
            assert "reload failed; keeping the running config" in line
        for thread in threads:
            thread.join(WAIT * 4)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        server.stop()
    assert len(answers) == senders * per_sender
    assert all(re.match(rb"\d+:K", answer) for answer in answers), set(answers)
    assert todo_count(queue) == senders * per_sender
    assert "event=reload " not in server.log()


def test_replaced_cdb_with_a_bad_rule_keeps_the_running_plans(world: World,
                                                              tmp_path: Path) -> None:
    text = tmp_path / "tcp.qmqp"
    cdb = tmp_path / "tcp.qmqp.cdb"
    text.write_text(':allow\n')
    compile_rules(str(text), str(cdb))
    server = Running(world, tmp_path, rules=str(cdb))
    try:
        assert re.match(rb"\d+:K", send(server.port))
        text.write_text('127.0.0.9:allow,SPLIT="7"\n127.0.0.7:deny\n:allow\n')
        compile_rules(str(text), str(cdb))
        said = "rules changed: the new allow/deny rules are in force; clients of a rule whose " \
            "settings cannot be used get Z, the others keep their running settings"
        wait_until(lambda: said in server.log(), what="the log line")
        line = next(x for x in server.log().splitlines() if said in x)
        assert f"SPLIT (split) from rule 127.0.0.9 in {cdb}: 7, but" in line
        assert re.match(rb"\d+:K", send(server.port))  # the other clients go on
        # what the line says: the new deny is in force at once
        assert exchange(server.port, request(MESSAGE, b"a@example.org", [b"b@example.net"]),
                        source="127.0.0.7") == b""
        # the bad rule's own clients: Z (nothing queued wrongly), the reason in the log
        answer = exchange(server.port, request(MESSAGE, b"a@example.org", [b"b@example.net"]),
                          source="127.0.0.9")
        assert answer == b"41:Zqq unable to read configuration (#4.3.0),"
        text.write_text('127.0.0.9:allow,DATABYTES="10"\n:allow\n')
        compile_rules(str(text), str(cdb))
        wait_until(lambda: "event=replan" in server.log(), what="the new plans")
        answer = exchange(server.port, request(MESSAGE, b"a@example.org", [b"b@example.net"]),
                          source="127.0.0.9")
        assert b":Dmessage too big" in answer
        assert server.log().count(said) == 1
    finally:
        server.stop()


def test_check_without_config_accepts_the_queue_serve_creates(tmp_path: Path) -> None:
    done = subprocess.run([*command("qmqpd"), "check"], env=clean_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert "creates the queue ./var/queue" in done.stdout
    assert not (tmp_path / "var").exists()  # check changes nothing


def test_session_with_a_bad_config_answers_z_and_logs_the_setting(
        world: World, tcpserver_sessions: Callable[[dict[str, str]], object]) -> None:
    session = tcpserver_sessions({"QUEUEDIR": str(world.queue), "SPLIT": "7"})
    queued = todo_count(world.queue)
    answer = send(session.port)  # type: ignore[attr-defined]
    assert answer == b"41:Zqq unable to read configuration (#4.3.0),"
    log = session.log.read_text()  # type: ignore[attr-defined]
    assert f"SPLIT (split) from environment: 7, but {world.queue} is laid out with 23" in log
    assert todo_count(world.queue) == queued
