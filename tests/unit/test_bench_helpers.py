"""The pure helpers of bench/serve_vs_postfix.py: counter parsing, percentiles, QMQP
framing, the qmqpd config it writes and the py-spy profile summary."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve_vs_postfix.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_vs_postfix", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_vs_postfix"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_counter_keeps_the_last_complete_number_and_the_partial_rest() -> None:
    assert bench.parse_counter("1\r2\r3\r4") == (3, "4")
    assert bench.parse_counter("12") == (None, "12")
    assert bench.parse_counter("9\r10\r") == (10, "")


@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=50), st.integers(1, 7))
def test_counter_split_anywhere_gives_the_same_last_count(numbers: list[int], cut: int) -> None:
    text = "".join(f"{n}\r" for n in numbers)
    first, rest = bench.parse_counter(text[:cut])
    second, _ = bench.parse_counter(rest + text[cut:])
    assert second == numbers[-1] or (second is None and first == numbers[-1])


def test_percentile_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert bench.percentile(samples, 0.50) == 50.0
    assert bench.percentile(samples, 0.99) == 99.0
    assert bench.percentile([7.0], 0.99) == 7.0
    assert bench.percentile([], 0.5) is None


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=200), st.floats(0, 1))
def test_percentile_is_one_of_the_samples_and_monotone(samples: list[float],
                                                       fraction: float) -> None:
    value = bench.percentile(samples, fraction)
    assert value in samples
    assert bench.percentile(samples, 0.0) <= value <= bench.percentile(samples, 1.0)


def test_message_has_the_asked_length() -> None:
    for length in (0, 10, 100, 2048, 5000):
        message = bench.message_of_length(length)
        assert len(message) == max(length, len(bench.message_of_length(0)))
    assert b"\n\n" in bench.message_of_length(2048)


def test_qmqp_request_is_one_netstring_of_message_sender_recipients() -> None:
    request = bench.qmqp_request(b"body", b"a@b", [b"c@d", b"e@f"])
    assert request == b"25:4:body,3:a@b,3:c@d,3:e@f,,"


def test_qmqpd_config_is_valid_toml_with_limits_on_and_overrides() -> None:
    text = bench.qmqpd_config(6280, Path("/q"), 75, 4, Path("/r.cdb"),
                              ["use_syncdir = false", "timeout = 9"])
    settings = tomllib.loads(text)
    assert settings["use_syncdir"] is False
    assert settings["use_fsync"] is True
    assert "maxperip" not in settings  # the default limit, raised by the rule only
    assert settings["rules"] == "/r.cdb"
    assert settings["timeout"] == 9
    assert settings["queuedir"] == "/q"
    with pytest.raises(bench.BenchError):
        bench.qmqpd_config(1, Path("/q"), 1, 1, Path("/r"), ["no equals sign"])
    with pytest.raises(bench.BenchError, match="limits on"):
        bench.qmqpd_config(1, Path("/q"), 1, 1, Path("/r"), ["MAXPERIP = 0"])


@pytest.mark.parametrize("sessions", [1, 8, 32, 100])
def test_rule_gives_the_load_generator_its_sessions_and_the_probe(sessions: int) -> None:
    text = bench.load_generator_rules(sessions)
    first, default = text.splitlines()
    address, _, rest = first.partition(":")
    assert address == "127.0.0.1" and rest.startswith("allow,")
    limit = int(rest.split('MAXPERIP="')[1].rstrip('"'))
    assert sessions + 1 < limit <= 2 * sessions + 5
    assert default == ":deny"


def test_the_options_every_serve_bench_shares() -> None:
    parser = bench.bench_options("A bench.\n\nMore text.", 100, "server", repeat=3)
    args = parser.parse_args(["--qmqpd", "env PYTHONPATH=/x python3 -m qmqpd",
                              "--qmqpd-setting", "timeout = 9", "-s", "1,4"])
    assert args.qmqpd == ["env", "PYTHONPATH=/x", "python3", "-m", "qmqpd"]
    assert args.qmqpd_setting == ["timeout = 9"] and args.sessions == [1, 4]
    defaults = parser.parse_args([])
    assert defaults.qmqpd == [sys.executable, "-m", "qmqpd"]
    assert (defaults.messages, defaults.repeat, defaults.qmqpd_setting) == (100, 3, [])
    assert parser.description == "A bench."


def test_load_refusal_above_the_limit_unless_forced() -> None:
    assert bench.load_refusal(0.4, 1.0, force=False) is None
    assert bench.load_refusal(1.0, 1.0, force=False) is None
    assert "--force" in bench.load_refusal(1.7, 1.0, force=False)
    assert bench.load_refusal(9.0, 1.0, force=True) is None


STRACE_C = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 61.05    0.060230         150       400           fdatasync
 38.95    0.038430          96       400         3 fsync
  0.00    0.000000           0       400           sync_file_range
------ ----------- ----------- --------- --------- ----------------
100.00    0.098660          82      1200         3 total
"""


