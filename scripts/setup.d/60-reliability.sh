# The reliability suite (reliability/run): cargo-fuzz for the libFuzzer target in fuzz/ (the suite
# runs it with RUSTC_BOOTSTRAP=1 on the stable toolchain), installed when the fuzz run is wanted:
# always for the full form (run this part by hand), in CI only with TILEWISE_RELIABILITY_FUZZ=1 (see
# scripts/test.d/60-reliability.sh). setpriv (util-linux), chattr (e2fsprogs) and mount, used by the
# other-UID and storage-fault checks, ship with Debian; without them (or without root) those rows
# are skipped with the reason. Idempotent.
set -euo pipefail
[ "${TILEWISE_RELIABILITY_FUZZ:-0}" = 1 ] || [ "${1:-}" = --fuzz ] || exit 0
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
