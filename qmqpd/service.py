"""`qmqpd service`: supervised service directories and systemd units, like `svctool --qmqp`.

A daemontools/runit service is `run` (`qmqpd serve --envdir ./variables`: the server reads
its settings itself, at start and on every HUP), a `variables/` envdir holding one file per
setting, `log/run` (multilog), `.options` (the command line that made it) and a `down` file
unless asked to start it. The systemd unit carries the same settings as Environment= lines
(USER and GROUP as User=/Group=). Called by `qmqpd service`; never touches a running
server except to stop it on --rmsvc.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import pwd
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Template

from qmqpd import config as config_mod
from qmqpd.errors import PermanentError
from qmqpd.fsio import replace_file

SERVICE_PREFIX = "qmqpd"
DEFAULT_LOG_BASE = "/var/log"
DEFAULT_KEY_PATTERN = "domainkeys/%/default"


def templates() -> Traversable:
    """The service templates: package data of an installed qmqpd (wheel, sdist, Debian
    package), or packaging/ beside the package in a source checkout."""
    candidates: list[Traversable] = [
        importlib.resources.files("qmqpd") / "packaging",
        Path(__file__).resolve().parent.parent / "packaging",
    ]
    for candidate in candidates:
        if candidate.joinpath("systemd", "qmqpd.service").is_file():
            return candidate
    raise FileNotFoundError("qmqpd's packaging templates are not installed "
                            "(looked in " + ", ".join(map(str, candidates)) + ")")


def _render(name: str, **values: str) -> str:
    template = templates().joinpath(*name.split("/")).read_text(encoding="utf-8")
    return Template(template).substitute(values)


class ServiceError(PermanentError):
    """A bad option or a directory that cannot be written; the text says which."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qmqpd service",
        description="write a supervised qmqpd service (svctool --qmqp options)",
    )
    p.add_argument("action", choices=("create",), nargs="?", default="create")
    p.add_argument("--qmqp", type=int, required=True, metavar="PORT", help="port (service name)")
    p.add_argument("--servicedir", default="/etc/service",
                   help="where the service directory goes (Debian svscan: /etc/service)")
    p.add_argument("--servicetag", help="service name instead of qmqpd.PORT")
    p.add_argument("--qbase", help="QUEUE_BASE: directory of the queueN queues")
    p.add_argument("--qcount", type=int, help="QUEUE_COUNT")
    p.add_argument("--qstart", type=int, help="QUEUE_START")
    p.add_argument("--queuedir", help="QUEUEDIR: one queue instead of qbase/qcount/qstart")
    p.add_argument("--cntrldir", default="/etc/qmqpd",
                   help="control directory (relative: under /etc/qmqpd); rules and keys live here")
    p.add_argument("--localip", default="0", help="LOCALIP (0 = all IPv4, :: = all)")
    p.add_argument("--maxdaemons", type=int, help="MAXDAEMONS")
    p.add_argument("--maxperip", type=int, help="MAXPERIP")
    p.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=None,
                   help="USE_FSYNC (on unless --no-fsync)")
    p.add_argument("--syncdir", action=argparse.BooleanOptionalAction, default=None,
                   help="USE_SYNCDIR (on unless --no-syncdir)")
    p.add_argument("--memory", type=int, help="SOFT_MEM: bytes per worker")
    p.add_argument("--min-free", type=int, help="MIN_FREE: bytes")
    p.add_argument("--rules", help="RULES: the access-rules cdb (default CNTRLDIR/tcp.qmqp.cdb)")
    p.add_argument("--user", help="USER to run as after binding")
    p.add_argument("--group", help="GROUP to run as after binding")
    p.add_argument("--virus-filter", "--qhpsi", dest="virus", nargs="?", const="",
                   metavar="CLAMD_SOCKET", help="scan with clamd (QHPSI=1[, CLAMD_SOCKET])")
    p.add_argument("--dksign", "--dkfilter", dest="dksign", nargs="?", const=DEFAULT_KEY_PATTERN,
                   metavar="KEY", help="DomainKeys signing (DKSIGN, %% = domain)")
    p.add_argument("--dkimsign", nargs="?", const=DEFAULT_KEY_PATTERN, metavar="KEY",
                   help="DKIM signing (DKIMSIGN, %% = domain)")
    p.add_argument("--dkimverify", nargs="?", const="", metavar="LETTERS",
                   help="DKIM verification (DKIMVERIFY result letters to refuse)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other setting, written to variables/NAME")
    p.add_argument("--supervisor", choices=("daemontools", "runit"), default="daemontools")
    p.add_argument("--logdir", help="multilog directory (default /var/log/qmqpd.PORT)")
    p.add_argument("--loguser", help="run multilog as this user (setuidgid)")
    p.add_argument("--up", action="store_true", help="no down file: start when supervised")
    p.add_argument("--rmsvc", action="store_true", help="remove the service instead")
    p.add_argument("--systemd", metavar="UNIT_FILE",
                   help="write a systemd unit with the same settings instead")
    p.add_argument("--qmqpd", default=None, help="path of the qmqpd program to run")
    return p


