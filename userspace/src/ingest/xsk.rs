//! AF_XDP ingest: one thread per NIC queue.
//!
//! Each pass: take back the frames the pipeline released and lend them to FILL (one batch, one
//! publish); read up to `batch` RX descriptors; for each, check it lies inside one lent UMEM
//! frame, find the UDP payload, and parse the events in place, so an event's topic and payload
//! point into the UMEM frame the NIC (or, in copy mode, the kernel) wrote. The frame goes back
//! to FILL when its last event is released. Nothing here allocates, locks, or makes a syscall
//! per packet: the wake-up and the poll are once per batch, and only when the kernel asks
//! (`XDP_RING_NEED_WAKEUP`) or there is nothing to read.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{Deliver, Handoff, IngestCounters, Tally};
use crate::engine::idle::Idle;
use crate::engine::inline::CONTROL_EVERY;
use crate::engine::stage::{self, Pass};
use crate::mem::frames::FrameOwner;
use crate::wire::event::{Peer, Source, Stamp, monotonic_ns};
use crate::wire::packet::udp_payload;
use crate::wire::protocol::Limits;
use crate::xdp::socket::XskRings;

/// How often the kernel's `XDP_STATISTICS` are read into the counters.
const STATS_EVERY: Duration = Duration::from_millis(250);

/// What the receive loop needs.
#[derive(Debug)]
pub struct XskIngest<'s> {
    /// Descriptors per pass (64..512 is the useful range).
    pub batch: u32,
    /// Frame limits.
    pub limits: Limits,
    /// Set to stop the loop (checked every pass; an idle pass waits at most `idle_poll`).
    pub stop: &'s AtomicBool,
    /// Longest wait in `poll` when there is nothing to read (inline mode keeps it short: the
    /// side queue and batch windows are served between polls).
    pub idle_poll: Duration,
    /// How long an empty RX ring is re-checked before sleeping in `poll` (`xdp.busy_spin_us`).
    pub busy_spin: Duration,
    /// `xsk_bare` (the bench's probe of the socket's own limit): descriptors go straight back to
    /// FILL, nothing is parsed.
    pub bare: bool,
    /// Where totals go.
    pub counters: &'s IngestCounters,
    /// The first sequence number ([`crate::wire::event::seq_base`] of this queue's stream).
    pub seq_base: u64,
    /// While set (the pipeline is `PAUSED`), stop receiving: the kernel holds what arrives,
    /// and counts what it must drop. Checked once per batch, so a pause takes effect within
    /// one receive timeout (a batch already being received is still delivered).
    pub paused: &'s AtomicBool,
}

impl XskIngest<'_> {
    /// Receives until `stop` is set, handing each event to `handoff`; then serves what the
    /// hand-off still holds and closes it. The loop is a [`stage::Stage`] driven by
    /// [`stage::drive`], `batch` descriptors a pass.
    ///
    /// Waiting: an empty RX ring is re-checked for up to `busy_spin` (no syscall), then the
    /// thread sleeps in `poll` for at most `idle_poll`. The kernel is kicked only when it set
    /// `need_wakeup` on the FILL ring.
    ///
    /// # Errors
    /// The hand-off's (a sink's, inline); the kernel's wake-up and poll errors are counted
    /// (`receive_errors`) and retried.
    pub fn run<'a, R: XskRings, H: Handoff<'a>>(
        &self,
        sock: &mut R,
        frames: &mut FrameOwner<'a>,
        handoff: H,
    ) -> io::Result<()> {
        let mut stage = XskStage {
            fs: u64::from(sock.frame_size()),
            umem_len: sock.umem_len(),
            ring: sock.rings().1.size() as usize,
            idle_ms: i32::try_from(self.idle_poll.as_millis()).unwrap_or(i32::MAX),
            spin_ns: self.busy_spin.as_nanos() as u64,
            job: self,
            sock,
            frames,
            deliver: Deliver {
                limits: self.limits,
                handoff,
            },
            tally: Tally::default(),
            seq: self.seq_base,
            empty_since: None,
            errs: (0, Duration::from_millis(1)),
            paused: false,
            next_stats: 0,
            since_side: 0,
            // The first pass fills FILL.
            unfilled: u32::MAX,
            idle_passes: 0,
            slept: false,
        };
        stage::drive(&mut stage, self.batch.max(1) as usize)
    }
    /// `xsk_bare`: returns `ready` RX descriptors to FILL as they are (bounds-checked, never
    /// read), counting datagrams and bytes. Where FILL has no room, the frame goes back to the
    /// free list, from which the next pass's refill lends it again.
    fn bare_batch<'a>(
        &self,
        sock: &mut impl XskRings,
        frames: &mut FrameOwner<'a>,
        ready: u32,
        fs: u64,
        umem_len: u64,
        tally: &mut Tally,
    ) {
        let room = sock.rings().0.free(ready);
        let mut n = 0;
        for i in 0..ready {
            let desc = sock.rings().1.read(i);
            let len = u64::from(desc.len);
            if desc.addr.checked_add(len).is_none_or(|end| end > umem_len)
                || desc.addr % fs + len > fs
            {
                tally.invalid_descs += 1;
                continue;
            }
            tally.datagrams += 1;
            tally.bytes += len;
            if n < room {
                sock.rings().0.write(n, desc.addr - desc.addr % fs);
                n += 1;
            } else if let Some(frame) = frames.claim((desc.addr / fs) as u32) {
                drop(frame); // back to the free list
            } else {
                tally.invalid_descs += 1;
            }
        }
        sock.rings().0.submit(n);
        sock.rings().1.release(ready);
    }
}

