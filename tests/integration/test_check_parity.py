"""`qmqpd check` is `serve`'s own validation: every bad configuration of the suite, run
through both, gets the same verdict and names the same setting.

The cases are test_plan's table (the settings a plan needs) and the ones a plan does not
cover: the whole server (root without USER, PROXY_PROTOCOL without PROXY_TRUSTED, METRICS on
the QMQP port, a LOCALIP that is no address, an unknown USER) and what only the service's
user meets (a key, a `%` key, the rules cdb, QMAILQUEUE or the status directory it cannot
use; MIN_FREE above the disk; SOFT_MEM below a worker's measured need). Each `serve` must
exit 111 within seconds; `check` must exit 111. clamd not answering is a warning in both:
check exits 0 and prints it, serve starts and logs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmqpd.filters import keys
from qmqpd.queue import create_queue
from qmqpd.rules import compile_rules
from tests.integration.test_plan import CASES as PLAN_CASES
from tests.integration.test_plan import World, clean_env, unescaped
from tests.integration.test_plan import world as world
from tests.serve_process import ServeProcess
from tests.support import command, free_port, toml_text, wait_until

WAIT = 60.0
SERVICE_USER = "nobody"


@dataclass
class Service:
    """A world the user `nobody` can work in: its queue, key, rules and status dir."""

    root: Path
    queue: Path
    key: Path
    rules: Path

    def base(self) -> dict[str, object]:
        return {"port": free_port(), "queuedir": str(self.queue), "prefork": 1,
                "use_fsync": False, "use_syncdir": False, "user": SERVICE_USER,
                "rules": str(self.rules), "status_file": str(self.root / "run" / "status.json")}


def _give(path: Path, uid: int, gid: int) -> None:
    for top, dirs, files in os.walk(path):
        for name in [top, *(os.path.join(top, d) for d in dirs),
                     *(os.path.join(top, f) for f in files)]:
            os.lchown(name, uid, gid)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    if os.geteuid() != 0:
        pytest.skip("the service-user cases drop to another user: run as root")
    import pwd

    entry = pwd.getpwnam(SERVICE_USER)
    root = Path(tempfile.mkdtemp(prefix="qmqpd-parity-"))
    root.chmod(0o755)
    try:
        create_queue(str(root / "queue"))
        keydir = root / "keys"
        path, _record = keys.keygen("example.org", "default", "rsa", 1024, str(keydir))
        (root / "run").mkdir()
        (root / "tcp.qmqp").write_text("127.:allow\n:deny\n")
        compile_rules(str(root / "tcp.qmqp"), str(root / "tcp.qmqp.cdb"))
        for owned in (root / "queue", keydir, root / "run", root / "tcp.qmqp.cdb"):
            _give(owned, entry.pw_uid, entry.pw_gid)
        yield Service(root, root / "queue", Path(path), root / "tcp.qmqp.cdb")
    finally:
        shutil.rmtree(root)


# ---- the cases a session plan does not cover: (settings, setting named, env) -------------

Case = Callable[[Service], tuple[dict[str, object], str]]


def root_without_user(s: Service) -> tuple[dict[str, object], str]:
    return {"user": ""}, "USER (user) from config file {config}: started as root with USER unset"


def unknown_user(s: Service) -> tuple[dict[str, object], str]:
    return {"user": "no-such-qmqpd-user"}, "USER (user) from config file"


def proxy_without_trusted(s: Service) -> tuple[dict[str, object], str]:
    return {"proxy_protocol": "v2"}, "PROXY_TRUSTED (proxy_trusted) from default: " \
        "PROXY_PROTOCOL is v2 but PROXY_TRUSTED is empty"


def localip_no_address(s: Service) -> tuple[dict[str, object], str]:
    return {"localip": "999.1.1.1"}, "LOCALIP (localip) from config file"


def metrics_on_the_qmqp_port(s: Service) -> tuple[dict[str, object], str]:
    port = free_port()
    return {"port": port, "metrics": f"127.0.0.1:{port}"}, "METRICS (metrics) from config file"


def metrics_on_a_wildcard_qmqp_port(s: Service) -> tuple[dict[str, object], str]:
    port = free_port()
    return ({"port": port, "localip": "0", "metrics": f"127.0.0.1:{port}"},
            "METRICS (metrics) from config file")


def key_unreadable_by_user(s: Service) -> tuple[dict[str, object], str]:
    private = s.root / "root-only-key"
    shutil.copy(s.key, private)
    os.chown(private, 0, 0)
    private.chmod(0o600)
    return {"dkimsign": str(private)}, f"DKIMSIGN (dkimsign) from config file {{config}}: " \
        f"key file {private}: Permission denied"


def percent_key_unreadable_by_user(s: Service) -> tuple[dict[str, object], str]:
    keys_root = s.root / "pkeys"
    (keys_root / "example.org").mkdir(parents=True, exist_ok=True)
    (keys_root / "example.net").mkdir(parents=True, exist_ok=True)
    keys_root.chmod(0o755)
    for domain in ("example.org", "example.net"):
        (keys_root / domain).chmod(0o755)
        shutil.copy(s.key, keys_root / domain / "s1")
        (keys_root / domain / "s1").chmod(0o600)
    os.chown(keys_root / "example.org" / "s1", *_nobody())
    os.chown(keys_root / "example.net" / "s1", 0, 0)  # this domain's key: root's only
    return {"dkimsign": str(keys_root / "%" / "s1")}, (
        f"DKIMSIGN (dkimsign) from config file {{config}}: key file "
        f"{keys_root / 'example.net' / 's1'}: Permission denied")


def rules_unreadable_by_user(s: Service) -> tuple[dict[str, object], str]:
    private = s.root / "root-only.cdb"
    shutil.copy(s.rules, private)
    os.chown(private, 0, 0)
    private.chmod(0o600)
    return {"rules": str(private)}, "RULES (rules) from config file {config}: unable to read"


def qmailqueue_not_executable_by_user(s: Service) -> tuple[dict[str, object], str]:
    program = s.root / "root-only-qmail-queue"
    program.write_text("#!/bin/sh\nexit 0\n")
    os.chown(program, 0, 0)
    program.chmod(0o700)
    return {"qmailqueue": str(program)}, (
        f"QMAILQUEUE (qmailqueue) from config file {{config}}: program {program} is not "
        "executable")


def status_dir_not_writable_by_user(s: Service) -> tuple[dict[str, object], str]:
    closed = s.root / "closed-run"
    closed.mkdir(exist_ok=True)
    closed.chmod(0o755)
    return {"status_file": str(closed / "status.json")}, "STATUS_FILE (status_file) from config"


def min_free_above_the_disk(s: Service) -> tuple[dict[str, object], str]:
    return {"min_free": 10**18}, "MIN_FREE (min_free) from config file {config}: " \
        "1000000000000000000 bytes, but the filesystem of"


def soft_mem_below_a_worker(s: Service) -> tuple[dict[str, object], str]:
    return {"soft_mem": 1000000}, "SOFT_MEM (soft_mem) from config file {config}: 1000000 " \
        "bytes is below what a worker needs"


def bad_value(s: Service) -> tuple[dict[str, object], str]:
    return {"maxdaemons": 0}, "MAXDAEMONS (maxdaemons) from config file {config}: bad value 0"


def _nobody() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


SERVICE_CASES: list[Case] = [
    root_without_user, unknown_user, proxy_without_trusted, localip_no_address,
    metrics_on_the_qmqp_port, metrics_on_a_wildcard_qmqp_port, key_unreadable_by_user,
    percent_key_unreadable_by_user, rules_unreadable_by_user,
    qmailqueue_not_executable_by_user, status_dir_not_writable_by_user,
    min_free_above_the_disk, soft_mem_below_a_worker, bad_value,
]


def verdicts(config: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str],
                                                           subprocess.CompletedProcess[str]]:
    checked = subprocess.run([*command("qmqpd"), "check", "--config", str(config)], env=env,
                             capture_output=True, text=True, timeout=WAIT, cwd=config.parent)
    served = subprocess.run([*command("qmqpd"), "serve", "--config", str(config)], env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=WAIT, cwd=config.parent)
    return checked, served


def assert_both_refuse(config: Path, expected: str, env: dict[str, str]) -> None:
    checked, served = verdicts(config, env)
    assert (checked.returncode, served.returncode) == (111, 111), (checked.stderr,
                                                                   served.stderr)
    assert f"qmqpd check: {expected}" in checked.stderr, checked.stderr
    refusal = [line for line in unescaped(served.stderr).splitlines()
               if 'msg="cannot start"' in line]
    assert len(refusal) == 1 and expected in refusal[0], served.stderr


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: c.__name__)
def test_plan_cases_get_the_same_verdict(world: World, case: Callable, tmp_path: Path) -> None:
    settings, expected = case(world)
    config = tmp_path / "qmqpd.toml"
    config.write_text(toml_text({**world.base(), **settings}))
    assert_both_refuse(config, expected.format(config=config), clean_env())


@pytest.mark.parametrize("case", SERVICE_CASES, ids=lambda c: c.__name__)
def test_service_cases_get_the_same_verdict(service: Service, case: Case,
                                            tmp_path: Path) -> None:
    settings, expected = case(service)
    config = tmp_path / "qmqpd.toml"
    config.write_text(toml_text({**service.base(), **settings}))
    env = clean_env()
    if case is root_without_user:
        env.pop("ALLOW_ROOT")
    assert_both_refuse(config, expected.format(config=config), env)


def served(service: Service, tmp_path: Path, **settings: object) -> ServeProcess:
    """`qmqpd serve` on the service's world (not started yet; its config is written)."""
    base = {key: value for key, value in service.base().items() if key != "port"}
    return ServeProcess(tmp_path, environ=clean_env(), **{**base, **settings})


