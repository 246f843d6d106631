"""A service directory run by a real daemontools `supervise`, its output in a file.

The service's own supervise only (no svscan, no log service): what the server writes goes
to one file the test reads. Stopped with `svc -dx`, then by the supervise PID if it lingers.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import need, process_gone, stop_process


class Supervised:
    def __init__(self, service: Path, output: Path) -> None:
        self.service = service
        self.output = output
        self._out = open(output, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([need("supervise"), str(service)], stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def svc(self, *flags: str) -> None:
        subprocess.run([need("svc"), *flags, str(self.service)], check=True, timeout=10)

    def server_pid(self) -> int | None:
        """The PID supervise runs the service as (from svstat), None when down."""
        text = subprocess.run([need("svstat"), str(self.service)], capture_output=True,
                              text=True, timeout=10).stdout
        if ": up (pid " not in text:
            return None
        return int(text.split(": up (pid ", 1)[1].split(")", 1)[0])

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> None:
        pid = self.server_pid()
        if self.proc.poll() is None:
            subprocess.run([need("svc"), "-dx", str(self.service)], timeout=10, check=False)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
        if pid is not None and not process_gone(pid, 30):
            os.kill(pid, 9)  # the server supervise ran, by its PID
        self._out.close()
