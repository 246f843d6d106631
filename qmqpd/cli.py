"""The command line: `qmqpd` serve, session, check, config, rules, queue, service, status, dkim.

Subcommands import what they need lazily: `qmqpd session` runs once per connection under
tcpserver, so its start-up must stay small.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING

from qmqpd import config as config_mod

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from qmqpd.injector import Writer
    from qmqpd.plan import PlanBook
    from qmqpd.queue import QueuedMessage, QueueStats

# `qmqpd serve` with no --config: a working server for a first look, on an unprivileged
# port, a queue under ./var/queue and loopback-only access (no rules file).
EMBEDDED_DEFAULTS = {
    "LOCALIP": "127.0.0.1",
    "PORT": 6280,
    "QUEUEDIR": "./var/queue",
    "STATUS_FILE": "./var/status.json",
}


def _fail(message: str, code: int = 111) -> int:
    print(f"qmqpd: {message}", file=sys.stderr)
    return code


def _embedded(args: argparse.Namespace,
              envdir: dict[str, config_mod.EnvdirEntry]) -> dict[str, object] | None:
    """Embedded defaults apply without --config; the queue only if neither the process
    environment nor the envdir names one."""
    if args.config:
        return None
    defaults = dict(EMBEDDED_DEFAULTS)
    names = ("QUEUEDIR", "QUEUE_BASE", "QMAILQUEUE")
    if (any(os.environ.get(name) for name in names)
            or any(envdir.get(name, (None, ""))[0] for name in names)):
        del defaults["QUEUEDIR"]
    return defaults


def _load(args: argparse.Namespace, embedded: bool = False) -> config_mod.Config:
    """The settings as `serve` reads them: embedded defaults (without --config), the
    config file, the process environment, then the --envdir (read again on every call, so
    a HUP sees the files as they are now)."""
    envdir_path = getattr(args, "envdir", None)
    envdir = config_mod.read_envdir(envdir_path) if envdir_path else {}
    return config_mod.load(args.config, os.environ,
                           defaults=_embedded(args, envdir) if embedded else None,
                           envdir=envdir)


def _ignored_note() -> str | None:
    """One line naming the settings the process environment has and that are ignored."""
    ignored = config_mod.ignored_in_environment(os.environ)
    if not ignored:
        return None
    names = ", ".join(ignored)
    return (f"{names} in the process environment ignored (a login shell or sudo sets "
            f"them); set {names} in the config file or the envdir")


def cmd_session(args: argparse.Namespace) -> int:
    # Only what this one connection needs: the plan imports the stage modules it uses.
    from qmqpd.plan import PlanBook
    from qmqpd.session import run_session

    return run_session(PlanBook(_load(args)))


def _writer(cfg: config_mod.Config) -> tuple[Writer | None, list[config_mod.ConfigError]]:
    """Who the workers run as (USER/GROUP, as the master drops to them): the identity the
    queues must be writable by."""
    from qmqpd import procctl
    from qmqpd.injector import Writer

    if not cfg.user and not cfg.group:
        return Writer.current(), []
    try:
        uid, _primary, gids, name = procctl.identity(cfg.user, cfg.group)
    except procctl.ProcError as error:
        setting = error.setting
        return None, [config_mod.problem(setting, cfg.source(setting), str(error))]
    uid = os.geteuid() if uid < 0 else uid
    return Writer(uid, tuple(gids), name or str(uid)), []


def plan_all(cfg: config_mod.Config) -> tuple[PlanBook | None, list[config_mod.ConfigError]]:
    """The validation `serve` runs at start, on HUP and when the rules cdb changes, and
    `qmqpd check` prints: the workers' user, the rules cdb, then the plan of the base
    settings and of every allowing rule's env."""
    from qmqpd import plan, rules

    writer, problems = _writer(cfg)
    envs: list[tuple[str, dict[str, str | None]]] = []
    if cfg.rules:
        try:
            envs = rules.rule_envs(cfg.rules)
        except rules.RulesError as error:
            problems.append(config_mod.problem("RULES", cfg.source("RULES"), str(error)))
    problems += _process_problems(cfg)
    if writer is None:
        return None, problems
    book, found = plan.check_all(cfg, envs, writer, cfg.rules)
    return book, problems + found


