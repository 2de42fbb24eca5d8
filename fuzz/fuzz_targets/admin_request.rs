//! Arbitrary bytes as one client connection to the admin port: the server (hyper, with the
//! appliance's limits, policy checks and handlers) never panics and never hangs, whatever the
//! request line, headers, lengths and bodies say.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = eventstream::ops::admin::answer_bytes(data);
    // Whatever it answered is an HTTP/1 response, or nothing at all.
    assert!(out.is_empty() || out.starts_with(b"HTTP/1."));
});
