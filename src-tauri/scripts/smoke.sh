#!/usr/bin/env bash
# Smoke test of the real menu-bar app against a real daemon, on a virtual X display with a D-Bus
# session and the `trayer` tray host (RECIPES.md). Checks that:
#   1. the app's dashboard window appears (xdotool finds it, and its screenshot is not blank),
#   2. the daemon saw the app's `hello` (a client.hello event naming tilewise-app),
#   3. the tray icon was created (the app did not log "no tray icon") and its menu opens,
#   4. a second launch exits and leaves the first instance running (single instance),
#   5. without a session bus the app keeps its window and says why there is no tray,
#   6. the app did not panic.
# Screenshots (desktop, dashboard window, tray menu) and logs go to OUT_DIR.
# Usage: smoke.sh [OUT_DIR]   (binaries from $TILEWISE_BIN_DIR, default target/debug; built by the caller)
# For screenshots with data: SMOKE_HOME=DIR uses (and keeps) that TILEWISE_HOME instead of a temp one;
# SMOKE_TUNE='<tuning.start params JSON>' starts a session first and waits (up to SMOKE_TUNE_WAIT_S,
# default 600 s) for SMOKE_TUNE_EVENT (default candidate.measured) before the app starts.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export TILEWISE_BIN_DIR=${TILEWISE_BIN_DIR:-$root/target/debug}
if [ "${1:-}" != --inner ]; then
  out=${1:-$(mktemp -d)}
  mkdir -p "$out" && out=$(cd "$out" && pwd)
  for tool in xvfb-run dbus-run-session trayer xdotool import convert; do
    command -v "$tool" >/dev/null || { echo "smoke: $tool is missing (scripts/setup.d/40-app.sh installs it)" >&2; exit 1; }
  done
  # -a picks a free display; the screen is tall enough to show the whole dashboard, and the tray.
  exec xvfb-run -a -s "-screen 0 1280x1600x24" dbus-run-session -- "$0" --inner "$out"
fi

