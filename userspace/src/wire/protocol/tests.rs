use super::*;
use proptest::prelude::*;

fn frame(priority: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode(priority, topic, payload, &mut v).unwrap();
    v
}

/// A frame with raw header fields, for building bad input.
fn raw(length: u32, priority: u8, topic_len: u16, body: &[u8]) -> Vec<u8> {
    let mut v = length.to_be_bytes().to_vec();
    v.push(priority);
    v.extend_from_slice(&topic_len.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// An owned copy of a parse result, for comparing.
type Owned = Result<(u8, String, Vec<u8>), FrameError>;

fn collect(buf: &[u8], limits: Limits) -> Vec<Owned> {
    Datagram::new(buf, limits)
        .map(|r| r.map(|f| (f.priority, f.topic.to_owned(), f.payload.to_vec())))
        .collect()
}

fn ok(p: u8, t: &str, b: &[u8]) -> Owned {
    Ok((p, t.to_owned(), b.to_vec()))
}

/// Feeds `bytes` to a fresh decoder in `chunk`-sized reads; returns frames and errors in order,
/// stopping at the first fatal error, then the EOF result.
fn stream(bytes: &[u8], chunk: usize, limits: Limits) -> (Vec<Owned>, Result<(), FrameError>) {
    let mut d = StreamDecoder::new(limits);
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        let spare = d.spare();
        spare[..piece.len()].copy_from_slice(piece);
        d.commit(piece.len());
        loop {
            match d.next_frame() {
                Ok(Some(f)) => out.push(Ok((f.priority, f.topic.to_owned(), f.payload.to_vec()))),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    if e.is_fatal_for_stream() {
                        return (out, Ok(()));
                    }
                }
            }
        }
    }
    let eof = d.finish();
    (out, eof)
}

// ---- the reference client ---------------------------------------------------------------

#[test]
fn matches_the_reference_python_client_bytes() {
    // struct.pack(">I", 1 + 2 + 5 + 2) + struct.pack("B", 5) + struct.pack(">H", 5) + b"a/b/c" + b"hi"
    let expected: &[u8] = &[
        0, 0, 0, 10, 5, 0, 5, b'a', b'/', b'b', b'/', b'c', b'h', b'i',
    ];
    assert_eq!(frame(5, "a/b/c", b"hi"), expected);
    assert_eq!(
        collect(expected, Limits::default()),
        vec![ok(5, "a/b/c", b"hi")]
    );
}

#[test]
fn minimum_frame_is_seven_bytes() {
    let f = frame(0, "", b"");
    assert_eq!(f, [0, 0, 0, 3, 0, 0, 0]);
    assert_eq!(collect(&f, Limits::default()), vec![ok(0, "", b"")]);
}

#[test]
fn many_frames_in_one_datagram() {
    let mut d = Vec::new();
    for i in 0..16u8 {
        d.extend(frame(i, &format!("t.{i}"), &[i; 9]));
    }
    let got = collect(&d, Limits::default());
    assert_eq!(got.len(), 16);
    for (i, r) in got.into_iter().enumerate() {
        let i = i as u8;
        assert_eq!(r, ok(i, &format!("t.{i}"), &[i; 9]));
    }
}

#[test]
fn spans_point_into_the_datagram() {
    let mut d = frame(1, "ab", b"xyz");
    d.extend(frame(2, "c", b""));
    let spans: Vec<_> = DatagramSpans::new(&d, Limits::default())
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        spans[0],
        FrameSpan {
            topic_off: 7,
            topic_len: 2,
            payload_off: 9,
            payload_len: 3,
            priority: 1
        }
    );
    assert_eq!(spans[1].topic_off, 12 + 7);
    assert_eq!(spans[1].end(), d.len());
    // Zero copy: the resolved slices are the datagram's own bytes.
    let f = spans[0].resolve(&d);
    assert_eq!(f.payload.as_ptr(), d[9..].as_ptr());
}

// ---- datagram rows of the table -----------------------------------------------------------

