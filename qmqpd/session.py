"""`qmqpd session`: one QMQP session on fd 0/1, for tcpserver, inetd or systemd Accept=yes.

Client facts come from the UCSPI environment (TCPREMOTEIP, ...); settings from --config and
the environment, so a tcpserver rule's env (e.g. DATABYTES) applies to that client.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from qmqpd.config import Config
from qmqpd.handler import serve_connection
from qmqpd.message import Client


def run_session(config: Config, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    result = serve_connection(0, 1, Client.from_environ(env), config)
    return 111 if result.fatal else 0
