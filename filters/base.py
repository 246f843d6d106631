"""The filter stage protocol and its verdicts.

A stage looks at one message and answers accept (possibly with headers to put on top),
tempfail (the client gets Z) or reject (D). It knows nothing of sockets or queues.
"""

from __future__ import annotations

from typing import Protocol

from qmqpd.message import FrozenRecord, Message, Reply


class Verdict(FrozenRecord):
    __slots__ = ("action", "facts", "headers", "text")
    action: str  # "accept", "tempfail", "reject" or "discard"
    text: str
    headers: tuple[bytes, ...]
    # Extra key=value facts for the session log line (virus name, scan ms, ...).
    facts: dict[str, object]

    def __init__(self, action: str, text: str = "", headers: tuple[bytes, ...] = (),
                 facts: dict[str, object] | None = None) -> None:
        self._set(action=action, text=text, headers=headers,
                  facts={} if facts is None else facts)

    @classmethod
    def accept(cls, *headers: bytes, **facts: object) -> Verdict:
        return cls("accept", headers=headers, facts=facts)

    @classmethod
    def tempfail(cls, text: str, **facts: object) -> Verdict:
        return cls("tempfail", text, facts=facts)

    @classmethod
    def reject(cls, text: str, **facts: object) -> Verdict:
        return cls("reject", text, facts=facts)

    @classmethod
    def discard(cls, **facts: object) -> Verdict:
        """Accepted towards the client, but not queued (e.g. REJECTVIRUS=2)."""
        return cls("discard", facts=facts)

    @classmethod
    def from_reply(cls, reply: Reply, **facts: object) -> Verdict:
        """Z or D with a text from the REPLIES table."""
        return cls("tempfail" if reply.status == "Z" else "reject", reply.text, facts=facts)

    def reply(self) -> Reply | None:
        """The answer this verdict forces, or None when the message goes on."""
        if self.action == "tempfail":
            return Reply("Z", self.text)
        if self.action == "reject":
            return Reply("D", self.text)
        return None


class Stage(Protocol):
    name: str

    def process(self, message: Message) -> Verdict: ...

    def check(self) -> list[tuple[str, str]]:
        """(setting, reason) for each thing the stage cannot work with (a key file it
        cannot read, ...): found when the session plan is made, before any message."""
        ...