#[test]
fn udp_length_below_three_rejects_rest_of_datagram() {
    let mut d = frame(1, "a", b"ok");
    d.extend(raw(2, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]));
    d.extend(frame(1, "never", b"seen"));
    assert_eq!(
        collect(&d, Limits::default()),
        vec![
            ok(1, "a", b"ok"),
            Err(FrameError::LengthTooSmall { length: 2 })
        ]
    );
}

#[test]
fn udp_topic_overrun_rejects_rest_of_datagram() {
    let mut d = raw(5, 0, 3, b"ab");
    d.extend(frame(1, "never", b""));
    let got = collect(&d, Limits::default());
    assert_eq!(
        got,
        vec![Err(FrameError::TopicOverrun {
            topic_len: 3,
            length: 5
        })]
    );
    assert_eq!(
        got[0].as_ref().unwrap_err().reason(),
        RejectReason::Malformed
    );
}

#[test]
fn udp_too_large_frame_inside_datagram_is_skipped() {
    let limits = Limits {
        max_frame_len: 16,
        max_topic_len: 255,
    };
    let mut d = frame(1, "big", &[7; 20]);
    d.extend(frame(2, "small", b"x"));
    assert_eq!(
        collect(&d, limits),
        vec![
            Err(FrameError::TooLarge {
                length: 26,
                max: 16
            }),
            ok(2, "small", b"x")
        ]
    );
}

#[test]
fn udp_too_large_frame_past_datagram_ends_it() {
    let d = raw(70_000, 0, 0, &[0; 10]);
    let got = collect(&d, Limits::default());
    assert_eq!(
        got,
        vec![Err(FrameError::TooLarge {
            length: 70_000,
            max: 65_535
        })]
    );
    assert_eq!(
        got[0].as_ref().unwrap_err().reason(),
        RejectReason::TooLarge
    );
}

#[test]
fn udp_topic_too_long_rejects_that_frame_only() {
    let limits = Limits {
        max_frame_len: 65_535,
        max_topic_len: 4,
    };
    let mut d = frame(1, "toolong", b"p");
    d.extend(frame(2, "ok", b"q"));
    let got = collect(&d, limits);
    assert_eq!(
        got,
        vec![
            Err(FrameError::TopicTooLong {
                topic_len: 7,
                max: 4,
                length: 11
            }),
            ok(2, "ok", b"q")
        ]
    );
    assert_eq!(
        got[0].as_ref().unwrap_err().reason(),
        RejectReason::BadTopic
    );
}

#[test]
fn udp_topic_not_utf8_rejects_that_frame_only() {
    let mut d = raw(6, 1, 2, &[b'a', 0xff, b'p']);
    d.extend(frame(2, "ok", b"q"));
    let got = collect(&d, Limits::default());
    assert_eq!(
        got,
        vec![
            Err(FrameError::TopicNotUtf8 {
                valid_up_to: 1,
                length: 6
            }),
            ok(2, "ok", b"q")
        ]
    );
    assert_eq!(
        got[0].as_ref().unwrap_err().reason(),
        RejectReason::BadTopic
    );
}

#[test]
fn udp_datagram_shorter_than_header_is_truncated() {
    for n in 0..HEADER_LEN {
        let d = vec![0u8; n];
        let got = collect(&d, Limits::default());
        assert_eq!(
            got,
            vec![Err(FrameError::Truncated { need: 7, have: n })],
            "len {n}"
        );
        assert_eq!(
            got[0].as_ref().unwrap_err().reason(),
            RejectReason::Truncated
        );
    }
}

#[test]
fn udp_trailing_partial_frame_is_truncated_after_whole_ones() {
    let mut d = frame(1, "a", b"ok");
    let tail = frame(2, "b", b"cut short");
    d.extend(&tail[..tail.len() - 3]);
    assert_eq!(
        collect(&d, Limits::default()),
        vec![
            ok(1, "a", b"ok"),
            Err(FrameError::Truncated {
                need: tail.len(),
                have: tail.len() - 3
            })
        ]
    );
    // A few stray trailing bytes, too short for a length prefix.
    let mut d = frame(1, "a", b"ok");
    d.extend([0, 0]);
    assert_eq!(
        collect(&d, Limits::default()),
        vec![
            ok(1, "a", b"ok"),
            Err(FrameError::Truncated { need: 7, have: 2 })
        ]
    );
}

