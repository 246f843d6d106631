#!/usr/bin/env bash
# Keeps tests/install-and-run.sh from taking a host's mail system away. Postfix (the tests'
# QMQP peers qmqp-source and qmqp-sink come with it) conflicts with every other package that
# provides mail-transport-agent, and apt resolves that by removing the other one.
#
#   mta-guard.sh other-mta < "$(dpkg-query -W -f='${Package}\t${Status}\t${Provides}\n')"
#       prints each installed package other than postfix that provides
#       mail-transport-agent; exit 1 if there is one (then postfix must not be installed)
#   mta-guard.sh removals < "$(apt-get install -s ...)"
#       prints each package the simulated install plan would remove; exit 1 if any
#
# Reads only its standard input, so tests/unit/test_mta_guard.py checks it with made-up
# dpkg and apt output.
set -euo pipefail

other_mta() {
  local package status provides found=1
  local mta='(^|,)[[:space:]]*mail-transport-agent[[:space:]]*(,|\(|$)'
  while IFS=$'\t' read -r package status provides; do
    # "install ok installed", "hold ok installed": unpacked and configured, the same to apt
    [[ "$status" == *" installed" && "$status" != *"not-installed"* ]] || continue
    [ "$package" = postfix ] && continue
    # Provides: "mail-transport-agent, default-mta (= 4.96-15)"
    if [[ "$provides" =~ $mta ]]; then
      echo "$package"
      found=0
    fi
  done
  [ "$found" -eq 1 ]
}

removals() {
  local word package rest found=1
  # apt-get -s prints one "Remv PACKAGE [VERSION]" line per package it would remove
  while read -r word package rest; do
    if [ "$word" = Remv ]; then
      echo "$package"
      found=0
    fi
  done
  [ "$found" -eq 1 ]
}

case "${1:-}" in
  other-mta) other_mta ;;
  removals) removals ;;
  *) echo "usage: $0 other-mta|removals < dpkg-query or apt-get -s output" >&2; exit 2 ;;
esac