def test_strace_summary_counts_calls_per_syscall() -> None:
    assert bench.parse_strace_counts(STRACE_C) == {
        "fdatasync": 400, "fsync": 400, "sync_file_range": 400}
    assert bench.parse_strace_counts("") == {}


def test_busy_seconds_leave_out_idle_and_iowait() -> None:
    ticks = bench.CLK_TCK
    line = f"cpu  {3 * ticks} 0 {ticks} {50 * ticks} {7 * ticks} 0 {ticks} 0 0 0"
    assert bench.busy_seconds(line) == pytest.approx(5.0)


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="util-linux findmnt missing")
def test_mount_of_agrees_with_findmnt(tmp_path: Path) -> None:
    device, kind, _options = bench.mount_of(tmp_path)
    found = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", str(tmp_path)],
                           capture_output=True, text=True, check=True).stdout.split()
    assert [device, kind] == found[:2]


def test_parse_sessions() -> None:
    assert bench.parse_sessions("1,8,32") == [1, 8, 32]
    with pytest.raises(Exception, match="integers >= 1"):
        bench.parse_sessions("0,8")


def test_frame_names_keep_the_package_path() -> None:
    assert bench.frame_name("serve_connection (qmqpd/handler.py:120)") == \
        "qmqpd/handler.py:serve_connection"
    assert bench.frame_name("write (/x/site/qmqpd/queue.py:12)") == "qmqpd/queue.py:write"
    assert bench.frame_name("select (/usr/lib/python3.11/selectors.py:468)") == \
        "selectors.py:select"


RAW = """\
process 1:"qmqpd: master";run (qmqpd/master.py:1);select (selectors.py:2) 90
process 1:"qmqpd: master";run (qmqpd/master.py:1);send_fds (socket.py:3) 10
process 1:"qmqpd: master";process 2:"qmqpd: worker";worker_main (qmqpd/worker.py:1);\
receive (qmqpd/ipc.py:5);recv_fds (socket.py:4) 500
process 1:"qmqpd: master";process 2:"qmqpd: worker";worker_main (qmqpd/worker.py:1);\
serve_connection (qmqpd/handler.py:9);write (qmqpd/queue.py:7);_sync_dir (qmqpd/queue.py:8) 75
process 1:"qmqpd: master";process 3:"qmqpd: worker";worker_main (qmqpd/worker.py:1);\
serve_connection (qmqpd/handler.py:9);read_request (qmqpd/protocol.py:3) 25
"""


def test_profile_summary_separates_master_busy_and_idle_workers() -> None:
    summary = bench.summarise_profile(RAW)
    assert summary["samples"] == {"master": 100, "worker_idle": 500, "worker": 100}
    assert summary["worker_self"][0] == ("qmqpd/queue.py:_sync_dir", 75.0)
    inclusive = dict(summary["worker_inclusive"])
    assert inclusive["qmqpd/queue.py:write"] == 75.0
    assert inclusive["qmqpd/protocol.py:read_request"] == 25.0
    assert "qmqpd/worker.py:worker_main" not in inclusive  # start-up frames left out
    assert summary["master_self"][0] == ("selectors.py:select", 90.0)


def test_filesystem_description_names_the_mount(tmp_path: Path) -> None:
    device, kind, options = bench.mount_of(tmp_path)
    text = bench.describe_filesystem(tmp_path)
    assert text.startswith(f"{kind} on {device} ({options})")
    if kind == "ext4":
        assert text.endswith((", journal", ", no journal"))
