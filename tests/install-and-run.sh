#!/usr/bin/env bash
# Install everything the tests need (Debian packages, a venv with the project) and run them.
# Usage: bash tests/install-and-run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  ucspi-tcp            # tcpserver, tcprules, tcprulescheck: real peers
  postfix              # qmqp-source, qmqp-sink and qmqpd: real QMQP peers
  clamav-daemon        # a real clamd for the virus stage (own test database, no freshclam)
  libmail-dkim-perl    # independent DKIM / DomainKeys verifier
  opendkim-tools       # independent ed25519 DKIM verifier
  daemontools          # supervise, svc, multilog for the service tests
  runit                # runsv, sv
  haproxy              # a real load balancer sending the PROXY protocol (cluster tests)
  prometheus           # promtool and a real Prometheus scraping /metrics
  mandoc               # mandoc -Tlint checks the man pages
)

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  # Postfix must not ask questions nor configure a mail system: the tests run their own.
  echo "postfix postfix/main_mailer_type select No configuration" | sudo_if_needed debconf-set-selections
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" python3-venv >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$status"
