#!/usr/bin/env bash
# Run qmqpd on its embedded defaults: 127.0.0.1:6280, queue in ./var/queue, loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/qmqpd ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
# A server on loopback with its queue in this clone: started as root, it stays root (a
# system service names its USER instead), so the quick start works for root as well.
if [ "$(id -u)" -eq 0 ]; then export ALLOW_ROOT="${ALLOW_ROOT:-1}"; fi
exec .venv/bin/qmqpd serve "$@"