out=$2
home=${SMOKE_HOME:-$(mktemp -d)}
mkdir -p "$home" && home=$(cd "$home" && pwd)
export TILEWISE_HOME=$home
unset TILEWISE_SOCKET
sock=$home/run/tilewised.sock
pids=()
cleanup() {
  python3 "$here/rpc.py" "$sock" daemon.shutdown >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${SMOKE_HOME:-}" ] || rm -rf "$home"
}
trap cleanup EXIT
fail() { echo "smoke: FAIL: $*" >&2; for f in "$out"/*.log; do echo "--- $f"; tail -20 "$f"; done >&2; exit 1; }

"$TILEWISE_BIN_DIR/tilewised" >"$out/tilewised.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do [ -S "$sock" ] && python3 "$here/rpc.py" "$sock" status >/dev/null 2>&1 && break; sleep 0.2; done
python3 "$here/rpc.py" "$sock" status >"$out/status-before.json" || fail "tilewised did not start"

rm -f "$home/subscribed" "$home/tune-subscribed"
if [ -n "${SMOKE_TUNE:-}" ]; then
  python3 "$here/rpc.py" "$sock" --wait-event "${SMOKE_TUNE_EVENT:-candidate.measured}" --timeout "${SMOKE_TUNE_WAIT_S:-600}" \
    --ready-file "$home/tune-subscribed" >"$out/tune-event.json" 2>"$out/tune-wait.log" & tune_waiter=$!
  for _ in $(seq 50); do [ -e "$home/tune-subscribed" ] && break; sleep 0.1; done
  python3 "$here/rpc.py" "$sock" tuning.start "$SMOKE_TUNE" || fail "tuning.start failed"
  wait $tune_waiter || fail "no ${SMOKE_TUNE_EVENT:-candidate.measured} event: $(cat "$out/tune-wait.log")"
fi

trayer --edge bottom --align right --widthtype pixel --width 120 --heighttype pixel --height 32 \
  --transparent false --tint 0x333333 >"$out/trayer.log" 2>&1 & pids+=($!)
sleep 1

# Subscribe first, then start the app, so its hello cannot be missed.
python3 "$here/rpc.py" "$sock" --wait-event client.hello --match client=tilewise-app --timeout 60 \
  --ready-file "$home/subscribed" >"$out/hello-event.json" 2>"$out/hello-wait.log" & waiter=$!
for _ in $(seq 50); do [ -e "$home/subscribed" ] && break; sleep 0.1; done

RUST_LOG=info "$TILEWISE_BIN_DIR/tilewise-app" >"$out/app.log" 2>&1 & app=$!; pids+=($app)

wid=$(timeout 120 xdotool search --sync --onlyvisible --name '^tilewise( — .*)?$' | head -1) || fail "no dashboard window within 120 s"
echo "smoke: dashboard window $wid: $(xdotool getwindowgeometry "$wid" | tr '\n' ' ')"
wait $waiter || fail "the daemon saw no hello from tilewise-app: $(cat "$out/hello-wait.log")"
echo "smoke: daemon saw $(cat "$out/hello-event.json")"

# The page sets the title to "tilewise — <state>" once it has drawn the daemon's data.
timeout 90 xdotool search --sync --onlyvisible --name '^tilewise — ' >/dev/null || fail "the dashboard never drew the daemon's data (title still $(xdotool getwindowname "$wid"))"
echo "smoke: dashboard title: $(xdotool getwindowname "$wid")"
if [ -n "${SMOKE_TUNE:-}" ]; then
  # Let one more event arrive while the app runs, so "Recent events" shows live data.
  python3 "$here/rpc.py" "$sock" --wait-event "${SMOKE_TUNE_EVENT:-candidate.measured}" --timeout "${SMOKE_TUNE_WAIT_S:-600}" >/dev/null \
    || fail "no further ${SMOKE_TUNE_EVENT:-candidate.measured} event while the app ran"
  sleep 2
fi
# Taller than its default, so the screenshot shows every card (no window manager: applied as is).
xdotool windowsize "$wid" 1120 1560
sleep 2
import -window root "$out/desktop.png"
import -window "$wid" "$out/dashboard.png"
spread=$(convert "$out/dashboard.png" -colorspace gray -format '%[fx:standard_deviation]' info:)
echo "smoke: dashboard screenshot grey-level spread $spread"
awk -v s="$spread" 'BEGIN { exit !(s > 0.03) }' || fail "the dashboard screenshot is blank (spread $spread)"

grep -q "no tray icon" "$out/app.log" && fail "the app created no tray icon: $(grep 'no tray icon' "$out/app.log")"
# The tray host sits at the bottom right corner and holds only the app's icon: click it, and the
# menu must appear (the screen must change around the corner).
eval "$(xdotool getdisplaygeometry --shell)"
xdotool mousemove $((WIDTH - 16)) $((HEIGHT - 16)) click 1
sleep 1.5
import -window root "$out/tray-menu.png"
changed=$(compare -metric AE "$out/desktop.png" "$out/tray-menu.png" null: 2>&1 || true)
echo "smoke: pixels changed by opening the tray menu: $changed"
awk -v n="${changed%% *}" 'BEGIN { exit !(n > 2000) }' || fail "clicking the tray icon opened no menu ($changed pixels changed)"
xdotool key Escape

# One instance only: a second launch hands over to the first (which shows its window) and exits.
timeout 30 "$TILEWISE_BIN_DIR/tilewise-app" >"$out/app-second.log" 2>&1 || fail "the second instance did not exit by itself (rc $?)"
kill -0 "$app" 2>/dev/null || fail "the first instance went away when a second was launched"
[ "$(xdotool search --onlyvisible --name '^tilewise( — .*)?$' | wc -l)" = 1 ] || fail "two dashboard windows after a second launch"
echo "smoke: a second launch exited and left the first instance running"

kill -0 "$app" 2>/dev/null || fail "the app exited early"
grep -qi "panicked" "$out/app.log" && fail "the app panicked"
kill "$app"; wait "$app" 2>/dev/null || true

# Without a session bus there can be no tray: the app must keep its window and say why, not panic.
env -u DBUS_SESSION_BUS_ADDRESS "$TILEWISE_BIN_DIR/tilewise-app" >"$out/app-no-bus.log" 2>&1 & app=$!; pids+=($app)
wid=$(timeout 120 xdotool search --sync --onlyvisible --name '^tilewise( — .*)?$' | head -1) || fail "no window without a session bus"
timeout 90 xdotool search --sync --onlyvisible --name '^tilewise — ' >/dev/null || fail "the dashboard drew nothing without a session bus"
sleep 1
import -window "$wid" "$out/dashboard-no-tray.png"
kill -0 "$app" 2>/dev/null || fail "the app exited without a session bus"
grep -q "no tray icon: no D-Bus session bus" "$out/app-no-bus.log" || fail "the app did not say why there is no tray"
grep -qi "panicked" "$out/app-no-bus.log" && fail "the app panicked without a session bus"
echo "smoke: without a session bus: window kept, $(grep -o 'no tray icon: .*' "$out/app-no-bus.log")"
python3 "$here/rpc.py" "$sock" status >"$out/status-after.json" || fail "the daemon died"
echo "smoke: ok (screenshots in $out)"
