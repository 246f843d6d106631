"""One `key=value` line per event on stderr, ready for multilog or journald."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

_stream: TextIO = sys.stderr


def set_stream(stream: TextIO) -> None:
    global _stream
    _stream = stream


def _quote(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = str(value)
    if text == "" or any(ch in text for ch in ' "=\\') or not text.isprintable():
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        escaped = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in escaped)
        return f'"{escaped}"'
    return text


def format_event(event: str, **fields: Any) -> str:
    parts = [f"event={event}"]
    parts.extend(f"{key}={_quote(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def event(event: str, **fields: Any) -> None:
    """Write one line; a failed write (closed stderr) must never break a session."""
    line = format_event(event, pid=os.getpid(), **fields) + "\n"
    try:
        _stream.write(line)
        _stream.flush()
    except (OSError, ValueError):
        pass


def warning(message: str, **fields: Any) -> None:
    event("warning", msg=message, **fields)


def error(message: str, **fields: Any) -> None:
    event("error", msg=message, **fields)
