//! Arbitrary bytes as a TCP stream cut into arbitrary reads: never panics, and the frames
//! decoded are the same whatever the cut, up to the first fatal error.
#![no_main]

use eventstream::wire::protocol::{FrameError, Limits, StreamDecoder};
use libfuzzer_sys::fuzz_target;

type Item = Result<(u8, String, Vec<u8>), FrameError>;

fn decode(data: &[u8], cuts: &[u8]) -> (Vec<Item>, Result<(), FrameError>) {
    let limits = Limits {
        max_frame_len: 4096,
        max_topic_len: 32,
    };
    let mut d = StreamDecoder::new(limits);
    let mut out = Vec::new();
    let mut rest = data;
    let mut cut = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = usize::from(*cut.next().unwrap_or(&255)).clamp(1, rest.len());
        let spare = d.spare();
        let n = n.min(spare.len());
        spare[..n].copy_from_slice(&rest[..n]);
        d.commit(n);
        rest = &rest[n..];
        loop {
            match d.next_frame() {
                Ok(Some(f)) => out.push(Ok((f.priority, f.topic.to_owned(), f.payload.to_vec()))),
                Ok(None) => break,
                Err(e) if e.is_fatal_for_stream() => {
                    out.push(Err(e));
                    return (out, Ok(()));
                }
                Err(e) => out.push(Err(e)),
            }
        }
    }
    let eof = d.finish();
    (out, eof)
}

fuzz_target!(|input: (&[u8], &[u8])| {
    let (data, cuts) = input;
    let whole = decode(data, &[255]);
    let cut = decode(data, if cuts.is_empty() { &[1] } else { cuts });
    assert_eq!(whole, cut, "decoding must not depend on how reads are cut");
});
