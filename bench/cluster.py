#!/usr/bin/env python3
"""msgs/s through HAProxy to one qmqpd node and to three, in the same run, with Postfix's
qmqp-source as the one client.

Three `qmqpd serve` nodes (fsync and syncdir on, limits on) and two HAProxy (Debian
haproxy) processes, each run with the shipped packaging/haproxy/qmqpd.cfg: one whose
backend lists node1 only, one that balances over node1-3. For every session count the
same N messages go to node1 directly (no hop: the baseline), through HAProxy to one node
and through HAProxy to three; the order alternates between repeats. Printed per run:
msgs/s, p50/p99 latency of a probe sending one message at a time during the run, CPU per
message (the servers' and the whole machine's) and the rate relative to the direct one.

On a machine with few cores this shows the cost of the extra hop, not a speed-up: three
nodes share the same cores (and the same disk for their syncs) as one.

--proxy on (the default, as the shipped config) sends each node the client in a PROXY v2
header (`send-proxy-v2`, nodes with PROXY_PROTOCOL=v2); --proxy off runs HAProxy without
it and the nodes without PROXY_PROTOCOL.

The figures mean little on a busy machine: it refuses to start when the 1-minute load
average is above --max-load (1.0) unless --force is given, and prints the load with them.
Everything runs on 127.0.0.1 in a temporary directory and is stopped again by PID, also on
Ctrl-C or error. The helpers are bench/serve_vs_postfix.py's.

    .venv/bin/python bench/cluster.py [-m 5000] [-s 1,8,32] [--repeat 3] [--proxy on|off]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_vs_postfix import (
    QMQP_SOURCE,
    START_TIMEOUT,
    BenchError,
    QmqpdTarget,
    RunResult,
    Target,
    _stop_process,
    bench_main,
    bench_options,
    fmt,
    load_text,
    machine_facts,
    measure,
    report,
    summarise_runs,
    tree_cpu_seconds,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CONFIG = ROOT / "packaging" / "haproxy" / "qmqpd.cfg"
HAPROXY = "/usr/sbin/haproxy"
SEND_PROXY = " send-proxy-v2 check-send-proxy"
NODE_COUNT = 3
TARGETS = ("direct", "one", "three")
# Connections HAProxy lets one client hold beyond the run's sessions: the latency probe
# and connections qmqp-source has closed but the stick table still counts.
PER_CLIENT_SPARE = 16


def balancer_config(shipped: str, nodes: int, proxy: bool) -> str:
    """The shipped config for `nodes` nodes: its `server nodeN` lines past that count are
    left out; without PROXY, default-server does not send the header."""
    kept = []
    for line in shipped.splitlines():
        words = line.split()
        if (words[:1] == ["server"] and words[1].startswith("node")
                and int(words[1].removeprefix("node")) > nodes):
            continue
        kept.append(line)
    text = "\n".join(kept) + "\n"
    if not proxy:
        if SEND_PROXY not in text:
            raise BenchError(f"{HAPROXY_CONFIG} has no '{SEND_PROXY.strip()}' to turn off")
        text = text.replace(SEND_PROXY, "")
    return text


def node_settings(proxy: bool) -> list[str]:
    """The qmqpd settings that make a node read HAProxy's PROXY v2 header."""
    if not proxy:
        return []
    # a balancer on loopback: trusted only with the explicit override
    return ['proxy_protocol = "v2"', 'proxy_trusted = "127.0.0.1"',
            "proxy_trusted_unsafe = true"]


class Node(QmqpdTarget):
    """One `qmqpd serve` of the cluster, in its own directory."""

    def __init__(self, root: Path, number: int, command: list[str], maxdaemons: int,
                 prefork: int, max_sessions: int, extra: list[str]) -> None:
        # the rules give 127.0.0.1 (the balancer, or the real client through PROXY) the
        # run's sessions plus one health check from each balancer
        super().__init__(root, command, maxdaemons, prefork, max_sessions + 2, extra)
        self.name = f"node{number}"
        self.dir = root / self.name  # its queue, rules, config and log


