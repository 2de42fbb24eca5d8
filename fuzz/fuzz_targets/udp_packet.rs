//! Arbitrary bytes as an Ethernet frame off the AF_XDP ring: the classifier never panics, and
//! whatever it hands on as a UDP payload lies inside the frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if let Some((payload, _meta)) = eventstream::wire::packet::udp_payload(frame) {
        assert!(payload.start <= payload.end && payload.end <= frame.len());
    }
});
