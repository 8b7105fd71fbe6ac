# The promotion rule against noise, reduced form: 8 short sessions through the real daemon in which every
# candidate computes exactly what stock computes (bench/integrity --quick); fails if any promotes. The
# full form (bench/integrity --sessions 120) and its result are in results/cpu/.
set -euo pipefail
cargo build --locked -q -p tilewise --bins
bench/integrity --quick --daemon target/debug/tilewised
