//! The pipelined mode's dispatcher: pops the ingest queue in batches, feeds its depth to the
//! [`ControlPlane`], sheds by priority in `DROPPING`/`EMERGENCY`, routes by topic, and pushes
//! each event into one worker's SPSC ring ([`Bus`]: round-robin across a class's workers, or by
//! topic hash where per-topic order or dedup needs it). Events it turns away go to the DLQ
//! worker with their reason.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use super::{DlqReason, EngineCounters, Ev};
use crate::engine::control::{Command, ControlPlane, PipelineState};
use crate::engine::idle::backoff;
use crate::engine::latency::{BatchSampler, LocalLatency, Stage};
use crate::engine::rules::RulesView;
use crate::engine::stage::{self, Pass};
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
    /// One bus per [`WorkerClass`](super::WorkerClass), in `WorkerClass::ALL` order.
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
    pub fn run(self) {
        let routed = self.stage_latency.then(LocalLatency::default);
        let mut stage = DispatchStage {
            d: self,
            dispatched: 0,
            routed,
            batches: BatchSampler::default(),
        };
        // The dispatcher's passes cannot fail: full rings are waited on (backpressure).
        let _ = stage::drive(&mut stage, 256);
    }
}

/// The dispatcher's loop as a [`stage::Stage`]: a pass reads commands and the input's depth
/// into the control plane, then routes up to a budget of events.
struct DispatchStage<'s, 'p, 'a> {
    d: Dispatcher<'s, 'p, 'a>,
    /// Routed this batch, published by `flush`.
    dispatched: u64,
    /// Receive → routed, sampled (`engine.stage_latency`).
    routed: Option<LocalLatency>,
    batches: BatchSampler,
}

impl stage::Stage for DispatchStage<'_, '_, '_> {
    fn poll(&mut self, budget: usize) -> io::Result<Pass> {
        let d = &mut self.d;
        if d.rules.refresh() {
            d.control.set_config(d.rules.get().control);
        }
        while let Some(cmd) = d.commands.pop() {
            let t = d.control.command(cmd);
            d.transition(t);
        }
        let t = d.control.observe(d.input.len(), d.input.capacity());
        d.transition(t);
        let mut spins = 0;
        let mut n = 0;
        // One clock read per sampled batch (the first, then one in STAGE_SAMPLE_EVERY): the
        // sample and its events' hand-over stamps.
        let mut now = 0;
        while n < budget {
            let Some(mut ev) = d.input.pop() else {
                break;
            };
            if n == 0
                && self.batches.next_batch()
                && let Some(l) = &mut self.routed
            {
                now = monotonic_ns();
                l.record(now.saturating_sub(ev.ingest_ns));
            }
            if now != 0 {
                ev.routed_ns = now;
            }
            n += 1;
            let routed = match d.control.admit(ev.priority()) {
                Err(shed) => Err(match shed {
                    crate::engine::control::Shed::Dropping => DlqReason::Dropping,
                    crate::engine::control::Shed::Emergency => DlqReason::Emergency,
                }),
                Ok(()) => d
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
                    while let Err(back) = d.buses[target.class as usize].push(ev) {
                        ev = back;
                        backoff(&mut spins);
                    }
                    self.dispatched += 1;
                }
                Err(reason) => {
                    let mut entry = (ev, reason);
                    // Counted by the DLQ's step once its sink made it durable.
                    while let Err(back) = d.dlq.push(entry) {
                        entry = back;
                        backoff(&mut spins);
                    }
                }
            }
        }
        let done = n == 0 && d.ingest_done.load(Ordering::Acquire) && d.input.is_empty();
        if (now != 0 || done)
            && let Some(l) = &mut self.routed
        {
            l.merge_into(
                d.counters.stages.get(Stage::ReceiveToRouted),
                monotonic_ns(),
                done,
            );
        }
        Ok(if n > 0 {
            Pass::Worked(n)
        } else if done {
            Pass::Done
        } else {
            Pass::Idle
        })
    }

    fn flush(&mut self) {
        if self.dispatched != 0 {
            self.d
                .counters
                .dispatched
                .fetch_add(core::mem::take(&mut self.dispatched), Ordering::Relaxed);
        }
    }
}
