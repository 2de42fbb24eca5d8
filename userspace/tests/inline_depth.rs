//! What an inline data-plane thread tells the control plane: the fuller of its two inputs, its
//! receive ring and the side queue the housekeeping thread feeds, whichever it is, and on every
//! batch (a thread with a side queue once published its ring only when the ring was empty, so
//! a queue kept full by traffic looked empty to the watermarks).

mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use eventstream::engine::inline::DEPTH_ONE;
use eventstream::engine::{DlqStep, EngineCounters, Inline};
use eventstream::ingest::{Handoff, RunInline};
use eventstream::mem::RegionOptions;
use eventstream::mem::frames::FrameArena;
use eventstream::mem::pool::{EventPool, Pooled};
use eventstream::ring::mpsc;
use eventstream::sink::MemorySink;
use eventstream::wire::event::{Event, Source, Stamp};
use eventstream::wire::protocol::{Limits, encode};

fn sink() -> Box<dyn eventstream::sink::Sink> {
    Box::new(MemorySink::new(1024, 1 << 16))
}

#[test]
fn the_fuller_input_is_published_on_every_batch() {
    let counters = EngineCounters::default();
    let depth = AtomicU32::new(0);
    let rules = common::realtime_rules("a.*");
    // Every class on a realtime step: only the depth matters here.
    let steps = common::realtime_steps();
    let mut engine = Inline::new(&rules, steps, DlqStep::new(sink()), &counters, &depth);
    // A side queue of 64 with 48 events waiting in it.
    let arena = FrameArena::new(2048, 4, RegionOptions::default()).unwrap();
    let pool = EventPool::<Event<'_>>::new(64);
    let (tx, rx) = mpsc::channel::<Pooled<'_, Event<'_>>>(64);
    let mut owner = arena.owner().unwrap();
    let mut frame = owner.take().unwrap();
    let mut dgram = Vec::new();
    for i in 0..48u8 {
        encode(1, "a.b", &[i; 8], &mut dgram).unwrap();
    }
    frame.bytes_mut()[..dgram.len()].copy_from_slice(&dgram);
    let mut shared = frame.share(0..dgram.len());
    let mut seq = 0;
    let stamp = Stamp {
        source: Source::Tcp,
        ingest_ns: 1,
    };
    let mut acq = pool.acquirer().unwrap();
    for ev in shared.events(Limits::default(), stamp, &mut seq) {
        assert!(tx.push(acq.acquire(ev.unwrap()).ok().unwrap()).is_ok());
    }
    drop(shared);
    let mut handoff = RunInline {
        engine: &mut engine,
        side: Some(rx),
        ring_depth: (0, 1),
        control: None,
        bell: None,
    };
    let published = || depth.load(Ordering::Relaxed);
    // The ring at 15 of 16 is fuller than the side queue (48 of 64): the ring's fill, at once.
    handoff.depth(15, 16);
    assert_eq!(published(), DEPTH_ONE / 16 * 15);
    // The ring at 1 of 16: the side queue is the fuller.
    handoff.depth(1, 16);
    assert_eq!(published(), DEPTH_ONE / 64 * 48);
    // Served, the side queue is empty: the ring again.
    assert_eq!(handoff.side().unwrap(), 48);
    handoff.depth(1, 16);
    assert_eq!(published(), DEPTH_ONE / 16);
    handoff.end(true).unwrap();
}
