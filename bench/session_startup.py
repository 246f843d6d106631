"""Cost of one `qmqpd session` (one interpreter per connection, as under tcpserver).

Runs the `qmqpd session` console script N times, each with one QMQP request on a
socketpair as fd 0/1 (what tcpserver hands it) and a native queue in a temp dir, and
prints the median wall time from spawn to exit (interpreter start, imports, settings and
plan, reading the request, queueing, the answer) with its quartiles, and the median CPU
time of the process. Cases: no filters and DKIM signing (RSA-2048), each with the queue's
fsyncs on (what a client waits for) and off (start-up and Python work only), and a bare
`python -c pass` for the interpreter's own share.

Also prints the CPU one message costs inside a long-lived process (a prefork worker's
case): serve_connection over a socketpair, N messages, user and system CPU per message,
and how many times per message settings, stages and queue writers are built (cProfile).

    .venv/bin/python bench/session_startup.py [--runs 50] [--messages 500] [--tree DIR]...
    sudo .venv/bin/python bench/session_startup.py --runs 50 --messages 0 --peers

--peers (as root) adds, in the same run, the whole connection as a client sees it, for
`qmqpd session` and for its C peer: N connections one at a time over loopback, one
message each, against Debian's ucspi-tcp `tcpserver` running `qmqpd session` (no filters,
and DKIM signing) and a private Postfix instance's qmqpd (its master's reused processes,
and `-o max_use=1`, a fresh qmqpd process per connection), fsync on for all, the servers
taken in turn connection by connection. It prints, for each, the median and p90 from
connect to the answer and to the server closing the connection, and the server's CPU per
connection (every process of its tree). Postfix's queue is drained (untimed) after each
of its connections, so its deliveries do not overlap another server's timing.

--tree runs the command against another checkout (its qmqpd/ and filters/ come first on
PYTHONPATH), so the same script measures before and after a change. Given more than once,
the trees' runs alternate (one run of each tree in turn, case by case), so every tree sees
the same moments of a shared machine's load. Compile each tree's bytecode first
(`python -m compileall -q DIR/qmqpd DIR/filters`) where PYTHONDONTWRITEBYTECODE is set, or
every run compiles the sources again.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Protocol

ROOT = Path(__file__).resolve().parents[1]
# bench/dkim.py would shadow dkimpy: keep this directory off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
MESSAGE = (b"From: a@example.com\nTo: b@example.org\nSubject: startup\n"
           b"Message-ID: <bench@example.com>\n\nhello\n")


def request() -> bytes:
    from qmqpd.netstring import encode

    return encode(encode(MESSAGE) + encode(b"a@example.com") + encode(b"b@example.org"))


def qmqpd(python: str) -> list[str]:
    """The console script tcpserver would run (beside the interpreter), else the module."""
    script = Path(python).parent / "qmqpd"
    return [str(script)] if script.exists() else [python, "-m", "qmqpd"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_session(python: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one whole `qmqpd session` process."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(request())
        cpu = _children_cpu()
        started = time.perf_counter()
        proc = subprocess.Popen([*qmqpd(python), "session"], stdin=theirs,
                                stdout=theirs, stderr=subprocess.DEVNULL, env=env)
        theirs.close()
        answer = ours.recv(4096)
        proc.wait()
        elapsed = time.perf_counter() - started
    if b":K" not in answer:
        raise RuntimeError(f"session did not answer K: {answer!r}")
    return elapsed, _children_cpu() - cpu


def bare_python(python: str) -> tuple[float, float]:
    cpu = _children_cpu()
    started = time.perf_counter()
    subprocess.run([python, "-c", "pass"], check=True)
    return time.perf_counter() - started, _children_cpu() - cpu


def summary(name: str, runs: list[tuple[float, float]]) -> str:
    """Wall time (what a client waits) and CPU time (what the process costs; steadier on a
    machine shared with other work): medians, and the wall quartiles."""
    walls = [wall * 1000 for wall, _cpu in runs]
    q1, median, q3 = statistics.quantiles(walls, n=4)
    cpu = statistics.median(cpu * 1000 for _wall, cpu in runs)
    return (f"{name:<36} wall median {median:6.1f} ms (quartiles {q1:6.1f} - {q3:6.1f})"
            f"   CPU median {cpu:6.1f} ms")


def make_key(control: Path, python: str, env: dict[str, str]) -> None:
    subprocess.run([python, "-m", "qmqpd", "dkim", "keygen", "--domain", "example.com",
                    "--selector", "bench", "--keydir", str(control / "domainkeys")],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def tree_env(tree: Path, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DKIM", "DK", "QHPSI"))}
    env["PYTHONPATH"] = str(tree)
    env["QUEUEDIR"] = str(work / "queue")
    env["CONTROLDIR"] = str(work / "control")
    env["TCPREMOTEIP"] = "127.0.0.1"
    return env


def _load() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def session_figures(python: str, trees: list[Path], runs: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        env = tree_env(trees[0], work)
        subprocess.run([python, "-m", "qmqpd", "queue", "create", str(work / "queue")],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        make_key(work / "control", python, env)
        no_sync = {"USE_FSYNC": "0", "USE_SYNCDIR": "0"}
        dkim = {"DKIMSIGN": "domainkeys/example.com/bench"}
        cases = {
            "python -c pass": None,
            "no filters": env,
            "no filters, no fsync": {**env, **no_sync},
            "DKIM signing": {**env, **dkim},
            "DKIM signing, no fsync": {**env, **dkim, **no_sync},
        }
        for name, case_env in cases.items():
            print(f"{name}: {_load()}", flush=True)
            ones = {}
            for tree in trees:
                tree_case = None if case_env is None else {**case_env,
                                                           "PYTHONPATH": str(tree)}
                ones[tree] = (lambda: bare_python(python)) if tree_case is None else (
                    lambda e=tree_case: one_session(python, e))
                ones[tree]()  # warm the page cache
            results: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
            for _ in range(runs):
                for tree in trees:
                    results[tree].append(ones[tree]())
            for tree in trees:
                label = f"{name} [{tree.name}]" if len(trees) > 1 else name
                print(summary(label, results[tree]), flush=True)


def worker_cpu(python: str, tree: Path, messages: int) -> None:
    """Per-message CPU inside one process, run in a child so --tree applies. Without
    fsync, and user time apart from system time: the kernel's share (file creation,
    links, syncs) varies with the disk and the machine's load; the user time is the
    Python work per message, which the plan changes."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        env = {**tree_env(tree, work), "USE_FSYNC": "0", "USE_SYNCDIR": "0"}
        subprocess.run([python, "-m", "qmqpd", "queue", "create", str(work / "queue")],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        make_key(work / "control", python, env)
        dkim = {"DKIMSIGN": "domainkeys/example.com/bench"}
        for name, extra in (("no filters", {}), ("DKIM signing", dkim),
                            ("DKIM + rule env", {**dkim, "BENCH_RULE_ENV": "DATABYTES=1000000"})):
            out = subprocess.run(
                [python, str(Path(__file__).resolve()), "--in-process", str(messages)],
                check=True, env={**env, **extra}, capture_output=True, text=True)
            print(f"worker CPU per message, {name:<15} {out.stdout.strip()}", flush=True)


# Functions that build settings, stages or queue writers: a profile counts their calls.
CONSTRUCTION = ("overlay", "build_stages", "from_config", "__init__ (qmqpd/queue.py)",
                "parse_sign_options", "check_config")


def _serve(count: int, data: bytes, target: object, client: object) -> None:
    from qmqpd import handler

    for _ in range(count):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.sendall(data)
            handler.serve_connection(theirs.fileno(), theirs.fileno(), client,  # type: ignore[arg-type]
                                     target)  # type: ignore[arg-type]


def _construction_calls(data: bytes, target: object, client: object, count: int) -> str:
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.runcall(_serve, count, data, target, client)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    calls: dict[str, int] = {}
    for (path, _line, name), (_prim, total, *_rest) in stats.items():
        where = f"{name} ({'/'.join(Path(path).parts[-2:])})"
        for wanted in CONSTRUCTION:
            if wanted in (name, where):
                calls[wanted] = calls.get(wanted, 0) + total
    return ", ".join(f"{name} {calls.get(name, 0) / count:g}" for name in CONSTRUCTION)


def in_process(messages: int) -> None:
    """Serve `messages` requests in this process as a worker does; print CPU per message
    and how often per message settings, stages and queue writers are built."""
    from qmqpd import config as config_mod
    from qmqpd.message import Client

    cfg = config_mod.load(None, os.environ)
    # BENCH_RULE_ENV="NAME=value ...": the client's rule env, as the master hands it over.
    rule_env: dict[str, str | None] = dict(
        item.split("=", 1) for item in os.environ.get("BENCH_RULE_ENV", "").split())
    client = Client(remote_ip="127.0.0.1", rule_env=rule_env)
    try:
        from qmqpd import plan
    except ImportError:  # a tree from before the session plan: settings per message
        target: object = cfg
    else:
        from qmqpd.injector import Writer

        target, problems = plan.check_all(cfg, [("bench", rule_env)] if rule_env else [],
                                          Writer.current())
        if problems:
            raise plan.PlanError(problems)
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(devnull, 2)  # the session log lines
    try:
        data = request()
        _serve(20, data, target, client)  # warm-up: imports, key cache, first queue entries
        start = os.times()
        _serve(messages, data, target, client)
        end = os.times()
        built = _construction_calls(data, target, client, 50)
    finally:
        os.dup2(saved, 2)
    user = (end.user - start.user) / messages * 1000
    system = (end.system - start.system) / messages * 1000
    print(f"user {user:.3f} ms + system {system:.3f} ms CPU ({messages} messages); "
          f"built per message: {built}")


# -- peers: the whole connection, `qmqpd session` under tcpserver beside Postfix's qmqpd ---
TCPSERVER = "/usr/bin/tcpserver"
TCPRULES = "/usr/bin/tcprules"
PEER_TIMEOUT = 60.0
PEER_WARMUP = 2


@functools.cache
def _svp() -> ModuleType:
    """bench/serve_vs_postfix.py (Postfix instance, process helpers), loaded by path:
    this directory is kept off sys.path."""
    spec = importlib.util.spec_from_file_location(
        "serve_vs_postfix", Path(__file__).with_name("serve_vs_postfix.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def peers_refusal() -> str | None:
    """Why --peers cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "--peers must run as root (Postfix's master needs it)"
    for tool in (TCPSERVER, TCPRULES, _svp().POSTFIX, f"{_svp().POSTFIX_DAEMONS}/qmqpd"):
        if not os.access(tool, os.X_OK):
            return f"--peers needs {tool} (Debian packages ucspi-tcp and postfix)"
    return None


class PeerServer(Protocol):
    """What the peer measurement needs of a server (serve_vs_postfix's PostfixTarget is one)."""

    name: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def main_pid(self) -> int | None: ...
    def cpu_seconds(self) -> float | None: ...
    def settle(self) -> None: ...


class TcpserverSession:
    """Debian's ucspi-tcp tcpserver on 127.0.0.1 running `qmqpd session` per connection,
    with a tcprules cdb, as the README shows."""

    def __init__(self, name: str, home: Path, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.dir = home
        self.command = command
        self.env = env
        self.port = _svp().free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        rules = self.dir / "tcp.qmqp.cdb"
        subprocess.run([TCPRULES, str(rules), str(self.dir / "tcp.qmqp.tmp")],
                       input=b"127.0.0.1:allow\n:deny\n", check=True)
        with open(self.dir / "tcpserver.log", "wb") as log:
            self.process = subprocess.Popen(
                [TCPSERVER, "-v", "-H", "-R", "-x", str(rules), "127.0.0.1", str(self.port),
                 *self.command, "session"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, cwd=self.dir)
        _svp().wait_for_port(self.port, lambda: self.process is not None
                             and self.process.poll() is None)

    def stop(self) -> None:
        if self.process is not None:
            _svp()._stop_process(self.process)

    def main_pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def cpu_seconds(self) -> float | None:
        """tcpserver's own CPU and its reaped sessions'."""
        pid = self.main_pid()
        return _svp().tree_cpu_seconds(pid) if pid else None

    def settle(self) -> None:
        """Nothing runs after a session: it queued the message before it answered."""


def _answer_complete(answer: bytes) -> bool:
    length, colon, rest = answer.partition(b":")
    return bool(colon) and length.isdigit() and len(rest) > int(length)


def one_connection(port: int, data: bytes) -> tuple[float, float]:
    """(seconds to the whole answer, seconds until the server closed the connection) of
    one QMQP connection from connect on; the answer must be K."""
    started = time.perf_counter()
    answered = None
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT) as conn:
        conn.sendall(data)
        while chunk := conn.recv(4096):
            answer += chunk
            if answered is None and _answer_complete(answer):
                answered = time.perf_counter()
    closed = time.perf_counter()
    if answered is None or b":K" not in answer:
        raise RuntimeError(f"port {port} did not answer K: {answer!r}")
    return answered - started, closed - started


def peer_summary(name: str, runs: list[tuple[float, float]], cpu: float | None) -> str:
    percentile = _svp().percentile
    answers = [answer * 1000 for answer, _closed in runs]
    closes = [closed * 1000 for _answer, closed in runs]
    cpu_text = "n/a" if cpu is None else f"{cpu * 1000 / len(runs):6.1f} ms"
    return (f"{name:<44} answer median {statistics.median(answers):6.1f} ms "
            f"p90 {percentile(answers, 0.9):6.1f}   closed median "
            f"{statistics.median(closes):6.1f} ms p90 {percentile(closes, 0.9):6.1f}"
            f"   server CPU {cpu_text}/connection")


def peer_targets(python: str, trees: list[Path], root: Path) -> list[PeerServer]:
    """The servers compared, each on its own loopback port; a queue and a DKIM key for
    the qmqpd sessions under root."""
    svp = _svp()
    env = {k: v for k, v in tree_env(trees[0], root).items() if k != "TCPREMOTEIP"}
    subprocess.run([python, "-m", "qmqpd", "queue", "create", str(root / "queue")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    make_key(root / "control", python, env)
    targets: list[PeerServer] = []
    for tree in trees:
        label = f" [{tree.name}]" if len(trees) > 1 else ""
        tree_case = {**env, "PYTHONPATH": str(tree)}
        targets.append(TcpserverSession(f"tcpserver + qmqpd session{label}",
                                        root / f"tcpserver-{len(targets)}", qmqpd(python),
                                        tree_case))
        targets.append(TcpserverSession(
            f"tcpserver + qmqpd session, DKIM{label}", root / f"tcpserver-{len(targets)}",
            qmqpd(python), {**tree_case, "DKIMSIGN": "domainkeys/example.com/bench"}))
    for name, home, options in (
            ("Postfix qmqpd (master reuses it)", root / "postfix-reuse", ""),
            ("Postfix qmqpd, max_use=1", root / "postfix-max-use-1", "-o max_use=1")):
        home.mkdir()
        home.chmod(0o755)  # Postfix daemons run as user postfix below it
        postfix = svp.PostfixTarget(home, qmqpd_options=options)
        postfix.name = name
        targets.append(postfix)
    return targets


def peer_figures(python: str, trees: list[Path], runs: int) -> None:
    """N connections per server, one at a time, the servers in turn (rotated each round)."""
    root = Path(tempfile.mkdtemp(prefix="qmqpd-session-peers-"))
    root.chmod(0o755)
    print(f"peers in {root}", file=sys.stderr, flush=True)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        targets = peer_targets(python, trees, root)
        for target in targets:
            stack.callback(target.stop)
            target.start()
            print(f"started {target.name} pid {target.main_pid()} "
                  f"port {target.port}", file=sys.stderr, flush=True)
        data = request()
        for _ in range(PEER_WARMUP):
            for target in targets:
                one_connection(target.port, data)
                target.settle()
        print(f"peers: {runs} connections each, one at a time, in turn; one message of "
              f"{len(MESSAGE)} bytes each; fsync on; {_load()}", flush=True)
        cpu_before = {id(t): t.cpu_seconds() for t in targets}
        results: dict[int, list[tuple[float, float]]] = {id(t): [] for t in targets}
        for round_number in range(runs):
            shift = round_number % len(targets)
            for target in targets[shift:] + targets[:shift]:
                results[id(target)].append(one_connection(target.port, data))
                target.settle()
        time.sleep(0.5)  # tcpserver and Postfix's master reap the last processes
        for target in targets:
            before, after = cpu_before[id(target)], target.cpu_seconds()
            cpu = after - before if before is not None and after is not None else None
            print(peer_summary(target.name, results[id(target)], cpu), flush=True)
        print(f"end of peers: {_load()}", flush=True)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--tree", type=Path, action="append",
                        help="a checkout to measure (default this one); repeat to alternate")
    parser.add_argument("--peers", action="store_true",
                        help="also time --runs whole connections each to tcpserver + qmqpd "
                             "session and to Postfix's qmqpd, in turn (root)")
    parser.add_argument("--in-process", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        in_process(args.in_process)
        return
    if args.peers and (refusal := peers_refusal()):
        sys.exit(f"session_startup: {refusal}")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the peers' servers on TERM too
    trees = [tree.resolve() for tree in args.tree or [ROOT]]
    print(f"trees {', '.join(map(str, trees))}; python {sys.version.split()[0]}; "
          f"{os.cpu_count()} CPUs; {_load()}", flush=True)
    session_figures(sys.executable, trees, args.runs)
    print(f"end of sessions: {_load()}", flush=True)
    if args.peers:
        try:
            peer_figures(sys.executable, trees, args.runs)
        except KeyboardInterrupt:
            print("session_startup: interrupted; the peers' servers are stopped",
                  file=sys.stderr)
            sys.exit(130)
    if args.messages:
        for tree in trees:
            print(f"tree {tree}", flush=True)
            worker_cpu(sys.executable, tree, args.messages)


if __name__ == "__main__":
    main()
