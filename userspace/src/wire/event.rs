//! The pipeline's event: metadata plus views into the frame it was parsed from.
//!
//! An [`Event`] owns a [`FrameLease`] on its receive frame (a `recvmmsg` buffer now, a UMEM frame
//! with AF_XDP) and the [`FrameSpan`] of its topic and payload inside it, so topic and payload
//! are never copied. Events are minted only by [`FrameEvents`], which parses the frame's own
//! bytes: that is what makes the span valid for the frame and the topic valid UTF-8.

use core::fmt;

use crate::mem::frames::{FrameLease, SharedFrame};
use crate::wire::protocol::{DatagramSpans, FrameError, FrameSpan, Limits};

/// Where an event came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Source {
    /// An AF_XDP socket.
    Xsk,
    /// The kernel UDP socket (`recvmmsg`).
    Udp,
    /// The kernel TCP listener.
    Tcp,
}

impl Source {
    /// All sources, for declaring one counter each.
    pub const ALL: [Source; 3] = [Source::Xsk, Source::Udp, Source::Tcp];

    /// The metric label (`eventstream_received_events_total{source}`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Xsk => "xsk",
            Source::Udp => "udp",
            Source::Tcp => "tcp",
        }
    }
}

/// Who sent a datagram (or opened a TCP connection): address and port, in a compact `Copy`
/// form that frames carry beside their bytes (one per frame, never per event).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    /// 0 unknown, 4 or 6.
    family: u8,
    port: u16,
    /// IPv4 in the first 4 bytes.
    addr: [u8; 16],
}

impl Peer {
    /// Bytes of [`Peer::to_bytes`].
    pub const ENCODED: usize = 19;

    /// No sender known (events made inside the appliance, old records).
    pub const UNKNOWN: Peer = Peer {
        family: 0,
        port: 0,
        addr: [0; 16],
    };

    /// An IPv4 sender.
    pub fn v4(addr: [u8; 4], port: u16) -> Self {
        let mut a = [0; 16];
        a[..4].copy_from_slice(&addr);
        Self {
            family: 4,
            port,
            addr: a,
        }
    }

    /// An IPv6 sender (an IPv4-mapped address is taken as the IPv4 one).
    pub fn v6(addr: [u8; 16], port: u16) -> Self {
        match std::net::Ipv6Addr::from(addr).to_ipv4_mapped() {
            Some(v4) => Self::v4(v4.octets(), port),
            None => Self {
                family: 6,
                port,
                addr,
            },
        }
    }

    /// The socket address, if known.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
        let ip = match self.family {
            4 => IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            )),
            6 => IpAddr::V6(Ipv6Addr::from(self.addr)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.port))
    }

    /// `family u8 | port u16 LE | addr [u8; 16]`, as records store it.
    pub fn to_bytes(&self) -> [u8; Self::ENCODED] {
        let mut b = [0; Self::ENCODED];
        b[0] = self.family;
        b[1..3].copy_from_slice(&self.port.to_le_bytes());
        b[3..].copy_from_slice(&self.addr);
        b
    }

    /// The inverse of [`Peer::to_bytes`]; an unknown family reads as [`Peer::UNKNOWN`].
    pub fn from_bytes(b: &[u8; Self::ENCODED]) -> Self {
        let mut addr = [0; 16];
        addr.copy_from_slice(&b[3..]);
        match b[0] {
            4 | 6 => Self {
                family: b[0],
                port: u16::from_le_bytes([b[1], b[2]]),
                addr,
            },
            _ => Self::UNKNOWN,
        }
    }
}