def _control_path(cntrldir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(cntrldir, path)


def settings_from_options(opts: argparse.Namespace) -> dict[str, str]:
    """The variables/ files: setting name -> value, only what the options say."""
    cntrldir = _control_path("/etc/qmqpd", opts.cntrldir)
    values: dict[str, str] = {
        "PORT": str(opts.qmqp),
        "LOCALIP": opts.localip,
        "CONTROLDIR": cntrldir,
        "RULES": opts.rules or os.path.join(cntrldir, "tcp.qmqp.cdb"),
        # One status file per service, read by `qmqpd status --envdir variables`.
        "STATUS_FILE": f"/run/{_service_name(opts)}/status.json",
    }
    optional = {
        "QUEUEDIR": opts.queuedir,
        "QUEUE_BASE": opts.qbase,
        "QUEUE_COUNT": opts.qcount,
        "QUEUE_START": opts.qstart,
        "MAXDAEMONS": opts.maxdaemons,
        "MAXPERIP": opts.maxperip,
        "SOFT_MEM": opts.memory,
        "MIN_FREE": opts.min_free,
        "USER": opts.user,
        "GROUP": opts.group,
    }
    values.update({name: str(v) for name, v in optional.items() if v is not None})
    for name, flag in (("USE_FSYNC", opts.fsync), ("USE_SYNCDIR", opts.syncdir)):
        if flag is not None:
            values[name] = "1" if flag else "0"
    if opts.virus is not None:
        values["QHPSI"] = "1"
        if opts.virus:
            values["CLAMD_SOCKET"] = opts.virus
    if opts.dksign is not None:
        values["DKSIGN"] = _control_path(cntrldir, opts.dksign)
    if opts.dkimsign is not None:
        values["DKIMSIGN"] = _control_path(cntrldir, opts.dkimsign)
    if opts.dkimverify is not None:
        values["DKIMVERIFY"] = opts.dkimverify
    for item in opts.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ServiceError(f"--set wants NAME=VALUE, not {item!r}")
        values[name] = value
    if not (values.get("QUEUEDIR") or values.get("QUEUE_BASE")):
        raise ServiceError("give --qbase (with --qcount/--qstart) or --queuedir")
    return values


def validate(values: Mapping[str, str]) -> None:
    """Every value must be one `qmqpd serve` accepts, before anything is written."""
    unknown = sorted(set(values) - set(config_mod.SETTINGS) - {"CONTROLDIR"})
    if unknown:
        raise ServiceError("unknown settings: " + ", ".join(unknown))
    try:
        config_mod.load(envdir={name: (value, f"variables/{name}")
                                for name, value in values.items()})
    except config_mod.ConfigError as error:
        raise ServiceError(str(error)) from None


def _qmqpd_program(explicit: str | None) -> str:
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "qmqpd"
    return str(beside) if beside.exists() else (shutil.which("qmqpd") or "qmqpd")


def _write(path: Path, text: str, mode: int) -> None:
    """Write atomically: a half-written run script must never be executed by supervise."""
    replace_file(str(path), text.encode(), mode)


def _service_name(opts: argparse.Namespace) -> str:
    return opts.servicetag or f"{SERVICE_PREFIX}.{opts.qmqp}"


def create_service(opts: argparse.Namespace, argv: Sequence[str]) -> Path:
    values = settings_from_options(opts)
    validate(values)
    # multilog runs as the log user: it must own its directory to write and rotate there.
    log_owner = _log_owner(opts.loguser) if opts.loguser and os.geteuid() == 0 else None
    name = _service_name(opts)
    service = Path(opts.servicedir) / name
    qmqpd = _qmqpd_program(opts.qmqpd)
    logdir = opts.logdir or os.path.join(DEFAULT_LOG_BASE, name)
    runit = opts.supervisor == "runit"
    tools = {
        "chpst": shutil.which("chpst") or "chpst",
        "multilog": shutil.which("multilog") or "multilog",
    }
    setuidgid = ""
    if opts.loguser:
        setuidgid = (f"{tools['chpst']} -u {opts.loguser} " if runit
                     else f"{shutil.which('setuidgid') or 'setuidgid'} {opts.loguser} ")
    (service / "log").mkdir(parents=True, exist_ok=True)
    variables = service / "variables"
    variables.mkdir(exist_ok=True)
    for old in variables.iterdir():
        if not old.name.startswith("."):
            old.unlink()
    for key, value in values.items():
        _write(variables / key, value + "\n", 0o644)
    _write(variables / ".options", shlex.join(["qmqpd", "service", *argv]) + "\n", 0o644)
    if not opts.up:
        (service / "down").touch()
    elif (service / "down").exists():
        (service / "down").unlink()
    kind = "runit" if runit else "daemontools"
    common = {"service": name, "qmqpd": shlex.quote(qmqpd), "logdir": shlex.quote(logdir),
              "setuidgid": setuidgid, **tools}
    # The log service is written first, so supervise never runs the server unlogged.
    _write(service / "log" / "run", _render(f"{kind}/log-run", **common), 0o755)
    _write(service / "run", _render(f"{kind}/run", **common), 0o755)
    os.makedirs(logdir, exist_ok=True)
    if log_owner is not None:
        os.chown(logdir, *log_owner)
    return service


def _log_owner(user: str) -> tuple[int, int]:
    """(uid, gid) of --loguser, checked before anything is written."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ServiceError(f"--loguser {user}: no such user") from None
    return entry.pw_uid, entry.pw_gid


def remove_service(opts: argparse.Namespace, wait: float = 90.0) -> Path:
    """Stop the server, then its logger, wait for both supervisors to exit, then remove
    the directory (svctool's order). It is first renamed to a dot name, which svscan
    skips, so svscan does not start it again meanwhile."""
    service = Path(opts.servicedir) / _service_name(opts)
    if not service.is_dir():
        raise ServiceError(f"no service at {service}")
    hidden = service.with_name(f".{service.name}.removing")
    os.rename(service, hidden)
    try:
        for path in (hidden, hidden / "log"):
            if _supervised(path):
                _control(path, b"dx")  # down, then exit: daemontools supervise and runsv
                _wait_gone(path, wait)
    except BaseException:
        os.rename(hidden, service)
        raise
    shutil.rmtree(hidden)
    return service


def _supervised(path: Path) -> bool:
    """True while a supervise (or runsv) runs for path: it holds supervise/ok open."""
    try:
        fd = os.open(path / "supervise" / "ok", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


def _control(path: Path, commands: bytes) -> None:
    fd = os.open(path / "supervise" / "control", os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, commands)
    finally:
        os.close(fd)


def _wait_gone(path: Path, wait: float) -> None:
    import time

    deadline = time.monotonic() + wait
    while _supervised(path):
        if time.monotonic() > deadline:
            raise ServiceError(f"{path}: still supervised after {wait:.0f}s; not removed")
        time.sleep(0.1)


def systemd_unit(opts: argparse.Namespace) -> str:
    values = settings_from_options(opts)
    validate(values)
    writable = sorted({values.get("QUEUEDIR") or values["QUEUE_BASE"]})
    # USER and GROUP are never read from the process environment (systemd's User= sets
    # $USER itself): systemd starts the server as that user, with the one capability it
    # needs to bind a low port.
    identity = _systemd_identity(values.get("USER", ""), values.get("GROUP", ""))
    environment = "\n".join(
        f'Environment="{key}={value}"' for key, value in values.items()
        if key not in ("USER", "GROUP")
    )
    environment = "\n".join(filter(None, (identity, environment)))
    caps = ("CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_CHOWN "
            "CAP_FOWNER CAP_DAC_OVERRIDE CAP_KILL")
    return _render(
        "systemd/qmqpd.service",
        service=_service_name(opts),
        port=str(opts.qmqp),
        environment=environment,
        qmqpd=_qmqpd_program(opts.qmqpd),
        writable=" ".join(writable),
        capabilities=caps,
    )


def _systemd_identity(user: str, group: str) -> str:
    """User=/Group= (and SupplementaryGroups= for a GROUP list) of the unit."""
    lines = []
    if user:
        lines.append(f"User={user}")
    groups = [g.strip() for g in group.split(",") if g.strip()]
    if groups:
        lines.append(f"Group={groups[0]}")
    if groups[1:]:
        lines.append("SupplementaryGroups=" + " ".join(groups[1:]))
    if lines:
        lines.append("AmbientCapabilities=CAP_NET_BIND_SERVICE")
    return "\n".join(lines)


# What `qmqpd check` finds in a written service: (problems, warnings).
Checker = Callable[[Path, Mapping[str, str]], tuple[list[config_mod.ConfigError], list[str]]]


def fix_for(error: config_mod.ConfigError, values: Mapping[str, str]) -> str:
    """The command that fixes a problem of a service just written, when one is known."""
    text = str(error)
    setting = error.setting
    if setting in ("QUEUEDIR", "QUEUE_BASE", "SPLIT") or "cannot write queue" in text:
        return "qmqpd queue create " + " ".join(shlex.quote(p) for p in _queues(values))
    if setting == "RULES":
        cdb = values.get("RULES", "")
        source = cdb[:-4] if cdb.endswith(".cdb") else cdb + ".txt"
        return f"qmqpd rules compile {shlex.quote(source)} {shlex.quote(cdb)}"
    if setting == "USER" and "no such user" in text:
        group = values.get("GROUP", "").split(",")[0]
        return ("useradd --system --no-create-home --shell /usr/sbin/nologin "
                + (f"--gid {shlex.quote(group)} " if group else "")
                + shlex.quote(values.get("USER", "")))
    if setting == "GROUP" and "no such group" in text:
        return "groupadd --system " + shlex.quote(values.get("GROUP", "").split(",")[0])
    if setting == "USER" and "started as root" in text:
        return "qmqpd service create ... --user=qmailq --group=qmail (or --set=ALLOW_ROOT=1)"
    if setting in ("DKIMSIGN", "DKSIGN", "DKIMKEY", "DKKEY") and "does not exist" in text:
        return "qmqpd dkim keygen --domain DOMAIN --selector SELECTOR" + (
            f" --user {shlex.quote(values['USER'])}" if values.get("USER") else "")
    return ""


def _queues(values: Mapping[str, str]) -> list[str]:
    if values.get("QUEUEDIR"):
        return [values["QUEUEDIR"]]
    start = int(values.get("QUEUE_START", "1"))
    count = int(values.get("QUEUE_COUNT", "1"))
    return [os.path.join(values["QUEUE_BASE"], f"queue{n}") for n in range(start, start + count)]


def report(service: Path, values: Mapping[str, str], checker: Checker) -> int:
    """Check the service as `serve` will read it; each problem with its fix. 0 = fine."""
    problems, warnings = checker(service, values)
    for warning in warnings:
        print(f"qmqpd service: warning: {warning}", file=sys.stderr)
    for found in problems:
        fix = fix_for(found, values)
        print(f"qmqpd service: {found}" + (f"\n  fix: {fix}" if fix else ""), file=sys.stderr)
    if problems:
        again = (f"`qmqpd check --envdir {service / 'variables'}`" if service.is_dir()
                 else "`systemctl start` it")
        print(f"qmqpd service: {service} written, but `qmqpd serve` would refuse to start "
              f"({len(problems)} problem(s)); fix them, then {again}", file=sys.stderr)
        return 111
    return 0


def main(argv: Sequence[str], checker: Checker | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        if opts.rmsvc:
            print(f"removed {remove_service(opts)}")
        elif opts.systemd:
            unit = systemd_unit(opts)
            _write(Path(opts.systemd), unit, 0o644)
            print(f"wrote {opts.systemd}")
            if checker is not None:
                return report(Path(opts.systemd), settings_from_options(opts), checker)
        else:
            service = create_service(opts, argv)
            state = "up" if opts.up else "down (remove the down file or `svc -u` to start)"
            print(f"created {service}, {state}")
            if checker is not None:
                return report(service, settings_from_options(opts), checker)
    except ServiceError as error:
        print(f"qmqpd service: {error}", file=sys.stderr)
        return error.exit_code  # 100: the options must change
    except OSError as error:  # a file or directory that cannot be written: try again
        print(f"qmqpd service: {error}", file=sys.stderr)
        return 111
    return 0
