"""`qmqpd service create` with svctool's full --qmqp option list, run under real supervision
(Debian daemontools svscan/supervise and runit runsv): a message sent by qmqpc is queued, the
log lands in the multilog directory, svc -h reloads, svc -d stops cleanly, --rmsvc removes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from qmqpd.queue import create_queue
from tests.support import command, free_port, need, stop_process, wait_until

SEED_OPTIONS = [
    "--qcount=2", "--qstart=1", "--cntrldir=control", "--localip=127.0.0.1",
    "--maxdaemons=75", "--maxperip=25", "--fsync", "--syncdir", "--memory=1073741824",
    "--min-free=52428800",
]


def qmqpd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command("qmqpd"), *args], capture_output=True, text=True,
                          timeout=60, check=check)


def send(port: int, tmp: Path, to: str) -> subprocess.CompletedProcess[bytes]:
    servers = tmp / "qmqpservers"
    servers.write_text(f"127.0.0.1:{port}\n")
    return subprocess.run(
        [*command("qmqpc"), "--servers", str(servers), "--from", "ops@example.org", "--to", to],
        input=b"Subject: supervised\n\nhello\n", capture_output=True, timeout=60)


def todo_count(base: Path) -> int:
    return sum(len(os.listdir(base / f"queue{n}" / "todo")) for n in (1, 2))


@pytest.fixture
def layout(tmp_path: Path):
    base = tmp_path / "queue"
    for n in (1, 2):
        create_queue(str(base / f"queue{n}"))
    control = tmp_path / "etc" / "control"
    control.mkdir(parents=True)
    rules_text = control / "tcp.qmqp"
    rules_text.write_text("127.:allow\n:deny\n")
    qmqpd("rules", "compile", str(rules_text), str(control / "tcp.qmqp.cdb"))
    return base, control


def create(tmp_path: Path, base: Path, control: Path, port: int, supervisor: str) -> Path:
    services = tmp_path / "service"
    services.mkdir(exist_ok=True)
    result = qmqpd(
        "service", "create", f"--qmqp={port}", f"--servicedir={services}", f"--qbase={base}",
        *SEED_OPTIONS, f"--cntrldir={control}", f"--logdir={tmp_path / 'log'}",
        f"--supervisor={supervisor}", "--up", "--virus-filter", "--dkimverify",
        "--set=PREFORK=2", f"--set=STATUS_FILE={tmp_path / 'status.json'}",
        "--set=ALLOW_ROOT=1",  # the suite may run as root; no service user here
    )
    assert "created" in result.stdout
    service = services / f"qmqpd.{port}"
    assert (service / "variables" / "QUEUE_COUNT").read_text() == "2\n"
    assert (service / "variables" / "USE_FSYNC").read_text() == "1\n"
    assert (service / "variables" / "SOFT_MEM").read_text() == "1073741824\n"
    assert (service / "variables" / "QHPSI").read_text() == "1\n"
    assert "--maxperip=25" in (service / "variables" / ".options").read_text()
    # The filters need clamd etc.; this test is about supervision, so switch them off.
    (service / "variables" / "QHPSI").write_text("0\n")
    (service / "variables" / "DKIMVERIFY").unlink()
    return service


def test_down_file_and_rmsvc(tmp_path: Path, layout) -> None:
    base, _ = layout
    services = tmp_path / "service"
    # No rules cdb under the default control directory: written, and the problem said
    created = qmqpd("service", "create", "--qmqp=7628", f"--servicedir={services}",
                    f"--qbase={base}", *SEED_OPTIONS, f"--logdir={tmp_path / 'log'}",
                    "--cntrldir=/nonexistent/qmqpd", check=False)
    assert created.returncode == 111, created.stderr
    assert ("fix: qmqpd rules compile /nonexistent/qmqpd/tcp.qmqp "
            "/nonexistent/qmqpd/tcp.qmqp.cdb") in created.stderr
    service = services / "qmqpd.7628"
    assert (service / "down").exists()
    assert os.access(service / "run", os.X_OK) and os.access(service / "log" / "run", os.X_OK)
    removed = qmqpd("service", "create", "--qmqp=7628", f"--servicedir={services}", "--rmsvc",
                    f"--qbase={base}")
    assert "removed" in removed.stdout and not service.exists()


def test_bad_option_writes_nothing(tmp_path: Path, layout) -> None:
    base, _ = layout
    services = tmp_path / "service"
    result = qmqpd("service", "create", "--qmqp=7628", f"--servicedir={services}",
                   f"--qbase={base}", "--maxdaemons=0", check=False)
    assert result.returncode == 100 and "MAXDAEMONS" in result.stderr
    assert not (services / "qmqpd.7628").exists()


def test_unknown_log_user_writes_nothing(tmp_path: Path, layout) -> None:
    base, _ = layout
    services = tmp_path / "service"
    result = qmqpd("service", "create", "--qmqp=7628", f"--servicedir={services}",
                   f"--qbase={base}", "--loguser=no-such-log-user",
                   f"--logdir={tmp_path / 'log'}", check=False)
    if os.geteuid() != 0:
        pytest.skip("the log directory is given to --loguser only when run as root")
    assert result.returncode == 100 and "--loguser no-such-log-user" in result.stderr
    assert not (services / "qmqpd.7628").exists() and not (tmp_path / "log").exists()


def _log_text(logdir: Path) -> str:
    current = logdir / "current"
    return current.read_text(errors="replace") if current.exists() else ""


@pytest.mark.parametrize("supervisor", ["daemontools", "runit"])
def test_supervised_service(tmp_path: Path, layout, supervisor: str) -> None:
    base, control = layout
    port = free_port()
    service = create(tmp_path, base, control, port, supervisor)
    logdir = tmp_path / "log"
    if supervisor == "daemontools":
        runner = subprocess.Popen([need("svscan"), str(service.parent)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
    else:
        runner = subprocess.Popen([need("runsv"), str(service)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
    svc = need("svc")
    try:
        wait_until(lambda: send(port, tmp_path, "first@example.net").returncode == 0,
                   what="the supervised server to accept")
        assert todo_count(base) >= 1
        wait_until(lambda: "event=session" in _log_text(logdir), what="a session log line")
        log_line = next(line for line in _log_text(logdir).splitlines()
                        if "event=session" in line and "answer=\"Kok" in line)
        assert log_line.startswith("@4000")  # multilog's TAI64N stamp

        # svc -h: reload settings from variables/ (a new MAXPERIP) and rules.
        (service / "variables" / "MAXPERIP").write_text("7\n")
        subprocess.run([svc, "-h", str(service)], check=True, timeout=10)
        wait_until(lambda: "event=reload" in _log_text(logdir), what="a reload log line")
        assert send(port, tmp_path, "second@example.net").returncode == 0

        # svc -d: TERM, the server drains and exits; nothing listens any more.
        subprocess.run([svc, "-d", str(service)], check=True, timeout=10)
        wait_until(lambda: send(port, tmp_path, "x@example.net").returncode != 0,
                   what="the service to stop")
        assert todo_count(base) == 2
        wait_until(lambda: "event=exit" in _log_text(logdir), what="the exit log line")
        exit_line = next(line for line in _log_text(logdir).splitlines() if "event=exit" in line)
        assert "status=0" in exit_line
    finally:
        for path in (service, service / "log"):
            subprocess.run([svc, "-dx", str(path)], timeout=10, check=False)
        os.killpg(runner.pid, signal.SIGTERM)
        stop_process(runner)
    shutil.rmtree(service)


def test_systemd_unit(tmp_path: Path, layout) -> None:
    base, control = layout
    port = free_port()
    unit_file = tmp_path / "qmqpd.service"
    qmqpd("service", "create", f"--qmqp={port}", f"--qbase={base}", *SEED_OPTIONS,
          f"--cntrldir={control}", f"--systemd={unit_file}", "--set=PREFORK=1",
          f"--set=STATUS_FILE={tmp_path / 'status.json'}", "--set=ALLOW_ROOT=1")
    unit = unit_file.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit
    assert f"ReadWritePaths={base}" in unit
    analyze = shutil.which("systemd-analyze")
    if analyze:
        verify = subprocess.run([analyze, "verify", str(unit_file)], capture_output=True,
                                text=True, timeout=60)
        assert verify.returncode == 0, verify.stderr
        assert "Unknown" not in verify.stderr, verify.stderr
    # Run the unit's own command line with its own environment under the unit's main
    # confinement, rebuilt by hand (no systemd here): the whole filesystem read-only except
    # ReadWritePaths (ProtectSystem=strict), and no new privileges (NoNewPrivileges=yes).
    env = {"PATH": os.environ["PATH"]}
    for line in unit.splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").strip('"').partition("=")
            env[key] = value
    directive = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in unit.splitlines()
                 if "=" in line and not line.startswith(("#", "Environment="))}
    writable = [*directive["ReadWritePaths"].split(), str(tmp_path)]  # tmp_path: status file
    confine = (" ".join(f'mount --bind "{p}" "{p}";' for p in writable)
               + ' mount -o remount,bind,ro /; exec setpriv --no-new-privs "$@"')
    argv = [need("unshare"), "-m", "--propagation", "private", "sh", "-ec", confine, "sh",
            *directive["ExecStart"].split()]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: send(port, tmp_path, "unit@example.net").returncode == 0,
                   what="the unit's command to serve")
        status = Path(f"/proc/{server.pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status
        mounts = Path(f"/proc/{server.pid}/mounts").read_text().splitlines()
        root = [m.split() for m in mounts if m.split()[1] == "/"][-1]
        assert "ro" in root[3].split(",")
    finally:
        stop_process(server)
    assert server.returncode == 0, server.stderr.read() if server.stderr else ""
    assert todo_count(base) == 1
