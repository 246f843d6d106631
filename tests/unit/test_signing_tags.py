"""filters.dkimtags against dkimpy, the reference it must equal: folding, the blanked b=,
tag lists, header canonicalisation, and which signatures' tags pass the checks (each
failure with its qmail-dkim letter, typed, not read back from a text)."""

from __future__ import annotations

import time

import dkim as dkimpy
import pytest
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import InvalidTagValueList, parse_tag_value
from hypothesis import given, settings
from hypothesis import strategies as st

from qmqpd.filters import dkimtags

TEXT = st.binary(max_size=300).map(lambda b: bytes(c % 96 + 32 for c in b))  # printable + DEL
WORDS = st.lists(st.sampled_from([b"a", b"bb", b"c" * 80, b" ", b";", b"=", b"\r\n ", b"x" * 5]),
                 max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(header=st.one_of(TEXT, WORDS), namelen=st.integers(0, 40),
       linesep=st.sampled_from([b"\r\n", b"\n"]))
def test_fold_is_dkimpys(header: bytes, namelen: int, linesep: bytes) -> None:
    assert dkimtags.fold(header, namelen, linesep) == dkimpy.fold(header, namelen, linesep)


@settings(max_examples=300, deadline=None)
@given(value=st.lists(st.sampled_from([b" b=", b";b=", b"b =", b"AbC+/=", b"\r\n ", b" ",
                                       b"bh=x", b";", b"a=1"]), max_size=12).map(b"".join))
def test_blank_b_is_dkimpys(value: bytes) -> None:
    assert dkimtags.blank_b(value) == dkimpy.RE_BTAG.sub(b"\\1", value)


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from([b"a=1", b"b = 2 ", b";", b" ", b"1x=3", b"a=", b"=",
                                      b"h=from:to", b"_=1"]), max_size=8).map(b"".join))
def test_tag_lists_parse_as_dkimpy_parses_them(text: bytes) -> None:
    try:
        expected = parse_tag_value(text)
    except InvalidTagValueList:
        with pytest.raises(dkimtags.TagError) as raised:
            dkimtags.parse_tags(text)
        assert raised.value.letter == "H"
        return
    assert dkimtags.parse_tags(text) == expected


@pytest.mark.parametrize("canon", [b"simple", b"relaxed"])
def test_header_canonicalisation_is_dkimpys(canon: bytes) -> None:
    fields = [(b"Subject ", b"  a \t b\r\n\t folded  \r\n"), (b"From", b" x@y\r\n")]
    policy = CanonicalizationPolicy.from_c_value(canon + b"/simple")
    assert dkimtags.canonical_headers(canon, fields) == policy.canonicalize_headers(fields)


@pytest.mark.parametrize(("value", "parsed"), [
    (b"relaxed/simple", (b"relaxed", b"simple")), (b"relaxed", (b"relaxed", b"simple")),
    (b"simple/relaxed", (b"simple", b"relaxed"))])
def test_c_values(value: bytes, parsed: tuple[bytes, bytes]) -> None:
    assert dkimtags.parse_c(value) == parsed


@pytest.mark.parametrize("value", [b"x/y", b"relaxed/relaxed/relaxed", b""])
def test_bad_c_values_are_syntax_errors(value: bytes) -> None:
    with pytest.raises(dkimtags.TagError) as raised:
        dkimtags.parse_c(value)
    assert raised.value.letter == "H"


NOW = int(time.time())
GOOD = {b"v": b"1", b"a": b"rsa-sha256", b"b": b"AAAA", b"bh": b"AAAA", b"d": b"example.org",
        b"h": b"from", b"s": b"s1"}


@pytest.mark.parametrize(("change", "letter"), [
    ({}, None),
    ({b"a": b"rsa-md5"}, "V"),
    ({b"x": str(NOW - 2 * dkimtags.CLOCK_SLOP).encode()}, "K"),
    ({b"x": str(NOW + 60).encode(), b"t": str(NOW).encode()}, None),
    ({b"t": str(NOW + 2 * dkimtags.CLOCK_SLOP).encode()}, "H"),
    ({b"i": b"joe@example.org"}, None), ({b"i": b"@mail.example.org"}, None),
    ({b"i": b"joe@badexample.org"}, "H"), ({b"i": b"example.org"}, "H"),
    ({b"d": b"exa;mple.org"}, "H"), ({b"v": b"2"}, "H"), ({b"l": b"12x"}, "H"),
    ({b"q": b"dns"}, "H"), ({b"b": b"AA!A"}, "H"), ({b"bh": b"AAA"}, "H"),
    ({b"h": None}, "H"),
])
def test_signature_checks_give_typed_letters(change: dict[bytes, bytes | None],
                                            letter: str | None) -> None:
    sig = {**GOOD, **change}
    sig = {k: v for k, v in sig.items() if v is not None}
    if letter is None:
        dkimtags.check_signature(sig, NOW)
        dkimpy.validate_signature_fields(sig)  # the reference agrees
        return
    with pytest.raises(dkimtags.TagError) as raised:
        dkimtags.check_signature(sig, NOW)
    assert raised.value.letter == letter
    if change != {b"i": b"example.org"}:  # dkimpy raises IndexError on that one
        with pytest.raises(dkimpy.ValidationError):
            dkimpy.validate_signature_fields(sig)
