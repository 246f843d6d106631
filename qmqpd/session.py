"""`qmqpd session`: one QMQP session on fd 0/1, for tcpserver, inetd or systemd Accept=yes.

Client facts come from the UCSPI environment (TCPREMOTEIP, ...); settings from --config and
the environment, so a tcpserver rule's env (e.g. DATABYTES) applies to that client. One
process serves one connection, so it loads only what its plan needs: no filter modules
when no stage is switched on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from qmqpd.handler import serve_connection
from qmqpd.message import Client

if TYPE_CHECKING:
    from qmqpd.plan import PlanBook


def run_session(plans: PlanBook, environ: Mapping[str, str] | None = None) -> int:
    """Serve the connection on fd 0/1 with its plan (made, and checked, on first use: a
    configuration that cannot work is answered Z and logged with the setting at fault)."""
    env = os.environ if environ is None else environ
    result = serve_connection(0, 1, Client.from_environ(env), plans)
    return 111 if result.fatal else 0
