//! The inline engine (parse, admit, route, the three worker classes, into memory sinks) per
//! 16-event datagram, with its per-batch stage latency sample (`ours`, the shipping default)
//! and without it (`no_stage_latency`): the ratio is what the sample costs (PERF.md's 2 %
//! budget for latency by stage). One engine serves both rows, its sample switched between
//! them, after a warm-up to steady state.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventstream::engine::control::ControlConfig;
use eventstream::engine::dedup::{KeyFrom, SharedDedupWindow};
use eventstream::engine::latency::LatencyFrom;
use eventstream::engine::route::Router;
use eventstream::engine::rules::{LiveRules, Rules};
use eventstream::engine::{
    ClassStep, Dedup, DlqStep, EngineCounters, Inline, Target, WorkerClass, WorkerKind,
};
use eventstream::ingest::{Deliver, Handoff, RunInline, Tally};
use eventstream::mem::RegionOptions;
use eventstream::mem::frames::FrameArena;
use eventstream::sink::MemorySink;
use eventstream::wire::event::{Source, Stamp, monotonic_ns};
use eventstream::wire::protocol::{Limits, encode};

const EVENTS: u64 = 16;

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

/// Datagrams run before measuring: past the dedup window's fill (a quarter of the events are
/// transactional, 2^20 keys), so every measurement sees the same steady state.
const WARM_UP: u64 = 1 << 19;

fn engine(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(EVENTS));
    let counters = EngineCounters::default();
    let dedup = SharedDedupWindow::new(1 << 20, 3600 * 1_000_000_000);
    let depth = AtomicU32::new(0);
    let sink = || Box::new(MemorySink::new(4096, 1 << 20));
    let steps = [
        ClassStep::new(
            WorkerKind::Realtime {
                from: LatencyFrom::Ingest,
            },
            sink(),
        ),
        ClassStep::new(
            WorkerKind::Transactional {
                dedup: Dedup::Shared(&dedup),
            },
            sink(),
        ),
        ClassStep::new(
            WorkerKind::Batch {
                max: 64,
                window: Duration::from_millis(5),
                max_topics: 16,
            },
            sink(),
        ),
    ];
    let rules = LiveRules::new(Rules {
        router: router(),
        control: ControlConfig::default(),
    });
    let mut inline = Inline::new(&rules, steps, DlqStep::new(sink()), &counters, &depth);
    let arena = FrameArena::new(2048, 64, RegionOptions::default()).unwrap();
    let mut owner = arena.owner().unwrap();
    let mut deliver = Deliver {
        limits: Limits::default(),
        handoff: RunInline {
            engine: &mut inline,
            side: None,
            ring_depth: (0, 1),
            control: None,
            bell: None,
        },
    };
    let topics = ["rt.a", "tx.b", "batch.c", "rt.d"];
    let mut datagram = Vec::with_capacity(2048);
    let mut tally = Tally::default();
    let mut seq = 0u64;
    let mut n = 0u64;
    // Sets the sample (one store, the same in both rows) and runs one datagram.
    let mut one = |on: bool| {
        deliver.handoff.engine.set_stage_latency(on);
        datagram.clear();
        for i in 0..EVENTS {
            n += 1;
            let topic = topics[(i % topics.len() as u64) as usize];
            encode((i % 8) as u8, topic, &n.to_be_bytes(), &mut datagram).unwrap();
        }
        let mut frame = owner.take().expect("frames come back at once, inline");
        frame.bytes_mut()[..datagram.len()].copy_from_slice(&datagram);
        let mut shared = frame.share(0..datagram.len());
        let stamp = Stamp {
            source: Source::Udp,
            ingest_ns: monotonic_ns(),
        };
        Handoff::begin(&mut deliver.handoff);
        deliver
            .frame(&mut shared, stamp, &mut seq, &mut tally)
            .unwrap();
        drop(shared);
        Handoff::end(&mut deliver.handoff, false).unwrap();
    };
    for _ in 0..WARM_UP {
        one(true);
    }
    // One engine, its sample switched on and off between measurements: two engines measured
    // one after the other differed by 18-33 % even when built alike (memory placement).
    for (name, on) in [("ours", true), ("no_stage_latency", false)] {
        g.bench_function(BenchmarkId::new(name, EVENTS), |b| b.iter(|| one(on)));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = eventstream_benches::criterion();
    targets = engine
}
criterion_main!(benches);
