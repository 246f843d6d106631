"""Docs and code cannot drift: every setting is documented, and only settings are."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

from qmqpd.config import SETTINGS, load, sample_toml, settings_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_settings_reference_is_generated_from_the_table() -> None:
    assert (ROOT / "docs" / "settings.md").read_text() == settings_markdown(), (
        "docs/settings.md is stale: run `qmqpd config --markdown > docs/settings.md`")


def test_sample_config_is_generated_from_the_table() -> None:
    assert (ROOT / "conf" / "qmqpd.toml").read_text() == sample_toml(), (
        "conf/qmqpd.toml is stale: run `qmqpd config --sample > conf/qmqpd.toml`")


def test_every_setting_once_in_the_reference_and_nothing_else() -> None:
    text = (ROOT / "docs" / "settings.md").read_text()
    documented = re.findall(r"^\| `([A-Z0-9_]+)` \|", text, flags=re.MULTILINE)
    assert sorted(documented) == sorted(SETTINGS)
    assert len(documented) == len(set(documented))


def test_settings_named_in_the_guides_exist() -> None:
    """An upper-case NAME in backticks in a guide that looks like a setting must be one."""
    known = set(SETTINGS)
    not_settings = {"TCPREMOTEIP", "TCPREMOTEHOST", "TCPREMOTEINFO", "TCPLOCALIP",
                    "TCPLOCALHOST", "TCPLOCALPORT", "TCPREMOTEPORT", "PROTO", "NAME",
                    "SIGHUP", "SIGTERM", "QMQPSERVERS", "QMAILHOME", "DKIM", "K", "Z", "D",
                    "IP", "TXT", "RSA",
                    "CONFIG"}  # Debian's haproxy.service: the HAProxy config file
    for doc in ("README.md", "docs/operator-guide.md"):
        text = (ROOT / doc).read_text()
        for name in set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", text)):
            assert name in known or name in not_settings, f"{doc} names unknown setting {name}"


def test_uncommented_sample_loads(tmp_path: Path) -> None:
    """Every default in the sample is a value the loader accepts."""
    lines = [line[1:] for line in sample_toml().splitlines()
             if line.startswith("#") and not line.startswith("# ") and "=" in line
             and not line.endswith("= (unset)")]  # no TOML value means "not set"
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    data = tomllib.loads(path.read_text())
    # a float default is written as a TOML float (3.0), not as the string "3.0"
    assert all(isinstance(data[s.key], float) for s in SETTINGS.values()
               if isinstance(s.default, float)), data
    cfg = load(str(path))
    for name, setting in SETTINGS.items():
        assert cfg[name] == setting.default, name


# What the operator reads: every file that names an installed path.
LAYOUT_FILES = ("README.md", "docs/*.md", "conf/*", "packaging/**/*", "man/*")
CONTROL_PATH = re.compile(r"/etc/qmqpd(/[^\s`'\"),]*)?")
CONTROL_ENTRIES = ("tcp.qmqp", "tcp.qmqp.cdb", "domainkeys/", "qmqpd.toml", "dkimkeys")


def layout_texts() -> dict[str, str]:
    paths = {path for pattern in LAYOUT_FILES for path in ROOT.glob(pattern) if path.is_file()}
    return {str(path.relative_to(ROOT)): path.read_text(errors="replace") for path in paths}


def test_one_control_layout_everywhere() -> None:
    """CONTROLDIR is /etc/qmqpd with tcp.qmqp, tcp.qmqp.cdb and domainkeys/ directly under
    it, in the code's defaults and in every document and example; the service directory is
    /etc/service (Debian's svscan)."""
    from qmqpd import service
    from qmqpd.filters import keys

    assert SETTINGS["CONTROLDIR"].default == "/etc/qmqpd" == keys.DEFAULT_CONTROLDIR
    options = service.build_parser().parse_args(["--qmqp=628", "--qbase=/q"])
    assert options.cntrldir == "/etc/qmqpd" and options.servicedir == "/etc/service"
    values = service.settings_from_options(options)
    assert values["RULES"] == "/etc/qmqpd/tcp.qmqp.cdb"
    assert keys.keygen.__defaults__ is not None
    assert "/etc/qmqpd/domainkeys" in keys.keygen.__defaults__
    for name, text in layout_texts().items():
        for match in CONTROL_PATH.finditer(text):
            rest = (match.group(1) or "/").lstrip("/")
            assert rest == "" or rest.startswith(CONTROL_ENTRIES), (
                f"{name}: {match.group(0)} is not in the one control layout")
        bare = re.findall(r"(?<![\w./-])/service\b", text)
        assert not bare, f"{name}: /service (Debian's svscan looks in /etc/service)"


def test_every_command_block_that_is_not_run_says_why() -> None:
    """A `sh norun` block is one the document tests do not run: the paragraph before it
    says so and why, so a reader knows which commands were not tried."""
    from tests.guide_runner import fenced_blocks

    for doc in ("README.md", "docs/operator-guide.md"):
        text = (ROOT / doc).read_text()
        lines = text.splitlines()
        for block in fenced_blocks(text):
            assert block.language in ("sh", "text", "yaml", "haproxy"), (doc, block.line)
            if "norun" in block.flags:
                before = " ".join(lines[max(0, block.line - 5):block.line - 1]).lower()
                assert "not run" in before or "does not run" in before, (
                    f"{doc}:{block.line}: say before the block why it is not run")


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of parser and of its subcommands' parsers, recursively."""
    found: set[str] = set()
    for action in parser._actions:  # argparse keeps no public list of them
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= _long_options(child)
        found |= {o for o in action.option_strings if o.startswith("--") and o != "--help"}
    return found


def test_man_pages_name_every_option() -> None:
    """Each long option `qmqpd --help` and `qmqpc --help` list is in the man page."""
    from qmqpd import cli, client

    for page, parser in (("qmqpd.8", cli.build_parser()), ("qmqpc.1", client._parser())):
        text = (ROOT / "man" / page).read_text()
        missing = sorted(o for o in _long_options(parser) if f"Fl -{o[2:]}" not in text)
        assert not missing, f"man/{page} does not name {missing}"
