//! Wire protocol v1 (`shared/design/PROTOCOL.md`), byte for byte.
//!
//! ```text
//! 0        4          5            7                 7+T
//! | length | priority | topic_len  | topic (T bytes) | payload (length - 3 - T bytes) |
//! | u32 BE | u8       | u16 BE = T | UTF-8           | opaque                          |
//! ```
//!
//! This module owns framing only: it never allocates and never copies topic or payload bytes.
//! [`parse_frame`] reads one frame at the start of a buffer and returns a [`FrameSpan`] (offsets
//! into that buffer), which is what the pooled-event path stores; [`Frame`] is the borrowed view
//! of the same thing. [`Datagram`] walks the frames of one UDP datagram (or one UMEM frame) with
//! the datagram rules of the table; [`StreamDecoder`] reassembles a TCP byte stream across reads
//! with the stream rules. [`encode`] and [`encode_into`] write frames.
//!
//! Every rejection is a typed [`FrameError`] whose [`FrameError::reason`] is the
//! `discarded_total{reason}` label the table names.

use thiserror::Error;

/// Bytes of the `length` prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes of the fixed header: length, priority, topic length.
pub const HEADER_LEN: usize = 7;
/// Smallest legal value of `length`: priority + topic length, empty topic and payload.
pub const MIN_LENGTH: u32 = 3;
/// Default `max_frame_len` (PROTOCOL.md).
pub const DEFAULT_MAX_FRAME_LEN: u32 = 65_535;
/// Default `max_topic_len` (PROTOCOL.md).
pub const DEFAULT_MAX_TOPIC_LEN: u16 = 255;

/// Configurable limits on incoming frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `length` field (bytes after the prefix).
    pub max_frame_len: u32,
    /// Largest accepted topic, in bytes.
    pub max_topic_len: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_topic_len: DEFAULT_MAX_TOPIC_LEN,
        }
    }
}

/// The `discarded_total{reason}` label of a rejected frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// `length` < 3, or the topic runs past the frame.
    Malformed,
    /// `length` > `max_frame_len`.
    TooLarge,
    /// Topic longer than `max_topic_len`, or not UTF-8.
    BadTopic,
    /// Datagram shorter than a header, trailing partial frame, or a stream ended mid-frame.
    Truncated,
}

impl RejectReason {
    /// All reasons, for declaring one counter each.
    pub const ALL: [RejectReason; 4] = [
        Self::Malformed,
        Self::TooLarge,
        Self::BadTopic,
        Self::Truncated,
    ];

    /// The metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::BadTopic => "bad_topic",
            Self::Truncated => "truncated",
        }
    }
}

/// Why a frame was rejected. One variant per bad-input row of PROTOCOL.md.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// `length` < 3: not even room for priority and topic length.
    #[error("malformed frame: length {length} is below the minimum of 3")]
    LengthTooSmall {
        /// The `length` field.
        length: u32,
    },
    /// The topic length points past the end of the frame.
    #[error("malformed frame: topic length {topic_len} exceeds length {length} - 3")]
    TopicOverrun {
        /// The `topic_len` field.
        topic_len: u16,
        /// The `length` field.
        length: u32,
    },
    /// `length` above the configured `max_frame_len`.
    #[error("frame too large: length {length} exceeds max_frame_len {max}")]
    TooLarge {
        /// The `length` field.
        length: u32,
        /// The configured limit.
        max: u32,
    },
    /// Topic longer than the configured `max_topic_len`.
    #[error("bad topic: {topic_len} bytes exceeds max_topic_len {max}")]
    TopicTooLong {
        /// The `topic_len` field.
        topic_len: u16,
        /// The configured limit.
        max: u16,
        /// The `length` field, so the frame can be skipped.
        length: u32,
    },
    /// Topic bytes are not UTF-8.
    #[error("bad topic: not UTF-8 (valid up to byte {valid_up_to})")]
    TopicNotUtf8 {
        /// Length of the longest valid UTF-8 prefix.
        valid_up_to: usize,
        /// The `length` field, so the frame can be skipped.
        length: u32,
    },
    /// Not enough bytes for the header or for the whole frame.
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the frame needs, counted from its first byte.
        need: usize,
        /// Bytes there are.
        have: usize,
    },
}

