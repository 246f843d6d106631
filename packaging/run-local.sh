#!/usr/bin/env bash
# Run qmqpd on its embedded defaults: 127.0.0.1:6280, queue in ./var/queue, loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/qmqpd ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
if [ "$(id -u)" = 0 ] && [ -z "${ALLOW_ROOT:-}" ]; then
  # serve refuses to stay root unless told so; a first look on 127.0.0.1 says so here
  echo "run-local.sh: running as root: ALLOW_ROOT=1 (serving 127.0.0.1 only)" >&2
  export ALLOW_ROOT=1
fi
exec .venv/bin/qmqpd serve "$@"
