//! `EventPool` acquire + release against `Box::new` + drop of the same 56-byte event.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventstream::mem::pool::EventPool;
use eventstream::ring::spsc;
use eventstream_benches::backoff;

/// Stand-in with the size of `eventstream::wire::event::Event` (lease, span, timestamps, source).
type Ev = [u64; 7];

fn single_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_single_thread");
    for burst in [1usize, 64] {
        g.throughput(Throughput::Elements(burst as u64));
        let pool = EventPool::<Ev>::new(65_536);
        let mut acq = pool.acquirer().unwrap();
        let mut held = Vec::with_capacity(burst);
        g.bench_function(BenchmarkId::new("ours", burst), |b| {
            b.iter(|| {
                for i in 0..burst {
                    held.push(acq.acquire(black_box([i as u64; 7])).unwrap());
                }
                held.clear();
            });
        });
        let mut boxed = Vec::with_capacity(burst);
        g.bench_function(BenchmarkId::new("Box", burst), |b| {
            b.iter(|| {
                for i in 0..burst {
                    boxed.push(Box::new(black_box([i as u64; 7])));
                }
                boxed.clear();
            });
        });
    }
    g.finish();
}

/// Sends `iters` values made by `make` to another thread over our SPSC ring, where they are
/// dropped; returns the wall time. Both pool rows run exactly this, so only `make` differs.
fn handoff<T: Send>(iters: u64, mut make: impl FnMut(u64) -> T) -> std::time::Duration {
    let (mut tx, mut rx) = spsc::channel::<T>(1024);
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0;
            while n < iters {
                n += rx.pop_batch(64).count() as u64;
            }
        });
        let mut spins = 0;
        for i in 0..iters {
            let mut v = make(i);
            while let Err(back) = tx.push(v) {
                v = back;
                backoff(&mut spins);
            }
        }
    });
    start.elapsed()
}

/// Acquired on one thread, released on another (the pipeline's pattern).
fn cross_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_cross_thread");
    g.throughput(Throughput::Elements(1));
    let pool = EventPool::<Ev>::new(65_536);
    g.bench_function("ours", |b| {
        b.iter_custom(|iters| {
            let mut acq = pool.acquirer().unwrap();
            let mut spins = 0;
            handoff(iters, |i| {
                let mut v = [i; 7];
                loop {
                    match acq.acquire(v) {
                        Ok(h) => return h,
                        Err(back) => {
                            v = back;
                            backoff(&mut spins);
                        }
                    }
                }
            })
        });
    });
    g.bench_function("Box", |b| {
        b.iter_custom(|iters| handoff(iters, |i| Box::new([i; 7])))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = eventstream_benches::criterion();
    targets = single_thread, cross_thread
}
criterion_main!(benches);
