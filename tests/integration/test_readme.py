"""README.md's quick start run as written, on a fresh copy of the repository, by an
ordinary user and by root, with the block runner of the operator guide's test
(tests/guide_runner.py): its `sh` blocks unchanged and in order, in private mount, network
and PID namespaces, so the port it names (127.0.0.1:6280) is free and nothing reaches the
host.

What differs from a developer's machine, and why:
- the copy holds the repository's files as a clone of the tree would (tracked files and
  new files not ignored, as they are in the working tree; no .venv, no var/), in the home
  of the user who runs it: `dev`, an ordinary user made in the namespace, or root;
- pip has no network there: the blocks' environment points it at a directory of the
  dependencies' wheels, fetched by the test first (PIP_NO_INDEX, PIP_FIND_LINKS);
- the `sh serves` block (the server in the foreground) is started and left running; the
  next blocks run once it listens on 127.0.0.1:6280, as "from a second terminal"; then it
  is stopped as Ctrl-C stops it (SIGINT to its PID) and must exit 0;
- `sh norun` blocks are not run (the README says why).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guide_runner import (
    Background,
    Namespace,
    login_env,
    offline_pip,
    shell_blocks,
    wheelhouse,
)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# who runs the quick start -> (home, clone)
USERS = {"dev": ("/home/dev", "/home/dev/qmqpd"), "root": ("/root", "/root/qmqpd")}


def test_readme_blocks_are_found() -> None:
    blocks = shell_blocks(README.read_text())
    assert [block.flags for block in blocks][:2] == [("serves",), ()]
    assert "packaging/run-local.sh" in blocks[0].body
    assert "127.0.0.1:6280" in blocks[1].body


@pytest.fixture(scope="module")
def wheels() -> str:
    if os.geteuid() != 0:
        pytest.skip("the namespaces need root (the quick start itself runs as a user)")
    return wheelhouse(ROOT)


@pytest.fixture
def tree() -> Iterator[Path]:
    """The repository's files as a clone of the working tree has them, as a tar file."""
    where = Path(tempfile.mkdtemp(prefix="qmqpd-clone-"))
    where.chmod(0o755)
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True, timeout=60)
    names = [name for name in listed.stdout.split(b"\0")
             if name and os.path.lexists(ROOT / os.fsdecode(name))]
    archive = where / "tree.tar"
    subprocess.run(["tar", "-C", str(ROOT), "--null", "-T", "-", "-cf", str(archive)],
                   input=b"\0".join(names), check=True, timeout=120)
    archive.chmod(0o644)
    yield archive
    shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize("user", sorted(USERS))
def test_readme_quick_start_as_written(wheels: str, tree: Path, user: str) -> None:
    home, clone = USERS[user]
    with Namespace(svscan=False) as ns:
        setup = ns.run(f"id -u {user} >/dev/null 2>&1 || useradd -m -s /bin/bash {user}; "
                       f"mkdir {clone} && tar -xf {tree} -C {clone} && chown -R {user}: {clone}")
        assert setup.returncode == 0, setup.stderr
        env = login_env(user, home, **offline_pip(wheels))
        who = None if user == "root" else user
        server: Background | None = None
        outputs = []
        try:
            for block in shell_blocks(README.read_text()):
                if "serves" in block.flags:
                    server = ns.start(block.body, env, cwd=clone, user=who)
                    wait_listening(ns, server)
                    continue
                done = ns.run(block.body, env, cwd=clone, user=who, timeout=120)
                assert done.returncode == 0, (
                    f"README.md:{block.line}: the block failed (exit {done.returncode}):\n"
                    f"{block.body}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
                outputs.append(done.stdout)
            assert server is not None, "the README starts no server"
            sent = outputs[0]
            assert re.search(r"^K", sent, re.M), sent
            assert re.search(r" todo .*from=me@example\.org to=you@example\.org$", sent,
                             re.M), sent
            ns.kill(server.pid, signal.SIGINT)  # Ctrl-C
            server.proc.wait(60)
            log = server.text()
            assert server.proc.returncode == 0, log
            assert re.search(r"event=session .*answer=\"Kok", log), log
            assert re.search(r"event=exit .*status=0", log), log
        finally:
            if server is not None:
                server.stop()


def wait_listening(ns: Namespace, server: Background, seconds: float = 240) -> None:
    """Until 127.0.0.1:6280 accepts (the first run installs qmqpd first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"the server exited ({server.proc.returncode}):\n"
                                 f"{server.text()[-3000:]}")
        if ns.run("exec 3<>/dev/tcp/127.0.0.1/6280", timeout=10).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:6280:\n{server.text()[-3000:]}")