/// One queue's receive loop as a [`stage::Stage`]: a pass refills FILL with released frames,
/// reads up to a budget of RX descriptors and parses them (or, with nothing to read, serves the
/// side queue and closes due batch windows).
struct XskStage<'j, 's, 'r, 'a, R, H> {
    job: &'j XskIngest<'s>,
    sock: &'r mut R,
    frames: &'r mut FrameOwner<'a>,
    deliver: Deliver<H>,
    tally: Tally,
    seq: u64,
    fs: u64,
    umem_len: u64,
    /// The RX ring's size.
    ring: usize,
    idle_ms: i32,
    spin_ns: u64,
    /// Since when RX has been empty (the busy-spin window).
    empty_since: Option<u64>,
    /// Kernel errors on wake-up and poll (ENETDOWN while the link flaps, ENXIO, ENOBUFS):
    /// counted, logged once per burst, retried after a backoff; never the end of ingest.
    /// (errors so far, the next backoff)
    errs: (u64, Duration),
    /// The last pass found the pipeline paused.
    paused: bool,
    /// When `XDP_STATISTICS` are next read ([`monotonic_ns`]).
    next_stats: u64,
    /// Busy batches since the side queue was last served.
    since_side: u32,
    /// RX descriptors taken since FILL was last topped up from the free list.
    unfilled: u32,
    /// Passes that found RX empty (wrapping).
    idle_passes: u32,
    /// The last wait slept in `poll` (the next idle pass ends a batch: time has passed).
    slept: bool,
}

/// An idle loop tops FILL up from the free list every this many empty passes (a few
/// microseconds of spinning).
const IDLE_REFILL: u32 = 64;

/// An idle loop ends a batch (flushes, windows, acks) every this many empty passes, and after
/// each sleep.
const IDLE_END: u32 = 16;

/// While RX keeps the loop busy, the side queue (TCP, the beside-XDP socket) is served, and
/// its depth published to the control plane, after this many batches: neither input starves
/// the other, and a full side queue is seen as what it is.
const SIDE_EVERY: u32 = 8;

impl<R: XskRings, H> XskStage<'_, '_, '_, '_, R, H> {
    /// Lends free frames to FILL, as many as it has room for (read from the kernel's consumer
    /// index when the cached view shows fewer than `want` free).
    fn refill(&mut self, want: u32) {
        self.unfilled = 0;
        let fs = self.fs;
        let (fill, _) = self.sock.rings();
        let room = fill.free(want);
        let mut n = 0;
        while n < room {
            let Some(frame) = self.frames.take() else {
                break;
            };
            fill.write(n, u64::from(self.frames.lend(frame)) * fs);
            n += 1;
        }
        if n > 0 {
            fill.submit(n);
        }
    }

