"""Incremental netstring reading with a byte budget and a per-digit length cap.

A netstring is ``<decimal length>:<bytes>,``. QMQP nests them: one outer netstring whose
length becomes the budget for every inner byte, prefixes and commas included. Every read
here is bounded by that budget, so a client can never make us read more than it announced.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from typing import BinaryIO

# qmail-qmqpd treats a length that is already above this when another digit arrives as
# too large; the largest length accepted is therefore about 2e9.
DIGIT_CAP = 200_000_000
# Before the outer length is known at most this many prefix bytes are read.
OUTER_PREFIX_MAX = 100
READ_SIZE = 65536


class NetstringError(Exception):
    """Malformed input; ``reason`` is short and safe to send back to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EarlyEOF(NetstringError):
    """The peer closed before the request was complete."""


class IdleTimeout(Exception):
    """No byte arrived within the idle timeout, or the session limit ran out."""


def encode(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


class FdSource:
    """Buffered reads from a file descriptor with an idle timeout and a session deadline."""

    def __init__(self, fd: int, idle_timeout: float, deadline: float) -> None:
        self.fd = fd
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self._buffer = b""
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLPRI)

    def _wait(self) -> None:
        now = time.monotonic()
        wait = min(self.idle_timeout, self.deadline - now)
        if wait <= 0 or not self._poll.poll(wait * 1000):
            raise IdleTimeout("session limit reached" if now + wait >= self.deadline else "idle")

    def _fill(self, want: int) -> None:
        self._wait()
        block = os.read(self.fd, max(want, READ_SIZE))
        if not block:
            raise EarlyEOF("connection closed early")
        self._buffer += block

    def read_byte(self) -> int:
        if not self._buffer:
            self._fill(1)
        byte = self._buffer[0]
        self._buffer = self._buffer[1:]
        return byte

    def read_exact(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._fill(count - len(self._buffer))
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def copy_exact(self, count: int, sink: BinaryIO) -> None:
        """Move ``count`` bytes into ``sink`` in bounded blocks, never all in memory."""
        while count:
            if not self._buffer:
                self._wait()
                self._buffer = os.read(self.fd, min(count, 1 << 20))
                if not self._buffer:
                    raise EarlyEOF("connection closed early")
            take = self._buffer[:count]
            self._buffer = self._buffer[len(take) :]
            sink.write(take)
            count -= len(take)

    def drain(self, max_bytes: int, seconds: float) -> None:
        """Discard what the peer still sends, bounded, so a final answer is not lost to RST."""
        stop = time.monotonic() + seconds
        left = max_bytes - len(self._buffer)
        self._buffer = b""
        while left > 0:
            wait = stop - time.monotonic()
            if wait <= 0 or not self._poll.poll(wait * 1000):
                return
            try:
                block = os.read(self.fd, min(left, 1 << 20))
            except OSError:
                return
            if not block:
                return
            left -= len(block)


class Budget:
    """Bytes the outer netstring still allows; every inner byte is charged to it."""

    def __init__(self, source: FdSource, remaining: int) -> None:
        self.source = source
        self.remaining = remaining

    def charge(self, count: int) -> None:
        if count > self.remaining:
            raise NetstringError("request longer than its outer length")
        self.remaining -= count

    def read_byte(self) -> int:
        self.charge(1)
        return self.source.read_byte()

    def read_exact(self, count: int) -> bytes:
        self.charge(count)
        return self.source.read_exact(count)

    def copy_exact(self, count: int, sink: BinaryIO) -> None:
        self.charge(count)
        self.source.copy_exact(count, sink)

    def skip(self, count: int) -> None:
        """Consume ``count`` bytes in small blocks (an oversized address is read, not kept)."""
        self.charge(count)
        while count:
            step = min(count, READ_SIZE)
            self.source.read_exact(step)
            count -= step


def read_length(read_byte: Callable[[], int], max_prefix: int | None = None) -> int:
    """Digits up to ``:``; non-digits, an empty length or an over-cap value are errors."""
    value = 0
    digits = 0
    while True:
        byte = read_byte()
        if byte == 0x3A:  # ':'
            if digits == 0:
                raise NetstringError("empty netstring length")
            return value
        if not 0x30 <= byte <= 0x39:
            raise NetstringError("bad netstring length")
        if value > DIGIT_CAP:
            raise NetstringError("netstring length too large")
        value = value * 10 + (byte - 0x30)
        digits += 1
        if max_prefix is not None and digits >= max_prefix:
            raise NetstringError("netstring length prefix too long")


def expect_comma(read_byte: Callable[[], int]) -> None:
    if read_byte() != 0x2C:
        raise NetstringError("missing comma after netstring")
