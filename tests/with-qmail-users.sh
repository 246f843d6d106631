#!/usr/bin/env bash
# Run a command on a host that has the qmail users, without adding them to this machine:
# inside a private mount namespace, copies of /etc/passwd, group, shadow and gshadow with
# the qmail users and groups added are bind-mounted over the real files. Nothing outside
# the command sees them, and they are gone when it ends. Needs root (unshare -m).
#
#   bash tests/with-qmail-users.sh .venv/bin/python -m pytest tests/unit tests/integration/test_plan.py
#
# The users are the ones qmail's INSTALL makes: alias qmaild qmaill qmailp (group nofiles),
# qmailq qmailr qmails (group qmail). Ones the host already has are kept as they are.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
if [ -z "${QMQPD_QMAIL_USERS_NS:-}" ]; then
  exec unshare -m --propagation private env QMQPD_QMAIL_USERS_NS=1 bash "$0" "$@"
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for file in passwd group shadow gshadow; do
  if [ -e "/etc/$file" ]; then cp -p "/etc/$file" "$scratch/$file"; else : >"$scratch/$file"; fi
done

# the first id from 900 up that neither file has (system range, as adduser --system picks)
free_id() {
  local id=900
  while cut -d: -f3 "$scratch/passwd" "$scratch/group" | grep -qx "$id"; do id=$((id + 1)); done
  echo "$id"
}
gid_of() { awk -F: -v name="$1" '$1 == name { print $3 }' "$scratch/group"; }

for group in nofiles qmail; do
  if [ -z "$(gid_of "$group")" ]; then
    echo "$group:x:$(free_id):" >>"$scratch/group"
    echo "$group:!::" >>"$scratch/gshadow"
  fi
done
while read -r user group home; do
  grep -q "^$user:" "$scratch/passwd" && continue
  echo "$user:x:$(free_id):$(gid_of "$group")::$home:/usr/sbin/nologin" >>"$scratch/passwd"
  echo "$user:!:20000:0:99999:7:::" >>"$scratch/shadow"
done <<'USERS'
alias nofiles /var/qmail/alias
qmaild nofiles /var/qmail
qmaill nofiles /var/qmail
qmailp nofiles /var/qmail
qmailq qmail /var/qmail
qmailr qmail /var/qmail
qmails qmail /var/qmail
USERS

for file in passwd group shadow gshadow; do
  [ -e "/etc/$file" ] && mount --bind "$scratch/$file" "/etc/$file"
done
set +e
"$@"
status=$?
exit "$status"
