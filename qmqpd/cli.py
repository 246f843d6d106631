"""`qmqpd serve / session / rules / queue / config`: the command line.

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


def _embedded(args: argparse.Namespace) -> dict[str, object] | None:
    """Embedded defaults apply without --config; the queue only if none is named in env."""
    if args.config:
        return None
    defaults = dict(EMBEDDED_DEFAULTS)
    if any(os.environ.get(name) for name in ("QUEUEDIR", "QUEUE_BASE", "QMAILQUEUE")):
        del defaults["QUEUEDIR"]
    return defaults


def _load(args: argparse.Namespace, embedded: bool = False) -> config_mod.Config:
    return config_mod.load(args.config, os.environ,
                           defaults=_embedded(args) if embedded else None)


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
        setting = "GROUP" if str(error).startswith("GROUP") else "USER"
        return None, [config_mod.problem(setting, cfg.source(setting), str(error))]
    uid = os.geteuid() if uid < 0 else uid
    return Writer(uid, tuple(gids), name or str(uid)), []


def plan_all(cfg: config_mod.Config) -> tuple[PlanBook | None, list[config_mod.ConfigError]]:
    """The validation `serve` runs at start, on HUP and when the rules cdb changes, and
    `qmqpd check` prints: the workers' user, the rules cdb, then the plan of the base
    settings and of every allowing rule's env."""
    from qmqpd import plan, proxy, rules

    writer, problems = _writer(cfg)
    try:
        proxy.Policy.from_config(cfg)
    except config_mod.ConfigError as error:
        problems.append(error)
    envs: list[tuple[str, dict[str, str | None]]] = []
    stamp = None
    if cfg.rules:
        stamp = plan.rules_stamp(cfg.rules)
        try:
            envs = rules.rule_envs(cfg.rules)
        except rules.RulesError as error:
            problems.append(config_mod.problem("RULES", cfg.source("RULES"), str(error)))
    if writer is None:
        return None, problems
    book, found = plan.check_all(cfg, envs, writer, cfg.rules, stamp)
    return book, problems + found


def planner(cfg: config_mod.Config) -> PlanBook:
    """The plans of cfg, or PlanError listing every problem (the master's planner)."""
    from qmqpd.plan import PlanError

    book, problems = plan_all(cfg)
    if problems or book is None:
        raise PlanError(problems)
    return book


def _creates_embedded_queue(cfg: config_mod.Config) -> bool:
    """`serve` without --config lays out its embedded queue when it is not there yet."""
    return (cfg.source("QUEUEDIR") == "embedded defaults"
            and not os.path.isdir(os.path.join(cfg.queuedir, "todo")))


def cmd_serve(args: argparse.Namespace) -> int:
    from qmqpd import master, queue, worker
    from qmqpd.filters import pipeline

    cfg = _load(args, embedded=True)
    if _creates_embedded_queue(cfg):
        queue.create_queue(cfg.queuedir, split=cfg.split, todo_layout=cfg.todo_layout)

    def reload() -> config_mod.Config:
        return _load(args, embedded=True)

    pipeline.preload()  # workers share the stage modules instead of each importing them
    return master.run(cfg, worker.worker_main, reload, planner)


def cmd_check(args: argparse.Namespace) -> int:
    """`qmqpd check`: the validation of start and HUP, each problem on its own line."""
    cfg = _load(args, embedded=True)
    book, problems = plan_all(cfg)
    if _creates_embedded_queue(cfg):  # as serve would: not a problem, said as a note
        problems = [p for p in problems if p.setting != "QUEUEDIR"]
        print(f"note: `qmqpd serve` creates the queue {cfg.queuedir} (embedded defaults)")
    for found in problems:
        print(f"qmqpd check: {found}", file=sys.stderr)
    if problems or book is None:
        return _fail(f"{len(problems)} problem(s); `qmqpd serve` would refuse to start", 1)
    rules = f", {cfg.rules}" if cfg.rules else ""
    print(f"ok: {len(book)} session plan(s) from {args.config or 'built-in defaults'}{rules}")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from qmqpd import rules

    if args.rules_command == "compile":
        try:
            count = rules.compile_rules(args.text, args.cdb)
        except (rules.RulesError, OSError) as error:
            return _fail(str(error), 100)  # tcprules' exit code for bad input
        print(f"{args.cdb}: {count} keys")
        return 0
    cdb = args.rules or _load(args).rules
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

    cfg = _load(args)
    from qmqpd.injector import queue_paths

    paths = args.dirs or queue_paths(cfg)
    if not paths:
        return _fail("no queue given: name a directory, or set QUEUEDIR or QUEUE_BASE", 100)
    if args.queue_command == "create":
        for path in paths:
            try:
                owners = queue.create_queue(path, split=cfg.split, todo_layout=cfg.todo_layout)
            except queue.QueueSetupError as error:
                return _fail(str(error), 100)
            print(f"created {path} (owners: {owners.source})")
        return 0
    if args.queue_command == "list":
        for path in paths:
            for item in queue.list_messages(path, split=cfg.split, todo_layout=cfg.todo_layout):
                print(_listing_line(path, item))
        return 0
    for path in paths:
        stats = queue.stat_queue(path, split=cfg.split, todo_layout=cfg.todo_layout)
        print(_stat_line(path, stats))
    return 0


def _text(value: bytes | None) -> str:
    return "?" if value is None else (value.decode("utf-8", "backslashreplace") or "<>")


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


def cmd_service(args: argparse.Namespace) -> int:
    from qmqpd import service

    return service.main(args.options)


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
    cfg = _load(args, embedded=args.embedded)
    for name, value in cfg.as_dict().items():
        print(f"{name}={value!r}  # {cfg.source(name)}")
    _book, problems = plan_all(cfg)
    for found in problems:
        print(f"qmqpd config: warning: {found}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    import argparse  # not on `qmqpd session`'s path (see _session_fast_path)

    parser = argparse.ArgumentParser(prog="qmqpd", description="filtering QMQP server")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML config file (keys are setting names in lower case)")
        return p

    with_config(sub.add_parser("serve", help="run the prefork server")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("session", help="serve one QMQP session on fd 0/1")).set_defaults(
        func=cmd_session
    )
    with_config(sub.add_parser(
        "check", help="validate settings, queues, keys and every rule as `serve` would; "
        "non-zero exit on any problem")).set_defaults(func=cmd_check)

    rules = sub.add_parser("rules", help="compile or check tcprules-format access rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    compile_p = rules_sub.add_parser("compile", help="compile tcp.qmqp to a cdb (atomic rename)")
    compile_p.add_argument("text")
    compile_p.add_argument("cdb")
    check_p = with_config(rules_sub.add_parser("check", help="show the rule an IP gets"))
    check_p.add_argument("ip")
    check_p.add_argument("--rules", help="the cdb (default: RULES setting)")
    check_p.add_argument("--host", default="")
    check_p.add_argument("--info", default="")
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
    cfg_p.add_argument("--embedded", action="store_true", help="as `serve` without --config")
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
        return SimpleNamespace(func=cmd_session, config=None)
    if len(rest) == 2 and rest[0] == "--config" and not rest[1].startswith("-"):
        return SimpleNamespace(func=cmd_session, config=rest[1])
    if len(rest) == 1 and rest[0].startswith("--config=") and len(rest[0]) > 9:
        return SimpleNamespace(func=cmd_session, config=rest[0][9:])
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
