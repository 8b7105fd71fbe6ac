# The menu-bar app: its unit tests, then a smoke test of the real app against a real tilewised under
# Xvfb + D-Bus + trayer (src-tauri/scripts/smoke.sh): window appears, daemon sees the app's hello,
# tray icon and menu exist, no panic. Screenshots land in target/app-smoke/.
set -euo pipefail
cargo build --locked -q -p tilewise --bin tilewised -p tilewise-app --bin tilewise-app
cargo test --locked -q -p tilewise-app
bash src-tauri/scripts/smoke.sh target/app-smoke