impl FrameError {
    /// The `discarded_total{reason}` label.
    pub const fn reason(&self) -> RejectReason {
        match self {
            Self::LengthTooSmall { .. } | Self::TopicOverrun { .. } => RejectReason::Malformed,
            Self::TooLarge { .. } => RejectReason::TooLarge,
            Self::TopicTooLong { .. } | Self::TopicNotUtf8 { .. } => RejectReason::BadTopic,
            Self::Truncated { .. } => RejectReason::Truncated,
        }
    }

    /// Total bytes of the rejected frame when its `length` field is still trusted, so that the
    /// reader can step over it: `Some` for `TooLarge` and the bad-topic errors.
    pub const fn frame_bytes(&self) -> Option<usize> {
        match *self {
            Self::TooLarge { length, .. }
            | Self::TopicTooLong { length, .. }
            | Self::TopicNotUtf8 { length, .. } => Some(LEN_PREFIX + length as usize),
            _ => None,
        }
    }
}

/// Where one frame's parts lie, as byte offsets from the start of the buffer it was parsed from.
///
/// This is what a pooled event stores: 16 bytes that point into a receive buffer or UMEM frame,
/// so topic and payload are never copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FrameSpan {
    /// Offset of the topic's first byte.
    pub topic_off: u32,
    /// Offset of the payload's first byte (`topic_off + topic_len`).
    pub payload_off: u32,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Topic length in bytes; the topic is valid UTF-8.
    pub topic_len: u16,
    /// Priority, 0 lowest, 255 highest.
    pub priority: u8,
}

impl FrameSpan {
    /// Offset one past the frame's last byte.
    pub const fn end(&self) -> usize {
        self.payload_off as usize + self.payload_len as usize
    }

    /// Moves the span by `delta` bytes, for a span parsed from a sub-slice.
    #[must_use]
    pub const fn offset_by(mut self, delta: u32) -> Self {
        self.topic_off += delta;
        self.payload_off += delta;
        self
    }

    /// The borrowed frame this span describes in `buf`.
    ///
    /// # Panics
    /// If the span does not lie inside `buf`, or the topic bytes are not UTF-8: both mean the
    /// span was not parsed from this buffer.
    pub fn resolve<'a>(&self, buf: &'a [u8]) -> Frame<'a> {
        let topic = &buf[self.topic_off as usize..self.payload_off as usize];
        let topic = core::str::from_utf8(topic).expect("span resolved against a foreign buffer");
        Frame {
            priority: self.priority,
            topic,
            payload: &buf[self.payload_off as usize..self.end()],
        }
    }

    /// [`FrameSpan::resolve`] without re-checking the topic: for spans this module's parser just
    /// produced over `buf`.
    ///
    /// # Safety
    /// `self` must come from [`parse_frame`] (moved by [`FrameSpan::offset_by`] to match) over
    /// these very bytes of `buf`, so the topic range is in bounds and valid UTF-8.
    #[inline]
    unsafe fn resolve_parsed<'a>(&self, buf: &'a [u8]) -> Frame<'a> {
        let topic = &buf[self.topic_off as usize..self.payload_off as usize];
        debug_assert!(core::str::from_utf8(topic).is_ok());
        // SAFETY: the caller guarantees `parse_frame` validated exactly these bytes as UTF-8.
        let topic = unsafe { core::str::from_utf8_unchecked(topic) };
        Frame {
            priority: self.priority,
            topic,
            payload: &buf[self.payload_off as usize..self.end()],
        }
    }
}

/// A parsed frame, borrowing topic and payload from the buffer it was parsed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Priority, 0 lowest, 255 highest.
    pub priority: u8,
    /// The topic, validated UTF-8.
    pub topic: &'a str,
    /// The opaque payload.
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes this frame takes on the wire, prefix included.
    pub const fn wire_len(&self) -> usize {
        HEADER_LEN + self.topic.len() + self.payload.len()
    }
}

