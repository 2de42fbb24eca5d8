//! Proves the foundation's hot path allocates nothing per event in steady state.
//!
//! Three threads, as in the daemon: an ingest thread fills receive frames with 16-event
//! datagrams, parses them zero-copy into pooled events and pushes them into the MPSC queue; a
//! dispatcher thread moves them into an SPSC ring; a worker checks and releases them, which
//! returns pool slots and, with the last event of a frame, the frame. A counting global allocator
//! records every allocation after warm-up. This file holds one test so nothing else allocates
//! while it counts.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use eventstream::mem::RegionOptions;
use eventstream::mem::frames::FrameArena;
use eventstream::mem::pool::{EventPool, Pooled};
use eventstream::ring::{mpsc, spsc};
use eventstream::wire::event::{Event, Source, Stamp, monotonic_ns};
use eventstream::wire::protocol::{Limits, encode};

#[global_allocator]
static GLOBAL: common::counting::Counting = common::counting::Counting;

const EVENTS_PER_DATAGRAM: u64 = 16;
const DATAGRAMS: u64 = if cfg!(miri) { 64 } else { 1 << 16 };
const TOTAL: u64 = DATAGRAMS * EVENTS_PER_DATAGRAM; // 1 048 576 events
const WARMUP_DATAGRAMS: u64 = DATAGRAMS / 16;

fn spin_or_yield(spins: &mut u32) {
    *spins += 1;
    if *spins > 64 {
        std::thread::yield_now();
        *spins = 0;
    } else {
        std::hint::spin_loop();
    }
}

#[test]
fn one_million_events_allocate_nothing_after_warmup() {
    let mut datagram = Vec::new();
    for i in 0..EVENTS_PER_DATAGRAM {
        let topic = format!("sensors.{}", i % 4);
        encode((i % 8) as u8, &topic, &i.to_be_bytes(), &mut datagram).unwrap();
    }
    let arena = FrameArena::new(2048, 256, RegionOptions::default()).unwrap();
    let pool = EventPool::new(4096);
    let (ingest_tx, mut ingest_rx) = mpsc::channel(1024);
    let (mut worker_tx, mut worker_rx) = spsc::channel::<Pooled<'_, Event<'_>>>(1024);
    let delivered = AtomicU64::new(0);

    std::thread::scope(|s| {
        // Worker: checks each event, then drops it (releasing slot and frame reference).
        s.spawn(|| {
            let mut next_seq = 0u64;
            let mut spins = 0;
            while next_seq < TOTAL {
                let mut got = 0;
                for ev in worker_rx.pop_batch(64) {
                    assert_eq!(ev.seq, next_seq, "events arrive in order, none lost");
                    let i = next_seq % EVENTS_PER_DATAGRAM;
                    assert_eq!(ev.payload(), i.to_be_bytes());
                    assert_eq!(ev.priority(), (i % 8) as u8);
                    assert!(ev.topic().starts_with("sensors."));
                    next_seq += 1;
                    got += 1;
                }
                if got == 0 {
                    spin_or_yield(&mut spins);
                }
            }
            delivered.store(next_seq, Ordering::Release);
        });

        // Dispatcher: MPSC -> SPSC, in batches.
        s.spawn(move || {
            let mut moved = 0u64;
            let mut pending = None;
            let mut spins = 0;
            while moved < TOTAL {
                let ev = match pending.take().or_else(|| ingest_rx.pop()) {
                    Some(ev) => ev,
                    None => {
                        spin_or_yield(&mut spins);
                        continue;
                    }
                };
                match worker_tx.push(ev) {
                    Ok(()) => moved += 1,
                    Err(back) => {
                        pending = Some(back);
                        spin_or_yield(&mut spins);
                    }
                }
            }
        });

        // Ingest (this thread): "receive" into a frame, parse, pool, push.
        let mut owner = arena.owner().unwrap();
        let mut acquirer = pool.acquirer().unwrap();
        let mut seq = 0u64;
        let mut spins = 0;
        for d in 0..DATAGRAMS {
            if d == WARMUP_DATAGRAMS {
                common::counting::start();
            }
            let mut frame = loop {
                match owner.take() {
                    Some(f) => break f,
                    None => spin_or_yield(&mut spins),
                }
            };
            frame.bytes_mut()[..datagram.len()].copy_from_slice(&datagram);
            let mut shared = frame.share(0..datagram.len());
            let stamp = Stamp {
                source: Source::Udp,
                ingest_ns: monotonic_ns(),
            };
            for parsed in shared.events(Limits::default(), stamp, &mut seq) {
                let mut ev = parsed.expect("well-formed datagram");
                let mut pooled = loop {
                    match acquirer.acquire(ev) {
                        Ok(p) => break p,
                        Err(back) => {
                            ev = back;
                            spin_or_yield(&mut spins);
                        }
                    }
                };
                while let Err(back) = ingest_tx.push(pooled) {
                    pooled = back;
                    spin_or_yield(&mut spins);
                }
            }
        }
        drop(acquirer);
    });
    let allocs = common::counting::stop();

    assert_eq!(delivered.load(Ordering::Acquire), TOTAL, "sent = delivered");
    assert_eq!(
        pool.free_slots(),
        pool.capacity(),
        "every pool slot came back"
    );
    let mut owner = arena.owner().unwrap();
    owner.reclaim();
    assert_eq!(
        owner.free_len(),
        arena.count() as usize,
        "every frame came back"
    );
    assert_eq!(
        allocs, 0,
        "{allocs} allocations while moving {TOTAL} events after warm-up"
    );
}