impl From<std::net::SocketAddr> for Peer {
    fn from(a: std::net::SocketAddr) -> Self {
        match a {
            std::net::SocketAddr::V4(a) => Self::v4(a.ip().octets(), a.port()),
            std::net::SocketAddr::V6(a) => Self::v6(a.ip().octets(), a.port()),
        }
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.socket_addr() {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("unknown"),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Per-batch ingest stamp shared by the events of one receive batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Where the batch came in.
    pub source: Source,
    /// Receive time, nanoseconds on `CLOCK_MONOTONIC`.
    pub ingest_ns: u64,
}

/// Where an ingest stream's number sits in [`Event::seq`].
pub const STREAM_SHIFT: u32 = 48;

/// The first sequence number of ingest stream `stream` (its events count up from it).
pub const fn seq_base(stream: u16) -> u64 {
    (stream as u64) << STREAM_SHIFT
}

/// One event, pointing into its receive frame.
pub struct Event<'a> {
    frame: FrameLease<'a>,
    /// Offsets relative to the frame's first byte; produced by parsing that frame.
    span: FrameSpan,
    /// Receive time, nanoseconds on `CLOCK_MONOTONIC`.
    pub ingest_ns: u64,
    /// When the pipelined dispatcher handed the event on (`CLOCK_MONOTONIC` ns, the batch's
    /// clock); 0 until then, and always in inline mode.
    pub routed_ns: u64,
    /// Per-ingest-stream sequence number, gap-free for accepted events; the stream (receive
    /// queue, socket, TCP slot) is in the top 16 bits ([`STREAM_SHIFT`]), so it is unique in a
    /// run and, with the node and the run, the event's id.
    pub seq: u64,
    /// Where it came in.
    pub source: Source,
    /// Dedup key, set by the dispatcher for transactional routes (0 until then); for
    /// `key: payload_id` routes, the sender's id (the first 8 payload bytes).
    pub key: u64,
    /// Whether `key` is the sender's id: then it is also the event's id in every sink.
    pub id_from_payload: bool,
}

impl<'a> Event<'a> {
    /// Priority, 0 lowest, 255 highest.
    #[inline]
    pub const fn priority(&self) -> u8 {
        self.span.priority
    }

    /// The topic.
    #[inline]
    pub fn topic(&self) -> &str {
        let bytes =
            &self.frame.frame()[self.span.topic_off as usize..self.span.payload_off as usize];
        // SAFETY: events are only built by `FrameEvents`, from spans that `parse_frame` produced
        // over this very frame's bytes after checking the topic is UTF-8; the frame is immutable
        // while this event's lease lives.
        unsafe { core::str::from_utf8_unchecked(bytes) }
    }

    /// The payload.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.frame.frame()[self.span.payload_off as usize..self.span.end()]
    }

    /// The span of topic and payload within the frame.
    pub const fn span(&self) -> FrameSpan {
        self.span
    }

    /// The frame lease (its index, for tracing).
    pub const fn lease(&self) -> &FrameLease<'a> {
        &self.frame
    }

    /// Who sent the datagram (or opened the connection) this event came in.
    #[inline]
    pub fn peer(&self) -> Peer {
        self.frame.peer()
    }
}

impl fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("source", &self.source)
            .field("seq", &self.seq)
            .field("priority", &self.priority())
            .field("topic", &self.topic())
            .field("payload_len", &self.span.payload_len)
            .finish()
    }
}

impl<'a> SharedFrame<'a> {
    /// Parses the frame's data as one datagram and mints an event per accepted frame. Sequence
    /// numbers are taken from `seq`, which is advanced once per event.
    pub fn events<'s>(
        &'s mut self,
        limits: Limits,
        stamp: Stamp,
        seq: &'s mut u64,
    ) -> FrameEvents<'s, 'a> {
        let offset = self.data_offset();
        let data = &self.frame_bytes()[offset as usize..][..self.data().len()];
        FrameEvents {
            spans: DatagramSpans::new(data, limits),
            offset,
            frame: self,
            stamp,
            seq,
        }
    }
}

/// Iterator from [`SharedFrame::events`]: events in datagram order, and each rejected frame as
/// its [`FrameError`] (count it by [`FrameError::reason`]).
pub struct FrameEvents<'s, 'a> {
    spans: DatagramSpans<'a>,
    offset: u32,
    frame: &'s mut SharedFrame<'a>,
    stamp: Stamp,
    seq: &'s mut u64,
}

impl<'a> FrameEvents<'_, 'a> {
    /// Returns an event this iterator minted, once its holder is done with it: its lease goes
    /// back to the frame without an atomic ([`SharedFrame::take_back`]).
    #[inline]
    pub fn give_back(&mut self, ev: Event<'a>) {
        self.frame.take_back(ev.frame);
    }
}

impl<'a> Iterator for FrameEvents<'_, 'a> {
    type Item = Result<Event<'a>, FrameError>;

    // Always inlined into the caller's loop, so the span stays in registers (called, its
    // `Option<Result<FrameSpan>>` went through the stack and a wider load of two narrower
    // stores stalled store-forwarding: 40 % of this function's samples at saturation).
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        Some(match self.spans.next()? {
            Ok(span) => {
                let seq = *self.seq;
                *self.seq += 1;
                Ok(Event {
                    frame: self.frame.lease(),
                    span: span.offset_by(self.offset),
                    ingest_ns: self.stamp.ingest_ns,
                    routed_ns: 0,
                    seq,
                    source: self.stamp.source,
                    key: 0,
                    id_from_payload: false,
                })
            }
            Err(e) => Err(e),
        })
    }
}