def _process_problems(cfg: config_mod.Config) -> list[config_mod.ConfigError]:
    """What the master and its workers need of this process, tested where they run: a
    SOFT_MEM a worker can live in (measured), a status directory the master can write."""
    from qmqpd import procctl

    found = []
    if cfg.soft_mem:
        floor = procctl.memory_floor()
        if cfg.soft_mem < floor:
            found.append(config_mod.problem(
                "SOFT_MEM", cfg.source("SOFT_MEM"),
                f"{cfg.soft_mem} bytes is below what a worker needs ({floor} bytes measured: "
                f"its modules, {procctl.WORKER_THREADS} threads and a session's buffers); "
                f"set it to {floor} or more, or 0 for no cap"))
    if cfg.status_file:
        directory = os.path.dirname(os.path.abspath(cfg.status_file))
        if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK):
            found.append(config_mod.problem(
                "STATUS_FILE", cfg.source("STATUS_FILE"),
                f"user {os.geteuid()} cannot write {directory}: give it to the service's "
                f"user or name another STATUS_FILE"))
    return found


def planner(cfg: config_mod.Config) -> PlanBook:
    """The plans of cfg, or PlanError listing every problem (the master's planner, at
    start, on HUP and when the rules cdb changes); warnings are logged."""
    from qmqpd import log
    from qmqpd.plan import PlanError

    book, problems = plan_all(cfg)
    if problems or book is None:
        raise PlanError(problems)
    for warning in book.warnings:
        log.warning(warning)
    return book


def _preloaded() -> None:
    """Every module the check needs and a worker has, loaded as `serve` loads them before
    it drops privileges (the interpreter's own files may be out of the user's reach) and
    forks (what the SOFT_MEM floor is measured with)."""
    import glob  # noqa: F401  (keys under a `%` path)
    import json  # noqa: F401  (the child's report)

    from qmqpd import injector, master, plan, rules, worker  # noqa: F401
    from qmqpd.filters import keys, pipeline  # noqa: F401

    pipeline.preload()


def _checked_as_user(cfg: config_mod.Config) -> tuple[int | None, list[config_mod.ConfigError],
                                                       list[str]]:
    book, problems = plan_all(cfg)
    return (None if book is None else len(book)), problems, list(book.warnings if book else [])


def validate(cfg: config_mod.Config) -> tuple[int | None, list[config_mod.ConfigError],
                                              list[str]]:
    """`qmqpd check`: what `serve` checks before it binds, then the plans as the service's
    user (a forked child that drops to USER/GROUP as the master does)."""
    from qmqpd import preflight

    problems = preflight.server_problems(cfg)
    _preloaded()
    plans, found, warnings = preflight.as_service_user(cfg, _checked_as_user)
    seen = {str(p) for p in problems}
    return plans, problems + [p for p in found if str(p) not in seen], warnings


def _creates_embedded_queue(cfg: config_mod.Config) -> bool:
    """`serve` without --config lays out its embedded queue when it is not there yet."""
    return (cfg.source("QUEUEDIR") == "embedded defaults"
            and not os.path.isdir(os.path.join(cfg.queuedir, "todo")))


def cmd_serve(args: argparse.Namespace) -> int:
    from qmqpd import log, master, queue, worker

    try:
        cfg = _load(args, embedded=True)
    except config_mod.ConfigError as error:
        log.error("cannot start", error=str(error))
        return 111
    note = _ignored_note()
    if note:
        log.warning(note)
    from qmqpd import preflight

    refused = preflight.server_problems(cfg)
    if refused:
        log.error("cannot start", error="; ".join(str(p) for p in refused))
        return 111
    if _creates_embedded_queue(cfg):
        queue.create_queue(cfg.queuedir, split=cfg.split, todo_layout=cfg.todo_layout)

    def reload() -> config_mod.Config:
        # the config file and the envdir as they are now: HUP applies variables/ edits
        return _load(args, embedded=True)

    # Everything the plans and workers use, loaded before the privilege drop (the
    # interpreter's files may be out of the user's reach) and shared by the workers.
    _preloaded()
    return master.run(cfg, worker.worker_main, reload, planner)