// ---- stream rows of the table --------------------------------------------------------------

#[test]
fn tcp_reassembles_frames_across_every_split() {
    let mut s = Vec::new();
    for i in 0..5u8 {
        s.extend(frame(
            i,
            &"t".repeat(i as usize),
            &vec![i; 100 * i as usize],
        ));
    }
    for chunk in [1, 2, 3, 7, 64, 1000, s.len()] {
        let (got, eof) = stream(&s, chunk, Limits::default());
        assert_eq!(eof, Ok(()));
        assert_eq!(got.len(), 5, "chunk {chunk}");
        for (i, r) in got.into_iter().enumerate() {
            let i = i as u8;
            assert_eq!(
                r,
                ok(i, &"t".repeat(i as usize), &vec![i; 100 * i as usize])
            );
        }
    }
}

#[test]
fn tcp_malformed_is_fatal_and_sticky() {
    let mut s = frame(1, "a", b"ok");
    s.extend(raw(1, 0, 0, &[]));
    s.extend(frame(1, "never", b""));
    let (got, _) = stream(&s, 3, Limits::default());
    assert_eq!(
        got,
        vec![
            ok(1, "a", b"ok"),
            Err(FrameError::LengthTooSmall { length: 1 })
        ]
    );

    let mut d = StreamDecoder::new(Limits::default());
    let bad = raw(9, 0, 200, &[0; 6]);
    d.spare()[..bad.len()].copy_from_slice(&bad);
    d.commit(bad.len());
    let e = FrameError::TopicOverrun {
        topic_len: 200,
        length: 9,
    };
    assert_eq!(d.next_frame(), Err(e));
    assert!(e.is_fatal_for_stream());
    assert_eq!(d.next_frame(), Err(e), "a failed stream stays failed");
}

#[test]
fn tcp_malformed_length_is_seen_from_four_bytes() {
    let mut d = StreamDecoder::new(Limits::default());
    d.spare()[..4].copy_from_slice(&0u32.to_be_bytes());
    d.commit(4);
    assert_eq!(
        d.next_frame(),
        Err(FrameError::LengthTooSmall { length: 0 })
    );
}

#[test]
fn tcp_too_large_closes_before_the_body_arrives() {
    let mut d = StreamDecoder::new(Limits::default());
    d.spare()[..4].copy_from_slice(&100_000u32.to_be_bytes());
    d.commit(4);
    let e = d.next_frame().unwrap_err();
    assert_eq!(
        e,
        FrameError::TooLarge {
            length: 100_000,
            max: 65_535
        }
    );
    assert!(e.is_fatal_for_stream());
}

#[test]
fn tcp_bad_topic_rejects_frame_and_keeps_connection() {
    let limits = Limits {
        max_frame_len: 65_535,
        max_topic_len: 3,
    };
    let mut s = frame(1, "long-topic", b"p");
    s.extend(raw(5, 1, 2, &[0xc3, 0x28]));
    s.extend(frame(2, "ok", b"q"));
    let (got, eof) = stream(&s, 5, limits);
    assert_eq!(
        got,
        vec![
            Err(FrameError::TopicTooLong {
                topic_len: 10,
                max: 3,
                length: 14
            }),
            Err(FrameError::TopicNotUtf8 {
                valid_up_to: 0,
                length: 5
            }),
            ok(2, "ok", b"q"),
        ]
    );
    assert_eq!(eof, Ok(()));
}