def test_the_good_service_passes_both(service: Service, tmp_path: Path) -> None:
    """The base of the cases is good: check says ok, serve starts as the user."""
    server = served(service, tmp_path, soft_mem=1 << 30)
    config = server.config_path
    checked = subprocess.run([*command("qmqpd"), "check", "--config", str(config)],
                             env=clean_env(), capture_output=True, text=True, timeout=WAIT)
    assert checked.returncode == 0 and checked.stdout.startswith("ok:"), checked.stderr
    try:
        server.start()
        status = service.root / "run" / "status.json"
        wait_until(status.exists, what="the status file")
        info = status.stat()
        assert (info.st_mode & 0o777, info.st_uid) == (0o640, _nobody()[0])
        assert info.st_gid == _nobody()[1]
    finally:
        server.stop()


def test_clamd_not_answering_is_a_warning_in_both(service: Service, tmp_path: Path) -> None:
    missing = tmp_path / "no-clamd.sock"
    server = served(service, tmp_path, qhpsi="1", clamd_socket=str(missing))
    config = server.config_path
    checked = subprocess.run([*command("qmqpd"), "check", "--config", str(config)],
                             env=clean_env(), capture_output=True, text=True, timeout=WAIT)
    expected = f"QHPSI (qhpsi) from config file {config}: clamd at {missing} does not answer"
    assert checked.returncode == 0, checked.stderr
    assert f"qmqpd check: warning: {expected}" in checked.stderr
    try:
        server.start()  # it listens: the warning did not stop it
        assert expected in unescaped(server.log()), server.log()
        assert "event=warning" in server.log()
    finally:
        server.stop()
