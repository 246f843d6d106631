"""`qmqpd queue list/stat` on what an operator may point them at: a path that is no queue
(one line, exit 100), a queue the reader may not read (one line, exit 111), and a queue
whose envelopes hold bytes a client chose (printed escaped: one message, one line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmqpd.queue import create_queue, envelope_bytes
from tests.support import command


def qmqpd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command("qmqpd"), *args], capture_output=True, text=True,
                          timeout=60, check=False, cwd=cwd)


def put(queue: Path, qid: int, sender: bytes, recipients: list[bytes]) -> None:
    """A committed message, written the way qmail-queue leaves it."""
    (queue / "mess" / str(qid % 23) / str(qid)).write_bytes(b"Subject: x\n\nbody\n")
    (queue / "todo" / str(qid)).write_bytes(envelope_bytes(sender, recipients, 0, 1))


@pytest.mark.parametrize("command_name", ["list", "stat"])
def test_no_queue_there_is_one_line_and_exit_100(tmp_path: Path, command_name: str) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("x")
    for path, reason in ((tmp_path / "missing", "no such directory"),
                         (tmp_path / "plain", "not a qmail queue (no mess/)"),
                         (tmp_path / "file", "not a directory")):
        done = qmqpd("queue", command_name, str(path))
        assert done.returncode == 100, done
        assert done.stderr == f"qmqpd: {path}: {reason}\n"
        assert done.stdout == ""


def test_unreadable_queue_is_one_line_and_exit_111(tmp_path: Path) -> None:
    """Run as a user who may not read the queue (root reads everything): the command is
    run in a child that imported qmqpd, then dropped to nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    import argparse  # noqa: F401  (loaded before the drop, as the command needs it)
    import pwd

    from qmqpd import cli, queue  # noqa: F401

    cli.build_parser()  # its imports too: the interpreter may be out of nobody's reach

    shared = Path(os.environ.get("TMPDIR", "/tmp")) / f"qmqpd-unreadable-{os.getpid()}"
    create_queue(str(shared / "queue"))
    shared.chmod(0o755)
    (shared / "queue" / "todo").chmod(0o700)  # qmail's own modes keep others out of info/
    nobody = pwd.getpwnam("nobody")
    results = {}
    try:
        for name in ("list", "stat"):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 99
                try:
                    # the command's own stdout and stderr (pytest has replaced sys.std*)
                    sys.stdout = sys.stderr = os.fdopen(write_end, "w")
                    os.setgroups([])
                    os.setgid(nobody.pw_gid)
                    os.setuid(nobody.pw_uid)
                    code = cli.main(["queue", name, str(shared / "queue")])
                    sys.stdout.flush()
                finally:
                    os._exit(code)
            os.close(write_end)
            with os.fdopen(read_end) as pipe:
                output = pipe.read()
            results[name] = (os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), output)
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=True)
    for name, (code, output) in results.items():
        assert code == 111, (name, output)
        assert output.count("\n") == 1 and "Traceback" not in output, output
        assert output.startswith(f"qmqpd: cannot read queue {shared}/queue/"), output
        assert "Permission denied" in output


def test_envelope_bytes_are_escaped(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    create_queue(str(queue))
    forged = b"a@b\n" + str(queue).encode() + b" 999 todo age=0s size=1 from=boss@corp"
    put(queue, 100, forged, [b"\x1b]0;owned\x07x@y", b"c,d@e f", b"\xff\xfe@z"])
    put(queue, 200, b"", [b"ok@example.net"])
    done = qmqpd("queue", "list", str(queue))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    first, second = lines
    assert "\n" not in first and "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "from=a@b\\x0a" in first
    assert "to=\\x1b]0;owned\\x07x@y,c\\x2cd@e\\x20f,\\xff\\xfe@z" in first
    assert second.endswith("from=<> to=ok@example.net")
    stat = qmqpd("queue", "stat", str(queue))
    assert stat.returncode == 0 and "todo=2" in stat.stdout


def test_subcommands_share_serve_s_defaults(tmp_path: Path) -> None:
    """After the quick start (`qmqpd serve` with nothing configured), `config`, `queue
    list`, `queue stat` and `status` with no arguments look where serve put things."""
    from tests.serve_process import ServeProcess
    from tests.support import wait_until

    # no config file, no queue or status file named: the embedded defaults, but PORT
    # from the environment (the embedded 6280 may be taken on a shared host)
    server = ServeProcess(tmp_path, config_file=False, port=0, queuedir=None,
                          status_file=None)
    try:
        server.start()
        wait_until(lambda: (tmp_path / "var" / "status.json").exists(),
                   what="serve's status file")
        shown = qmqpd("config", cwd=tmp_path)
        assert "QUEUEDIR='./var/queue'  # embedded defaults" in shown.stdout
        assert "STATUS_FILE='./var/status.json'  # embedded defaults" in shown.stdout
        assert "no queue configured" not in shown.stderr
        listed = qmqpd("queue", "list", cwd=tmp_path)
        assert (listed.returncode, listed.stdout, listed.stderr) == (0, "", "")
        counted = qmqpd("queue", "stat", cwd=tmp_path)
        assert counted.returncode == 0 and counted.stdout.startswith("./var/queue todo=0 ")
        status = qmqpd("status", cwd=tmp_path)
        assert status.returncode == 0 and f"pid {server.pid}, running" in status.stdout
    finally:
        server.stop()


def test_version_is_the_package_s() -> None:
    from importlib.metadata import version

    done = qmqpd("--version")
    assert (done.returncode, done.stdout) == (0, f"qmqpd {version('qmqpd')}\n")
