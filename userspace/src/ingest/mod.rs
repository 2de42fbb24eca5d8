//! Ingest: receive frames, parse them in place into pooled events, push them to the dispatcher.
//!
//! - [`xsk`]: one thread per NIC queue over an AF_XDP socket (the product's data path);
//! - [`udp`]: a kernel UDP socket with `recvmmsg`, where XDP cannot attach;
//! - [`tcp`]: the kernel TCP listener, for clients that cannot use UDP.
//!
//! All share [`Deliver`], the per-datagram step: parse the frame's events, hand each to a
//! [`Handoff`] (the engine inline, or a pool slot and the dispatcher's queue), and count each
//! rejected frame by reason. Counting is in plain locals ([`Tally`]) flushed to the shared
//! [`IngestCounters`] once per batch, never a shared atomic per event. Backpressure (no free
//! frame, a slow sink, no pool or queue slot) makes a receive thread wait, and makes the loop
//! the housekeeping thread serves (the socket beside AF_XDP, [`TryEnqueue`]) stop reading until
//! its stash is on the queue; the kernel's ring or socket buffer absorbs the burst, and what it
//! drops is counted there (`XDP_STATISTICS`, `RcvbufErrors`).

pub mod tcp;
pub mod udp;
pub mod xsk;

use core::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::Inline;
use crate::engine::inline::InlineControl;

use crate::engine::idle::backoff;
use crate::mem::frames::SharedFrame;
use crate::mem::pool::{Acquirer, Pooled};
use crate::ring::doorbell::Doorbell;
use crate::ring::mpsc;
use crate::wire::event::{Event, Stamp};
use crate::wire::protocol::{Limits, RejectReason};

pub use tcp::{AcceptPass, Acceptor, Connection, Connections, Slot, TcpIngest};
pub use udp::{SideTurn, SideUdp, UdpIngest, bind_udp};
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
    /// Kernel UDP: datagrams the socket dropped (its receive buffer was full), from
    /// `SO_RXQ_OVFL` on every batch and `SO_MEMINFO` at the end.
    pub kernel_drops: AtomicU64,
    /// Receive calls that failed with an error other than a timeout, retried.
    pub receive_errors: AtomicU64,
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

/// What an ingest loop does with each event it parses, and around each batch.
///
/// - [`Enqueue`]: into a pool slot and onto the dispatcher's MPSC queue (pipelined mode, and
///   the kernel TCP connections in every mode);
/// - [`TryEnqueue`]: the same without ever waiting (the socket beside AF_XDP, served by the
///   housekeeping thread);
/// - [`RunInline`]: straight through the engine in this thread (inline mode), which also
///   serves the side queue that TCP connections feed;
/// - [`Discard`]: parse and release, nothing else (the bench's `xsk_parse`).
pub trait Handoff<'a> {
    /// Before a batch.
    #[inline]
    fn begin(&mut self) {}
    /// One parsed event. A hand-off that is done with the event when this returns (inline:
    /// the sinks copied what they keep) gives it back, and its frame lease is settled without
    /// an atomic; one that keeps it (a pool slot) returns `None`.
    ///
    /// # Errors
    /// A sink's (inline mode).
    fn event(&mut self, ev: Event<'a>) -> io::Result<Option<Event<'a>>>;
    /// After a batch, and on every idle pass (batch windows close on time). `closing` at exit.
    ///
    /// # Errors
    /// A sink's (inline mode).
    #[inline]
    fn end(&mut self, _closing: bool) -> io::Result<()> {
        Ok(())
    }
    /// Serves events queued by other threads for this one; returns how many.
    ///
    /// # Errors
    /// A sink's (inline mode).
    #[inline]
    fn side(&mut self) -> io::Result<usize> {
        Ok(0)
    }
    /// The receive ring's fill (`used` of `capacity`), for the control plane.
    #[inline]
    fn depth(&mut self, _used: usize, _capacity: usize) {}
    /// Whether everything handed over has reached its sink (nothing held in batch windows, the
    /// side queue empty) or, for a hand-off that never waits, its queue (nothing stashed).
    fn is_drained(&self) -> bool {
        true
    }
    /// Whether the hand-off takes a new batch now: one that never waits says no while it still
    /// holds events it could not pass on, so the loop reads nothing more until they are gone.
    #[inline]
    fn ready(&self) -> bool {
        true
    }
    /// Scheduled work of the hand-off (the inline control plane's tick), every
    /// [`crate::engine::inline::CONTROL_EVERY`] of the receive loop's housekeeping.
    #[inline]
    fn housekeeping(&mut self) {}
    /// The doorbell other threads ring when they queue work for this one ([`Handoff::side`]):
    /// the receive loop arms it and sleeps on it beside its socket.
    #[inline]
    fn bell(&self) -> Option<&Doorbell> {
        None
    }
    /// Whether other threads have queued work for this one (looked at once the bell is armed,
    /// before sleeping).
    #[inline]
    fn side_pending(&self) -> bool {
        false
    }
}

