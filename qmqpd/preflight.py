"""The checks of a whole server configuration that no session plan covers, and the run of
the plan checks as the service's user: what `qmqpd serve` refuses to start with, which
`qmqpd check` reports in the same words.

`server_problems` runs where `serve` starts (usually root), before it binds: root without
USER (unless ALLOW_ROOT), USER/GROUP and PROXY_SOCKET_USER/_GROUP that do not exist,
PROXY_PROTOCOL without PROXY_TRUSTED, METRICS on the address and port the server listens
on. `as_service_user` runs a check in a forked child that drops to USER/GROUP exactly as
the master does before it plans, so file access (queues, keys, the rules cdb, QMAILQUEUE,
the status directory) is tested with the service's credentials. Called by cli; never
binds, never writes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

from qmqpd import procctl, proxy
from qmqpd.address import split_host_port
from qmqpd.config import Config, ConfigError, problem

# What a check run as the service's user hands back: (plans made or None, problems, warnings)
Outcome = tuple["int | None", list[ConfigError], list[str]]


def server_problems(cfg: Config) -> list[ConfigError]:
    found: list[ConfigError] = []
    if os.geteuid() == 0 and not cfg.user and not cfg.allow_root:
        found.append(problem("USER", cfg.source("USER"),
                             "started as root with USER unset: set USER (and GROUP) to the "
                             "queue's owner, e.g. qmailq, or ALLOW_ROOT=1 to run as root on "
                             "purpose"))
    try:
        procctl.identity(cfg.user, cfg.group)
    except procctl.ProcError as error:
        found.append(problem(error.setting, cfg.source(error.setting), str(error)))
    if cfg.proxy_socket:  # the socket's owner and group: the master chowns it at start
        try:
            procctl.identity(cfg.proxy_socket_user, cfg.proxy_socket_group)
        except procctl.ProcError as error:
            setting = f"PROXY_SOCKET_{error.setting}"
            found.append(problem(setting, cfg.source(setting),
                                 str(error).replace(error.setting, setting, 1)))
    try:
        proxy.Policy.from_config(cfg)
    except ConfigError as error:  # already names its setting and source
        found.append(error)
    except ValueError as error:
        setting = "PROXY_TRUSTED" if cfg.proxy_protocol != "off" else "PROXY_PROTOCOL"
        found.append(problem(setting, cfg.source(setting), str(error)))
    clash = _metrics_clash(cfg)
    if clash:
        found.append(problem("METRICS", cfg.source("METRICS"), clash))
    return found


def _metrics_clash(cfg: Config) -> str | None:
    """METRICS on a port and address the QMQP listener takes (a wildcard takes all)."""
    import ipaddress

    if not cfg.metrics:
        return None
    host, port = split_host_port(cfg.metrics)
    if port != cfg.port:
        return None
    metrics_ip = ipaddress.ip_address(host)
    for address in cfg.localip:
        listen_ip = ipaddress.ip_address(address.split("%")[0])
        if metrics_ip == listen_ip or metrics_ip.is_unspecified or listen_ip.is_unspecified:
            return (f"{cfg.metrics} is where the server listens (LOCALIP {address}, PORT "
                    f"{cfg.port}): give the metrics another port")
    return None


def as_service_user(cfg: Config, check: Callable[[Config], Outcome]) -> Outcome:
    """`check(cfg)` in a forked child dropped to USER/GROUP as the master drops; without
    either it runs as this process. A failed drop is the problem `serve` would meet."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 0
        try:
            try:
                procctl.drop_privileges(cfg.user, cfg.group)
                plans, problems, warnings = check(cfg)
            except procctl.ProcError as error:
                plans, problems, warnings = None, [problem(
                    error.setting, cfg.source(error.setting), str(error))], []
                if error.missing:  # no one to test as: the rest as we are
                    _plans, more, warnings = check(cfg)
                    problems += [p for p in more if str(p) != str(problems[0])]
            except ConfigError as error:
                plans, problems, warnings = None, [error], []
            data = {"plans": plans, "warnings": warnings,
                    "problems": [[str(p), p.setting, p.source] for p in problems]}
            with os.fdopen(write_end, "w") as pipe:
                json.dump(data, pipe)
        except BaseException as error:  # the parent reports a child that failed, and why
            code = 1
            with contextlib.suppress(OSError), os.fdopen(write_end, "w") as pipe:
                json.dump({"crash": f"{type(error).__name__}: {error}"}, pipe)
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _pid, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not text:
        who = cfg.user or str(os.geteuid())
        try:
            why = ": " + json.loads(text)["crash"]
        except (ValueError, KeyError, TypeError):
            why = ""
        return None, [problem("USER", cfg.source("USER"),
                              f"the check could not run as user {who}{why}")], []
    data = json.loads(text)
    problems = [ConfigError(message, setting, source)
                for message, setting, source in data["problems"]]
    return data["plans"], problems, list(data["warnings"])
