"""Our rules cdb against Debian's ucspi-tcp: tcprules output and tcprulescheck decisions."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import cdbx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmqpd import rules
from qmqpd.rules import RulesError, RuleTable

TCPRULES = shutil.which("tcprules")
TCPRULESCHECK = shutil.which("tcprulescheck")
pytestmark = pytest.mark.skipif(
    not (TCPRULES and TCPRULESCHECK), reason="Debian ucspi-tcp (tcprules) is not installed"
)


def debian_compile(text: str, cdb: Path) -> subprocess.CompletedProcess[bytes]:
    assert TCPRULES
    return subprocess.run(
        [TCPRULES, str(cdb), str(cdb) + ".tmp"],
        input=text.encode("utf-8", "surrogateescape"),
        capture_output=True,
        timeout=10,
        check=False,
    )


def debian_check(cdb: Path, ip: str, host: str = "", info: str = "") -> str:
    assert TCPRULESCHECK
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TCPREMOTEIP": ip}
    if host:
        env["TCPREMOTEHOST"] = host
    if info:
        env["TCPREMOTEINFO"] = info
    done = subprocess.run(
        [TCPRULESCHECK, str(cdb)], env=env, capture_output=True, timeout=10, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode("utf-8", "surrogateescape")


def our_compile(text: str, cdb: Path) -> None:
    source = cdb.with_suffix(".txt")
    source.write_text(text, errors="surrogateescape")
    rules.compile_rules(str(source), str(cdb))


def items(cdb: Path) -> list[tuple[bytes, bytes]]:
    db = cdbx.CDB(str(cdb))
    try:
        return list(db.items(all=True))
    finally:
        db.close()


CORPUS = {
    "svctool_default": ":deny\n",
    "install_mini": "# QMQP clients\n127.:allow\n1.2.3.:allow\n:deny\n",
    "relay_style": (
        "127.0.0.1:allow,RELAYCLIENT=\"\",TCPLOCALHOST=\"movie.edu\"\n"
        "10.0.:allow,RELAYCLIENT=/@fix.me/\n"
        "18.23.0.32:deny\n"
        "192.168.1.37-53:allow,MAXPERIP=\"3\",DKIMSIGN=\"/etc/dkim/%d/default\"\n"
        "172.16-31.:allow,QHPSI=\"clamd\"\n"
        "joe@127.0.0.1:allow,WHO=\"joe\"\n"
        "bob@=mail.example.com:deny\n"
        "=mail.example.com:allow,WHO=|host|\n"
        "=.example.com:allow,WHO=#suffix#\n"
        "=:deny\n"
        ":allow,DEFAULT=\"yes\"\n"
    ),
    "quirks": (
        "#comment:deny\n"
        "\n"
        "   \t\n"
        " 5.5.5.5:deny\n"
        "6.6.6.6:allow   \t\n"
        "7.7.7.:allow,A=xx,B=xyzx,C=\"a=b\",D,E=\"v\",=\"empty name\"\n"
        "8.8.8.0-3:deny\n"
        "8.8.9.04-06:allow\n"
        "8.8.10.250-999:allow\n"
        "9.-2.:allow\n"
        "-:allow\n"
        "x-y@9.9.9.9:allow\n"
        "=a-b.example:allow\n"
        "1.1.1.1:deny\n"
        "1.1.1.1:allow\n"
        "2.2.2.2:allow,A=\":deny\""
    ),
    "utf8_and_bytes": "=h\u00e9.example:allow,N=\"caf\u00e9\"\n3.3.3.3:allow,RAW=\"\udcff\"\n",
}

CLIENTS = [
    (ip, host, info)
    for ip in (
        "127.0.0.1", "127.1.2.3", "1.2.3.4", "1.2.4.4", "10.0.0.1", "10.1.0.1", "18.23.0.32",
        "18.23.0.33", "192.168.1.36", "192.168.1.37", "192.168.1.53", "192.168.1.54",
        "172.15.0.1", "172.16.0.1", "172.31.255.255", "172.32.0.1", "5.5.5.5", "6.6.6.6",
        "7.7.7.7", "8.8.8.2", "8.8.8.4", "8.8.9.5", "8.8.10.255", "9.0.0.1", "9.2.0.1",
        "9.3.0.1", "0", "9.9.9.9", "1.1.1.1", "2.2.2.2", "3.3.3.3", "203.0.113.9",
    )
    for host, info in (
        ("", ""), ("", "joe"), ("mail.example.com", ""), ("mail.example.com", "bob"),
        ("www.example.com", ""), ("other.org", ""), ("h\u00e9.example", ""),
    )
]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_compiles_byte_identical(tmp_path, name):
    text = CORPUS[name]
    debian, ours = tmp_path / "debian.cdb", tmp_path / "ours.cdb"
    done = debian_compile(text, debian)
    assert done.returncode == 0, done.stderr
    our_compile(text, ours)
    assert items(ours) == items(debian)
    assert ours.read_bytes() == debian.read_bytes()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_decisions_agree_with_tcprulescheck(tmp_path, name):
    text = CORPUS[name]
    debian, ours = tmp_path / "debian.cdb", tmp_path / "ours.cdb"
    assert debian_compile(text, debian).returncode == 0
    our_compile(text, ours)
    on_debian, on_ours = RuleTable(str(debian)), RuleTable(str(ours))
    for ip, host, info in CLIENTS:
        assert on_ours.lookup(ip, host, info) == on_debian.lookup(ip, host, info)
        expected = debian_check(ours, ip, host, info)
        assert rules.check(str(ours), ip, host, info) == expected, (ip, host, info)
        rule = on_ours.lookup(ip, host, info)
        assert rule.allow is expected.endswith("allow connection\n")


def test_tcprulescheck_sees_our_decisions_for_many_addresses(tmp_path):
    text = CORPUS["relay_style"]
    ours = tmp_path / "ours.cdb"
    our_compile(text, ours)
    table = RuleTable(str(ours))
    for last in range(30, 60):
        ip = f"192.168.1.{last}"
        report = debian_check(ours, ip)
        assert rules.check(str(ours), ip) == report
        rule = table.lookup(ip)
        assert report.startswith(f"rule {rule.key}:\n")
        assert rule.allow is report.endswith("allow connection\n")
        assert (rule.env.get("MAXPERIP") == "3") is (37 <= last <= 53)


BAD_LINES = [
    "1.2.3.4:Allow",
    "1.2.3.4:allowx",
    "1.2.3.4:denyx",
    "1.2.3.4: allow",
    "1.2.3.4:allow\r",
    "1.2.3.4:allow,",
    "1.2.3.4:allow,A",
    "1.2.3.4:allow,A=",
    '1.2.3.4:allow,A="x',
    '1.2.3.4:allow,A="x"y',
    "1.2.3.x-5:allow",
    "1.2.3.4-5x:allow",
    "a-b:allow",
    "a:b:deny",
]


@pytest.mark.parametrize("line", BAD_LINES)
def test_bad_lines_rejected_by_both_and_cdb_left_alone(tmp_path, line):
    text = "127.:allow\n" + line + "\n:deny\n"
    debian, ours = tmp_path / "debian.cdb", tmp_path / "ours.cdb"
    for cdb in (debian, ours):
        rules.write_cdb([(b"old", b"")], str(cdb))
    assert debian_compile(text, debian).returncode == 100
    with pytest.raises(RulesError, match=r":2: "):
        our_compile(text, ours)
    assert items(debian) == items(ours) == [(b"old", b"")]


def test_documented_differences_from_debian(tmp_path):
    debian, ours = tmp_path / "debian.cdb", tmp_path / "ours.cdb"
    # IndiMail's unset: Debian rejects it
    assert debian_compile("1.2.3.4:allow,!A\n", debian).returncode == 100
    our_compile("1.2.3.4:allow,!A\n", ours)
    assert items(ours) == [(b"1.2.3.4", b"-A\0")]
    # an empty range and a line without a colon: Debian writes nothing, we refuse
    for text in ("1.2.3.9-5:deny\n", "1.2.3.4 deny\n"):
        assert debian_compile(text, debian).returncode == 0
        assert items(debian) == []
        with pytest.raises(RulesError):
            our_compile(text, ours)
    # CIDR: Debian stores the text (it never matches there), we store tcpserver's key
    assert debian_compile("10.0.0.0/8:deny\n", debian).returncode == 0
    assert items(debian) == [(b"10.0.0.0/8", b"D\0")]
    our_compile("10.0.0.0/8:deny\n", ours)
    assert items(ours) == [(b"_0000e0g0", b"D\0")]
    assert not RuleTable(str(ours)).lookup("10.9.8.7").allow
    # IPv6: Debian cannot parse the address, we store the expanded form
    assert debian_compile("::1:allow\n", debian).returncode == 100
    our_compile("::1:allow\n", ours)
    assert items(ours) == [(b"0000:0000:0000:0000:0000:0000:0000:0001", b"")]


def test_debian_reads_our_ipv6_key_as_an_exact_address(tmp_path):
    ours = tmp_path / "ours.cdb"
    our_compile("2001:db8::1:deny\n:allow\n", ours)
    expanded = "2001:0DB8:0000:0000:0000:0000:0000:0001"
    assert debian_check(ours, expanded) == f"rule {expanded}:\ndeny connection\n"
    assert rules.check(str(ours), "2001:db8::1") == f"rule {expanded}:\ndeny connection\n"


# ------------------------------------------------------------ differential fuzzing

OCTETS = ["1", "2", "10", "127", "255"]
ip_part = st.lists(st.sampled_from(OCTETS), min_size=1, max_size=4)
hosts = st.sampled_from(["a.example.com", "b.example.com", "example.com", "x.org", "y"])
infos = st.sampled_from(["joe", "bob"])


@st.composite
def addresses(draw) -> str:
    kind = draw(st.sampled_from(
        ["exact", "prefix", "range", "host", "suffix", "anyhost", "info_ip", "info_host", ""]
    ))
    octets = draw(ip_part)
    if kind == "exact":
        return ".".join([*octets, "1", "1", "1"][:4])
    if kind == "prefix":
        return ".".join(octets[:3]) + "."
    if kind == "range":
        low = draw(st.integers(0, 255))
        high = draw(st.integers(low, 300))
        return ".".join(octets[:3]) + f".{low}-{high}"
    if kind == "host":
        return "=" + draw(hosts)
    if kind == "suffix":
        return "=" + draw(st.sampled_from([".example.com", ".com", ".org"]))
    if kind == "anyhost":
        return "="
    if kind == "info_ip":
        return draw(infos) + "@" + ".".join([*octets, "1", "1", "1"][:4])
    if kind == "info_host":
        return draw(infos) + "@=" + draw(hosts)
    return ""


@st.composite
def rule_lines(draw) -> str:
    line = draw(addresses()) + ":" + draw(st.sampled_from(["allow", "deny"]))
    for _ in range(draw(st.integers(0, 2))):
        quote = draw(st.sampled_from(['"', "/", "|", "x"]))
        value = draw(st.text(alphabet="ab 1=:,", max_size=4)).replace(quote, "")
        line += f",{draw(st.sampled_from(['A', 'B', 'MAXPERIP']))}={quote}{value}{quote}"
    return line


@st.composite
def clients(draw) -> tuple[str, str, str]:
    ip = ".".join(draw(st.lists(st.sampled_from(OCTETS), min_size=4, max_size=4)))
    return ip, draw(st.just("") | hosts), draw(st.just("") | infos)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rule_lines(), max_size=10), st.lists(clients(), min_size=1, max_size=4))
def test_random_rules_agree_with_debian(tmp_path_factory, lines, some_clients):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    text = "\n".join(lines) + "\n"
    debian, ours = tmp_path / "debian.cdb", tmp_path / "ours.cdb"
    assert debian_compile(text, debian).returncode == 0
    our_compile(text, ours)
    assert ours.read_bytes() == debian.read_bytes()
    for ip, host, info in some_clients:
        assert rules.check(str(ours), ip, host, info) == debian_check(ours, ip, host, info)


def _known_difference(line: str, error: RulesError | None) -> bool:
    """The documented places where we and Debian's tcprules may disagree on a line."""
    body = line.rstrip(" \t")
    address = body.split(":allow", 1)[0].split(":deny", 1)[0]
    if "!" in body or "/" in address or ":" in address:
        return True  # unset, CIDR and IPv6 extensions
    text = str(error or "")
    return "no colon" in text or "contains no number" in text


junk_lines = st.one_of(
    st.text(alphabet="0123456789.-=@,!\"x/:adeilnowy #\t", max_size=30),
    st.builds(
        lambda address, head, tail: f"{address}:{head}{tail}",
        st.text(alphabet="0123456789.-=@x ", max_size=12),
        st.sampled_from(["allow", "deny", "allo", "Deny", ""]),
        st.text(alphabet=',=",x/!ab: \t', max_size=14),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk_lines)
def test_random_lines_accepted_or_rejected_like_debian(tmp_path_factory, line):
    if line.startswith("#"):
        line = line[1:]
    tmp_path = tmp_path_factory.mktemp("line")
    debian, ours = tmp_path / "debian.cdb", tmp_path / "ours.cdb"
    debian_ok = debian_compile(line + "\n", debian).returncode == 0
    error = None
    try:
        our_compile(line + "\n", ours)
    except RulesError as caught:
        error = caught
    if (error is None) is not debian_ok:
        assert _known_difference(line, error), (line, error)
    elif debian_ok and ours.read_bytes() != debian.read_bytes():
        assert _known_difference(line, error), (line, items(ours), items(debian))
