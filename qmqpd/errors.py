"""The one base of qmqpd's errors, with the exit convention qmail uses everywhere.

Owns `QmqpdError` and its two kinds: `PermanentError` (exit 100: the same input fails the
same way again) and `TemporaryError` (exit 111: try again later; what is not known to be
permanent is temporary, as in qmail). Every module's exception classes derive from them, so
a caller that stops on any of our errors exits with its `exit_code` and never reads the
text to decide. A class whose interface has its own codes (the qmail-queue codes of
`qmqpc`) carries those instead.

Stdlib only and importing nothing of the project: every module may import it, the shared
leaves (config, log, message) included. It never touches processes, files or sockets.
"""

from __future__ import annotations

EXIT_PERMANENT = 100
EXIT_TEMPORARY = 111


class QmqpdError(Exception):
    """Base of every qmqpd error; `exit_code` is what a command exits with for it."""

    exit_code: int = EXIT_TEMPORARY


class PermanentError(QmqpdError):
    """Retrying cannot help: the input or the setting must change (exit 100)."""

    exit_code = EXIT_PERMANENT


class TemporaryError(QmqpdError):
    """It may pass later: a peer down, a timeout, a resource short (exit 111)."""

    exit_code = EXIT_TEMPORARY


def exit_for_status(status: str) -> int:
    """A QMQP answer's letter as an exit code: D is permanent, anything else temporary."""
    return EXIT_PERMANENT if status == "D" else EXIT_TEMPORARY
