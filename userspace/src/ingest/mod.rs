//! Ingest: receive frames, parse them in place into pooled events, push them to the dispatcher.
//!
//! - [`xsk`]: one thread per NIC queue over an AF_XDP socket (the product's data path);
//! - [`udp`]: a kernel UDP socket with `recvmmsg`, where XDP cannot attach;
//! - [`tcp`]: the kernel TCP listener, for clients that cannot use UDP.
//!
//! Both share [`Deliver`], the per-datagram step: parse the frame's events, put each in the
//! pool, push it to the queue, and count each rejected frame by reason. Counting is in plain
//! locals ([`Tally`]) flushed to the shared [`IngestCounters`] once per batch, never a shared
//! atomic per event. Backpressure (no free frame, pool slot or queue slot) makes the thread
//! wait, spinning briefly and then yielding; the kernel's ring or socket buffer absorbs the
//! burst, and what it drops is counted there (`XDP_STATISTICS`, `RcvbufErrors`).

pub mod tcp;
pub mod udp;
pub mod xsk;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::idle::backoff;
use crate::mem::frames::SharedFrame;
use crate::mem::pool::{Acquirer, Pooled};
use crate::ring::mpsc;
use crate::wire::event::{Event, Stamp};
use crate::wire::protocol::{Limits, RejectReason};

pub use tcp::{Slot, TcpIngest};
pub use udp::{UdpIngest, bind_udp};
pub use xsk::XskIngest;

/// Totals an ingest thread publishes (flushed once per batch).
#[derive(Debug, Default)]
pub struct IngestCounters {
    /// Datagrams received.
    pub datagrams: AtomicU64,
    /// Bytes received (UDP payload for kernel UDP, whole frames for AF_XDP).
    pub bytes: AtomicU64,
    /// Events accepted into the pipeline.
    pub events: AtomicU64,
    /// Rejected frames, by [`RejectReason`] (indexed in `RejectReason::ALL` order).
    pub rejected: [AtomicU64; RejectReason::ALL.len()],
    /// AF_XDP: RX descriptors refused (outside the UMEM, or naming a frame not lent).
    pub invalid_descs: AtomicU64,
    /// AF_XDP: frames that were not a well-formed UDP datagram once in userspace.
    pub bad_packets: AtomicU64,
    /// AF_XDP `XDP_STATISTICS`, last read: `rx_dropped`.
    pub xsk_rx_dropped: AtomicU64,
    /// `rx_invalid_descs`.
    pub xsk_rx_invalid_descs: AtomicU64,
    /// `rx_ring_full`.
    pub xsk_rx_ring_full: AtomicU64,
    /// `rx_fill_ring_empty_descs`.
    pub xsk_rx_fill_ring_empty_descs: AtomicU64,
}

impl IngestCounters {
    /// Rejections for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }
}

/// Per-batch local tallies, flushed into [`IngestCounters`].
#[derive(Debug, Default)]
pub struct Tally {
    /// Datagrams.
    pub datagrams: u64,
    /// Bytes.
    pub bytes: u64,
    /// Accepted events.
    pub events: u64,
    /// Rejected frames by reason.
    pub rejected: [u64; RejectReason::ALL.len()],
    /// Refused descriptors.
    pub invalid_descs: u64,
    /// Frames that were not well-formed UDP.
    pub bad_packets: u64,
}

impl Tally {
    /// Adds everything to `to` and starts over.
    pub fn flush(&mut self, to: &IngestCounters) {
        let add = |c: &AtomicU64, n: u64| {
            if n != 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&to.datagrams, self.datagrams);
        add(&to.bytes, self.bytes);
        add(&to.events, self.events);
        add(&to.invalid_descs, self.invalid_descs);
        add(&to.bad_packets, self.bad_packets);
        for (c, n) in to.rejected.iter().zip(self.rejected) {
            add(c, n);
        }
        *self = Self::default();
    }
}

/// The per-datagram step shared by every ingest path.
pub struct Deliver<'d, 'a, 'p> {
    /// Frame limits.
    pub limits: Limits,
    /// This thread's pool.
    pub pool: &'d mut Acquirer<'p, Event<'a>>,
    /// The ingest → dispatcher queue.
    pub queue: &'d mpsc::Producer<Pooled<'p, Event<'a>>>,
}

impl<'a> Deliver<'_, 'a, '_> {
    /// Parses `frame` as one datagram; each event goes into the pool and onto the queue
    /// (waiting while either is full), each rejected frame into `tally` by reason.
    #[inline]
    pub fn frame(
        &mut self,
        frame: &mut SharedFrame<'a>,
        stamp: Stamp,
        seq: &mut u64,
        tally: &mut Tally,
    ) {
        let mut spins = 0;
        for parsed in frame.events(self.limits, stamp, seq) {
            let mut ev = match parsed {
                Ok(ev) => ev,
                Err(e) => {
                    tally.rejected[e.reason() as usize] += 1;
                    continue;
                }
            };
            let mut pooled = loop {
                match self.pool.acquire(ev) {
                    Ok(p) => break p,
                    Err(back) => {
                        ev = back;
                        backoff(&mut spins);
                    }
                }
            };
            while let Err(back) = self.queue.push(pooled) {
                pooled = back;
                backoff(&mut spins);
            }
            tally.events += 1;
        }
    }
}

impl std::fmt::Debug for Deliver<'_, '_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliver")
            .field("limits", &self.limits)
            .finish()
    }
}