#[inline]
fn read_u32_be(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether every byte of `b` is ASCII, eight bytes at a time in registers and inline: for a
/// topic's few bytes, core's `is_ascii` (a call) costs more than the check.
#[inline(always)]
pub(crate) fn is_ascii(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    let mut acc = 0u64;
    for w in words.by_ref() {
        acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
    }
    let mut tail = 0u8;
    for &x in words.remainder() {
        tail |= x;
    }
    acc & 0x8080_8080_8080_8080 == 0 && tail < 0x80
}

/// Parses the frame at the start of `buf`.
///
/// Checks run in the order that lets a stream reader reject early: `length` (from 4 bytes),
/// then the topic length against `length` (from 7), then completeness, then the topic.
///
/// # Errors
/// A [`FrameError`] per PROTOCOL.md row. `Truncated` means "not all here": a stream reader waits
/// for more bytes, a datagram reader rejects the rest of the datagram.
#[inline]
pub fn parse_frame(buf: &[u8], limits: &Limits) -> Result<FrameSpan, FrameError> {
    let have = buf.len();
    if have < LEN_PREFIX {
        return Err(FrameError::Truncated {
            need: HEADER_LEN,
            have,
        });
    }
    let length = read_u32_be(buf, 0);
    if length < MIN_LENGTH {
        return Err(FrameError::LengthTooSmall { length });
    }
    if length > limits.max_frame_len {
        return Err(FrameError::TooLarge {
            length,
            max: limits.max_frame_len,
        });
    }
    if have < HEADER_LEN {
        return Err(FrameError::Truncated {
            need: HEADER_LEN,
            have,
        });
    }
    let priority = buf[4];
    let topic_len = u16::from_be_bytes([buf[5], buf[6]]);
    if u32::from(topic_len) > length - MIN_LENGTH {
        return Err(FrameError::TopicOverrun { topic_len, length });
    }
    // `length <= max_frame_len <= u32::MAX`, so this cannot overflow on 64-bit targets; on
    // 32-bit ones `have` bounds it first.
    let need = LEN_PREFIX + length as usize;
    if have < need {
        return Err(FrameError::Truncated { need, have });
    }
    if topic_len > limits.max_topic_len {
        return Err(FrameError::TopicTooLong {
            topic_len,
            max: limits.max_topic_len,
            length,
        });
    }
    let topic_end = HEADER_LEN + usize::from(topic_len);
    let topic = &buf[HEADER_LEN..topic_end];
    // Topics are almost always ASCII: checked inline, without the general validator's call.
    if !is_ascii(topic)
        && let Err(e) = core::str::from_utf8(topic)
    {
        return Err(FrameError::TopicNotUtf8 {
            valid_up_to: e.valid_up_to(),
            length,
        });
    }
    Ok(FrameSpan {
        priority,
        topic_off: HEADER_LEN as u32,
        topic_len,
        payload_off: topic_end as u32,
        payload_len: length - MIN_LENGTH - u32::from(topic_len),
    })
}

/// The frames of one UDP datagram (or one AF_XDP frame's UDP payload), in order.
///
/// Datagram rules (PROTOCOL.md): a datagram shorter than a header is `truncated`; a malformed
/// frame or trailing bytes that do not form a whole frame end the datagram (one error, then
/// `None`); a frame with a bad topic, or too large but wholly inside the datagram, is rejected
/// alone and the walk goes on. Frames before an error are always delivered.
#[derive(Clone, Debug)]
pub struct DatagramSpans<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: Limits,
    done: bool,
}

impl<'a> DatagramSpans<'a> {
    /// Walks `buf`, one datagram.
    ///
    /// # Panics
    /// If `buf` is 4 GiB or longer (offsets are `u32`); no datagram or UMEM frame is.
    pub fn new(buf: &'a [u8], limits: Limits) -> Self {
        assert!(u32::try_from(buf.len()).is_ok(), "datagram over 4 GiB");
        Self {
            buf,
            pos: 0,
            limits,
            done: false,
        }
    }

    /// The datagram being walked.
    pub const fn buf(&self) -> &'a [u8] {
        self.buf
    }
}

