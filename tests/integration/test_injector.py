"""The injector: queue choice, MIN_FREE, native writes and real QMAILQUEUE programs."""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qmqpd.config import Config, load
from qmqpd.injector import Injector, Route
from qmqpd.message import Client, Message, MessageData
from qmqpd.queue import create_queue, free_bytes
from tests.support import wait_until

RECEIVED = b"Received: from unknown (127.0.0.1)\n  by test with QMQP; 1 Jan 2025 00:00:00 -0000\n"
BODY = b"Subject: t\n\nhello\n"
CLIENT = Client(remote_ip="127.0.0.1", remote_port="40000", local_ip="127.0.0.1",
                local_port="628")


def injector_for(config: Config, client: Client = CLIENT) -> Injector:
    """As a worker makes it: with the route the session plan made from the settings."""
    return Injector(config, client, Route.from_config(config))


def make_message(body: bytes = BODY) -> Message:
    return Message(b"s@example.org", [b"r1@example.net", b"r2@example.net"],
                   MessageData(data=body), received=RECEIVED)


def files_in(path: Path) -> list[str]:
    return sorted(os.path.join(d, n) for d, _s, names in os.walk(path) for n in names
                  if "/lock/" not in os.path.join(d, n) + "/")


def native(queue: Path, **settings: str) -> Injector:
    env = {"QUEUEDIR": str(queue), "USE_FSYNC": "0", "USE_SYNCDIR": "0", **settings}
    return injector_for(load(environ=env))


# -- native ----------------------------------------------------------------------------

def test_native_inject_answers_k_with_the_queue_id(queue: Path) -> None:
    injector = native(queue, USE_FSYNC="1", USE_SYNCDIR="1")
    before = int(time.time())
    outcome = injector.inject(make_message())
    assert outcome.reply.status == "K"
    match = re.fullmatch(r"ok (\d+) qp (\d+)", outcome.reply.text)
    assert match and int(match[1]) >= before and match[2] == outcome.qid
    assert outcome.queue == str(queue)
    qid = int(outcome.qid)
    assert (queue / "mess" / str(qid % 23) / str(qid)).read_bytes() == RECEIVED + BODY
    assert (queue / "todo" / str(qid)).read_bytes().endswith(
        b"\0Fs@example.org\0Tr1@example.net\0Tr2@example.net\0")


def test_settings_reach_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "q"
    create_queue(str(path), split=5, todo_layout="split")
    injector = native(path, SPLIT="5", TODO_LAYOUT="split")
    qid = int(injector.inject(make_message()).qid)
    assert (path / "todo" / str(qid % 5) / str(qid)).exists()


def test_min_free_above_free_space_refuses_and_writes_nothing(queue: Path) -> None:
    injector = native(queue, MIN_FREE=str(free_bytes(str(queue)) + 10**12))
    refusal = injector.check_space()
    assert refusal is not None and refusal.line == "Zqq write error or disk full (#4.3.0)"
    outcome = injector.inject(make_message())
    assert outcome.reply.line == "Zqq write error or disk full (#4.3.0)"
    assert outcome.qid == ""
    assert files_in(queue) == []


def test_min_free_below_free_space_accepts(queue: Path) -> None:
    injector = native(queue, MIN_FREE="1")
    assert injector.check_space() is None
    assert injector.inject(make_message()).reply.status == "K"


def test_missing_queue_gives_statvfs_error_text(tmp_path: Path) -> None:
    injector = native(tmp_path / "absent", MIN_FREE="1")
    assert injector.check_space().line == "Zqq read error (#4.3.0)"  # type: ignore[union-attr]


def test_write_failure_maps_to_reply_and_leaves_nothing(queue: Path) -> None:
    os.rmdir(queue / "todo")
    (queue / "todo").write_bytes(b"")
    outcome = native(queue).inject(make_message())
    assert outcome.reply.line == "Zqq trouble linking todofn to intdfn (#4.3.0)"
    assert files_in(queue) == [str(queue / "todo")]