class Direct(Target):
    """A node without the balancer: the baseline the hop is measured against (node1, or
    with --proxy on a node0 of its own without PROXY_PROTOCOL: a node that requires the
    header closes a client that connects to it directly)."""

    name = "direct to 1 node"

    def __init__(self, node: Node) -> None:
        super().__init__(node.root)
        self.node = node
        self.port = node.port

    def start(self) -> None:
        """The node is started (and stopped) on its own."""

    def stop(self) -> None:
        """See start."""

    def main_pid(self) -> int | None:
        return self.node.main_pid()

    def accepted(self) -> int:
        return self.node.accepted()

    def settle(self) -> None:
        self.node.settle()


class Balancer(Target):
    """HAProxy with the shipped config, in front of the given nodes."""

    def __init__(self, root: Path, nodes: list[Node], proxy: bool, max_sessions: int) -> None:
        super().__init__(root)
        self.nodes = nodes
        self.name = f"haproxy to {len(nodes)} node{'s' if len(nodes) > 1 else ''}"
        self.tag = f"haproxy-{len(nodes)}"
        self.config = root / f"{self.tag}.cfg"
        self.config.write_text(balancer_config(HAPROXY_CONFIG.read_text(), len(nodes), proxy))
        self.stats = root / f"{self.tag}.sock"
        self.log = root / f"{self.tag}.log"
        self.per_client = max_sessions + PER_CLIENT_SPARE
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "QMQP_BIND": f"127.0.0.1:{self.port}", "QMQP_SOURCE": "127.0.0.1",
               "QMQP_PER_CLIENT": str(self.per_client),
               "HAPROXY_STATS_SOCKET": str(self.stats),
               **{f"QMQPD_NODE{n}": f"127.0.0.1:{node.port}"
                  for n, node in enumerate(self.nodes, 1)}}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, env=env, start_new_session=True, cwd=self.root)
        wait_for_port(self.port, self.alive)
        deadline = time.monotonic() + START_TIMEOUT
        while self.up() < len(self.nodes):  # the health check must pass on every node
            if not self.alive() or time.monotonic() > deadline:
                raise BenchError(f"{self.name}: {self.up()} of {len(self.nodes)} nodes up; "
                                 f"see {self.log}: {self.log.read_text()[-500:]}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def up(self) -> int:
        """Nodes HAProxy's health check has marked UP (from its stats socket)."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return 0
        rows = csv.DictReader(b"".join(chunks).decode().lstrip("# ").splitlines())
        return sum(row["status"].startswith("UP") for row in rows
                   if row["pxname"] == "qmqpd" and row["svname"].startswith("node"))

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process)

    def main_pid(self) -> int | None:
        return self.process.pid if self.alive() and self.process else None

    def accepted(self) -> int:
        return sum(node.accepted() for node in self.nodes)

    def settle(self) -> None:
        for node in self.nodes:
            node.settle()

    def cpu_seconds(self) -> float | None:
        """HAProxy's and its nodes' (every process that works for a message)."""
        pids = [self.main_pid(), *(node.main_pid() for node in self.nodes)]
        if None in pids:
            return None
        return sum(tree_cpu_seconds(pid) for pid in pids if pid)


def print_table(results: list[RunResult], sessions: list[int]) -> None:
    print("\n| sessions | path | msgs/s (median) | runs msgs/s | p50 ms | p99 ms | probes "
          "| servers CPU ms/msg | machine CPU ms/msg | vs direct |")
    print("| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for count in sessions:
        rows = [row for row in results if row.sessions == count]
        names = list(dict.fromkeys(row.target for row in rows))
        summaries = {name: summarise_runs([row for row in rows if row.target == name])
                     for name in names}
        direct = summaries.get(Direct.name, {}).get("rate")
        for name, summary in summaries.items():
            rate = summary["rate"] or 0.0
            runs = ", ".join(f"{row.rate:,.0f}" for row in rows if row.target == name)
            ratio = f"{rate / direct:.2f}" if direct else ""
            print(f"| {count} | {name} | {rate:,.0f} | {runs} | {fmt(summary['p50_ms'])} "
                  f"| {fmt(summary['p99_ms'])} | {summary['probes']} "
                  f"| {fmt(summary['server_ms_per_msg'], 2)} "
                  f"| {fmt(summary['machine_ms_per_msg'], 2)} | {ratio} |")


def parse_targets(text: str) -> list[str]:
    wanted = [item.strip() for item in text.split(",") if item.strip()]
    unknown = set(wanted) - set(TARGETS)
    if not wanted or unknown:
        raise argparse.ArgumentTypeError(f"paths are {', '.join(TARGETS)}, comma separated")
    return [name for name in TARGETS if name in wanted]


def build_parser() -> argparse.ArgumentParser:
    parser = bench_options(__doc__, 5_000, "path")
    parser.add_argument("--targets", type=parse_targets, default=list(TARGETS),
                        help="which of direct,one,three to measure (default all)")
    parser.add_argument("--proxy", choices=("on", "off"), default="on",
                        help="HAProxy sends PROXY v2 and the nodes read it (default on)")
    return parser


def run(args: argparse.Namespace, root: Path, stack: contextlib.ExitStack) -> int:
    proxy = args.proxy == "on"
    command = args.qmqpd
    most = max(args.sessions)
    nodes = [Node(root, n, command, args.maxdaemons, args.prefork, most,
                  [*node_settings(proxy), *args.qmqpd_setting])
             for n in range(1, NODE_COUNT + 1)]
    direct = nodes[0] if not proxy else Node(root, 0, command, args.maxdaemons,
                                             args.prefork, most, list(args.qmqpd_setting))
    one = Balancer(root, nodes[:1], proxy, most)
    three = Balancer(root, nodes, proxy, most)
    started: list[Target] = [*nodes, *([direct] if proxy else []), one, three]
    for target in started:
        stack.callback(target.stop)  # registered first, so a failed start is cleaned up too
        target.start()
        print(f"started {target.name} pid {target.main_pid()} port {target.port}",
              file=sys.stderr, flush=True)
    paths = {"direct": Direct(direct), "one": one, "three": three}
    measured = [paths[name] for name in args.targets]

    facts = machine_facts(command, root)
    facts["haproxy"] = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True,
                                      check=False).stdout.splitlines()[0]
    print("machine: " + "; ".join(f"{key} {value}" for key, value in facts.items()))
    print(f"run: {args.messages} messages of {args.length} bytes, sessions "
          f"{','.join(map(str, args.sessions))}, warm-up {args.warmup}, PROXY v2 "
          f"{args.proxy}, {NODE_COUNT} nodes (MAXDAEMONS {args.maxdaemons}, "
          f"PREFORK {args.prefork}, fsync and syncdir on)")
    results: list[RunResult] = []
    for repeat in range(args.repeat):
        for sessions in args.sessions:
            # alternate the order so no path always runs right after another
            for target in measured if repeat % 2 == 0 else measured[::-1]:
                results.append(measure(target, args.messages, sessions, args.length,
                                       args.warmup, args.probe_pause))
    load_after = load_text()
    # node2 and node3 serve only the balancer to three: their share shows the spreading
    per_node = {node.name: node.accepted()
                for node in [*nodes, *([direct] if proxy else [])]}
    print(f"\nload average (1, 5, 15 min): before {facts['load before']}, "
          f"after the timed runs {load_after}")
    print_table(results, args.sessions)
    print("\nanswered K, warm-ups and probes included: "
          + ", ".join(f"{name} {count}" for name, count in per_node.items()))
    return report(args, results, started, {
        "machine": facts, "load_after": load_after, "accepted_per_node": per_node})


def missing_tools(_args: argparse.Namespace) -> str | None:
    """Why this bench cannot run here (None: it can)."""
    for tool, package in ((HAPROXY, "haproxy"), (QMQP_SOURCE, "postfix")):
        if not os.access(tool, os.X_OK):
            return f"{tool} not found (Debian package {package})"
    return None


def main(argv: list[str] | None = None) -> int:
    return bench_main("cluster", build_parser(), argv, missing_tools, run,
                      "qmqpd-cluster-bench-")


if __name__ == "__main__":
    sys.exit(main())