impl Iterator for DatagramSpans<'_> {
    type Item = Result<FrameSpan, FrameError>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rest = &self.buf[self.pos..];
        if rest.is_empty() {
            self.done = true;
            // An empty datagram is one "shorter than 7 bytes"; the end of a non-empty one is not.
            return (self.pos == 0).then_some(Err(FrameError::Truncated {
                need: HEADER_LEN,
                have: 0,
            }));
        }
        if self.pos == 0 && rest.len() < HEADER_LEN {
            self.done = true;
            return Some(Err(FrameError::Truncated {
                need: HEADER_LEN,
                have: rest.len(),
            }));
        }
        match parse_frame(rest, &self.limits) {
            Ok(span) => {
                let span = span.offset_by(self.pos as u32);
                self.pos = span.end();
                Some(Ok(span))
            }
            Err(e) => {
                match e.frame_bytes() {
                    Some(n) if n <= rest.len() => self.pos += n,
                    _ => self.done = true,
                }
                Some(Err(e))
            }
        }
    }
}

/// [`DatagramSpans`] resolved to borrowed [`Frame`]s.
#[derive(Clone, Debug)]
pub struct Datagram<'a> {
    spans: DatagramSpans<'a>,
}

impl<'a> Datagram<'a> {
    /// Walks `buf`, one datagram. See [`DatagramSpans`] for the rules.
    pub fn new(buf: &'a [u8], limits: Limits) -> Self {
        Self {
            spans: DatagramSpans::new(buf, limits),
        }
    }
}

impl<'a> Iterator for Datagram<'a> {
    type Item = Result<Frame<'a>, FrameError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let buf = self.spans.buf();
        // SAFETY: `DatagramSpans` yields spans `parse_frame` produced over `buf`, offset to it.
        self.spans
            .next()
            .map(|r| r.map(|s| unsafe { s.resolve_parsed(buf) }))
    }
}

/// Reassembles frames from a TCP byte stream, across reads, in one fixed buffer.
///
/// Read into [`StreamDecoder::spare`], [`StreamDecoder::commit`] what was read, then call
/// [`StreamDecoder::next_frame`] until it returns `Ok(None)`. Stream rules (PROTOCOL.md):
/// `malformed` and `too_large` are fatal (close the connection: see
/// [`FrameError::is_fatal_for_stream`]); a bad topic rejects that frame only, and decoding goes
/// on; a partial frame waits for more bytes, and [`StreamDecoder::finish`] at EOF reports it as
/// `truncated`.
///
/// The buffer holds one maximal frame plus a read chunk, allocated once. A partial frame is moved
/// to the front only when the space behind it cannot take the rest of it.
#[derive(Debug)]
pub struct StreamDecoder {
    buf: Box<[u8]>,
    /// First byte not yet consumed. Invariant: `start <= end <= buf.len()`.
    start: usize,
    /// One past the last byte received.
    end: usize,
    limits: Limits,
    failed: Option<FrameError>,
}

/// Bytes a read should be offered at least, besides the largest frame.
const STREAM_READ_CHUNK: usize = 16 * 1024;

impl FrameError {
    /// Whether a stream reader must close the connection: true for `malformed` and `too_large`,
    /// after which the stream cannot be re-synchronised.
    pub const fn is_fatal_for_stream(&self) -> bool {
        matches!(
            self.reason(),
            RejectReason::Malformed | RejectReason::TooLarge
        )
    }
}

impl StreamDecoder {
    /// A decoder for one connection, with its buffer allocated now.
    pub fn new(limits: Limits) -> Self {
        let cap = LEN_PREFIX + limits.max_frame_len as usize + STREAM_READ_CHUNK;
        Self {
            buf: vec![0; cap].into_boxed_slice(),
            start: 0,
            end: 0,
            limits,
            failed: None,
        }
    }