def test_queue_count_spreads_over_every_queue(tmp_path: Path) -> None:
    for n in range(1, 5):
        create_queue(str(tmp_path / f"queue{n}"), split=3)
    config = load(environ={"QUEUE_BASE": str(tmp_path), "QUEUE_COUNT": "4", "QUEUE_START": "1",
                           "SPLIT": "3", "USE_FSYNC": "0", "USE_SYNCDIR": "0"})
    chosen: collections.Counter[str] = collections.Counter()
    for _ in range(200):
        injector = injector_for(config)
        outcome = injector.inject(make_message())
        assert outcome.reply.status == "K"
        assert outcome.queue == injector.queue_path
        chosen[os.path.basename(outcome.queue)] += 1
    assert set(chosen) == {"queue1", "queue2", "queue3", "queue4"}
    for n in range(1, 5):
        assert len(os.listdir(tmp_path / f"queue{n}" / "todo")) == chosen[f"queue{n}"]


def test_queue_start_offsets_the_numbers(tmp_path: Path) -> None:
    config = load(environ={"QUEUE_BASE": str(tmp_path), "QUEUE_COUNT": "2",
                           "QUEUE_START": "7"})
    names = {os.path.basename(injector_for(config).queue_path) for _ in range(100)}
    assert names == {"queue7", "queue8"}


def test_rule_env_overrides_the_queue(tmp_path: Path, queue: Path) -> None:
    other = tmp_path / "other"
    create_queue(str(other))
    client = Client(remote_ip="127.0.0.2", rule_env={"QUEUEDIR": str(other)})
    config = load(environ={"QUEUEDIR": str(queue), "USE_FSYNC": "0"})
    injector = injector_for(config.overlay(client.rule_env, "rule env"), client)
    outcome = injector.inject(make_message())
    assert outcome.queue == str(other)
    assert len(os.listdir(other / "todo")) == 1 and os.listdir(queue / "todo") == []


# -- external QMAILQUEUE ---------------------------------------------------------------

COPY_SCRIPT = """
import json, os, sys
out = sys.argv[1]
order = sys.argv[2] if len(sys.argv) > 2 else "01"
def drain(fd):
    chunks = []
    while True:
        block = os.read(fd, 65536)
        if not block:
            return b"".join(chunks)
        chunks.append(block)
data = {}
for fd in order:
    data[fd] = drain(int(fd))
open(out + ".message", "wb").write(data["0"])
open(out + ".envelope", "wb").write(data["1"])
env = {k: v for k, v in os.environ.items() if k.startswith(("TCP", "PROTO", "RULE", "QUEUEDIR"))}
open(out + ".env", "w").write(json.dumps(env))
"""


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def external(program: str, client: Client = CLIENT, **settings: str) -> Injector:
    return injector_for(load(environ={"QMAILQUEUE": program, **settings}), client)


def test_external_program_gets_message_envelope_and_env(tmp_path: Path) -> None:
    prog = script(tmp_path, "copy", COPY_SCRIPT)
    out = tmp_path / "out"
    client = Client(remote_ip="127.0.0.9", remote_port="1234", local_ip="127.0.0.1",
                    local_port="628", rule_env={"RULEVAR": "set", "TCPLOCALPORT": None})
    message = make_message()
    message.prepend_header(b"X-Test: 1")
    outcome = external(f"{prog} {out}", client).inject(message)
    assert outcome.reply.status == "K", outcome.reply
    match = re.fullmatch(r"ok \d+ qp (\d+)", outcome.reply.text)
    assert match and match[1] == outcome.qid and outcome.queue == str(prog)
    assert Path(f"{out}.message").read_bytes() == b"X-Test: 1\n" + RECEIVED + BODY
    assert Path(f"{out}.envelope").read_bytes() == (
        b"Fs@example.org\0Tr1@example.net\0Tr2@example.net\0\0")
    env = json.loads(Path(f"{out}.env").read_text())
    assert env["TCPREMOTEIP"] == "127.0.0.9" and env["TCPREMOTEPORT"] == "1234"
    assert env["RULEVAR"] == "set" and "TCPLOCALPORT" not in env
    assert "QUEUEDIR" not in env  # the program chooses its own queue


def test_external_program_reading_envelope_first_with_a_big_spooled_message(
        tmp_path: Path) -> None:
    prog = script(tmp_path, "copy", COPY_SCRIPT)
    out = tmp_path / "out"
    payload = os.urandom(3 << 20)
    with tempfile.TemporaryFile() as spool:
        spool.write(payload)
        message = Message(b"s@x", [b"r@y"], MessageData(spool=spool), received=RECEIVED)
        outcome = external(f"{prog} {out} 10").inject(message)
    assert outcome.reply.status == "K", outcome.reply
    assert Path(f"{out}.message").read_bytes() == RECEIVED + payload
    assert Path(f"{out}.envelope").read_bytes() == b"Fs@x\0Tr@y\0\0"