    fn retry(&mut self, e: io::Error) {
        self.errs.0 += 1;
        self.job
            .counters
            .receive_errors
            .fetch_add(1, Ordering::Relaxed);
        if self.errs.0.is_power_of_two() {
            tracing::warn!(reason = %e, errors = self.errs.0, "AF_XDP wake-up or poll failed; retrying");
        }
        std::thread::sleep(self.errs.1);
        self.errs.1 = (self.errs.1 * 2).min(Duration::from_millis(100));
    }
}

impl<'a, R: XskRings, H: Handoff<'a>> stage::Stage for XskStage<'_, '_, '_, 'a, R, H> {
    #[inline]
    fn poll(&mut self, budget: usize) -> io::Result<Pass> {
        let job = self.job;
        if job.stop.load(Ordering::Relaxed) {
            // Stopped: what other threads queued for this one is served, then windows close.
            let served = self.deliver.handoff.side()?;
            if served > 0 {
                return Ok(Pass::Worked(served));
            }
            self.deliver.handoff.end(true)?;
            // The driver's last housekeeping reads the kernel's final statistics.
            self.next_stats = 0;
            return Ok(Pass::Done);
        }
        self.paused = job.paused.load(Ordering::Relaxed);
        if self.paused {
            // Queued work continues: the side queue is still served.
            let served = self.deliver.handoff.side()?;
            if served == 0 {
                self.deliver.handoff.end(false)?;
                return Ok(Pass::Idle);
            }
            return Ok(Pass::Worked(served));
        }
        let budget = u32::try_from(budget).unwrap_or(u32::MAX);
        let (fs, umem_len) = (self.fs, self.umem_len);
        // Refill: free frames (released ones first) to FILL, as many as it has room for. The
        // bare probe does the same with the frames it could not put straight back, so both run
        // on the same frame depth (the crate's probe too). FILL is topped up once a batch's
        // worth (or a quarter of the ring, if less) has been received since the last time, not
        // on every pass: the kernel reads FILL's producer index and writes its consumer index
        // for every frame, so a loop that looked at them on each empty pass would pull those
        // cache lines from the core doing the receive over and over, a frame at a time. An
        // idle loop also tops FILL up every `IDLE_REFILL` empty passes and before it sleeps:
        // frames the pipeline released while FILL ran dry must reach it though nothing arrives.
        let refill_at = (self.sock.rings().0.size() / 4).clamp(1, budget);
        if self.unfilled >= refill_at {
            self.refill(budget);
        }
        let (fill, _) = self.sock.rings();
        if fill.needs_wakeup()
            && let Err(e) = self.sock.wakeup_rx()
        {
            self.retry(e);
        }

        let rx = self.sock.rings().1;
        let ready = rx.available(budget);
        if ready == 0 {
            self.idle_passes = self.idle_passes.wrapping_add(1);
            if self.idle_passes.is_multiple_of(IDLE_REFILL) {
                self.refill(budget);
            }
            let served = self.deliver.handoff.side()?;
            // The batch's end (sinks flushed, windows closed, acks and counts published) ran
            // after the last busy pass; an idle pass repeats it only every `IDLE_END` passes,
            // after a sleep, or when the side queue gave it events: each end reads the clock
            // and asks every sink for its acks, a third of an idle pass's time, which would
            // otherwise stretch the gap between looks at RX.
            if served > 0 || self.slept || self.idle_passes.is_multiple_of(IDLE_END) {
                self.slept = false;
                self.deliver.handoff.end(false)?;
            }
            return Ok(if served > 0 {
                Pass::Worked(served)
            } else {
                Pass::Idle
            });
        }
        self.empty_since = None;
        self.unfilled = self.unfilled.saturating_add(ready);
        if job.bare {
            // The socket's own limit: every descriptor straight back to FILL, unread.
            job.bare_batch(self.sock, self.frames, ready, fs, umem_len, &mut self.tally);
            return Ok(Pass::Worked(ready as usize));
        }
        // How deep the ring is, for the control plane (once per batch).
        self.deliver
            .handoff
            .depth(rx.available(self.ring as u32) as usize, self.ring);
        let stamp = Stamp {
            source: Source::Xsk,
            ingest_ns: monotonic_ns(),
        };
        self.deliver.handoff.begin();
        let arena = self.frames.arena();
        for i in 0..ready {
            if i + 1 < ready {
                let next = self.sock.rings().1.read(i + 1);
                arena.prefetch(next.addr, next.len);
            }
            let desc = self.sock.rings().1.read(i);
            let len = u64::from(desc.len);
            let offset = desc.addr % fs;
            // The descriptor must lie inside the UMEM and inside one frame, and name a frame we
            // lent; anything else is refused without touching memory.
            let frame = (desc
                .addr
                .checked_add(len)
                .is_some_and(|end| end <= umem_len)
                && offset + len <= fs)
                .then(|| self.frames.claim((desc.addr / fs) as u32))
                .flatten();
            let Some(frame) = frame else {
                self.tally.invalid_descs += 1;
                continue;
            };
            self.tally.datagrams += 1;
            self.tally.bytes += len;
            let start = offset as usize;
            let Some((payload, meta)) =
                udp_payload(&frame.bytes()[start..start + desc.len as usize])
            else {
                self.tally.bad_packets += 1;
                continue; // `frame` drops here and returns to the free list
            };
            let mut frame = frame;
            frame.set_peer(Peer::from(std::net::SocketAddr::new(
                meta.src,
                meta.src_port,
            )));
            let mut shared = frame.share(start + payload.start..start + payload.end);
            self.deliver
                .frame(&mut shared, stamp, &mut self.seq, &mut self.tally)?;
        }
        self.sock.rings().1.release(ready);
        self.deliver.handoff.end(false)?;
        self.since_side += 1;
        if self.since_side >= SIDE_EVERY {
            self.since_side = 0;
            let served = self.deliver.handoff.side()?;
            return Ok(Pass::Worked(ready as usize + served));
        }
        Ok(Pass::Worked(ready as usize))
    }

