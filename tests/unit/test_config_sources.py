"""Where each setting comes from: a login shell's variables never become settings, an
envdir is read like daemontools' envdir, and each value's source is named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qmqpd.config import ignored_in_environment, load, read_envdir


def test_user_and_group_from_the_process_environment_are_ignored(tmp_path: Path) -> None:
    conf = tmp_path / "qmqpd.toml"
    conf.write_text('user = "qmailq"\ngroup = "qmail"\n')
    cfg = load(str(conf), {"USER": "root", "GROUP": "root", "MAXPERIP": "3"})
    assert cfg.user == "qmailq" and cfg.source("USER") == f"config file {conf}"
    assert cfg.group == "qmail"
    assert cfg.maxperip == 3 and cfg.source("MAXPERIP") == "environment"
    assert load(None, {"USER": "root"}).user == ""
    assert ignored_in_environment({"USER": "root", "HOME": "/root", "PORT": "1"}) == ["USER"]


def test_envdir_read_like_daemontools(tmp_path: Path) -> None:
    env = tmp_path / "variables"
    env.mkdir()
    (env / "MAXPERIP").write_bytes(b"7 \t\nignored second line\n")
    (env / "USER").write_text("qmailq\n")
    (env / "QUEUEDIR").write_bytes(b"/var/q\0ueue\n")  # NUL -> newline, as envdir does
    (env / "DATABYTES").write_bytes(b"")  # empty file: unset
    (env / ".options").write_text("qmqpd service ...\n")  # dot files skipped
    (env / "NOT_A_SETTING").write_text("x\n")
    entries = read_envdir(str(env))
    assert entries["MAXPERIP"] == ("7", f"envdir {env}/MAXPERIP")
    assert entries["QUEUEDIR"][0] == "/var/q\nueue"
    assert entries["DATABYTES"][0] is None
    assert set(entries) == {"MAXPERIP", "USER", "QUEUEDIR", "DATABYTES"}
    conf = tmp_path / "qmqpd.toml"
    conf.write_text("maxperip = 2\ndatabytes = 1000\n")
    cfg = load(str(conf), {"MAXPERIP": "5", "DATABYTES": "99", "USER": "root"}, envdir=str(env))
    assert cfg.maxperip == 7 and cfg.source("MAXPERIP") == f"envdir {env}/MAXPERIP"
    assert cfg.user == "qmailq" and cfg.source("USER") == f"envdir {env}/USER"
    # the empty file removes the process env's value; the config file's stays
    assert cfg.databytes == 1000 and cfg.source("DATABYTES") == f"config file {conf}"


def test_config_command_names_sources_and_the_ignored_variable(tmp_path: Path) -> None:
    env = tmp_path / "variables"
    env.mkdir()
    (env / "USER").write_text("nobody\n")
    result = subprocess.run(
        [sys.executable, "-m", "qmqpd", "config", "--envdir", str(env)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "USER": "root", "GROUP": "wheel"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"USER='nobody'  # envdir {env}/USER" in result.stdout
    notes = [line for line in result.stderr.splitlines() if "ignored" in line]
    assert len(notes) == 1 and "USER, GROUP" in notes[0], result.stderr