def test_queuedir_is_exported_to_the_program(tmp_path: Path, queue: Path) -> None:
    prog = script(tmp_path, "copy", COPY_SCRIPT)
    out = tmp_path / "out"
    outcome = external(f"{prog} {out}", QUEUEDIR=str(queue)).inject(make_message())
    assert outcome.reply.status == "K"
    assert json.loads(Path(f"{out}.env").read_text())["QUEUEDIR"] == str(queue)


def exit_script(code: int, error_text: str = "", read_all: bool = True) -> str:
    reading = "sys.stdin.buffer.read()\nos.read(1, 100000)\n" if read_all else ""
    return f"import os, sys\n{reading}sys.stderr.write({error_text!r})\nsys.exit({code})\n"


@pytest.mark.parametrize(("code", "error_text", "line"), [
    (31, "", "Dqq mail server permanently rejected message (#5.3.0)"),
    (53, "", "Zqq write error or disk full (#4.3.0)"),
    (88, "Dcustom text (#5.7.1)", "Dcustom text (#5.7.1)"),
    (88, "Zlater please (#4.3.0)", "Zlater please (#4.3.0)"),
    (88, "Xnot a status", "Zqq temporary problem (#4.3.0)"),
    (82, "Dfrom fd 2 (#5.7.1)", "Dfrom fd 2 (#5.7.1)"),
    (20, "", "Dqq permanent problem (#5.3.0)"),
    (99, "Dignored unless 82/88", "Zqq temporary problem (#4.3.0)"),
])
def test_external_exit_codes(tmp_path: Path, code: int, error_text: str, line: str) -> None:
    prog = script(tmp_path, "fail", exit_script(code, error_text))
    outcome = external(str(prog)).inject(make_message())
    assert outcome.reply.line == line
    assert outcome.qid == ""


def test_external_program_killed_by_a_signal(tmp_path: Path) -> None:
    prog = script(tmp_path, "crash", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    outcome = external(str(prog)).inject(make_message())
    assert outcome.reply.line == "Zqq crashed (#4.3.0)"


def test_external_program_missing(tmp_path: Path) -> None:
    outcome = external(str(tmp_path / "no-such-program")).inject(make_message())
    assert outcome.reply.line == "Zqq unable to exec qq (#4.3.0)"


def test_external_program_not_executable(tmp_path: Path) -> None:
    prog = tmp_path / "plain"
    prog.write_text("not a program")
    prog.chmod(0o644)
    outcome = external(str(prog)).inject(make_message())
    assert outcome.reply.line == "Zqq unable to exec qq (#4.3.0)"


def test_external_program_that_ignores_the_message_is_not_k(tmp_path: Path) -> None:
    # qmail: exit 0 after a failed write to the program is "qq read error", never K.
    prog = script(tmp_path, "lazy", exit_script(0, read_all=False))
    outcome = external(str(prog)).inject(make_message(body=b"x" * (4 << 20)))
    assert outcome.reply.line == "Zqq read error (#4.3.0)"


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_external_program_overrunning_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    prog = script(tmp_path, "slow", f"""import os, time
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child}}")
time.sleep(60)
""")
    started = time.monotonic()
    outcome = external(str(prog)).inject(make_message(), deadline=time.monotonic() + 1.0)
    assert outcome.reply.line == "Zqq timeout (#4.3.0)"
    assert time.monotonic() - started < 30
    program, grandchild = (int(p) for p in pids.read_text().split())
    assert not alive(program)
    # the grandchild's reaper is init: wait for it to go, not a fixed while
    wait_until(lambda: not alive(grandchild), 10, "the program's grandchild to be gone")


def test_external_mode_checks_min_free_on_queuedir(tmp_path: Path, queue: Path) -> None:
    prog = script(tmp_path, "ok", exit_script(0))
    injector = external(str(prog), QUEUEDIR=str(queue),
                        MIN_FREE=str(free_bytes(str(queue)) + 10**12))
    assert injector.inject(make_message()).reply.line == "Zqq write error or disk full (#4.3.0)"
