# The reliability suite (reliability/run): cargo-fuzz for the libFuzzer target in fuzz/ (the suite
# runs it with RUSTC_BOOTSTRAP=1 on the stable toolchain). setpriv (util-linux) and mount, used by
# the other-UID and storage-fault checks, ship with Debian; without them those rows are skipped
# with the reason. Idempotent.
set -euo pipefail
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