    #[inline]
    fn flush(&mut self) {
        self.tally.flush(self.job.counters);
    }

    fn housekeeping_every(&self) -> Duration {
        CONTROL_EVERY
    }

    /// The hand-off's (the inline control plane), and every [`STATS_EVERY`] `XDP_STATISTICS`
    /// copied into the counters.
    fn housekeeping(&mut self, now: u64) {
        self.deliver.handoff.housekeeping();
        if now < self.next_stats {
            return;
        }
        self.next_stats = now + STATS_EVERY.as_nanos() as u64;
        if let Ok(s) = self.sock.stats() {
            let c = self.job.counters;
            c.xsk_rx_dropped.store(s.rx_dropped, Ordering::Relaxed);
            c.xsk_rx_invalid_descs
                .store(s.rx_invalid_descs, Ordering::Relaxed);
            c.xsk_rx_ring_full.store(s.rx_ring_full, Ordering::Relaxed);
            c.xsk_rx_fill_ring_empty_descs
                .store(s.rx_fill_ring_empty_descs, Ordering::Relaxed);
        }
    }

    /// Paused: 1 ms. RX empty: spin for `busy_spin` (no syscall), then sleep in `poll` until
    /// the kernel has something, the side queue's bell rings, or `idle_poll` passes.
    fn wait(&mut self, idle: &mut Idle) {
        if self.paused {
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        // The driver's clock read of this pass (it has a schedule, so it read one).
        let now = match idle.now() {
            0 => monotonic_ns(),
            now => now,
        };
        let since = *self.empty_since.get_or_insert(now);
        if now - since < self.spin_ns {
            core::hint::spin_loop();
            return;
        }
        // FILL full before the sleep: what arrives meanwhile has frames to land in.
        self.refill(self.ring as u32);
        let (sock, idle_ms) = (&*self.sock, self.idle_ms);
        self.slept = true;
        match super::sleep(&self.deliver.handoff, |bell| sock.poll_rx(idle_ms, bell)) {
            Ok(_) => self.errs.1 = Duration::from_millis(1),
            Err(e) => self.retry(e),
        }
    }
}
