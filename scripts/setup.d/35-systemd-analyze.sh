# systemd-analyze, used by daemon/tests/service_units.rs to verify the generated systemd user unit.
# Best effort: without it (or without root/sudo) that one check is skipped with a visible message.
set -uo pipefail
[ "$(uname -s)" = Linux ] || exit 0
command -v systemd-analyze >/dev/null && exit 0
command -v apt-get >/dev/null || { echo "systemd-analyze missing and no apt-get: the unit check will be skipped"; exit 0; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
if $SUDO true 2>/dev/null; then
  $SUDO apt-get install -y -q --no-install-recommends systemd >/dev/null \
    || echo "apt-get install systemd failed: the unit check will be skipped"
else
  echo "systemd-analyze missing and no root/sudo: the unit check will be skipped"
fi
exit 0
