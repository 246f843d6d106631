"""The checks behind a session plan, on real directories and files in a temp dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmqpd import plan
from qmqpd.config import ConfigError, load, problem
from qmqpd.filters import pipeline
from qmqpd.injector import Writer, check_config, queue_paths
from qmqpd.message import decode_env_item, encode_env_item
from qmqpd.queue import (
    QueueOwners,
    QueueSetupError,
    create_queue,
    detect_layout,
    envelope_bytes,
    envelope_records,
    unwritable,
)

NOBODY = Writer(65534, (65534,), "nobody")


def settings(**env: str) -> object:
    return load(environ={"USE_FSYNC": "0", "USE_SYNCDIR": "0", **env})


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (the test's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="qmqpd-checks-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


# ---- queue layout and writability ---------------------------------------------------------

@pytest.mark.parametrize(("split", "todo_layout"), [(23, "flat"), (7, "flat"), (3, "split")])
def test_layout_is_read_from_the_queue(tmp_path: Path, split: int, todo_layout: str) -> None:
    create_queue(str(tmp_path / "q"), split=split, todo_layout=todo_layout)
    (tmp_path / "q" / "todo" / "12345").write_bytes(b"")  # a waiting message is no bucket
    layout = detect_layout(str(tmp_path / "q"))
    assert (layout.split, layout.todo_layout) == (split, todo_layout)


def test_a_directory_that_is_no_queue_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(QueueSetupError, match=r"not a qmail queue \(missing mess, todo, intd"):
        detect_layout(str(tmp_path / "empty"))
    with pytest.raises(QueueSetupError, match="No such file or directory"):
        detect_layout(str(tmp_path / "absent"))


def test_writability_follows_owner_group_and_other_bits(open_dir: Path) -> None:
    queue = open_dir / "q"
    # root-owned even where qmail's users exist, with qmail's modes (pid/ 0700)
    create_queue(str(queue), owners=QueueOwners(0, 0, 0, 0))
    assert unwritable(str(queue), 0, (0,)) is None
    assert "is owned by uid 0 gid 0 mode 750" in str(unwritable(str(queue), 65534, (65534,)))
    for top, dirs, _files in os.walk(queue):
        for name in [top, *(os.path.join(top, d) for d in dirs)]:
            os.chown(name, 0, 4242)
            os.chmod(name, 0o770)
    assert unwritable(str(queue), 65534, (65534,)) is not None
    assert unwritable(str(queue), 65534, (65534, 4242)) is None  # via the group


def test_an_unpassable_parent_is_named(open_dir: Path) -> None:
    closed = open_dir / "closed"
    create_queue(str(closed / "q"))
    closed.chmod(0o700)
    assert f"{closed} is owned by uid 0" in str(unwritable(str(closed / "q"), 65534, (65534,)))


def test_check_config_names_each_setting(tmp_path: Path) -> None:
    create_queue(str(tmp_path / "queue1"))
    cfg = settings(QUEUE_BASE=str(tmp_path), QUEUE_COUNT="2", SPLIT="7")
    assert queue_paths(cfg) == [str(tmp_path / "queue1"), str(tmp_path / "queue2")]  # type: ignore[arg-type]
    problems = check_config(cfg, Writer(0, (0,), "root"))  # type: ignore[arg-type]
    assert [p.setting for p in problems] == ["SPLIT", "QUEUE_BASE"]
    assert str(problems[0]).startswith("SPLIT (split) from environment: 7, but")
    assert str(problems[1]).startswith(f"QUEUE_BASE (queue_base) from environment: "
                                       f"{tmp_path / 'queue2'}: No such file")
    assert check_config(settings(QMAILQUEUE="/bin/true"), NOBODY) == []  # type: ignore[arg-type]


# ---- stages -------------------------------------------------------------------------------

def test_stage_option_errors_name_the_setting_and_source() -> None:
    stages, problems = pipeline.checked_stages(settings(DKSIGN="", DKSIGNOPTIONS="-c odd"))  # type: ignore[arg-type]
    assert stages == []
    (found,) = problems
    assert (found.setting, found.source) == ("DKSIGNOPTIONS", "environment")
    assert str(found) == ("DKSIGNOPTIONS (dksignoptions) from environment: -c takes nofws or "
                          "simple, not 'odd'")


def test_a_key_pattern_with_percent_is_left_to_each_message(tmp_path: Path) -> None:
    cfg = settings(DKIMSIGN=str(tmp_path / "%" / "default"))
    stages, problems = pipeline.checked_stages(cfg)  # type: ignore[arg-type]
    assert [s.name for s in stages] == ["dkim"] and problems == []
    cfg = settings(DKIMSIGN=str(tmp_path / "default"))
    _stages, (found,) = pipeline.checked_stages(cfg)  # type: ignore[arg-type]
    assert str(found).endswith(f"key file {tmp_path / 'default'} does not exist")


# ---- plans --------------------------------------------------------------------------------

def test_one_plan_per_distinct_rule_env(tmp_path: Path) -> None:
    create_queue(str(tmp_path / "q"))
    cfg = settings(QUEUEDIR=str(tmp_path / "q"))
    envs = [("10.", {"DATABYTES": "100", "RELAYCLIENT": ""}), ("11.", {"DATABYTES": "100"}),
            ("12.", {"MARK": "x"}), ("13.", {"DATABYTES": "200"})]
    book, problems = plan.check_all(cfg, envs, Writer.current())  # type: ignore[arg-type]
    assert problems == []
    assert len(book) == 3  # base (also 12.), DATABYTES=100 (10. and 11.), DATABYTES=200
    assert book.for_env({"DATABYTES": "100", "OTHER": "y"}) is book.for_env(envs[1][1])
    assert book.for_env({}).config.databytes == 20_000_000
    assert book.settings({"MAXPERIP": "3"}).maxperip == 3  # not planned: merged on demand


def test_a_bad_rule_env_is_reported_with_its_rule(tmp_path: Path) -> None:
    create_queue(str(tmp_path / "q"))
    cfg = settings(QUEUEDIR=str(tmp_path / "q"))
    envs = [("10.1.", {"DATABYTES": "lots"})]
    _book, (found,) = plan.check_all(cfg, envs, Writer.current(), "r.cdb")  # type: ignore[arg-type]
    assert str(found) == ("DATABYTES (databytes) from rule 10.1. in r.cdb: bad value "
                          "'lots'; allowed: bytes, 0 = no limit")


def test_an_env_planned_on_first_use_keeps_its_failure(tmp_path: Path) -> None:
    create_queue(str(tmp_path / "q"))
    cfg = settings(QUEUEDIR=str(tmp_path / "q"))
    book, problems = plan.check_all(cfg, (), Writer.current())  # type: ignore[arg-type]
    assert problems == []
    with pytest.raises(plan.PlanError, match="SPLIT"):
        book.for_env({"SPLIT": "5"})
    (tmp_path / "q" / "mess" / "0").rename(tmp_path / "gone")  # the retry would differ...
    with pytest.raises(plan.PlanError, match="SPLIT"):  # ...but the verdict is kept
        book.for_env({"SPLIT": "5"})


def test_problem_shape() -> None:
    found = problem("SPLIT", "config file x.toml", "7, but")
    assert isinstance(found, ConfigError)
    assert str(found) == "SPLIT (split) from config file x.toml: 7, but"


# ---- shared encodings ---------------------------------------------------------------------

names = st.text(st.characters(blacklist_characters="=\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=20)


@given(names, st.one_of(st.none(), st.text(st.characters(blacklist_categories=("Cs",)),
                                           max_size=40)))
def test_env_items_round_trip(name: str, value: str | None) -> None:
    assert decode_env_item(encode_env_item(name, value)) == (name, value)


def test_env_items_that_are_neither_set_nor_unset() -> None:
    assert [decode_env_item(item) for item in ("D", "-", "+NAME", "x=1")] == [None] * 4


def test_envelope_records_shared_by_todo_file_and_qmail_queue() -> None:
    records = envelope_records(b"a@b", [b"c@d", b"e@f"])
    assert records == b"Fa@b\0Tc@d\0Te@f\0"
    assert envelope_bytes(b"a@b", [b"c@d", b"e@f"], 7, 9) == b"u7\0p9\0" + records


# ---- `qmqpd session`'s own argument reading ------------------------------------------------

@pytest.mark.parametrize(("argv", "config"), [
    (["session"], None), (["session", "--config", "a.toml"], "a.toml"),
    (["session", "--config=b.toml"], "b.toml")])
def test_session_arguments_without_the_parser(argv: list[str], config: str | None) -> None:
    from qmqpd import cli

    args = cli._session_fast_path(argv)
    assert args is not None and args.config == config and args.func is cli.cmd_session


@pytest.mark.parametrize("argv", [["serve"], ["session", "--help"], ["session", "--config"],
                                  ["session", "--config", "-x"], ["session", "extra"]])
def test_anything_else_goes_to_the_parser(argv: list[str]) -> None:
    from qmqpd import cli

    assert cli._session_fast_path(argv) is None


def test_a_missing_proxy_socket_owner_is_named_before_the_start() -> None:
    """PROXY_SOCKET_USER/_GROUP that do not exist: `qmqpd check` and `serve` name them
    (before, the start failed binding, with a line naming USER, and check said nothing)."""
    from qmqpd import preflight

    settings = {"PROXY_SOCKET": "/run/qmqpd-test/lb.sock", "ALLOW_ROOT": "1",
                "PROXY_SOCKET_USER": "no-such-user-qmqpd", "PROXY_SOCKET_GROUP": "0"}
    found = {p.setting: str(p) for p in preflight.server_problems(load(None, settings))}
    assert set(found) == {"PROXY_SOCKET_USER"}, found
    assert "'no-such-user-qmqpd': no such user" in found["PROXY_SOCKET_USER"]
    settings.update(PROXY_SOCKET_USER="0", PROXY_SOCKET_GROUP="no-such-group-qmqpd")
    found = {p.setting: str(p) for p in preflight.server_problems(load(None, settings))}
    assert set(found) == {"PROXY_SOCKET_GROUP"}, found
    settings.update(PROXY_SOCKET="")  # no socket: its owner is not looked up
    assert preflight.server_problems(load(None, settings)) == []
