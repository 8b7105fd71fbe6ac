# The menu-bar app (src-tauri) and its dashboard tests: WebKitGTK + appindicator to build and run the
# Tauri app, Xvfb/dbus/trayer/ImageMagick for the smoke test and screenshots, Debian's Chromium for the
# browser tests (Playwright's own browser download does not work here), and the ui/ node deps.
# Idempotent: installs only what is missing.
set -euo pipefail
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null; then
  pkgs=(libwebkit2gtk-4.1-dev libayatana-appindicator3-dev librsvg2-dev build-essential pkg-config
        xvfb xauth imagemagick dbus-x11 trayer xdotool fonts-dejavu-core chromium)
  # node/npm may come from NodeSource (npm bundled) rather than Debian's packages.
  command -v npm >/dev/null || pkgs+=(nodejs npm)
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi
# Browser-test deps, pinned by ui/package-lock.json.
if [ ! -d ui/node_modules ] || [ ui/package-lock.json -nt ui/node_modules/.package-lock.json ]; then
  (cd ui && npm ci --no-audit --no-fund --loglevel=error)
fi
