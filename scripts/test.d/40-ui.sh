# The dashboard in headless Chromium (Debian's /usr/bin/chromium via playwright-core) against a real
# tilewised, through tilewise-ui-bridge, which answers the page with the app's own dispatch code.
set -euo pipefail
cargo build --locked -q -p tilewise --bin tilewised -p tilewise-app --bin tilewise-ui-bridge
cargo build --locked -q -p tilewise --example seed_best   # the provenance test stores bests with it
cd ui
TILEWISE_BIN_DIR="$PWD/../target/debug" node --test --test-concurrency=1 tests/
