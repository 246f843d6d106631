"""Rules text → cdb records, lookup order, reopen on change, and property tests."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmqpd import rules
from qmqpd.rules import Rule, RulesError, RuleTable, compile_rules, parse_text


def make_table(tmp_path, text: str, name: str = "tcp.qmqp") -> RuleTable:
    source = tmp_path / name
    source.write_text(text)
    compile_rules(str(source), str(source) + ".cdb")
    return RuleTable(str(source) + ".cdb")


# ------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    ("text", "records"),
    [
        ("1.2.3.4:allow\n", [(b"1.2.3.4", b"")]),
        ("1.2.3.4:deny\n", [(b"1.2.3.4", b"D\0")]),
        (':allow,A="x",B=/y/\n', [(b"", b"+A=x\0+B=y\0")]),
        ("=h.example:deny,A=xyzx\n", [(b"=h.example", b"D\0+A=yz\0")]),
        ('1.:allow,A=""\n', [(b"1.", b"+A=\0")]),
        ("1.:allow,A=xx\n", [(b"1.", b"+A=\0")]),
        ('1.:allow,A,B="v"\n', [(b"1.", b"+A,B=v\0")]),
        ('1.:allow,A=":deny"\n', [(b"1.", b"+A=:deny\0")]),
        ("1.:allow,!A\n", [(b"1.", b"-A\0")]),
        ('1.:allow,!A,B="v",!C\n', [(b"1.", b"-A\0+B=v\0-C\0")]),
        ("joe@1.2.3.4:allow\n", [(b"joe@1.2.3.4", b"")]),
        ("joe@=h.example:allow\n", [(b"joe@=h.example", b"")]),
        ("# comment:deny\n\n   \n\t\n1.2.3.4:allow \t \n", [(b"1.2.3.4", b"")]),
        (" #x:deny\n", [(b" #x", b"D\0")]),
        ("1.2.3.4:allow", [(b"1.2.3.4", b"")]),
        ("1.2.3.7-9:deny\n", [(b"1.2.3.7", b"D\0"), (b"1.2.3.8", b"D\0"), (b"1.2.3.9", b"D\0")]),
        ("10.2-3.:allow\n", [(b"10.2.", b""), (b"10.3.", b"")]),
        ("1.2.3.04-05:allow\n", [(b"1.2.3.4", b""), (b"1.2.3.5", b"")]),
        ("1.2.3.254-999:allow\n", [(b"1.2.3.254", b""), (b"1.2.3.255", b"")]),
        ("1.2.-1.:allow\n", [(b"1.2.0.", b""), (b"1.2.1.", b"")]),
        ("x-y@1.2.3.4-5:allow\n", [(b"x-y@1.2.3.4-5", b"")]),
        ("=a-b.example:allow\n", [(b"=a-b.example", b"")]),
        ("1.2.3.4:deny\n1.2.3.4:allow\n", [(b"1.2.3.4", b"D\0"), (b"1.2.3.4", b"")]),
    ],
)
def test_parse_text_records(text, records):
    assert parse_text(text) == records


def test_ipv6_addresses_are_stored_expanded():
    expanded = b"2001:0DB8:0000:0000:0000:0000:0000:0001"
    assert parse_text("2001:db8::1:allow\n") == [(expanded, b"")]
    assert parse_text("2001:DB8:0:0::1:deny,A=\"x\"\n") == [(expanded, b"D\0+A=x\0")]
    assert parse_text("joe@2001:db8::1:allow\n") == [(b"joe@" + expanded, b"")]
    assert parse_text("::1:allow\n") == [(b"0000:" * 7 + b"0001", b"")]


def test_cidr_keys_use_the_tcpserver_bit_encoding():
    # 10 = 00001010: bits 4 and 6 are set -> the 5th and 7th letters
    assert parse_text("10.0.0.0/8:allow\n") == [(b"_0000e0g0", b"")]
    assert parse_text("10/8:allow\n") == [(b"_0000e0g0", b"")]
    assert parse_text("255.255.255.255/32:deny\n") == [
        (b"_abcdefghijklmnopqrstuvwxyz123456", b"D\0")
    ]
    # IPv6: the n-th set bit is the byte 96+n; 2001 = 0010 0000 0000 0001
    assert parse_text("2001::/16:allow\n") == [(b"^00`000000000000a", b"")]


def test_rule_from_data_decodes_like_tcpserver():
    assert rules.rule_from_data("k", b"") == Rule(True, {}, "k")
    assert rules.rule_from_data("k", b"D\0") == Rule(False, {}, "k")
    rule = rules.rule_from_data("k", b"+A=x\0+B=\0-C\0+MAXPERIP=3\0+D=a=b\0junk")
    assert rule == Rule(True, {"A": "x", "B": "", "C": None, "MAXPERIP": "3", "D": "a=b"}, "k")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("1.2.3.4:Allow", "must start with allow or deny"),
        ("1.2.3.4:allowfoo", "expected ','"),
        ("1.2.3.4: allow", "must start with allow or deny"),
        ("1.2.3.4:allow\r", "expected ','"),
        ("1.2.3.4:allow,", "VAR"),
        ("1.2.3.4:allow,A", "VAR"),
        ("1.2.3.4:allow,A=", "no quoted value"),
        ('1.2.3.4:allow,A="x', "not closed"),
        ('1.2.3.4:allow,A="x"junk', "expected ','"),
        ("1.2.3.4:allow,!", "variable name"),
        ("1.2.3.4 allow", "no colon"),
        ("1.2.3.x-5:allow", "not a number"),
        ("1.2.3.4-5x:allow", "not a number"),
        ("1.2.3.9-5:allow", "no number"),
        ("1.2.3.300-400:allow", "no number"),
        ("a:b:deny", "invalid IPv6"),
        ("2001:db8::/200:allow", "prefix length"),
        ("10.0.0.0/0:allow", "prefix length"),
        ("10/16:allow", "fewer than 16 bits"),
        ("10.300.0.0/8:allow", "invalid IPv4"),
        ("1.2.3.4:allow,A=\"a\0b\"", "NUL"),
    ],
)
def test_bad_line_names_file_and_line(line, problem):
    text = "# header\n1.2.3.4:allow\n\n" + line + "\n:deny\n"
    with pytest.raises(RulesError) as caught:
        parse_text(text, "/etc/tcp.qmqp")
    message = str(caught.value)
    assert message.startswith("/etc/tcp.qmqp:4: ")
    assert problem in message


# ----------------------------------------------------------------------- compiling


def test_compile_is_atomic_and_leaves_no_temp(tmp_path):
    source, cdb = tmp_path / "tcp.qmqp", tmp_path / "tcp.qmqp.cdb"
    source.write_text("127.:allow\n:deny\n")
    assert compile_rules(str(source), str(cdb)) == 2
    before = cdb.read_bytes()
    assert oct(cdb.stat().st_mode & 0o777) == "0o644"
    source.write_text("127.:allow\n1.2.3.4:bogus\n")
    with pytest.raises(RulesError, match=r"tcp.qmqp:2: "):
        compile_rules(str(source), str(cdb))
    assert cdb.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tcp.qmqp", "tcp.qmqp.cdb"]


def test_write_error_removes_temp(tmp_path):
    with pytest.raises(TypeError):
        rules.write_cdb([(b"k", 5)], str(tmp_path / "x.cdb"))  # type: ignore[list-item]
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------- lookup

ORDER_RULES = """\
joe@1.2.3.4:allow,WHO="info@ip"
joe@=h.example.com:allow,WHO="info@=host"
1.2.3.4:allow,WHO="ip"
=h.example.com:allow,WHO="=host"
1.2.3.:allow,WHO="1.2.3."
1.2.:allow,WHO="1.2."
1.0.0.0/8:allow,WHO="cidr8"
1.128.0.0/9:allow,WHO="cidr9"
=.example.com:allow,WHO="=.example.com"
=.com:allow,WHO="=.com"
=:allow,WHO="="
:deny,WHO="default"
"""


@pytest.mark.parametrize(
    ("ip", "host", "info", "who"),
    [
        ("1.2.3.4", "h.example.com", "joe", "info@ip"),
        ("1.2.3.5", "h.example.com", "joe", "info@=host"),
        ("1.2.3.4", "h.example.com", "ann", "ip"),
        ("1.2.3.5", "h.example.com", "", "=host"),
        ("1.2.3.5", "x.example.com", "", "1.2.3."),
        ("1.2.9.9", "x.example.com", "", "1.2."),
        ("1.200.0.1", "x.example.com", "", "cidr9"),
        ("1.9.0.1", "x.example.com", "", "cidr8"),
        ("9.9.9.9", "x.example.com", "", "=.example.com"),
        ("9.9.9.9", "a.b.com", "", "=.com"),
        ("9.9.9.9", "localhost", "", "="),
        ("9.9.9.9", "", "joe", "default"),
    ],
)
def test_lookup_order(tmp_path, ip, host, info, who):
    table = make_table(tmp_path, ORDER_RULES)
    rule = table.lookup(ip, host, info)
    if who == "default":
        # tcpserver stops at the D of a deny: variables after it are never set
        assert rule == Rule(False, {}, "")
    else:
        assert rule.allow and rule.env == {"WHO": who}


def test_no_match_allows_with_empty_env(tmp_path):
    table = make_table(tmp_path, "10.:deny\n")
    assert table.lookup("192.0.2.1") == Rule(True, {}, None)
    assert table.lookup("10.1.1.1") == Rule(False, {}, "10.")


def test_ipv6_and_v4_mapped_lookups(tmp_path):
    text = (
        "2001:db8::1:allow,WHO=\"exact6\"\n"
        "2001:db8::/32:allow,WHO=\"net6\"\n"
        "joe@2001:db8::7:allow,WHO=\"info6\"\n"
        "192.0.2.:allow,WHO=\"v4\"\n"
        ":deny\n"
    )
    table = make_table(tmp_path, text)
    assert table.lookup("2001:db8::1").env == {"WHO": "exact6"}
    assert table.lookup("2001:0DB8:0:0:0:0:0:1").env == {"WHO": "exact6"}
    assert table.lookup("2001:db8:ffff::9").env == {"WHO": "net6"}
    assert table.lookup("2001:db8::7", info="joe").env == {"WHO": "info6"}
    assert table.lookup("::ffff:192.0.2.8").env == {"WHO": "v4"}
    assert table.lookup("::FFFF:192.0.2.8").key == "192.0.2."
    denied = table.lookup("2001:db9::1")
    assert (denied.allow, denied.key) == (False, "")


def test_compact_ipv6_keys_from_other_compilers_match(tmp_path):
    # IndiMail's own tcprules stores IPv6 literally; tcpserver then matches the compact form
    rules.write_cdb([(b"2001:db8::5", b"D\0")], str(tmp_path / "r.cdb"))
    table = RuleTable(str(tmp_path / "r.cdb"))
    assert table.lookup("2001:db8::5").allow is False
    assert table.lookup("2001:db8::6").allow is True


def test_candidate_keys_for_ipv6_are_expanded_compact_then_cidr():
    keys = list(rules.candidate_keys("2001:db8::1", "h.example", "joe"))
    assert keys[:4] == [
        "joe@2001:0DB8:0000:0000:0000:0000:0000:0001",
        "joe@=h.example",
        "2001:0DB8:0000:0000:0000:0000:0000:0001",
        "2001:db8::1",
    ]
    assert keys[4] == "=h.example"
    assert sum(k.startswith("^") for k in keys) == 128
    assert keys[-3:] == ["=.example", "=", ""]


def test_no_rules_means_loopback_only():
    table = RuleTable(None)
    for ip in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
        assert table.lookup(ip).allow, ip
    for ip in ("192.0.2.1", "::2", "10.0.0.1", "garbage"):
        rule = table.lookup(ip)
        assert not rule.allow and "no rules" in rule.reason, ip


def test_unreadable_cdb_denies_and_reports_once(tmp_path):
    reasons: list[str] = []
    path = tmp_path / "missing.cdb"
    table = RuleTable(str(path), report=reasons.append)
    for _ in range(3):
        rule = table.lookup("127.0.0.1")
        assert not rule.allow
        assert "unable to read" in rule.reason
    assert len(reasons) == 1
    path.write_bytes(b"\0" * 10)  # not a cdb
    rule = table.lookup("127.0.0.1")
    assert not rule.allow and "not a cdb" in rule.reason
    assert len(reasons) == 2
    rules.write_cdb([(b"", b"")], str(path))
    assert table.lookup("127.0.0.1").allow


def test_text_rules_path_is_a_clear_error(tmp_path):
    text = tmp_path / "tcp.qmqp"
    text.write_text("127.:allow\n:deny\n")
    with pytest.raises(RulesError, match="compile it first"):
        RuleTable(str(text))
    with pytest.raises(RulesError, match="compile it first"):
        rules.check(str(text), "127.0.0.1")


def test_atomic_swap_is_seen_by_the_next_lookup(tmp_path):
    table = make_table(tmp_path, "192.0.2.1:allow\n:deny\n")
    assert table.lookup("192.0.2.1").allow
    other = tmp_path / "new"
    other.write_text("192.0.2.1:deny\n:allow\n")
    compile_rules(str(other), str(other) + ".cdb")
    os.rename(str(other) + ".cdb", str(tmp_path / "tcp.qmqp.cdb"))
    assert not table.lookup("192.0.2.1").allow
    assert table.lookup("192.0.2.2").allow


def test_rewrite_in_place_with_new_size_is_seen(tmp_path):
    table = make_table(tmp_path, ":deny\n")
    assert not table.lookup("192.0.2.1").allow
    rules.write_cdb(parse_text(':allow,A="1"\n'), str(tmp_path / "other.cdb"))
    # same inode, new content: caught by size and mtime
    (tmp_path / "tcp.qmqp.cdb").write_bytes((tmp_path / "other.cdb").read_bytes())
    assert table.lookup("192.0.2.1").env == {"A": "1"}


def test_remembered_rules_are_bounded_and_forgotten_on_refresh(tmp_path, monkeypatch):
    monkeypatch.setattr(rules, "RULE_CACHE", 2)
    table = make_table(tmp_path, '192.0.2.1:allow,A="1"\n192.0.2.2:deny\n:allow\n')
    for _ in range(2):  # more addresses than the cache holds, each asked twice
        assert table.lookup("192.0.2.1", refresh=False).env == {"A": "1"}
        assert not table.lookup("192.0.2.2", refresh=False).allow
        assert table.lookup("192.0.2.3", refresh=False) == Rule(True, {}, "")
    other = tmp_path / "new"
    other.write_text('192.0.2.1:deny\n:allow,B="2"\n')
    compile_rules(str(other), str(other) + ".cdb")
    os.rename(str(other) + ".cdb", str(tmp_path / "tcp.qmqp.cdb"))
    assert table.lookup("192.0.2.1", refresh=False).env == {"A": "1"}  # not looked at yet
    assert table.refresh()
    assert not table.lookup("192.0.2.1", refresh=False).allow
    assert table.lookup("192.0.2.3", refresh=False).env == {"B": "2"}


def test_check_output_format(tmp_path):
    make_table(tmp_path, '1.2.3.4:allow,A="x",!B\n1.2.:deny\n')
    cdb = str(tmp_path / "tcp.qmqp.cdb")
    assert rules.check(cdb, "1.2.3.4") == (
        "rule 1.2.3.4:\nset environment variable A=x\n"
        "unset environment variable B\nallow connection\n"
    )
    assert rules.check(cdb, "1.2.9.9") == "rule 1.2.:\ndeny connection\n"
    assert rules.check(cdb, "9.9.9.9") == "default:\nallow connection\n"


# ------------------------------------------------------------------ property tests

octet = st.integers(0, 255)
ipv4 = st.tuples(octet, octet, octet, octet).map(lambda t: ".".join(map(str, t)))


@st.composite
def rule_sets(draw):
    """Exact, dotted-prefix and CIDR rules (unique keys) plus an optional default."""
    rules_out: dict[str, bool] = {}
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["exact", "prefix", "cidr"]))
        parts = draw(st.tuples(octet, octet, octet, octet))
        allow = draw(st.booleans())
        if kind == "exact":
            rules_out.setdefault(".".join(map(str, parts)), allow)
        elif kind == "prefix":
            size = draw(st.integers(1, 3))
            rules_out.setdefault(".".join(map(str, parts[:size])) + ".", allow)
        else:
            length = draw(st.integers(1, 32))
            net = ipaddress.IPv4Network((".".join(map(str, parts)), length), strict=False)
            rules_out.setdefault(str(net), allow)
    default = draw(st.none() | st.booleans())
    return rules_out, default


def model_decision(rule_set: dict[str, bool], default: bool | None, ip: str) -> bool:
    """The decision written down plainly: exact, longest dot prefix, longest CIDR, default."""
    if ip in rule_set:
        return rule_set[ip]
    prefixes = [k for k in rule_set if k.endswith(".") and ip.startswith(k)]
    if prefixes:
        return rule_set[max(prefixes, key=len)]
    address = ipaddress.IPv4Address(ip)
    nets = [ipaddress.IPv4Network(k) for k in rule_set if "/" in k]
    containing = [n for n in nets if address in n]
    if containing:
        return rule_set[str(max(containing, key=lambda n: n.prefixlen))]
    return True if default is None else default


def rules_text(rule_set: dict[str, bool], default: bool | None) -> str:
    lines = [f"{key}:{'allow' if allow else 'deny'}" for key, allow in rule_set.items()]
    if default is not None:
        lines.append(":allow" if default else ":deny")
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None)
@given(rule_sets(), st.lists(ipv4, min_size=1, max_size=8), st.data())
def test_decision_matches_reference_model(tmp_path_factory, drawn, ips, data):
    rule_set, default = drawn
    # also look up addresses inside the rules' own networks, or few would ever match
    for key in rule_set:
        if "/" in key:
            net = ipaddress.IPv4Network(key)
            ips.append(str(net.network_address + data.draw(st.integers(0, net.num_addresses - 1))))
        elif key.endswith("."):
            ips.append(key + ".".join(["7"] * (4 - key.count("."))))
    tmp_path = tmp_path_factory.mktemp("prop")
    table = make_table(tmp_path, rules_text(rule_set, default))
    for ip in ips:
        assert table.lookup(ip).allow is model_decision(rule_set, default, ip), ip
        assert table.lookup("::ffff:" + ip).allow is model_decision(rule_set, default, ip)


@settings(max_examples=100, deadline=None)
@given(
    st.text(alphabet="0123456789.-:=@,!\"/xa #\t", max_size=40)
)
def test_parse_never_fails_other_than_rules_error(line):
    try:
        records = parse_text(line + "\n")
    except RulesError as error:
        assert str(error).startswith("tcp.qmqp:1: ")
    else:
        assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in records)


ipv6_values = st.integers(0, 2**128 - 1).filter(
    lambda v: ipaddress.IPv6Address(v).ipv4_mapped is None
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(ipv6_values, st.integers(1, 128), st.booleans()), max_size=6),
    st.lists(ipv6_values, max_size=4),
    st.data(),
)
def test_ipv6_cidr_decision_is_longest_prefix(tmp_path_factory, networks, ips, data):
    nets: dict[ipaddress.IPv6Network, bool] = {}
    for value, length, allow in networks:
        nets.setdefault(ipaddress.IPv6Network((value, length), strict=False), allow)
    for net in nets:  # an address inside each network, or few would ever match
        ips.append(int(net.network_address) + data.draw(st.integers(0, net.num_addresses - 1)))
    text = "".join(f"{net}:{'allow' if ok else 'deny'}\n" for net, ok in nets.items())
    table = make_table(tmp_path_factory.mktemp("v6"), text + ":deny\n")
    for value in ips:
        address = ipaddress.IPv6Address(value)
        containing = [net for net in nets if address in net]
        expected = nets[max(containing, key=lambda n: n.prefixlen)] if containing else False
        assert table.lookup(str(address)).allow is expected, (address, text)