/// A receive loop's sleep, in `poll` (given the bell to wait on beside its socket): until the
/// socket is readable, the hand-off's bell rings (work on its side queue), or the poll's
/// timeout. With a bell, the side queue is looked at once more after arming it, and there is
/// no sleep if it has work. Returns `poll`'s answer (`false` when there was no sleep).
///
/// # Errors
/// `poll`'s.
pub fn sleep<'a, H: Handoff<'a>>(
    handoff: &H,
    poll: impl FnOnce(Option<&Doorbell>) -> io::Result<bool>,
) -> io::Result<bool> {
    let Some(bell) = handoff.bell() else {
        return poll(None);
    };
    bell.arm();
    let r = if handoff.side_pending() {
        Ok(false)
    } else {
        poll(Some(bell))
    };
    bell.disarm();
    r
}

/// Pipelined hand-off: a pool slot, then the dispatcher's queue (waiting while either is
/// full: that is the backpressure).
pub struct Enqueue<'d, 'a, 'p> {
    /// This thread's pool.
    pub pool: &'d mut Acquirer<'p, Event<'a>>,
    /// The ingest → dispatcher queue.
    pub queue: &'d mpsc::Producer<Pooled<'p, Event<'a>>>,
}

impl<'a> Handoff<'a> for Enqueue<'_, 'a, '_> {
    #[inline]
    fn event(&mut self, mut ev: Event<'a>) -> io::Result<Option<Event<'a>>> {
        let mut spins = 0;
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
        Ok(None)
    }
}

impl fmt::Debug for Enqueue<'_, '_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enqueue").finish_non_exhaustive()
    }
}

/// Pipelined hand-off that never waits, for a loop on the housekeeping thread (the kernel
/// socket beside AF_XDP): into a pool slot and onto the queue when both have room, otherwise
/// into a stash, in arrival order, that [`Handoff::side`] empties first at the next pass. While
/// the stash holds events the hand-off is not [`ready`](Handoff::ready), so the loop receives
/// nothing more and the stash holds at most one receive batch's events (its preallocated room
/// covers a batch of small datagrams; only a batch of datagrams packed with many events grows
/// it, once, on this thread and never on the data plane). The socket's buffer holds what
/// arrives meanwhile, and the kernel counts what it drops.
pub struct TryEnqueue<'d, 'a, 'p> {
    pool: &'d mut Acquirer<'p, Event<'a>>,
    queue: &'d mpsc::Producer<Pooled<'p, Event<'a>>>,
    stash: std::collections::VecDeque<Event<'a>>,
    /// The queue's consumer's doorbell, rung at the end of a batch that queued anything.
    bell: Option<&'d Doorbell>,
    queued: bool,
}

impl<'d, 'a, 'p> TryEnqueue<'d, 'a, 'p> {
    /// Over `pool` and `queue`, with room for `stash` events set aside.
    pub fn new(
        pool: &'d mut Acquirer<'p, Event<'a>>,
        queue: &'d mpsc::Producer<Pooled<'p, Event<'a>>>,
        stash: usize,
    ) -> Self {
        Self {
            pool,
            queue,
            stash: std::collections::VecDeque::with_capacity(stash),
            bell: None,
            queued: false,
        }
    }

    /// Rings `bell` (the queue's consumer's) after each batch that queued events.
    #[must_use]
    pub fn ringing(mut self, bell: Option<&'d Doorbell>) -> Self {
        self.bell = bell;
        self
    }

    /// Events set aside now.
    pub fn stashed(&self) -> usize {
        self.stash.len()
    }

    /// Onto the queue if a pool slot and a queue slot are free; the event back if not.
    fn try_push(&mut self, ev: Event<'a>) -> Result<(), Event<'a>> {
        let pooled = self.pool.acquire(ev)?;
        self.queue.push(pooled).map_err(Pooled::into_inner)?;
        self.queued = true;
        Ok(())
    }

    /// Rings the consumer's bell if anything was queued since the last ring.
    fn ring(&mut self) {
        if std::mem::take(&mut self.queued)
            && let Some(b) = self.bell
        {
            b.ring();
        }
    }
}

impl<'a> Handoff<'a> for TryEnqueue<'_, 'a, '_> {
    #[inline]
    fn event(&mut self, ev: Event<'a>) -> io::Result<Option<Event<'a>>> {
        if !self.stash.is_empty() {
            self.stash.push_back(ev);
        } else if let Err(ev) = self.try_push(ev) {
            self.stash.push_back(ev);
        }
        Ok(None)
    }
    /// Moves stashed events onto the queue, oldest first, while it has room.
    fn side(&mut self) -> io::Result<usize> {
        let mut n = 0;
        while let Some(ev) = self.stash.pop_front() {
            if let Err(ev) = self.try_push(ev) {
                self.stash.push_front(ev);
                break;
            }
            n += 1;
        }
        self.ring();
        Ok(n)
    }
    /// The end of a batch: the consumer is woken if it sleeps and anything was queued.
    #[inline]
    fn end(&mut self, _closing: bool) -> io::Result<()> {
        self.ring();
        Ok(())
    }
    fn is_drained(&self) -> bool {
        self.stash.is_empty()
    }
    #[inline]
    fn ready(&self) -> bool {
        self.stash.is_empty()
    }
}

impl fmt::Debug for TryEnqueue<'_, '_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryEnqueue")
            .field("stashed", &self.stash.len())
            .finish_non_exhaustive()
    }
}

