"""Run the shell blocks of a Markdown document as written: as root, inside private mount,
network and PID namespaces, so the blocks use the real paths (/etc/qmqpd, /var/qmail,
/etc/service, /etc/passwd, /opt ...) and the real port and addresses, and nothing they do
reaches the host.

Owns: finding a document's fenced blocks (`fenced_blocks`); the namespace (`Namespace`):
each directory in OVERLAID gets an overlay whose writable layer is on a tmpfs, so users
created, queues, services, units and installs land in memory and vanish with the
namespace; /etc/service starts empty and a real `svscanboot` supervises it, as Debian's
daemontools-run does; loopback is the only network, with the addresses the document
uses added to it. Called by tests/integration/test_operator_guide.py and test_readme.py
(and tests/unit/test_docs.py for the blocks); run as a script it is the namespace's first
process (`inside`).
Never touches the host's files, network or processes: the kernel ends every process of the
namespace when its first process exits, which it does when the test closes its stdin.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Every directory a document's blocks may write (the system's configuration, queues, logs,
# services, units, installs, users' homes, temporary files), each under a scratch overlay.
OVERLAID = ("/etc", "/var", "/run", "/opt", "/usr", "/srv", "/root", "/home", "/tmp")
# What a root login shell on Debian has; nothing of the test's own environment.
LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READY = "ready"

# A fenced block, also indented under a list item (its lines lose that indentation).
FENCE = re.compile(r"^( {0,3})```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    """One fenced block: its language (`sh`), its flags (`norun`, `serves`), its text."""

    language: str
    flags: tuple[str, ...]
    body: str
    line: int  # 1-based line of the opening fence, for messages

    @property
    def runs(self) -> bool:
        return self.language == "sh" and "norun" not in self.flags


def fenced_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        indent, info, body = match.groups()
        words = info.split()
        body = "".join(line.removeprefix(indent) for line in body.splitlines(keepends=True))
        blocks.append(Block(words[0] if words else "", tuple(words[1:]), body,
                            text.count("\n", 0, match.start()) + 1))
    return blocks


def shell_blocks(text: str) -> list[Block]:
    """The `sh` blocks that run, in document order."""
    return [block for block in fenced_blocks(text) if block.runs]


def login_env(user: str = "root", home: str = "/root", **extra: str) -> dict[str, str]:
    """The environment of a login shell of `user` (USER and LOGNAME set, as login does)."""
    return {"PATH": LOGIN_PATH, "HOME": home, "USER": user, "LOGNAME": user,
            "SHELL": "/bin/bash", "LANG": "C.UTF-8", **extra}


@dataclass
class Background:
    """A script started in the namespace and left running: its nsenter process, its PID
    inside the namespace, the file its output goes to."""

    proc: subprocess.Popen[bytes]
    output: Path
    pid: int = 0

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> None:
        """End it if it still runs (the namespace's end would as well) and drop its file."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.output.unlink(missing_ok=True)


class Namespace:
    """The namespaces and the first process in them; `run` enters them for one script."""

    def __init__(self, addresses: Sequence[str] = (), overlaid: Sequence[str] = OVERLAID,
                 svscan: bool = True) -> None:
        self.addresses = list(addresses)
        self.overlaid = list(overlaid)
        self.svscan = svscan
        self.scratch = ""
        self.proc: subprocess.Popen[str] | None = None
        self.pid = 0  # the first process, as the host numbers it

    def __enter__(self) -> Namespace:
        if os.geteuid() != 0:
            raise PermissionError("the namespaces need root")
        self.scratch = tempfile.mkdtemp(prefix="qmqpd-ns-")
        config = {"scratch": self.scratch, "overlaid": self.overlaid,
                  "addresses": self.addresses, "svscan": self.svscan}
        self.proc = subprocess.Popen(
            [need("unshare"), "--mount", "--net", "--pid", "--fork", "--mount-proc",
             "--propagation", "private", sys.executable, __file__, "inside", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != READY:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"the namespace did not start: {line!r} {err}")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        self.pid = int(children.split()[0])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the first process exits; the kernel ends the rest
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                if self.pid:
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def command(self, script: str, env: Mapping[str, str], cwd: str = "/",
                user: str | None = None) -> list[str]:
        """argv of `bash -euo pipefail -c script` in the namespaces, in a clean env."""
        # The working directory is set inside (env -C): nsenter's --wd opens it before it
        # enters the mount namespace, which would be the host's directory, not the overlay.
        enter = [need("nsenter"), "--target", str(self.pid), "--mount", "--net", "--pid", "--"]
        drop = ([need("setpriv"), f"--reuid={user}", f"--regid={user}", "--init-groups"]
                if user else [])
        return [*enter, *drop, "/usr/bin/env", "-i", f"--chdir={cwd}",
                *(f"{k}={v}" for k, v in env.items()),
                "/bin/bash", "-euo", "pipefail", "-c", script]

    def run(self, script: str, env: Mapping[str, str] | None = None, cwd: str = "/",
            user: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(script, env or login_env(), cwd, user),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def read_bytes(self, path: str) -> bytes:
        done = subprocess.run(self.command(f"cat -- {shlex.quote(path)}", login_env()),
                              capture_output=True, timeout=30, check=True)
        return done.stdout

    def start(self, script: str, env: Mapping[str, str], cwd: str = "/",
              user: str | None = None) -> Background:
        """Start a script that keeps running (a server in the foreground), its stdout and
        stderr into a file; the script execs, so its PID inside the namespace stays."""
        wrapped = "echo pid=$$; exec /bin/bash -euo pipefail -c " + shlex.quote(script)
        with tempfile.NamedTemporaryFile(prefix="qmqpd-ns-out-", delete=False) as output:
            proc = subprocess.Popen(self.command(wrapped, env, cwd, user),
                                    stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT)
        started = Background(proc, Path(output.name))
        deadline = time.monotonic() + 30
        while not (first := started.text().partition("\n")[0]).startswith("pid="):
            if proc.poll() is not None or time.monotonic() > deadline:
                output = started.text()
                started.stop()
                raise RuntimeError(f"could not start {script!r}: {output!r}")
            time.sleep(0.1)
        started.pid = int(first[4:])
        return started

    def kill(self, pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal a process by its PID inside the namespace."""
        done = self.run(f"kill -{sig.name[3:]} {int(pid)}")
        if done.returncode != 0:
            raise ProcessLookupError(f"kill {pid}: {done.stderr.strip()}")


def offline_pip(wheels: str) -> dict[str, str]:
    """The environment that makes pip install from `wheels` only (the namespace has no
    network): what a host with a local package mirror has in its pip configuration."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": wheels,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


_WHEELHOUSE: list[Path] = []


def wheelhouse(project: Path) -> str:
    """A directory of wheels of the project's declared dependencies and build requirements
    (not of the project: the documents install it from its source), fetched once per test
    run outside the namespace, readable by every user, removed at exit."""
    if not _WHEELHOUSE:
        import atexit
        import tomllib

        where = Path(tempfile.mkdtemp(prefix="qmqpd-wheels-"))
        atexit.register(shutil.rmtree, where, True)
        where.chmod(0o755)
        meta = tomllib.loads((project / "pyproject.toml").read_text())
        wanted = [*meta["project"]["dependencies"], *meta["build-system"]["requires"], "wheel"]
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet",
                               "--disable-pip-version-check", "--wheel-dir", str(where),
                               *wanted], capture_output=True, text=True, timeout=600,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pip wheel failed: {done.stderr[-2000:]}")
        _WHEELHOUSE.append(where)
    return str(_WHEELHOUSE[0])


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise FileNotFoundError(f"{program} is not installed")
    return path


# ---- inside: the namespace's first process ----------------------------------------------

def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, capture_output=True, timeout=30)


def inside(config: dict[str, object]) -> int:
    scratch = str(config["scratch"])
    _mount("-t", "tmpfs", "-o", "mode=0700,size=2g", "qmqpd-ns", scratch)
    overlaid = [str(directory) for directory in config["overlaid"]]  # type: ignore[union-attr]
    # The directory holding the scratch tmpfs goes last: its overlay hides the tmpfs.
    overlaid.sort(key=lambda directory: scratch.startswith(directory.rstrip("/") + "/"))
    for number, directory in enumerate(overlaid):
        upper, work = f"{scratch}/upper{number}", f"{scratch}/work{number}"
        os.mkdir(upper)
        os.mkdir(work)
        os.chmod(upper, os.stat(directory).st_mode & 0o7777)
        _mount("-t", "overlay", "-o", f"lowerdir={directory},upperdir={upper},workdir={work}",
               "qmqpd-ns", directory)
    # A fresh Debian with daemontools-run: svscan on an empty /etc/service.
    os.makedirs("/etc/service", exist_ok=True)
    _mount("-t", "tmpfs", "-o", "mode=0755", "qmqpd-ns", "/etc/service")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    for address in config["addresses"]:  # type: ignore[union-attr]
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True,
                       timeout=30)
    signal.signal(signal.SIGCHLD, _reap)
    if config["svscan"]:
        subprocess.Popen(["/usr/bin/svscanboot"], cwd="/", env={},
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    print(READY, flush=True)
    while sys.stdin.read(4096):  # until the test closes the pipe
        pass
    return 0


def _reap(signum: int, frame: object) -> None:
    """PID 1 adopts every orphan: reap them, so an ended process does not linger."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "inside":
        sys.exit(inside(json.loads(sys.argv[2])))
    sys.exit("usage: guide_runner.py inside CONFIG_JSON (started by Namespace)")
