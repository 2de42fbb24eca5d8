//! Workers ([`run_worker`]) deliver to a [`Sink`]:
//! - **realtime**: one event at a time, recording sender→worker latency;
//! - **transactional**: drops duplicates within the dedup window (counted, not delivered);
//! - **batch**: groups events per topic and flushes a group when it reaches `batch_max` events or
//!   `batch_window` age, as one sink write.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{DlqEntry, EngineCounters, Ev, WorkerClass};
use crate::engine::dedup::DedupWindow;
use crate::engine::idle::Idle;
use crate::engine::latency::{LatencyFrom, LocalLatency, read_stamp, realtime_ns};
use crate::ring::spsc;
use crate::sink::Sink;
use crate::wire::event::monotonic_ns;

/// How a worker treats its events.
#[derive(Debug)]
pub enum WorkerKind {
    /// Deliver each event at once and record its latency.
    Realtime {
        /// Where the latency clock starts.
        from: LatencyFrom,
    },
    /// Drop duplicates within the window.
    Transactional {
        /// The window table.
        dedup: DedupWindow,
    },
    /// Group per topic; flush at `max` events or `window` age.
    Batch {
        /// Events per group before a flush.
        max: usize,
        /// Oldest event's age before a flush.
        window: Duration,
    },
}

/// Runs one worker until its ring is closed (the dispatcher is gone) and empty.
///
/// # Errors
/// The sink's I/O error (the worker stops; the caller logs it).
pub fn run_worker<'p, 'a>(
    class: WorkerClass,
    mut kind: WorkerKind,
    mut input: spsc::Consumer<Ev<'p, 'a>>,
    sink: &mut dyn Sink,
    counters: &EngineCounters,
) -> io::Result<()> {
    let mut pending: HashMap<Box<str>, (u64, Vec<Ev<'p, 'a>>)> = HashMap::new();
    let mut latency = LocalLatency::default();
    let mut idle = Idle::new();
    loop {
        let mut n = 0;
        let (mut delivered, mut dups) = (0u64, 0u64);
        let now = monotonic_ns();
        let wall = match kind {
            WorkerKind::Realtime {
                from: LatencyFrom::Payload,
            } => realtime_ns(),
            _ => 0,
        };
        for ev in input.pop_batch(256) {
            n += 1;
            match &mut kind {
                WorkerKind::Realtime { from } => {
                    match from {
                        LatencyFrom::Ingest => latency.record(now.saturating_sub(ev.ingest_ns)),
                        LatencyFrom::Payload => match read_stamp(ev.payload()) {
                            Some((_, sent)) => latency.record(wall.saturating_sub(sent)),
                            None => latency.unstamped += 1,
                        },
                    }
                    sink.write(core::slice::from_ref(&ev), None)?;
                    delivered += 1;
                }
                WorkerKind::Transactional { dedup } => {
                    if dedup.check_and_insert(ev.key, now) {
                        dups += 1;
                    } else {
                        sink.write(core::slice::from_ref(&ev), None)?;
                        delivered += 1;
                    }
                }
                WorkerKind::Batch { .. } => {
                    // The group key allocates once per topic (the map keeps it), not per event.
                    if !pending.contains_key(ev.topic()) {
                        pending.insert(ev.topic().into(), (now, Vec::new()));
                    }
                    let group = pending.get_mut(ev.topic()).expect("inserted above");
                    if group.1.is_empty() {
                        group.0 = now;
                    }
                    group.1.push(ev);
                }
            }
        }
        if let WorkerKind::Batch { max, window } = &kind {
            let closing = n == 0 && input.is_abandoned() && input.is_empty();
            for (_, (opened, group)) in pending.iter_mut() {
                let due =
                    group.len() >= *max || now.saturating_sub(*opened) >= window.as_nanos() as u64;
                if !group.is_empty() && (due || closing) {
                    sink.write(group, None)?;
                    delivered += group.len() as u64;
                    group.clear();
                    counters.batch_flushes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if delivered != 0 || dups != 0 {
            sink.flush()?;
            counters.delivered[class as usize].fetch_add(delivered, Ordering::Relaxed);
            counters.duplicates.fetch_add(dups, Ordering::Relaxed);
        }
        if let WorkerKind::Realtime { .. } = kind {
            let closing = n == 0 && input.is_abandoned() && input.is_empty();
            latency.merge_into(&counters.latency, now, closing);
            if latency.unstamped != 0 {
                counters
                    .unstamped
                    .fetch_add(core::mem::take(&mut latency.unstamped), Ordering::Relaxed);
            }
        }
        if let WorkerKind::Transactional { dedup, .. } = &kind {
            counters
                .dedup_evictions
                .store(dedup.evictions(), Ordering::Relaxed);
        }
        if n == 0 {
            let drained = pending.values().all(|(_, g)| g.is_empty());
            if input.is_abandoned() && input.is_empty() && drained {
                return Ok(());
            }
            idle.wait();
        } else {
            idle.busy();
        }
    }
}

/// Runs the DLQ worker: writes each turned-away event with its reason, until the dispatcher
/// is gone and the ring is empty.
///
/// # Errors
/// The sink's I/O error.
pub fn run_dlq(mut input: spsc::Consumer<DlqEntry<'_, '_>>, sink: &mut dyn Sink) -> io::Result<()> {
    let mut idle = Idle::new();
    loop {
        let mut n = 0;
        for (ev, reason) in input.pop_batch(256) {
            sink.write(core::slice::from_ref(&ev), Some(reason.as_str()))?;
            n += 1;
        }
        if n > 0 {
            sink.flush()?;
            idle.busy();
        } else if input.is_abandoned() && input.is_empty() {
            return Ok(());
        } else {
            idle.wait();
        }
    }
}