/// Inline hand-off: the engine runs in this thread. `side` is the queue other ingest threads
/// (TCP connections, the beside-XDP socket) feed; this thread serves it between its own
/// batches.
#[derive(Debug)]
pub struct RunInline<'i, 's, 'p, 'a> {
    /// The engine.
    pub engine: &'i mut Inline<'s>,
    /// Events from other ingest threads, served here.
    pub side: Option<mpsc::Consumer<Pooled<'p, Event<'a>>>>,
    /// Depth of the receive ring last published.
    pub ring_depth: (usize, usize),
    /// The control plane, on the first data-plane thread only.
    pub control: Option<InlineControl<'s>>,
    /// Rung by the side queue's producers (the housekeeping thread) when this thread sleeps.
    pub bell: Option<&'s Doorbell>,
}

impl RunInline<'_, '_, '_, '_> {
    /// Publishes the deeper of this thread's two inputs, its receive ring and the side queue,
    /// for the control plane; returns the side queue's length.
    #[inline]
    fn publish_deeper(&self) -> usize {
        let (r_used, r_cap) = self.ring_depth;
        let (used, cap) = self
            .side
            .as_ref()
            .map_or((0, 1), |s| (s.len(), s.capacity()));
        if used * r_cap.max(1) >= r_used * cap.max(1) {
            self.engine.publish_depth(used, cap);
        } else {
            self.engine.publish_depth(r_used, r_cap);
        }
        used
    }
}

impl<'a> Handoff<'a> for RunInline<'_, '_, '_, 'a> {
    #[inline]
    fn begin(&mut self) {
        self.engine.begin();
    }
    #[inline]
    fn event(&mut self, mut ev: Event<'a>) -> io::Result<Option<Event<'a>>> {
        self.engine.event(&mut ev)?;
        Ok(Some(ev))
    }
    fn end(&mut self, closing: bool) -> io::Result<()> {
        self.engine.end(closing)
    }
    fn side(&mut self) -> io::Result<usize> {
        let used = self.publish_deeper();
        let Some(side) = &mut self.side else {
            return Ok(0);
        };
        if used == 0 {
            return Ok(0);
        }
        self.engine.begin();
        let mut n = 0;
        while n < 256 {
            let Some(ev) = side.pop() else { break };
            self.engine.event(&mut ev.into_inner())?;
            n += 1;
        }
        self.engine.end(false)?;
        Ok(n)
    }
    #[inline]
    fn depth(&mut self, used: usize, capacity: usize) {
        self.ring_depth = (used, capacity);
        self.publish_deeper();
    }
    fn is_drained(&self) -> bool {
        self.side.as_ref().is_none_or(|s| s.is_empty())
    }
    fn housekeeping(&mut self) {
        if let Some(c) = &mut self.control {
            let side = self
                .side
                .as_ref()
                .map_or((0, 1), |s| (s.len(), s.capacity()));
            c.tick(side);
        }
    }
    #[inline]
    fn bell(&self) -> Option<&Doorbell> {
        self.side.as_ref().and(self.bell)
    }
    #[inline]
    fn side_pending(&self) -> bool {
        self.side.as_ref().is_some_and(|s| !s.is_empty())
    }
}

/// Parse-only hand-off (the bench's `xsk_parse`): every event is released at once.
#[derive(Debug, Default)]
pub struct Discard;

impl<'a> Handoff<'a> for Discard {
    #[inline]
    fn event(&mut self, ev: Event<'a>) -> io::Result<Option<Event<'a>>> {
        Ok(Some(ev))
    }
}

/// The per-datagram step shared by every ingest path.
pub struct Deliver<H> {
    /// Frame limits.
    pub limits: Limits,
    /// Where events go.
    pub handoff: H,
}

impl<H> Deliver<H> {
    /// Parses `frame` as one datagram; each event goes to the hand-off, each rejected frame into
    /// `tally` by reason.
    ///
    /// # Errors
    /// The hand-off's (a sink's, inline).
    #[inline]
    pub fn frame<'a>(
        &mut self,
        frame: &mut SharedFrame<'a>,
        stamp: Stamp,
        seq: &mut u64,
        tally: &mut Tally,
    ) -> io::Result<()>
    where
        H: Handoff<'a>,
    {
        let mut events = frame.events(self.limits, stamp, seq);
        while let Some(parsed) = events.next() {
            match parsed {
                Ok(ev) => {
                    if let Some(done) = self.handoff.event(ev)? {
                        events.give_back(done);
                    }
                    tally.events += 1;
                }
                Err(e) => tally.rejected[e.reason() as usize] += 1,
            }
        }
        Ok(())
    }
}

impl<H> fmt::Debug for Deliver<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliver")
            .field("limits", &self.limits)
            .finish()
    }
}
