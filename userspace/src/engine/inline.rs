//! Inline mode: the whole engine as a stage of the thread that owns a receive queue.
//!
//! [`Inline`] admits (the pipeline state is read once per batch), routes (the dispatcher's
//! table), and runs the worker classes' steps ([`ClassStep`]) and the DLQ's in the receive
//! thread, so an event's bytes stay in one core's cache from the RX ring to the sink, with no
//! ring, no pool slot and no cross-thread release per event. The control plane stays apart, on
//! the housekeeping thread: each data-plane thread publishes its input depth once per batch
//! ([`Inline::publish_depth`]); the housekeeping tick runs the watermarks over the deepest and
//! publishes the state in one atomic.
//!
//! Order per topic within a queue is kept (one thread, in arrival order). Dedup is exact across
//! queues: every queue's transactional step shares one lock-free window.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use super::control::{ControlConfig, PipelineState, Shed, admit};
use super::dedup::key;
use super::route::Router;
use super::worker::{BatchClock, ClassStep, DlqStep};
use super::{DlqReason, EngineCounters, Target};
use crate::engine::latency::realtime_ns;
use crate::wire::event::{Event, monotonic_ns};

/// Depth is published as a fraction of capacity in units of 1 / `DEPTH_ONE`.
pub const DEPTH_ONE: u32 = 1 << 16;

/// One data-plane thread's engine.
#[derive(Debug)]
pub struct Inline<'s> {
    router: Router<Target>,
    control: ControlConfig,
    /// One step per class, in `WorkerClass::ALL` order.
    steps: [ClassStep<'s>; 3],
    dlq: DlqStep,
    counters: &'s EngineCounters,
    /// This thread's input depth, for the control plane.
    depth: &'s AtomicU32,
    state: PipelineState,
    clock: BatchClock,
    wants_wall: bool,
    dispatched: u64,
    dlq_counts: [u64; 3],
}

impl<'s> Inline<'s> {
    /// An engine over `steps` (realtime, transactional, batch) and `dlq`.
    pub fn new(
        router: Router<Target>,
        control: ControlConfig,
        steps: [ClassStep<'s>; 3],
        dlq: DlqStep,
        counters: &'s EngineCounters,
        depth: &'s AtomicU32,
    ) -> Self {
        let wants_wall = steps.iter().any(ClassStep::wants_wall);
        Self {
            router,
            control,
            steps,
            dlq,
            counters,
            depth,
            state: PipelineState::Running,
            clock: BatchClock::default(),
            wants_wall,
            dispatched: 0,
            dlq_counts: [0; 3],
        }
    }

    /// Starts a batch: reads the pipeline state and the clocks once.
    #[inline]
    pub fn begin(&mut self) {
        self.state = self.counters.state();
        self.clock = BatchClock {
            mono: monotonic_ns(),
            wall: if self.wants_wall { realtime_ns() } else { 0 },
        };
    }

    /// Admits, routes and delivers one event (or turns it away to the DLQ with its reason).
    ///
    /// # Errors
    /// A sink's.
    #[inline]
    pub fn event(&mut self, mut ev: Event<'_>) -> io::Result<()> {
        let routed = match admit(&self.control, self.state, ev.priority()) {
            Err(Shed::Dropping) => Err(DlqReason::Dropping),
            Err(Shed::Emergency) => Err(DlqReason::Emergency),
            Ok(()) => self
                .router
                .route(ev.topic())
                .copied()
                .ok_or(DlqReason::NoRoute),
        };
        match routed {
            Ok(target) => {
                if target.class == super::WorkerClass::Transactional {
                    ev.key = key(target.key, ev.topic(), ev.payload());
                }
                self.dispatched += 1;
                self.steps[target.class as usize].event(&ev, self.clock)
            }
            Err(reason) => {
                self.dlq_counts[reason as usize] += 1;
                self.dlq.event(&ev, reason)
            }
        }
    }

    /// Publishes this thread's input depth (`used` of `capacity`) for the control plane.
    #[inline]
    pub fn publish_depth(&self, used: usize, capacity: usize) {
        let f = (used as u64 * u64::from(DEPTH_ONE)) / capacity.max(1) as u64;
        self.depth
            .store(f.min(u64::from(DEPTH_ONE)) as u32, Ordering::Relaxed);
    }

    /// Ends a batch: flushes the sinks written to, writes due batch groups, and publishes the
    /// counts. `closing` writes every open group (shutdown).
    ///
    /// # Errors
    /// A sink's.
    pub fn end(&mut self, closing: bool) -> io::Result<()> {
        // Fresh, not the batch's: idle passes end no batch but must still close windows.
        let now = monotonic_ns();
        for step in &mut self.steps {
            step.end(now, closing, self.counters)?;
        }
        self.dlq.end(self.counters, closing)?;
        if self.dispatched != 0 {
            self.counters
                .dispatched
                .fetch_add(core::mem::take(&mut self.dispatched), Ordering::Relaxed);
        }
        for (c, d) in self.counters.dlq.iter().zip(&mut self.dlq_counts) {
            if *d != 0 {
                c.fetch_add(core::mem::take(d), Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