#[test]
fn tcp_partial_frame_waits_then_is_truncated_at_eof() {
    let f = frame(3, "topic", b"payload");
    let (got, eof) = stream(&f[..f.len() - 1], 4, Limits::default());
    assert!(
        got.is_empty(),
        "a partial frame is not an error while the stream is open"
    );
    assert_eq!(
        eof,
        Err(FrameError::Truncated {
            need: f.len(),
            have: f.len() - 1
        })
    );
    let (_, eof) = stream(&f[..2], 1, Limits::default());
    assert_eq!(eof, Err(FrameError::Truncated { need: 7, have: 2 }));
}

#[test]
fn tcp_max_size_frame_fits_after_compaction() {
    let limits = Limits {
        max_frame_len: 70_000,
        max_topic_len: 255,
    };
    let big = vec![0xab; 70_000 - 3 - 1];
    let mut s = frame(0, "x", b"small");
    s.extend(frame(9, "b", &big));
    s.extend(frame(1, "y", b"after"));
    let (got, eof) = stream(&s, 9_999, limits);
    assert_eq!(eof, Ok(()));
    assert_eq!(
        got,
        vec![ok(0, "x", b"small"), ok(9, "b", &big), ok(1, "y", b"after")]
    );
}

// ---- encoder -------------------------------------------------------------------------------

#[test]
fn encode_rejects_unrepresentable_and_short_buffers() {
    let long = "x".repeat(70_000);
    assert_eq!(
        encode_into(0, &long, b"", &mut [0; 8]),
        Err(EncodeError::TopicTooLong(70_000))
    );
    let mut out = [0u8; 9];
    assert_eq!(
        encode_into(0, "ab", b"c", &mut out),
        Err(EncodeError::BufferTooSmall { need: 10, have: 9 })
    );
    let mut v = vec![1, 2];
    assert!(encode(0, &long, b"", &mut v).is_err());
    assert_eq!(v, [1, 2], "a failed encode leaves the vector as it was");
}

// ---- properties ----------------------------------------------------------------------------

fn arb_frame() -> impl Strategy<Value = (u8, String, Vec<u8>)> {
    (
        any::<u8>(),
        "[a-z0-9./*>#é]{0,40}",
        proptest::collection::vec(any::<u8>(), 0..300),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 4 } else { 256 }, ..ProptestConfig::default() })]

    #[test]
    fn inline_ascii_check_agrees_with_core(b in proptest::collection::vec(any::<u8>(), 0..40), ascii in any::<bool>()) {
        // Half the cases all-ASCII, so both answers are exercised at every length.
        let b: Vec<u8> = if ascii { b.iter().map(|x| x & 0x7f).collect() } else { b };
        prop_assert_eq!(is_ascii(&b), b.is_ascii());
    }

    #[test]
    fn encode_then_parse_round_trips(frames in proptest::collection::vec(arb_frame(), 1..16)) {
        let mut d = Vec::new();
        for (p, t, b) in &frames {
            encode(*p, t, b, &mut d).unwrap();
        }
        let got: Vec<_> = collect(&d, Limits::default());
        let want: Vec<_> = frames.iter().map(|(p, t, b)| ok(*p, t, b)).collect();
        prop_assert_eq!(&got, &want);
        for chunk in [1usize, 13, 4096] {
            let (got, eof) = stream(&d, chunk, Limits::default());
            prop_assert_eq!(eof, Ok(()));
            prop_assert_eq!(&got, &want);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..64,
        max_frame_len in 0u32..1000,
        max_topic_len in 0u16..64,
    ) {
        let limits = Limits { max_frame_len, max_topic_len };
        let mut end = 0;
        for span in DatagramSpans::new(&bytes, limits).flatten() {
            prop_assert!(span.end() <= bytes.len());
            prop_assert!(span.topic_off as usize >= end);
            end = span.end();
        }
        let _ = stream(&bytes, chunk, limits);
    }

    #[test]
    fn datagram_errors_end_or_skip_whole_frames(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        // The walk terminates, and yields at most one item per 7 bytes plus the final error.
        let n = Datagram::new(&bytes, Limits::default()).count();
        prop_assert!(n <= bytes.len() / HEADER_LEN + 1);
    }
}
