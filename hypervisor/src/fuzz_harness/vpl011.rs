//! vPL011 harness (see mod.rs).
pub fn run(_data: &[u8]) {}
