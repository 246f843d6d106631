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
  opendkim             # the DKIM milter Postfix is benchmarked with (bench/filter_vs_milter.py)
  clamav-milter        # the virus milter Postfix is benchmarked with (same bench)
  daemontools          # supervise, svc, multilog for the service tests
  runit                # runsv, sv
  haproxy              # a real load balancer sending the PROXY protocol (cluster tests)
  prometheus           # promtool and a real Prometheus scraping /metrics
  mandoc               # mandoc -Tlint checks the man pages
  man-db               # man -w: which qmqpd(8) a reader gets
  socat                # the operator guide's HAProxy `show stat` over the stats socket
)

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

# Postfix conflicts with every other mail-transport-agent (a packaged qmail, notqmail,
# IndiMail, exim4, ...) and apt would remove that one to make room: on a host with another
# mail system, postfix is left out and the tests that need its tools skip, saying why.
unpackaged_mta() {
  # a mail system built from source: qmail's tree, or a sendmail no package owns
  if [ -e /var/qmail/bin/qmail-send ] && ! dpkg -S /var/qmail/bin/qmail-send >/dev/null 2>&1; then
    echo "/var/qmail (not from a package)"
  elif [ -e /usr/sbin/sendmail ] && ! dpkg -S /usr/sbin/sendmail >/dev/null 2>&1; then
    echo "/usr/sbin/sendmail (not from a package)"
  fi
}
if [[ " ${missing[*]} " == *" postfix "* ]]; then
  installed=$(dpkg-query -W -f='${Package}\t${Status}\t${Provides}\n')
  if others=$(printf '%s\n' "$installed" | bash tests/mta-guard.sh other-mta); then
    refused=$(unpackaged_mta)
  else
    refused=$(echo $others)
  fi
  if [ -n "$refused" ]; then
    export QMQPD_TEST_NO_POSTFIX="postfix not installed: it would replace the installed mail system ($refused)"
    echo "$QMQPD_TEST_NO_POSTFIX; the tests that need it skip" >&2
    kept=()
    for pkg in "${missing[@]}"; do [ "$pkg" = postfix ] || kept+=("$pkg"); done
    missing=("${kept[@]}")
  fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo_if_needed apt-get update -qq
  # Never remove anything: simulate first and refuse a plan with a removal in it.
  plan=$(sudo_if_needed apt-get install -s --no-install-recommends "${missing[@]}" python3-venv)
  if ! removed=$(printf '%s\n' "$plan" | bash tests/mta-guard.sh removals); then
    printf '%s\n' "$plan" >&2
    echo "refusing to install ${missing[*]}: apt would remove $(echo $removed)" >&2
    exit 1
  fi
  if [[ " ${missing[*]} " == *" postfix "* ]]; then
    # Postfix must not ask questions nor configure a mail system: the tests run their own.
    echo "postfix postfix/main_mailer_type select No configuration" | sudo_if_needed debconf-set-selections
  fi
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove \
    --no-install-recommends "${missing[@]}" python3-venv
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
