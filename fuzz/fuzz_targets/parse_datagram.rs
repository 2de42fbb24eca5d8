//! Arbitrary bytes as one datagram: the walk never panics, every span lies inside the datagram
//! in order, and re-encoding the accepted frames gives back exactly their bytes.
#![no_main]

use eventstream::wire::protocol::{DatagramSpans, Limits, encode_into, parse_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first two bytes pick the limits, so they get explored too.
    let (limits, data) = match input {
        [a, b, rest @ ..] => (
            Limits {
                max_frame_len: u32::from(*a) * 64,
                max_topic_len: u16::from(*b),
            },
            rest,
        ),
        _ => (Limits::default(), input),
    };
    let mut end = 0;
    let mut out = [0u8; 1 << 16];
    for span in DatagramSpans::new(data, limits).flatten() {
        assert!(
            span.topic_off as usize >= end + 7,
            "frames are in order and disjoint"
        );
        assert!(span.end() <= data.len());
        let start = span.topic_off as usize - 7;
        let frame = span.resolve(data);
        let n = encode_into(frame.priority, frame.topic, frame.payload, &mut out).unwrap();
        assert_eq!(&out[..n], &data[start..span.end()], "encode(parse(x)) == x");
        assert_eq!(
            parse_frame(&data[start..], &limits).map(|s| s.offset_by(start as u32)),
            Ok(span)
        );
        end = span.end();
    }
});
