"""What a `qmqpd session` process imports, and what a prefork worker may import late.

A session is one interpreter per connection: every module it imports at start is paid per
connection, so the heavy ones are imported where they are needed (a spooled large message,
several queues, the first sync). A prefork worker runs the same code after its master has
dropped privileges, where an import the master has not done may fail (an interpreter
installed where the service user cannot read, or upgraded on disk under a running server):
the master must already hold every module the session path imports late.
"""

from __future__ import annotations

import subprocess
import sys

# Imported inside functions on the session path, each only when it is needed.
LATE = ("tempfile", "random", "shutil", "threading", "ctypes")
# Never imported on the session path at all.
NEVER = ("dataclasses", "concurrent.futures", "logging", "inspect", "argparse")


def loaded_after(*modules: str) -> set[str]:
    code = (f"import sys\nfor name in {list(modules)!r}: __import__(name)\n"
            "print('\\n'.join(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    return set(result.stdout.split())


def test_a_session_starts_without_the_heavy_modules() -> None:
    loaded = loaded_after("qmqpd.cli", "qmqpd.session", "qmqpd.plan")
    assert not loaded & {*LATE, *NEVER}, sorted(loaded & {*LATE, *NEVER})


def test_the_master_holds_what_workers_import_late() -> None:
    loaded = loaded_after("qmqpd.master", "qmqpd.worker")
    assert set(LATE) <= loaded, sorted(set(LATE) - loaded)