def cmd_check(args: argparse.Namespace) -> int:
    """`qmqpd check`: the validation of start and HUP, each problem on its own line."""
    try:
        cfg = _load(args, embedded=True)
    except config_mod.ConfigError as error:
        print(f"qmqpd check: {error}", file=sys.stderr)
        return _fail("1 problem(s); `qmqpd serve` would refuse to start")
    note = _ignored_note()
    if note:
        print(f"qmqpd check: note: {note}", file=sys.stderr)
    plans, problems, warnings = validate(cfg)
    if _creates_embedded_queue(cfg):  # as serve would: not a problem, said as a note
        problems = [p for p in problems if p.setting != "QUEUEDIR"]
        print(f"note: `qmqpd serve` creates the queue {cfg.queuedir} (embedded defaults)")
    for warning in warnings:
        print(f"qmqpd check: warning: {warning}", file=sys.stderr)
    for found in problems:
        print(f"qmqpd check: {found}", file=sys.stderr)
    if problems or plans is None:
        return _fail(f"{len(problems)} problem(s); `qmqpd serve` would refuse to start")
    rules = f", {cfg.rules}" if cfg.rules else ""
    where = " + ".join(filter(None, (args.config, args.envdir))) or "built-in defaults"
    print(f"ok: {plans} session plan(s) from {where}{rules}")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from qmqpd import rules

    if args.rules_command == "compile":
        try:
            count = rules.compile_rules(args.text, args.cdb)
        except rules.RulesError as error:
            return _fail(str(error), error.exit_code)  # 100, tcprules' code for bad input
        except OSError as error:  # a file that cannot be read or written: 111, as tcprules
            return _fail(f"{error.filename or args.cdb}: {error.strerror or error}")
        print(f"{args.cdb}: {count} keys")
        return 0
    cdb = args.rules or _load(args, embedded=True).rules
    if not cdb:
        return _fail("no rules cdb: give --rules or set RULES (without one, serve allows "
                     "loopback only)", 100)
    try:
        sys.stdout.write(rules.check(cdb, args.ip, host=args.host, info=args.info))
    except (rules.RulesError, OSError) as error:
        return _fail(f"fatal: unable to read {cdb}: {error}")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from qmqpd import queue

    cfg = _load(args, embedded=True)  # no --config: serve's queue, ./var/queue
    from qmqpd.injector import queue_paths

    paths = args.dirs or queue_paths(cfg)
    if not paths:
        return _fail("no queue given: name a directory, or set QUEUEDIR or QUEUE_BASE", 100)
    if args.queue_command == "create":
        for path in paths:
            try:
                owners = queue.create_queue(path, split=cfg.split, todo_layout=cfg.todo_layout)
            except queue.QueueSetupError as error:
                return _fail(str(error), error.exit_code)
            print(f"created {path} (owners: {owners.source})")
        return 0
    for path in paths:
        try:
            layout = queue.reader_layout(path)
            if args.queue_command == "list":
                for item in queue.list_messages(path, split=layout.split,
                                                todo_layout=layout.todo_layout):
                    print(_listing_line(path, item))
            else:
                stats = queue.stat_queue(path, split=layout.split,
                                         todo_layout=layout.todo_layout)
                print(_stat_line(path, stats) + _backlog_fields(cfg, path))
        except queue.NotAQueue as error:
            return _fail(str(error), error.exit_code)
        except queue.QueueUnreadable as error:
            return _fail(f"cannot read queue {error}", error.exit_code)
        except OSError as error:  # a file or directory inside the queue
            return _fail(f"cannot read queue {path}: {error.filename}: {error.strerror}")
    return 0


# Bytes of an envelope shown as themselves: printable UTF-8 other than the listing's own
# separators (space between fields, comma between recipients) and the backslash.
_SEPARATORS = frozenset(" ,\\")


