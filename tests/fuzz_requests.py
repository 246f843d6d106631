"""Seeded QMQP request generator for the protocol fuzz run: valid, mutated, truncated,
random, huge length prefixes and nested netstring errors."""

from __future__ import annotations

import random
from collections.abc import Callable

from tests.qmqp_oracle import build_request, encode

ADDRESS_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789.-_+@"


def _address(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.01:
        return b"a" * 999  # the longest acceptable address
    if roll < 0.02:
        return b"b" * rng.choice((1000, 1001, 5000))  # too long: D
    if roll < 0.03:
        return b"nul\0inside@example.org"  # a NUL: D
    if roll < 0.06:
        return b""
    if roll < 0.12:
        return bytes(rng.randrange(1, 256) for _ in range(rng.randint(1, 40)))
    return bytes(rng.choice(ADDRESS_CHARS) for _ in range(rng.randint(3, 40)))


def _message(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.003:
        return b"Subject: big\n\n" + rng.randbytes(rng.randint(1_100_000, 1_600_000))
    if roll < 0.03:
        return b""
    if roll < 0.3:
        return rng.randbytes(rng.randint(1, 3000))  # any bytes: NUL, CR, digits, commas
    body = b"\n".join(bytes(rng.randrange(32, 127) for _ in range(rng.randint(0, 70)))
                      for _ in range(rng.randint(0, 30)))
    return b"Subject: fuzz %d\nFrom: <x@example.org>\n\n%s\n" % (rng.randrange(10**6), body)


def _recipients(rng: random.Random) -> list[bytes]:
    roll = rng.random()
    count = 0 if roll < 0.02 else rng.randint(20, 200) if roll < 0.03 else rng.randint(1, 4)
    return [_address(rng) for _ in range(count)]


def valid(rng: random.Random) -> bytes:
    trailer = rng.randbytes(rng.randint(1, 20)) if rng.random() < 0.03 else b""
    return build_request(_message(rng), _address(rng), _recipients(rng), trailer)


def _mutate_once(rng: random.Random, data: bytearray) -> None:
    if not data:
        data.extend(rng.randbytes(3))
        return
    at = rng.randrange(len(data))
    kind = rng.randrange(5)
    if kind == 0:
        data[at] = rng.randrange(256)
    elif kind == 1:
        data.insert(at, rng.choice(b"0123456789:,\0x"))
    elif kind == 2:
        del data[at]
    elif kind == 3:
        colons = [i for i, byte in enumerate(data[:4096]) if byte == 0x3A and i > 0]
        if colons:  # bump a length digit by one either way
            i = rng.choice(colons) - 1
            if 0x30 <= data[i] <= 0x39:
                data[i] = 0x30 + (data[i] - 0x30 + rng.choice((1, 9))) % 10
    else:
        end = min(len(data), at + rng.randint(1, 16))
        data[at:at] = data[at:end]


def mutated(rng: random.Random) -> bytes:
    data = bytearray(valid(rng))
    for _ in range(rng.randint(1, 3)):
        _mutate_once(rng, data)
    return bytes(data)


def truncated(rng: random.Random) -> bytes:
    data = valid(rng)
    return data[:rng.randrange(len(data))]


def random_bytes(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(rng.randint(0, 300))
    return bytes(rng.choice(b"0123456789:,") for _ in range(rng.randint(1, 60)))


def huge_length(rng: random.Random) -> bytes:
    inner = encode(b"Subject: x\n\nhi\n") + encode(b"a@b") + encode(b"c@d")
    choice = rng.randrange(6)
    if choice == 0:
        return b"%d:" % rng.choice((200_000_000, 200_000_001, 1_999_999_999, 2_000_000_000))
    if choice == 1:
        return b"9" * rng.randint(11, 40) + b":" + inner + b","
    if choice == 2:
        return b"%d:%s," % (rng.choice((10**8, 10**9, 36 << 20)), inner)
    if choice == 3:  # the message length huge inside a small outer netstring
        body = b"%d:hello," % rng.choice((10**9, 2 * 10**9, 21_000_000))
        return encode(body + encode(b"a@b") + encode(b"c@d"))
    if choice == 4:  # leading zeros: a long prefix that stays small
        return b"0" * rng.choice((50, 98, 99, 100, 150)) + b"%d:%s," % (len(inner), inner)
    return b"%d:" % rng.choice((10**9, 50_000_000)) + rng.randbytes(rng.randint(0, 2000))


def nested_error(rng: random.Random) -> bytes:
    parts = [_message(rng), _address(rng), *(_recipients(rng) or [b"r@example.org"])]
    pieces = [encode(part) for part in parts]
    which = rng.randrange(len(pieces))
    part = parts[which]
    choice = rng.randrange(6)
    if choice == 0:  # an inner length off by a little
        pieces[which] = b"%d:%s," % (max(0, len(part) + rng.choice((-2, -1, 1, 2))), part)
    elif choice == 1:  # a missing or wrong comma after one inner netstring
        pieces[which] = pieces[which][:-1] + rng.choice((b"", b";", b":", b"\0"))
    elif choice == 2:  # a non-digit or empty inner length
        pieces[which] = rng.choice((b"1a", b"", b" 3", b"-1", b"+2", b"0x1")) + b":" + part + b","
    elif choice == 3:  # the last inner netstring overruns the outer length
        pieces[-1] = b"%d:%s," % (len(parts[-1]) + 50, parts[-1])
    inner = b"".join(pieces)
    if choice == 4:  # the outer length off by a little
        return b"%d:%s," % (max(0, len(inner) + rng.choice((-3, -1, 1, 3))), inner)
    if choice == 5:  # the outer comma missing or wrong
        return b"%d:%s" % (len(inner), inner) + rng.choice((b"", b";", b".", b"\n"))
    return encode(inner)


KINDS: dict[str, tuple[float, Callable[[random.Random], bytes]]] = {
    "valid": (0.35, valid),
    "mutated": (0.25, mutated),
    "truncated": (0.10, truncated),
    "random": (0.10, random_bytes),
    "huge_length": (0.05, huge_length),
    "nested_error": (0.15, nested_error),
}


def generate(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    names = list(KINDS)
    weights = [KINDS[name][0] for name in names]
    return [(kind, KINDS[kind][1](rng)) for kind in rng.choices(names, weights, k=count)]
