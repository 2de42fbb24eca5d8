//! Arbitrary bytes as a log segment: recovery's scan and the readers' decoding never panic,
//! and every byte is either in a good record or in a reported damaged stretch.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut good = 0u64;
    let (damage, last) = eventstream::sink::file::scan_segment(
        std::path::Path::new("fuzz.seg"),
        data,
        0,
        |id, body| {
            good += 16 + body.len() as u64;
            let _ = eventstream::sink::file::decode(id, body);
        },
    );
    let bad: u64 = damage.iter().map(|d| d.bytes).sum();
    assert_eq!(good + bad, data.len() as u64);
    assert_eq!(last.is_some(), good > 0);
});
