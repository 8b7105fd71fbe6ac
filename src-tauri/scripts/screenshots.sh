#!/usr/bin/env bash
# Refreshes docs/screenshots/ from the real app against a real daemon (smoke.sh under Xvfb), with a
# tuning session running when the daemon can tune: dashboard.png (the window) and tray-menu.png (the
# tray menu opened over it, cropped to the bottom-right corner of the screen).
# Usage: screenshots.sh ['<tuning.start params JSON>']   e.g. '{"model":"synthetic:tiny","budget":{"evaluations":40}}'
# SCREENSHOTS_HOME=DIR reuses a TILEWISE_HOME that already holds sessions (an interrupted session
# resumes when the daemon starts, so the tray shows it tuning). The daemon there must be stopped.
# (binaries from $TILEWISE_BIN_DIR, default target/debug; build tilewised and tilewise-app first)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
home=${SCREENSHOTS_HOME:-$work/home}
if [ -n "${1:-}" ]; then
  SMOKE_HOME=$home SMOKE_TUNE=$1 bash "$here/smoke.sh" "$work/out"
else
  SMOKE_HOME=$home bash "$here/smoke.sh" "$work/out"
fi
dest=$root/docs/screenshots
mkdir -p "$dest"
cp "$work/out/dashboard.png" "$dest/dashboard.png"
convert "$work/out/tray-menu.png" -gravity SouthEast -crop 250x260+0+0 +repage "$dest/tray-menu.png"
cp "$work/out/dashboard-no-tray.png" "$dest/dashboard-no-tray.png"
echo "screenshots: $(ls "$dest")"
