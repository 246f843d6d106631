"""The HAProxy configuration in the operator guide is the file the cluster test runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_guide_shows_the_tested_haproxy_config() -> None:
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    blocks = re.findall(r"```haproxy\n(.*?)```", guide, flags=re.DOTALL)
    assert blocks == [(ROOT / "packaging" / "haproxy" / "qmqpd.cfg").read_text()], (
        "docs/operator-guide.md: copy packaging/haproxy/qmqpd.cfg into its haproxy block")
