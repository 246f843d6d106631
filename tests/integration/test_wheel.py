"""qmqpd installs the way a user installs it: an sdist and a wheel built from a copy of the
tree, the wheel installed (not editable) into a fresh venv of the system Python with
`pip install qmqpd-*.whl`, its declared dependencies fetched from the package index and
nothing borrowed from the test environment. From that venv: every module imports, `pip
check` is clean, `serve` runs with every stage on (a real clamd, DomainKeys and DKIM
signing with keys made by `qmqpd dkim keygen`, DKIM verification against a DNS stub) and
Mail::DKIM verifies what it signed; `check`, `config` and `session` work, and
`service create` writes services.

The build and the venv are made once per test run (session fixtures): building and
installing take most of this module's time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmqpd.queue import create_queue
from qmqpd.rules import compile_rules
from tests.clamd import Clamd, eicar
from tests.dnsstub import DnsStub
from tests.integration.test_signing_served import queued
from tests.serve_process import ServeProcess
from tests.support import (
    exchange,
    need,
    request,
    start_on_free_port,
    stop_process,
    wait_listening,
)

ROOT = Path(__file__).resolve().parents[2]
VERIFIER = ROOT / "tests" / "peers" / "dkim-verify.pl"
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                    "dist", ".hypothesis", ".pytest_cache", ".ruff_cache",
                                    "var")
TEMPLATES = ("systemd/qmqpd.service", "daemontools/run", "daemontools/log-run", "runit/run",
             "runit/log-run")
MESSAGE = (b"From: Joe Sender <joe@example.org>\nTo: rcpt@example.net\n"
           b"Subject: from a wheel\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
           b"Message-ID: <wheel@example.org>\n\nhello from an installed wheel\n")


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False,
                          **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel (the wheel built from the sdist, as `python -m build` does), and
    build.log: everything the build printed."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    # every warning shown (and no "byte-compiling is disabled" notice from the test run's
    # PYTHONDONTWRITEBYTECODE): test_build_prints_no_warnings reads them all
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    built = run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                 str(tmp / "dist"), str(source)], cwd=tmp,
                env=dict(env, PYTHONWARNINGS="always"))
    (tmp / "dist" / "build.log").write_text(built.stdout + built.stderr)
    return tmp / "dist"


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob("qmqpd-*.whl")
    return wheel


@pytest.fixture(scope="session")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv of the system Python (no system site-packages) with the wheel and its
    declared dependencies installed by the venv's own pip, as a user would."""
    where = tmp_path_factory.mktemp("venv") / "venv"
    system_python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    assert system_python
    run([system_python, "-m", "venv", str(where)], env=clean_env())
    run([str(where / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
         str(wheel_of(dist))], env=clean_env())
    return where


def clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH, no settings from the test run: only what the venv has (and pip's
    own configuration, as a user's pip would read it); serve runs as whoever runs the
    suite (ALLOW_ROOT)."""
    keep = {name: value for name, value in os.environ.items() if name.startswith("PIP_")}
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
            "ALLOW_ROOT": "1", **keep, **extra}


def test_sdist_and_wheel_carry_the_templates(dist: Path) -> None:
    (sdist,) = dist.glob("qmqpd-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
    assert all(f"{sdist.name[:-7]}/packaging/{t}" in names for t in TEMPLATES), names
    with zipfile.ZipFile(wheel_of(dist)) as archive:
        names = set(archive.namelist())
    assert all(f"qmqpd/packaging/{t}" in names for t in TEMPLATES), names
    assert "qmqpd/proxy.py" in names and "qmqpd/metrics.py" in names
    assert "qmqpd/filters/dkim.py" in names


def test_wheel_installs_only_the_qmqpd_package(dist: Path) -> None:
    with zipfile.ZipFile(wheel_of(dist)) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    packages = {top for top in tops if not top.endswith((".dist-info", ".data"))}
    assert packages == {"qmqpd"}, tops


def test_build_prints_no_warnings(dist: Path) -> None:
    said = (dist / "build.log").read_text()
    assert "Successfully built" in said, said
    warned = [line for line in said.splitlines() if "warning" in line.lower()]
    assert not warned, said


def test_license_and_man_pages_travel_with_the_wheel(dist: Path, venv: Path) -> None:
    (sdist,) = dist.glob("qmqpd-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
    top = sdist.name[:-7]
    assert {f"{top}/LICENSE", f"{top}/man/qmqpd.8", f"{top}/man/qmqpc.1"} <= names, names
    with zipfile.ZipFile(wheel_of(dist)) as archive:
        names = set(archive.namelist())
        (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        head = archive.read(metadata).decode().split("\n\n")[0]
    assert "License-Expression: BSD-2-Clause" in head.splitlines(), head
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    for page in ("man8/qmqpd.8", "man1/qmqpc.1"):
        assert (venv / "share" / "man" / page).is_file(), page
    # man-db looks in ../share/man beside each PATH entry, so the venv's page comes before
    # Postfix's qmqpd.8postfix: the unit's Documentation=man:qmqpd(8) opens ours
    found = run([need("man"), "-w", "8", "qmqpd"],
                env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin"}).stdout.strip()
    assert found == str(venv / "share" / "man" / "man8" / "qmqpd.8"), found


def test_man_pages_lint_clean_and_name_every_subcommand() -> None:
    pages = [ROOT / "man" / "qmqpd.8", ROOT / "man" / "qmqpc.1"]
    linted = subprocess.run([need("mandoc"), "-Tlint", "-Wwarning", *map(str, pages)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    from qmqpd import cli, client

    qmqpd_page = pages[0].read_text()
    (commands,) = (action for action in cli.build_parser()._actions
                   if action.dest == "command")
    for name in commands.choices:  # type: ignore[union-attr]
        assert re.search(rf"^\.Cm {name}\b", qmqpd_page, re.MULTILINE), name
    qmqpc_page = pages[1].read_text()
    for action in client._parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert re.search(rf"\bFl {re.escape(option[1:])}(?![\w-])", qmqpc_page), option


def modules_in(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.endswith(".py")]
    modules = [name[:-3].replace("/", ".").removesuffix(".__init__") for name in names]
    return sorted(m for m in modules if not m.endswith("__main__"))


def test_every_module_imports_and_pip_check_is_clean(dist: Path, venv: Path,
                                                     tmp_path: Path) -> None:
    modules = modules_in(wheel_of(dist))
    assert "qmqpd.filters.dkim" in modules and "qmqpd.filters.virus" in modules
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    module = importlib.import_module(name)\n"
              "    assert module.__file__.startswith(sys.prefix), module.__file__\n")
    run([str(venv / "bin" / "python"), "-c", script, *modules], cwd=tmp_path, env=clean_env())
    checked = run([str(venv / "bin" / "pip"), "check", "--disable-pip-version-check"],
                  env=clean_env())
    assert "No broken requirements found" in checked.stdout


def test_version(dist: Path, venv: Path) -> None:
    version = wheel_of(dist).name.split("-")[1]  # qmqpd-VERSION-py3-none-any.whl
    shown = run([str(venv / "bin" / "qmqpd"), "--version"], env=clean_env()).stdout
    assert shown.strip() == f"qmqpd {version}"


# --- serve, check, config and session with every stage on ----------------------------------

@pytest.fixture
def clamd(tmp_path: Path) -> Iterator[Clamd]:
    scanner = Clamd(tmp_path / "clamd").start()
    yield scanner
    scanner.stop()


@pytest.fixture
def stages(venv: Path, tmp_path: Path, clamd: Clamd) -> Iterator[dict[str, str]]:
    """The environment that switches every stage on: virus scanning against the real
    clamd, DomainKeys and DKIM signing with a key `qmqpd dkim keygen` made, DKIM
    verification whose key lookups a DNS stub answers with that key's record."""
    control = tmp_path / "control"
    made = run([str(venv / "bin" / "qmqpd"), "dkim", "keygen", "--domain", "example.org",
                "--keydir", str(control / "domainkeys")], env=clean_env())
    text = "".join(re.findall(r'"([^"]*)"', made.stdout))  # the zone line's strings
    assert text.startswith("v=DKIM1; k=rsa; p="), made.stdout
    dns = DnsStub({"default._domainkey.example.org": text})
    (tmp_path / "records.json").write_text(
        json.dumps({"default._domainkey.example.org": text}))
    queue = tmp_path / "queue"
    create_queue(str(queue))
    yield {"QUEUEDIR": str(queue), "USE_FSYNC": "0", "USE_SYNCDIR": "0",
           "QHPSI": "1", "CLAMD_TCP": clamd.tcp, "CONTROLDIR": str(control),
           "DKSIGN": "", "DKIMSIGN": "", "DKIMVERIFY": "", "DNS_SERVERS": dns.address}
    dns.close()


def answer_of(raw: bytes) -> bytes:
    length, _, rest = raw.partition(b":")
    return rest[: int(length)]


def mail_dkim(message: bytes, records: Path) -> list[str]:
    """Mail::DKIM's verdict per signature ("DKIM example.org default pass (...)")."""
    need("perl")
    checked = subprocess.run(["perl", str(VERIFIER), str(records)],
                             input=message.replace(b"\n", b"\r\n"), capture_output=True,
                             timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr.decode()
    return checked.stdout.decode().splitlines()


def start_serve(venv: Path, tmp_path: Path, stages: dict[str, str]) -> ServeProcess:
    """The venv's `qmqpd serve` without a config file: every setting from the environment."""
    return ServeProcess(tmp_path, qmqpd=[str(venv / "bin" / "qmqpd")],
                        config_file=False, environ=clean_env(), localip="127.0.0.1",
                        prefork="1", status_file=str(tmp_path / "status.json"),
                        **stages).start(seconds=60)


def test_serve_with_every_stage_signs_what_mail_dkim_verifies(
        venv: Path, tmp_path: Path, stages: dict[str, str]) -> None:
    queue = Path(stages["QUEUEDIR"])
    server = start_serve(venv, tmp_path, stages)
    port = server.port
    try:
        servers = tmp_path / "qmqpservers"
        servers.write_text(f"127.0.0.1:{port}\n")
        sent = subprocess.run(
            [str(venv / "bin" / "qmqpc"), "--servers", str(servers), "--from",
             "joe@example.org", "--to", "rcpt@example.net"], input=MESSAGE,
            capture_output=True, timeout=60, env=clean_env(), cwd=tmp_path, check=False)
        assert sent.returncode == 0, sent.stderr
        (signed,) = queued(queue)
        # what the server signed, sent through it again: its own DKIM verification passes
        again = exchange(port, request(signed, b"joe@example.org", [b"rcpt@example.net"]))
        assert answer_of(again).startswith(b"K"), again
        virus = exchange(port, request(b"Subject: x\n\n" + eicar() + b"\n",
                                       b"joe@example.org", [b"rcpt@example.net"]))
        assert answer_of(virus).startswith(b"D"), virus
    finally:
        status = server.stop()
    assert status == 0, server.log()
    first, second = queued(queue)
    assert b"\nX-QHPSI: clean\n" in first
    assert b"\nDomainKey-Signature: " in first or first.startswith(b"DomainKey-Signature: ")
    verdicts = mail_dkim(first, tmp_path / "records.json")
    assert any(v.startswith("DKIM example.org default pass") for v in verdicts), verdicts
    assert any(v.startswith("DK example.org default pass") for v in verdicts), verdicts
    assert re.search(rb"Authentication-Results: \S+;\s+dkim=none", first), first[:600]
    assert re.search(rb"Authentication-Results: \S+;\s+dkim=pass header.d=example.org", second)


def test_check_config_and_session_with_every_stage(venv: Path, tmp_path: Path,
                                                   stages: dict[str, str]) -> None:
    qmqpd = str(venv / "bin" / "qmqpd")
    checked = subprocess.run([qmqpd, "check"], capture_output=True, text=True, timeout=120,
                             env=clean_env(**stages), cwd=tmp_path, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    shown = run([qmqpd, "config"], env=clean_env(**stages), cwd=tmp_path).stdout
    assert f"QUEUEDIR={stages['QUEUEDIR']!r}  # environment" in shown
    assert "DKIMSIGN=''  # environment" in shown

    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        session = subprocess.Popen(
            [qmqpd, "session"], stdin=server_end, stdout=server_end, stderr=subprocess.PIPE,
            cwd=tmp_path, env=clean_env(TCPREMOTEIP="127.0.0.1", TCPLOCALIP="127.0.0.1",
                                        TCPREMOTEPORT="1234", TCPLOCALPORT="628", **stages))
        server_end.close()
        client_end.sendall(request(MESSAGE, b"joe@example.org", [b"rcpt@example.net"]))
        client_end.shutdown(socket.SHUT_WR)
        client_end.settimeout(60)
        raw = b""
        while block := client_end.recv(4096):
            raw += block
        _, errors = session.communicate(timeout=60)
    assert answer_of(raw).startswith(b"K"), (raw, errors)
    assert session.returncode == 0, errors
    (message,) = queued(Path(stages["QUEUEDIR"]))
    verdicts = mail_dkim(message, tmp_path / "records.json")
    assert any(v.startswith("DKIM example.org default pass") for v in verdicts), verdicts


def test_installed_wheel_writes_services(venv: Path, tmp_path: Path) -> None:
    python = venv / "bin" / "python"
    where = run([str(python), "-c", "import qmqpd.service as s; print(s.__file__); "
                 "print(s.templates())"], cwd=tmp_path, env=clean_env()).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where  # not the checkout
    qmqpd = venv / "bin" / "qmqpd"
    queue = tmp_path / "queue"
    create_queue(str(queue))
    # what `service create` checks the written service against: rules, and who runs it
    (tmp_path / "tcp.qmqp").write_text("127.:allow\n")
    compile_rules(str(tmp_path / "tcp.qmqp"), str(tmp_path / "tcp.qmqp.cdb"))
    checked = [f"--rules={tmp_path / 'tcp.qmqp.cdb'}", "--set=ALLOW_ROOT=1"]
    run([str(qmqpd), "service", "create", "--qmqp=6280", f"--queuedir={queue}",
         f"--servicedir={tmp_path / 'service'}", f"--logdir={tmp_path / 'log'}",
         "--localip=127.0.0.1", *checked], cwd=tmp_path, env=clean_env())
    run_script = (tmp_path / "service" / "qmqpd.6280" / "run").read_text()
    assert f"{qmqpd} serve" in run_script
    assert (tmp_path / "service" / "qmqpd.6280" / "variables" / "QUEUEDIR").read_text() \
        == f"{queue}\n"
    unit = tmp_path / "qmqpd.service"
    run([str(qmqpd), "service", "create", "--qmqp=6280", f"--queuedir={queue}",
         f"--systemd={unit}", *checked], cwd=tmp_path, env=clean_env())
    assert f"ExecStart={qmqpd} serve" in unit.read_text()


def test_run_local_serves_from_a_fresh_copy(tmp_path: Path) -> None:
    """The README's first command on a copy of the tree with no venv: it makes one,
    installs the project with its declared dependencies and serves on the embedded
    defaults (PORT from the environment, so parallel runs do not collide)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    log_path = tmp_path / "run-local.log"

    def start(port: int) -> tuple[subprocess.Popen[bytes], int]:
        mark = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            server = subprocess.Popen(
                ["bash", "packaging/run-local.sh"], cwd=source, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, env=clean_env(PORT=str(port)))
        try:
            wait_listening(server, lambda: log_path.read_bytes()[mark:].decode(
                errors="replace"), seconds=300)
        except BaseException:
            stop_process(server)
            raise
        return server, port

    server, port = start_on_free_port(start)
    try:
        sent = exchange(port, request(MESSAGE, b"joe@example.org", [b"rcpt@example.net"]))
    finally:
        stop_process(server)
    assert answer_of(sent).startswith(b"K"), (sent, log_path.read_text())
    assert len(queued(source / "var" / "queue")) == 1
    assert server.returncode == 0, log_path.read_text()