impl fmt::Debug for FrameEvents<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameEvents")
            .field("frame", &self.frame)
            .finish()
    }
}

/// What to add to a `CLOCK_MONOTONIC` time ([`Event::ingest_ns`]) to get Unix time in ns, as
/// the wall clock says now (read it once per batch: it moves only when the clock is stepped or
/// slewed). Wrapping arithmetic: `ingest_ns.wrapping_add(offset)`.
pub fn unix_offset_ns() -> u64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    wall.wrapping_sub(monotonic_ns())
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of [`Event::ingest_ns`].
pub fn monotonic_ns() -> u64 {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux (vDSO, no
        // syscall).
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
    #[cfg(not(all(target_os = "linux", not(miri))))]
    {
        use std::sync::OnceLock;
        use std::time::Instant;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::RegionOptions;
    use crate::mem::frames::FrameArena;
    use crate::mem::pool::EventPool;
    use crate::wire::protocol::{RejectReason, encode};

    #[test]
    fn peers_round_trip_through_their_bytes() {
        for a in [
            "198.18.0.1:40000",
            "[2001:db8::7]:8082",
            "[::ffff:10.1.2.3]:9",
        ] {
            let sa: std::net::SocketAddr = a.parse().unwrap();
            let p = Peer::from(sa);
            assert_eq!(Peer::from_bytes(&p.to_bytes()), p);
            let want = match sa {
                std::net::SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => {
                    std::net::SocketAddr::new(v6.ip().to_ipv4_mapped().unwrap().into(), v6.port())
                }
                _ => sa,
            };
            assert_eq!(p.socket_addr(), Some(want), "{a}");
        }
        assert_eq!(Peer::from_bytes(&[9; Peer::ENCODED]), Peer::UNKNOWN);
        assert_eq!(Peer::UNKNOWN.socket_addr(), None);
        assert_eq!(Peer::UNKNOWN.to_string(), "unknown");
    }

    #[test]
    fn events_view_the_frame_without_copying() {
        let arena = FrameArena::new(2048, 4, RegionOptions::default()).unwrap();
        let pool = EventPool::new(16);
        let mut owner = arena.owner().unwrap();
        let mut f = owner.take().unwrap();
        let mut dgram = Vec::new();
        encode(7, "orders.eu", b"hello", &mut dgram).unwrap();
        encode(1, "x", b"", &mut dgram).unwrap();
        dgram.extend([0, 0, 0, 1]); // malformed tail
        // Land the datagram at offset 42, as a UMEM frame's UDP payload would.
        f.bytes_mut()[42..42 + dgram.len()].copy_from_slice(&dgram);
        let mut shared = f.share(42..42 + dgram.len());
        let stamp = Stamp {
            source: Source::Udp,
            ingest_ns: monotonic_ns(),
        };
        let mut seq = 100;
        let mut events = Vec::new();
        let mut rejected = Vec::new();
        let mut acq = pool.acquirer().unwrap();
        for r in shared.events(Default::default(), stamp, &mut seq) {
            match r {
                Ok(ev) => events.push(acq.acquire(ev).unwrap()),
                Err(e) => rejected.push(e.reason()),
            }
        }
        let base = shared.data().as_ptr();
        drop(shared);
        assert_eq!(rejected, [RejectReason::Malformed]);
        assert_eq!(seq, 102);
        assert_eq!(events.len(), 2);
        let e0 = &events[0];
        assert_eq!(
            (e0.priority(), e0.topic(), e0.payload()),
            (7, "orders.eu", &b"hello"[..])
        );
        assert_eq!((e0.seq, e0.source), (100, Source::Udp));
        assert_eq!(
            e0.payload().as_ptr(),
            base.wrapping_add(7 + 9),
            "payload is a view"
        );
        assert_eq!(
            (events[1].topic(), events[1].payload(), events[1].seq),
            ("x", &b""[..], 101)
        );
        drop(events);
        owner.reclaim();
        assert_eq!(owner.free_len(), 4, "frame returned after its events");
    }
}
