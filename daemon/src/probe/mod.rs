//! Hardware probe (see probe/mod.rs docs).
