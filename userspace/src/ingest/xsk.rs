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

use super::{Deliver, IngestCounters, Tally};
use crate::mem::frames::FrameOwner;
use crate::mem::pool::{Acquirer, Pooled};
use crate::ring::mpsc;
use crate::wire::event::{Event, Source, Stamp, monotonic_ns};
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
    /// Longest wait in `poll` when there is nothing to read.
    pub idle_poll: Duration,
    /// Where totals go.
    pub counters: &'s IngestCounters,
    /// While set (the pipeline is `PAUSED`), stop receiving: the kernel holds what arrives,
    /// and counts what it must drop. Checked once per batch, so a pause takes effect within
    /// one receive timeout (a batch already being received is still delivered).
    pub paused: &'s AtomicBool,
}

impl XskIngest<'_> {
    /// Receives until `stop` is set.
    ///
    /// # Errors
    /// A wake-up or poll error from the kernel.
    pub fn run<'a, 'p>(
        &self,
        sock: &mut impl XskRings,
        frames: &mut FrameOwner<'a>,
        pool: &mut Acquirer<'p, Event<'a>>,
        queue: &mpsc::Producer<Pooled<'p, Event<'a>>>,
    ) -> io::Result<()> {
        let fs = u64::from(sock.frame_size());
        let umem_len = sock.umem_len();
        let idle_ms = i32::try_from(self.idle_poll.as_millis()).unwrap_or(i32::MAX);
        let mut deliver = Deliver {
            limits: self.limits,
            pool,
            queue,
        };
        let mut tally = Tally::default();
        let mut seq = 0u64;
        let mut next_stats = monotonic_ns();
        while !self.stop.load(Ordering::Relaxed) {
            if self.paused.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            // Refill: released frames first, then as many as FILL has room for.
            let (fill, _) = sock.rings();
            let room = fill.free(self.batch);
            let mut n = 0;
            while n < room {
                let Some(frame) = frames.take() else { break };
                fill.write(n, u64::from(frames.lend(frame)) * fs);
                n += 1;
            }
            if n > 0 {
                fill.submit(n);
            }
            if fill.needs_wakeup() {
                sock.wakeup_rx()?;
            }

            let ready = sock.rings().1.available(self.batch);
            if ready == 0 {
                sock.poll_rx(idle_ms)?;
                self.read_stats(sock, &mut next_stats);
                continue;
            }
            let stamp = Stamp {
                source: Source::Xsk,
                ingest_ns: monotonic_ns(),
            };
            for i in 0..ready {
                let desc = sock.rings().1.read(i);
                let len = u64::from(desc.len);
                let offset = desc.addr % fs;
                // The descriptor must lie inside the UMEM and inside one frame, and name a frame
                // we lent; anything else is refused without touching memory.
                let frame = (desc
                    .addr
                    .checked_add(len)
                    .is_some_and(|end| end <= umem_len)
                    && offset + len <= fs)
                    .then(|| frames.claim((desc.addr / fs) as u32))
                    .flatten();
                let Some(frame) = frame else {
                    tally.invalid_descs += 1;
                    continue;
                };
                tally.datagrams += 1;
                tally.bytes += len;
                let start = offset as usize;
                let Some((payload, _)) =
                    udp_payload(&frame.bytes()[start..start + desc.len as usize])
                else {
                    tally.bad_packets += 1;
                    continue; // `frame` drops here and returns to the free list
                };
                let mut shared = frame.share(start + payload.start..start + payload.end);
                deliver.frame(&mut shared, stamp, &mut seq, &mut tally);
            }
            sock.rings().1.release(ready);
            tally.flush(self.counters);
            self.read_stats(sock, &mut next_stats);
        }
        tally.flush(self.counters);
        Ok(())
    }

    /// Copies `XDP_STATISTICS` into the counters every [`STATS_EVERY`].
    fn read_stats(&self, sock: &impl XskRings, next: &mut u64) {
        let now = monotonic_ns();
        if now < *next {
            return;
        }
        *next = now + STATS_EVERY.as_nanos() as u64;
        if let Ok(s) = sock.stats() {
            let c = self.counters;
            c.xsk_rx_dropped.store(s.rx_dropped, Ordering::Relaxed);
            c.xsk_rx_invalid_descs
                .store(s.rx_invalid_descs, Ordering::Relaxed);
            c.xsk_rx_ring_full.store(s.rx_ring_full, Ordering::Relaxed);
            c.xsk_rx_fill_ring_empty_descs
                .store(s.rx_fill_ring_empty_descs, Ordering::Relaxed);
        }
    }
}
