#!/usr/bin/env bash
# Run qmqpd on its embedded defaults: 127.0.0.1:6280, queue in ./var/queue, loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/qmqpd ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
exec .venv/bin/qmqpd serve "$@"