def _text(value: bytes | None) -> str:
    """An envelope address for one listing line: control characters, separators and
    bytes that are not UTF-8 as \\xNN, so a client cannot forge a line or send escapes."""
    if value is None:
        return "?"
    if not value:
        return "<>"
    text = value.decode("utf-8", "surrogateescape")
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char in _SEPARATORS or not char.isprintable():
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def _listing_line(path: str, item: QueuedMessage) -> str:
    fields = [
        path,
        str(item.id),
        item.state,
        f"age={item.age:.0f}s",
        f"size={'?' if item.size is None else item.size}",
        f"from={_text(item.sender)}",
        "to=" + (",".join(_text(r) for r in item.recipients) or "-"),
    ]
    if item.done:
        fields.append("done=" + ",".join(_text(r) for r in item.done))
    if item.broken:
        fields.append(f"broken={item.broken!r}")
    return " ".join(fields)


def _stat_line(path: str, stats: QueueStats) -> str:
    oldest = "-" if stats.oldest_age is None else f"{stats.oldest_age:.0f}s"
    return (
        f"{path} todo={stats.todo} queued={stats.queued} broken={stats.broken} "
        f"oldest={oldest} bytes={stats.total_bytes} "
        f"pid_leftovers={stats.pid_leftovers} intd_leftovers={stats.intd_leftovers}"
    )


def _backlog_fields(cfg: config_mod.Config, path: str) -> str:
    """The backlog as the flow control sees it (the shared summary, rescanned if stale):
    mess/ files, oldest todo entry, free space, the scan's age and duration."""
    from qmqpd import backlog

    row = backlog.report(cfg, [path])[0]
    fields = []
    if "messages" in row:
        fields += [f"mess={row['messages']}", f"oldest_todo={row['oldest_todo_age']:.0f}s",
                   f"oldest_mess={row['oldest_message_age']:.0f}s"]
    if "free_bytes" in row:
        fields += [f"free_bytes={row['free_bytes']}", f"free_inodes={row['free_inodes']}"]
    if "scanned_age" in row:
        fields += [f"scanned={row['scanned_age']:.1f}s_ago",
                   f"scan_ms={float(row['scan_seconds']) * 1000:.1f}"]
    return "".join(f" {field}" for field in fields)


def cmd_service(args: argparse.Namespace) -> int:
    from qmqpd import service

    return service.main(args.options, checker=_check_service)


def _check_service(written: Path, values: dict[str, str]) -> tuple[
        list[config_mod.ConfigError], list[str]]:
    """A service just written, checked as `serve` will read it, with a supervisor's clean
    environment (nothing from this shell): a service directory from its `variables/`, in
    it (the run script's directory); a systemd unit from its settings (its User=/Group=
    are USER/GROUP)."""
    args = SimpleNamespace(config=None, envdir=None)
    if written.is_dir():
        args.envdir = str(written / "variables")
    here = os.getcwd()
    os.chdir(written if written.is_dir() else "/")
    try:
        envdir = (config_mod.read_envdir(args.envdir) if args.envdir else
                  {name: (value, f"unit {written} {name}") for name, value in values.items()})
        cfg = config_mod.load(None, {}, defaults=_embedded(args, envdir),  # type: ignore[arg-type]
                              envdir=envdir)
        _plans, problems, warnings = validate(cfg)
    except config_mod.ConfigError as error:
        return [error], []
    finally:
        os.chdir(here)
    return problems, warnings


def cmd_status(args: argparse.Namespace) -> int:
    from qmqpd import status

    return status.run(_load(args, embedded=True), as_json=args.json)


def cmd_dkim(args: argparse.Namespace) -> int:
    from qmqpd.filters import keys

    return keys.main(args.options)


def cmd_config(args: argparse.Namespace) -> int:
    if args.sample:
        sys.stdout.write(config_mod.sample_toml())
        return 0
    if args.markdown:
        sys.stdout.write(config_mod.settings_markdown())
        return 0
    cfg = _load(args, embedded=True)  # the settings `serve` would run with
    for name, value in cfg.as_dict().items():
        print(f"{name}={value!r}  # {cfg.source(name)}")
    note = _ignored_note()
    if note:
        print(f"qmqpd config: note: {note}", file=sys.stderr)
    _book, problems = plan_all(cfg)
    for found in problems:
        print(f"qmqpd config: warning: {found}", file=sys.stderr)
    return 0


