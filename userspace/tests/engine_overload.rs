//! The dispatcher under overload, in process: the ingest queue is filled past the watermarks
//! before the dispatcher starts, so its first look at the depth puts the pipeline in
//! `EMERGENCY` (or `DROPPING`); low priorities go to the DLQ with that reason, the rest reach the
//! worker, the state walks back to `RUNNING` as the queue empties, and every event is accounted
//! for: delivered + DLQ = sent.

use eventstream::engine::rules::{LiveRules, Rules};
use std::sync::atomic::{AtomicBool, Ordering};

use eventstream::engine::control::{Command, ControlConfig, ControlPlane, PipelineState};
use eventstream::engine::dedup::KeyFrom;
use eventstream::engine::route::Router;
use eventstream::engine::{
    Bus, Dispatcher, DlqEntry, DlqReason, EngineCounters, Ev, Target, WorkerClass,
};
use eventstream::mem::RegionOptions;
use eventstream::mem::frames::FrameArena;
use eventstream::mem::pool::EventPool;
use eventstream::ring::{mpsc, spsc};
use eventstream::wire::event::{Source, Stamp};
use eventstream::wire::protocol::{Limits, encode};

const QUEUE: usize = 64;

/// Runs one overload episode with the queue filled to `fill` events whose priorities cycle
/// through 0..=255 in steps of `step`; returns (delivered priorities, DLQ reasons, counters).
fn episode(fill: usize, step: u8) -> (Vec<u8>, Vec<(u8, DlqReason)>, EngineCounters) {
    let arena = FrameArena::new(2048, 128, RegionOptions::default()).unwrap();
    let pool = EventPool::new(256);
    let (in_tx, in_rx) = mpsc::channel::<Ev<'_, '_>>(QUEUE);
    let (w_tx, mut w_rx) = spsc::channel::<Ev<'_, '_>>(QUEUE);
    let (dlq_tx, mut dlq_rx) = spsc::channel::<DlqEntry<'_, '_>>(QUEUE);
    let (_cmd_tx, cmd_rx) = mpsc::channel::<Command>(4);
    let counters = EngineCounters::default();
    let ingest_done = AtomicBool::new(true); // everything is queued before the dispatcher starts

    let mut owner = arena.owner().unwrap();
    let mut acq = pool.acquirer().unwrap();
    let mut seq = 0;
    for i in 0..fill {
        let mut frame = owner.take().unwrap();
        let mut d = Vec::new();
        encode((i as u8).wrapping_mul(step), "load.t", &[i as u8], &mut d).unwrap();
        frame.bytes_mut()[..d.len()].copy_from_slice(&d);
        let mut shared = frame.share(0..d.len());
        let stamp = Stamp {
            source: Source::Udp,
            ingest_ns: 1,
        };
        for ev in shared.events(Limits::default(), stamp, &mut seq) {
            in_tx.push(acq.acquire(ev.unwrap()).unwrap()).unwrap();
        }
    }
    drop(acq);
    let mut router = Router::new();
    router.set_default(Target {
        class: WorkerClass::Realtime,
        key: KeyFrom::TopicAndPayload,
    });
    let empty = || Bus::new(Vec::new(), false);
    let rules = LiveRules::new(Rules {
        router,
        control: ControlConfig::default(),
    });
    let dispatcher = Dispatcher {
        input: in_rx,
        rules: rules.view(),
        buses: [Bus::new(vec![w_tx], false), empty(), empty()],
        dlq: dlq_tx,
        control: ControlPlane::new(ControlConfig::default()),
        commands: cmd_rx,
        ingest_done: &ingest_done,
        counters: &counters,
        stage_latency: true,
    };
    let (mut delivered, mut dead) = (Vec::new(), Vec::new());
    std::thread::scope(|s| {
        s.spawn(move || dispatcher.run());
        // Drain worker ring and DLQ until the dispatcher is gone and both are empty.
        loop {
            let mut n = 0;
            for ev in w_rx.pop_batch(64) {
                delivered.push(ev.priority());
                n += 1;
            }
            for (ev, reason) in dlq_rx.pop_batch(64) {
                dead.push((ev.priority(), reason));
                n += 1;
            }
            if n == 0
                && w_rx.is_abandoned()
                && dlq_rx.is_abandoned()
                && w_rx.is_empty()
                && dlq_rx.is_empty()
            {
                break;
            }
            std::thread::yield_now();
        }
    });
    (delivered, dead, counters)
}

#[test]
fn a_full_queue_sheds_below_the_emergency_floor_and_recovers() {
    let (delivered, dead, c) = episode(QUEUE, 37);
    assert_eq!(
        delivered.len() + dead.len(),
        QUEUE,
        "delivered + DLQ = sent"
    );
    assert!(!dead.is_empty() && !delivered.is_empty());
    let floor = ControlConfig::default().emergency_min_priority;
    assert!(
        dead.iter()
            .all(|&(p, r)| r == DlqReason::Emergency && p < floor),
        "{dead:?}"
    );
    assert!(delivered.iter().all(|&p| p >= floor), "{delivered:?}");
    assert_eq!(
        c.transitions[PipelineState::Emergency as usize].load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        c.state(),
        PipelineState::Running,
        "back to RUNNING once the queue emptied"
    );
    // `dlq{reason}` is counted by the DLQ's step once its sink made the record durable (no
    // step runs here: the test drains the ring itself).
    assert_eq!(c.dlq_total(), 0);
    assert_eq!(c.dispatched.load(Ordering::Relaxed), delivered.len() as u64);
}

#[test]
fn a_high_queue_sheds_below_the_dropping_floor_only() {
    // 52 of 64 slots: above high (0.75), below critical (0.9).
    let (delivered, dead, c) = episode(52, 1);
    assert_eq!(delivered.len() + dead.len(), 52, "delivered + DLQ = sent");
    let floor = ControlConfig::default().dropping_min_priority;
    assert_eq!(
        dead.len(),
        usize::from(floor),
        "priorities 0..{floor} are shed: {dead:?}"
    );
    assert!(
        dead.iter()
            .all(|&(p, r)| r == DlqReason::Dropping && p < floor)
    );
    assert_eq!(
        c.transitions[PipelineState::Dropping as usize].load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        c.transitions[PipelineState::Emergency as usize].load(Ordering::Relaxed),
        0
    );
    assert_eq!(c.state(), PipelineState::Running);
}
