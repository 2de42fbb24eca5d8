//! The pipelined mode's dispatcher: pops the ingest queue in batches, feeds its depth to the
//! [`ControlPlane`], sheds by priority in `DROPPING`/`EMERGENCY`, routes by topic, and pushes
//! each event into one worker's SPSC ring ([`Bus`]: round-robin across a class's workers, or by
//! topic hash where per-topic order or dedup needs it). Events it turns away go to the DLQ
//! worker with their reason.

use std::sync::atomic::{AtomicBool, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use super::{DlqReason, EngineCounters, Ev};
use crate::engine::control::{Command, ControlPlane, PipelineState};
use crate::engine::idle::{Idle, backoff};
use crate::engine::latency::{BatchSampler, LocalLatency, Stage};
use crate::engine::rules::RulesView;
use crate::ring::{mpsc, spsc};
use crate::wire::event::monotonic_ns;

/// One class's fan-out over its workers' rings (EventBusMulti).
#[derive(Debug)]
pub struct Bus<'p, 'a> {
    rings: Vec<spsc::Producer<Ev<'p, 'a>>>,
    by_topic: bool,
    next: usize,
}

impl<'p, 'a> Bus<'p, 'a> {
    /// A bus over `rings`; `by_topic` picks a ring by topic hash instead of round-robin.
    pub fn new(rings: Vec<spsc::Producer<Ev<'p, 'a>>>, by_topic: bool) -> Self {
        Self {
            rings,
            by_topic,
            next: 0,
        }
    }

    /// Pushes `ev` to its ring, handing it back when that ring is full.
    #[inline]
    fn push(&mut self, ev: Ev<'p, 'a>) -> Result<(), Ev<'p, 'a>> {
        let n = self.rings.len();
        let i = if self.by_topic {
            (xxh3_64(ev.topic().as_bytes()) % n as u64) as usize
        } else {
            self.next = (self.next + 1) % n;
            self.next
        };
        self.rings[i].push(ev)
    }
}

/// What a DLQ record carries.
pub type DlqEntry<'p, 'a> = (Ev<'p, 'a>, DlqReason);

/// The dispatcher thread's state.
#[derive(Debug)]
pub struct Dispatcher<'s, 'p, 'a> {
    /// The ingest → dispatcher queue.
    pub input: mpsc::Consumer<Ev<'p, 'a>>,
    /// Topic routes and the control plane's thresholds, as reloaded.
    pub rules: RulesView<'s>,
    /// One bus per [`WorkerClass`], in `WorkerClass::ALL` order.
    pub buses: [Bus<'p, 'a>; 3],
    /// To the DLQ worker.
    pub dlq: spsc::Producer<DlqEntry<'p, 'a>>,
    /// The state machine.
    pub control: ControlPlane,
    /// Operator commands (pause, resume, drain), from the admin endpoint or a signal.
    pub commands: mpsc::Consumer<Command>,
    /// Set when every ingest thread has stopped.
    pub ingest_done: &'s AtomicBool,
    /// Totals.
    pub counters: &'s EngineCounters,
    /// Whether to sample receive → routed and stamp the hand-over (`engine.stage_latency`).
    pub stage_latency: bool,
}

impl Dispatcher<'_, '_, '_> {
    fn transition(&self, t: Option<(PipelineState, PipelineState)>) {
        self.counters.publish_transition(t, self.input.len());
    }

    /// Runs until ingest is done and the input queue is empty; dropping `self` then closes the
    /// workers' rings, and they finish what is queued.
    pub fn run(mut self) {
        let mut spins = 0;
        let mut idle = Idle::new();
        let mut dispatched = 0u64;
        let mut routed = self.stage_latency.then(LocalLatency::default);
        let mut batches = BatchSampler::default();
        loop {
            if self.rules.refresh() {
                self.control.set_config(self.rules.get().control);
            }
            while let Some(cmd) = self.commands.pop() {
                let t = self.control.command(cmd);
                self.transition(t);
            }
            let t = self
                .control
                .observe(self.input.len(), self.input.capacity());
            self.transition(t);
            let mut n = 0;
            // One clock read per sampled batch (the first, then one in STAGE_SAMPLE_EVERY): the
            // sample and its events' hand-over stamps.
            let mut now = 0;
            while n < 256 {
                let Some(mut ev) = self.input.pop() else {
                    break;
                };
                if n == 0
                    && batches.next_batch()
                    && let Some(l) = &mut routed
                {
                    now = monotonic_ns();
                    l.record(now.saturating_sub(ev.ingest_ns));
                }
                if now != 0 {
                    ev.routed_ns = now;
                }
                n += 1;
                let routed = match self.control.admit(ev.priority()) {
                    Err(shed) => Err(match shed {
                        crate::engine::control::Shed::Dropping => DlqReason::Dropping,
                        crate::engine::control::Shed::Emergency => DlqReason::Emergency,
                    }),
                    Ok(()) => self
                        .rules
                        .get()
                        .router
                        .route(ev.topic())
                        .copied()
                        .ok_or(DlqReason::NoRoute),
                };
                match routed {
                    Ok(target) => {
                        let mut ev = ev;
                        crate::engine::dedup::identify(&mut ev, target);
                        while let Err(back) = self.buses[target.class as usize].push(ev) {
                            ev = back;
                            backoff(&mut spins);
                        }
                        dispatched += 1;
                    }
                    Err(reason) => {
                        let mut entry = (ev, reason);
                        // Counted by the DLQ's step once its sink made it durable.
                        while let Err(back) = self.dlq.push(entry) {
                            entry = back;
                            backoff(&mut spins);
                        }
                    }
                }
            }
            if dispatched != 0 {
                self.counters
                    .dispatched
                    .fetch_add(core::mem::take(&mut dispatched), Ordering::Relaxed);
            }
            let done = n == 0 && self.ingest_done.load(Ordering::Acquire) && self.input.is_empty();
            if (now != 0 || done)
                && let Some(l) = &mut routed
            {
                l.merge_into(
                    self.counters.stages.get(Stage::ReceiveToRouted),
                    monotonic_ns(),
                    done,
                );
            }
            if n == 0 {
                if done {
                    return;
                }
                idle.wait();
            } else {
                idle.busy();
            }
        }
    }
}