def _version() -> str:
    """The installed distribution's version (package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qmqpd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    import argparse  # not on `qmqpd session`'s path (see _session_fast_path)

    parser = argparse.ArgumentParser(prog="qmqpd", description="filtering QMQP server")
    parser.add_argument("--version", action="version", version=f"qmqpd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML config file (keys are setting names in lower case)")
        p.add_argument("--envdir", metavar="DIR",
                       help="read settings from DIR like daemontools' envdir (one file per "
                       "setting; `serve` reads it again on every HUP)")
        return p

    with_config(sub.add_parser("serve", help="run the prefork server")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("session", help="serve one QMQP session on fd 0/1")).set_defaults(
        func=cmd_session
    )
    with_config(sub.add_parser(
        "check", help="validate settings, queues, keys and every rule as `serve` would; "
        "exit 111 on any problem")).set_defaults(func=cmd_check)

    rules = sub.add_parser("rules", help="compile or check tcprules-format access rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    compile_p = rules_sub.add_parser("compile", help="compile tcp.qmqp to a cdb (atomic rename)")
    compile_p.add_argument("text")
    compile_p.add_argument("cdb")
    check_p = with_config(rules_sub.add_parser("check", help="show the rule an IP gets"))
    check_p.add_argument("ip")
    check_p.add_argument("--rules", help="the cdb (default: RULES setting)")
    check_p.add_argument("--host", default="",
                         help="the client's host name (TCPREMOTEHOST), for =host rules")
    check_p.add_argument("--info", default="",
                         help="the client's ident answer (TCPREMOTEINFO), for info@ rules")
    rules.set_defaults(func=cmd_rules)

    queue_p = sub.add_parser("queue", help="create, list or count qmail queues")
    queue_sub = queue_p.add_subparsers(dest="queue_command", required=True)
    for name, text in (("create", "lay out an empty queue (like queue-fix)"),
                       ("list", "one line per queued message"),
                       ("stat", "counts, oldest age and bytes per queue")):
        p = with_config(queue_sub.add_parser(name, help=text))
        p.add_argument("dirs", nargs="*", help="queue directories (default: configured queues)")
    queue_p.set_defaults(func=cmd_queue)

    service_p = sub.add_parser("service", add_help=False,
                               help="write a supervised service (svctool --qmqp options)")
    service_p.add_argument("options", nargs=argparse.REMAINDER)
    service_p.set_defaults(func=cmd_service)

    status_p = with_config(sub.add_parser("status", help="what the running master is doing"))
    status_p.add_argument("--json", action="store_true", help="machine-readable output")
    status_p.set_defaults(func=cmd_status)

    dkim_p = sub.add_parser("dkim", add_help=False, help="signing keys: qmqpd dkim keygen ...")
    dkim_p.add_argument("options", nargs=argparse.REMAINDER)
    dkim_p.set_defaults(func=cmd_dkim)

    cfg_p = with_config(sub.add_parser("config", help="print the effective settings"))
    cfg_p.add_argument("--embedded", action="store_true",
                       help="as `serve` without --config (the default; kept for scripts)")
    cfg_p.add_argument("--sample", action="store_true", help="print a commented config file")
    cfg_p.add_argument("--markdown", action="store_true", help="print the settings reference")
    cfg_p.set_defaults(func=cmd_config)
    return parser


# Subcommands with option parsers of their own: everything after the name is theirs.
DELEGATED = {"service": cmd_service, "dkim": cmd_dkim}


def _session_fast_path(argv: list[str]) -> SimpleNamespace | None:
    """`session [--config FILE]` without building the parser: it runs once per connection
    under tcpserver, and the full parser is a good part of a bare session's start-up."""
    if not argv or argv[0] != "session":
        return None
    rest = argv[1:]
    if not rest:
        return SimpleNamespace(func=cmd_session, config=None, envdir=None)
    if len(rest) == 2 and rest[0] == "--config" and not rest[1].startswith("-"):
        return SimpleNamespace(func=cmd_session, config=rest[1], envdir=None)
    if len(rest) == 1 and rest[0].startswith("--config=") and len(rest[0]) > 9:
        return SimpleNamespace(func=cmd_session, config=rest[0][9:], envdir=None)
    return None  # anything else (--help, mistakes): the parser explains


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](SimpleNamespace(options=argv[1:]))
    args = _session_fast_path(argv) or build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config_mod.ConfigError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `qmqpd queue list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
