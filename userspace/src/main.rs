//! The `eventstream` daemon.
fn main() {}
