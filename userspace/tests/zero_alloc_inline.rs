//! Proves the inline engine (run to completion in the receive thread) allocates nothing per
//! event in steady state, all the way into the sink: frames parsed zero-copy, admitted, routed
//! to all three worker classes (realtime with latency, transactional through the shared dedup
//! window, batch groups copied out of their frames) and the DLQ, delivered to the memory sink
//! and then, in a second pass, to the file sink. One test in this file, so nothing else
//! allocates while it counts.

mod common;

use eventstream::engine::rules::{LiveRules, Rules};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use eventstream::engine::control::ControlConfig;
use eventstream::engine::dedup::{KeyFrom, SharedDedupWindow};
use eventstream::engine::latency::LatencyFrom;
use eventstream::engine::route::Router;
use eventstream::engine::{
    ClassStep, Dedup, DlqStep, EngineCounters, Inline, Target, WorkerClass, WorkerKind,
};
use eventstream::ingest::{Deliver, RunInline, Tally};
use eventstream::mem::RegionOptions;
use eventstream::mem::frames::FrameArena;
use eventstream::sink::file::{FileSink, Fsync, SegmentLog};
use eventstream::sink::{MemorySink, Sink};
use eventstream::wire::event::{Source, Stamp, monotonic_ns};
use eventstream::wire::protocol::{Limits, encode};

#[global_allocator]
static GLOBAL: common::counting::Counting = common::counting::Counting;

const EVENTS_PER_DATAGRAM: u64 = 16;
const DATAGRAMS: u64 = if cfg!(miri) { 64 } else { 1 << 15 };
const WARMUP_DATAGRAMS: u64 = DATAGRAMS / 8;

/// Routes of the test: one topic per class, and one with no route (to the DLQ).
fn router() -> Router<Target> {
    let mut r = Router::new();
    let t = |class| Target {
        class,
        key: KeyFrom::PayloadId,
    };
    r.add("rt.*", t(WorkerClass::Realtime)).unwrap();
    r.add("tx.*", t(WorkerClass::Transactional)).unwrap();
    r.add("batch.*", t(WorkerClass::Batch)).unwrap();
    r
}

/// Runs `DATAGRAMS` datagrams through one inline engine whose sinks `sink()` makes; returns
/// the allocations counted after warm-up and the counters.
fn run(sink: &mut dyn FnMut(&str) -> Box<dyn Sink>) -> (u64, EngineCounters) {
    let counters = EngineCounters::default();
    let dedup = SharedDedupWindow::new(1 << 20, 3600 * 1_000_000_000);
    let depth = AtomicU32::new(0);
    let steps = [
        ClassStep::new(
            WorkerKind::Realtime {
                from: LatencyFrom::Ingest,
            },
            sink("realtime"),
        ),
        ClassStep::new(
            WorkerKind::Transactional {
                dedup: Dedup::Shared(&dedup),
            },
            sink("transactional"),
        ),
        ClassStep::new(
            WorkerKind::Batch {
                max: 64,
                window: Duration::from_millis(5),
                max_topics: 16,
            },
            sink("batch"),
        ),
    ];
    let rules = LiveRules::new(Rules {
        router: router(),
        control: ControlConfig::default(),
    });
    let mut engine = Inline::new(&rules, steps, DlqStep::new(sink("dlq")), &counters, &depth);
    let arena = FrameArena::new(2048, 64, RegionOptions::default()).unwrap();
    let mut owner = arena.owner().unwrap();
    let mut deliver = Deliver {
        limits: Limits::default(),
        handoff: RunInline {
            engine: &mut engine,
            side: None,
            ring_depth: (0, 1),
            control: None,
            bell: None,
        },
    };
    let topics = ["rt.a", "tx.b", "batch.c", "batch.d", "nowhere"];
    let mut datagram = Vec::with_capacity(2048);
    let mut tally = Tally::default();
    let mut seq = 0u64;
    for d in 0..DATAGRAMS {
        if d == WARMUP_DATAGRAMS {
            common::counting::start();
        }
        datagram.clear();
        for i in 0..EVENTS_PER_DATAGRAM {
            let n = d * EVENTS_PER_DATAGRAM + i;
            let topic = topics[(n % topics.len() as u64) as usize];
            // tx.b comes every 5th event with id n / 10: every other one is a duplicate.
            let id = if topic == "tx.b" { n / 10 } else { n };
            encode((n % 8) as u8, topic, &id.to_be_bytes(), &mut datagram).unwrap();
        }
        let mut frame = owner
            .take()
            .expect("every frame comes back at once, inline");
        frame.bytes_mut()[..datagram.len()].copy_from_slice(&datagram);
        let mut shared = frame.share(0..datagram.len());
        let stamp = Stamp {
            source: Source::Udp,
            ingest_ns: monotonic_ns(),
        };
        eventstream::ingest::Handoff::begin(&mut deliver.handoff);
        deliver
            .frame(&mut shared, stamp, &mut seq, &mut tally)
            .unwrap();
        drop(shared);
        eventstream::ingest::Handoff::end(&mut deliver.handoff, false).unwrap();
    }
    eventstream::ingest::Handoff::end(&mut deliver.handoff, true).unwrap();
    let allocs = common::counting::stop();
    assert_eq!(tally.events, DATAGRAMS * EVENTS_PER_DATAGRAM);
    drop(deliver);
    drop(engine);
    (allocs, counters)
}

fn check(what: &str, allocs: u64, c: &EngineCounters) {
    let total = DATAGRAMS * EVENTS_PER_DATAGRAM;
    let delivered = c.delivered_total();
    let dups = c.duplicates.load(Ordering::Relaxed);
    assert_eq!(
        delivered + dups + c.dlq_total(),
        total,
        "{what}: accepted = delivered + duplicates + DLQ"
    );
    assert_eq!(
        c.dlq_total(),
        total / 5 + u64::from(total % 5 > 4),
        "{what}: no-route share"
    );
    assert!(dups > 0 && c.delivered[WorkerClass::Batch as usize].load(Ordering::Relaxed) > 0);
    assert_eq!(
        allocs, 0,
        "{what}: {allocs} allocations while running {total} events inline after warm-up"
    );
}

#[test]
fn the_inline_engine_allocates_nothing_per_event_into_memory_and_file_sinks() {
    let (allocs, c) = run(&mut |_| Box::new(MemorySink::new(4096, 1 << 20)));
    check("memory sink", allocs, &c);
    assert!(
        c.sink_evicted.load(Ordering::Relaxed) > 0,
        "the bounded ring evicted and counted"
    );

    let dir = std::env::temp_dir().join(format!("es-zero-alloc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (allocs, c) = run(&mut |name| {
        let (log, _) =
            SegmentLog::open(&dir.join(name), 1 << 30, Fsync::Never, Duration::ZERO).unwrap();
        Box::new(FileSink::new(log))
    });
    check("file sink", allocs, &c);
    let _ = std::fs::remove_dir_all(&dir);
}