    /// Bytes received and not yet consumed.
    pub const fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Where the next read should land. Never empty while the decoder has not failed.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < STREAM_READ_CHUNK {
            // Not enough room behind a partial frame: slide it to the front. `new` sized the
            // buffer so a maximal frame plus a chunk fits from offset 0.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`StreamDecoder::spare`].
    ///
    /// # Panics
    /// If `n` is larger than the spare space last returned.
    pub fn commit(&mut self, n: usize) {
        assert!(
            n <= self.buf.len() - self.end,
            "commit past the spare space"
        );
        self.end += n;
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    ///
    /// # Errors
    /// A fatal error ([`FrameError::is_fatal_for_stream`]) is returned again on every later call;
    /// a bad-topic error consumes that frame and the next call goes on after it.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let rest = &self.buf[self.start..self.end];
        match parse_frame(rest, &self.limits) {
            Ok(span) => {
                let base = self.start;
                self.start += span.end();
                // SAFETY: `parse_frame` just produced `span` over `buf[base..end]`.
                Ok(Some(unsafe {
                    span.resolve_parsed(&self.buf[base..self.end])
                }))
            }
            Err(FrameError::Truncated { .. }) => Ok(None),
            Err(e) if e.is_fatal_for_stream() => {
                self.failed = Some(e);
                Err(e)
            }
            Err(e) => {
                // Bad topic: the frame is whole (completeness is checked first), skip it.
                self.start += e.frame_bytes().unwrap_or(rest.len());
                Err(e)
            }
        }
    }

    /// Call at EOF.
    ///
    /// # Errors
    /// `Truncated` when the stream ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        let have = self.buffered();
        if have == 0 || self.failed.is_some() {
            return Ok(());
        }
        let rest = &self.buf[self.start..self.end];
        let need = if have < LEN_PREFIX {
            HEADER_LEN
        } else {
            LEN_PREFIX + read_u32_be(rest, 0) as usize
        };
        Err(FrameError::Truncated { need, have })
    }
}

/// Why a frame could not be encoded.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum EncodeError {
    /// The topic does not fit the u16 topic length.
    #[error("topic of {0} bytes does not fit a u16 length")]
    TopicTooLong(usize),
    /// The frame does not fit the u32 length.
    #[error("frame of {0} bytes does not fit a u32 length")]
    FrameTooLong(usize),
    /// The output buffer is too small.
    #[error("output buffer holds {have} bytes, frame needs {need}")]
    BufferTooSmall {
        /// Bytes the frame needs.
        need: usize,
        /// Bytes the buffer has.
        have: usize,
    },
}

/// Bytes `topic` and `payload` take as one frame on the wire.
pub const fn encoded_len(topic: &str, payload: &[u8]) -> usize {
    HEADER_LEN + topic.len() + payload.len()
}

/// Writes one frame at the start of `out`; returns the bytes written. Allocates nothing.
///
/// # Errors
/// [`EncodeError`] when the topic or frame does not fit the header fields, or `out` is short.
pub fn encode_into(
    priority: u8,
    topic: &str,
    payload: &[u8],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let topic_len =
        u16::try_from(topic.len()).map_err(|_| EncodeError::TopicTooLong(topic.len()))?;
    let need = encoded_len(topic, payload);
    let length = u32::try_from(need - LEN_PREFIX).map_err(|_| EncodeError::FrameTooLong(need))?;
    let Some(out) = out.get_mut(..need) else {
        return Err(EncodeError::BufferTooSmall {
            need,
            have: out.len(),
        });
    };
    out[0..4].copy_from_slice(&length.to_be_bytes());
    out[4] = priority;
    out[5..7].copy_from_slice(&topic_len.to_be_bytes());
    out[HEADER_LEN..HEADER_LEN + topic.len()].copy_from_slice(topic.as_bytes());
    out[HEADER_LEN + topic.len()..].copy_from_slice(payload);
    Ok(need)
}

/// Appends one frame to `out`.
///
/// # Errors
/// [`EncodeError`] when the topic or frame does not fit the header fields.
pub fn encode(
    priority: u8,
    topic: &str,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, EncodeError> {
    let at = out.len();
    out.resize(at + encoded_len(topic, payload), 0);
    let r = encode_into(priority, topic, payload, &mut out[at..]);
    if r.is_err() {
        out.truncate(at);
    }
    r
}

#[cfg(test)]
mod tests;
