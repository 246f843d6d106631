"""qmqpd installs anywhere: an sdist and a wheel built from a copy of the tree, the wheel
installed (not editable) into a fresh venv of the system Python, and from that venv
`qmqpd service create` (daemontools dir and systemd unit) and `qmqpd serve` + `qmqpc`.

The network is loopback only, so nothing is fetched: the build uses this environment's
setuptools (`build --no-isolation`) and the fresh venv borrows this environment's
third-party packages through a .pth path entry. qmqpd itself comes from the wheel only,
which the test checks, so a template or module missing from the wheel fails it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from qmqpd.queue import create_queue
from qmqpd.rules import compile_rules
from tests.support import free_port, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                    "dist", ".hypothesis", ".pytest_cache", ".ruff_cache",
                                    "var")
TEMPLATES = ("systemd/qmqpd.service", "daemontools/run", "daemontools/log-run", "runit/run",
             "runit/log-run")


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                          **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel (the wheel built from the sdist, as `python -m build` does)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"),
         str(source)], cwd=tmp)
    return tmp / "dist"


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv of the system Python with the wheel installed, not editable."""
    where = tmp_path_factory.mktemp("venv") / "venv"
    system_python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    assert system_python
    run([system_python, "-m", "venv", "--without-pip", str(where)])
    (wheel,) = dist.glob("qmqpd-*.whl")
    run([sys.executable, "-m", "pip", "--python", str(where / "bin" / "python"), "install",
         "--quiet", "--no-index", "--no-deps", "--disable-pip-version-check", str(wheel)])
    purelib = run([str(where / "bin" / "python"), "-c",
                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "borrowed_dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    return where


def clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH or settings from the test run: only what the venv has."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "ALLOW_ROOT": "1", **extra}  # serve runs as whoever runs the suite
    return env


def test_sdist_and_wheel_carry_the_templates(dist: Path) -> None:
    (sdist,) = dist.glob("qmqpd-*.tar.gz")
    (wheel,) = dist.glob("qmqpd-*.whl")
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
    assert all(f"{sdist.name[:-7]}/packaging/{t}" in names for t in TEMPLATES), names
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert all(f"qmqpd/packaging/{t}" in names for t in TEMPLATES), names
    assert "qmqpd/proxy.py" in names and "qmqpd/metrics.py" in names
    assert not any(name.startswith(("tests/", "packaging/")) for name in names)


def test_installed_wheel_writes_services_and_serves(venv: Path, tmp_path: Path) -> None:
    python = venv / "bin" / "python"
    where = run([str(python), "-c", "import qmqpd.service as s; print(s.__file__); "
                 "print(s.templates())"], cwd=tmp_path, env=clean_env()).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where  # not the checkout
    qmqpd = venv / "bin" / "qmqpd"
    queue = tmp_path / "queue"
    create_queue(str(queue))
    port = free_port()
    # what `service create` checks the written service against: rules, and who runs it
    (tmp_path / "tcp.qmqp").write_text("127.:allow\n")
    compile_rules(str(tmp_path / "tcp.qmqp"), str(tmp_path / "tcp.qmqp.cdb"))
    checked = [f"--rules={tmp_path / 'tcp.qmqp.cdb'}", "--set=ALLOW_ROOT=1"]
    run([str(qmqpd), "service", "create", f"--qmqp={port}", f"--queuedir={queue}",
         f"--servicedir={tmp_path / 'service'}", f"--logdir={tmp_path / 'log'}",
         "--localip=127.0.0.1", *checked], cwd=tmp_path, env=clean_env())
    run_script = (tmp_path / "service" / f"qmqpd.{port}" / "run").read_text()
    assert f"{qmqpd} serve" in run_script
    assert (tmp_path / "service" / f"qmqpd.{port}" / "variables" / "QUEUEDIR").read_text() \
        == f"{queue}\n"
    unit = tmp_path / "qmqpd.service"
    run([str(qmqpd), "service", "create", f"--qmqp={port}", f"--queuedir={queue}",
         f"--systemd={unit}", *checked], cwd=tmp_path, env=clean_env())
    assert f"ExecStart={qmqpd} serve" in unit.read_text()

    server = subprocess.Popen(
        [str(qmqpd), "serve"], cwd=tmp_path, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=clean_env(PORT=str(port), LOCALIP="127.0.0.1", QUEUEDIR=str(queue),
                      USE_FSYNC="0", USE_SYNCDIR="0", PREFORK="1",
                      STATUS_FILE=str(tmp_path / "status.json")))
    try:
        wait_for_port(port, seconds=30)
        servers = tmp_path / "qmqpservers"
        servers.write_text(f"127.0.0.1:{port}\n")
        sent = subprocess.run(
            [str(venv / "bin" / "qmqpc"), "--servers", str(servers), "--from",
             "ops@example.org", "--to", "wheel@example.net"],
            input=b"Subject: from a wheel\n\nhello\n", capture_output=True, timeout=60,
            env=clean_env(), cwd=tmp_path, check=False)
        assert sent.returncode == 0, sent.stderr
    finally:
        stop_process(server)
    assert server.returncode == 0, server.stderr.read() if server.stderr else b""
    assert len(os.listdir(queue / "todo")) == 1
