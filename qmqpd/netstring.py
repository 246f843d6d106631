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

from qmqpd.errors import EXIT_PERMANENT, QmqpdError, TemporaryError

# qmail-qmqpd treats a length that is already above this when another digit arrives as
# too large; the largest length accepted is therefore about 2e9.
DIGIT_CAP = 200_000_000
# Before the outer length is known at most this many prefix bytes are read.
OUTER_PREFIX_MAX = 100
READ_SIZE = 65536


class NetstringError(QmqpdError):
    """Malformed input; ``reason`` is short and safe to send back to the client."""

    exit_code = EXIT_PERMANENT  # answered D: the same bytes fail the same way

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EarlyEOF(NetstringError):
    """The peer closed before the request was complete."""

    exit_code = TemporaryError.exit_code  # nothing wrong with its bytes: it may send again


class IdleTimeout(TemporaryError):
    """No byte arrived within the idle timeout, or the session limit ran out."""


class TooSlow(IdleTimeout):
    """The client fell below the minimum transfer rate after its grace period."""


def encode(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


class FdSource:
    """Buffered reads from a file descriptor with an idle timeout and a session deadline.

    Reads advance an index into the buffer (qmail's substdio style): consuming a byte or a
    block never copies the rest of the buffer, so the cost per byte is constant.

    With ``min_rate`` (bytes/s) the client must keep up after ``grace`` seconds: the read
    deadline is ``started + grace + received / min_rate``, so every byte buys time and a
    request of L bytes takes at most ``grace + L / min_rate`` to arrive.

    ``clock`` (time.monotonic) is what the deadlines are read against; a test may drive it.
    The idle timeout is a wait in the kernel and always runs in real time.
    """

    def __init__(self, fd: int, idle_timeout: float, deadline: float, min_rate: int = 0,
                 grace: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.fd = fd
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.min_rate = min_rate
        self.grace = grace
        self.started = clock()
        self.received = 0
        self._buffer = b""
        self._pos = 0
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLPRI)

    def rate_deadline(self) -> float | None:
        """When the bytes received so far stop covering the minimum rate (None = no rule)."""
        if not self.min_rate:
            return None
        return self.started + self.grace + self.received / self.min_rate

    def _wait(self) -> None:
        now = self.clock()
        limit = self.deadline
        slow = self.rate_deadline()
        if slow is not None and slow < limit:
            limit = slow
        idle = self.idle_timeout < limit - now
        wait = self.idle_timeout if idle else limit - now
        if wait <= 0 or not self._poll.poll(wait * 1000):
            if idle:
                raise IdleTimeout("idle")
            if limit == slow:
                elapsed = now - self.started
                raise TooSlow(f"too slow: {self.received} bytes in {elapsed:.0f}s, "
                              f"below {self.min_rate} bytes/s after {self.grace:g}s")
            raise IdleTimeout("session limit reached")

    def _read_block(self, size: int) -> bytes:
        self._wait()
        block = os.read(self.fd, size)
        if not block:
            raise EarlyEOF("connection closed early")
        self.received += len(block)
        return block

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def read_byte(self) -> int:
        if self._pos >= len(self._buffer):
            self._buffer = self._read_block(READ_SIZE)
            self._pos = 0
        byte = self._buffer[self._pos]
        self._pos += 1
        return byte

    def peek(self, limit: int) -> bytes:
        """Up to ``limit`` buffered bytes without consuming them (reads once when empty)."""
        if self._pos >= len(self._buffer):
            self._buffer = self._read_block(max(limit, READ_SIZE))
            self._pos = 0
        return self._buffer[self._pos : self._pos + limit]

    def advance(self, count: int) -> None:
        """Consume ``count`` bytes that peek() returned."""
        if count > self.buffered:
            raise ValueError("advance past the buffered bytes")
        self._pos += count

    def read_exact(self, count: int) -> bytes:
        if count <= self.buffered:
            data = self._buffer[self._pos : self._pos + count]
            self._pos += count
            return data
        parts = [self._buffer[self._pos :]]
        need = count - len(parts[0])
        self._buffer, self._pos = b"", 0
        while need:
            block = self._read_block(max(need, READ_SIZE))
            if len(block) > need:
                parts.append(block[:need])
                self._buffer, self._pos = block, need
                break
            parts.append(block)
            need -= len(block)
        return b"".join(parts)

    def copy_exact(self, count: int, sink: BinaryIO) -> None:
        """Move ``count`` bytes into ``sink`` in bounded blocks, never all in memory."""
        while count:
            if self._pos >= len(self._buffer):
                self._buffer = self._read_block(min(count, 1 << 20))
                self._pos = 0
            take = min(count, len(self._buffer) - self._pos)
            sink.write(memoryview(self._buffer)[self._pos : self._pos + take])
            self._pos += take
            count -= take

    def drain(self, max_bytes: int, seconds: float) -> None:
        """Discard what the peer still sends, bounded, so a final answer is not lost to RST.

        The minimum rate holds here too: a slow sender is not drained for the full time."""
        stop = self.clock() + seconds
        left = max_bytes - self.buffered
        self._buffer, self._pos = b"", 0
        while left > 0:
            slow = self.rate_deadline()
            wait = (stop if slow is None else min(stop, slow)) - self.clock()
            if wait <= 0 or not self._poll.poll(wait * 1000):
                return
            try:
                block = os.read(self.fd, min(left, 1 << 20))
            except OSError:
                return
            if not block:
                return
            self.received += len(block)
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

    def peek(self, limit: int) -> bytes:
        """Buffered bytes this budget still allows, at most ``limit``, not consumed."""
        return self.source.peek(min(limit, self.remaining))

    def consume(self, count: int) -> None:
        """Take ``count`` bytes that peek() returned."""
        self.charge(count)
        self.source.advance(count)

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
