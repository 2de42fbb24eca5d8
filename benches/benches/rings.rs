//! SPSC ring vs `rtrb` and `crossbeam_queue::ArrayQueue`; MPSC queue vs `ArrayQueue` and
//! `crossbeam_channel::bounded`. Ours and the peers run back to back in one group per row, so
//! each run's ratio is measured side by side (PERF.md).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventstream_benches::{
    Rx, Tx, array_mpsc, array_spsc, channel_mpsc, ours_mpsc, ours_spsc, rtrb_spsc, transfer,
};

const CAP: usize = 4096;

/// Push `burst` items then pop them, on one thread: the cost of the operations themselves.
fn single_thread<T: Tx, R: Rx>(
    c: &mut Criterion,
    group: &str,
    name: &str,
    burst: usize,
    (mut tx, mut rx): (T, R),
) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(burst as u64));
    g.bench_function(BenchmarkId::new(name, burst), |b| {
        let mut sum = 0u64;
        b.iter(|| {
            if burst == 1 {
                tx.push(black_box(1)).unwrap();
                sum = sum.wrapping_add(rx.pop().unwrap());
            } else {
                assert_eq!(tx.push_burst(black_box(0), burst), burst);
                assert_eq!(rx.pop_burst(burst, &mut sum), burst);
            }
        });
        black_box(sum);
    });
    g.finish();
}

fn spsc_single_thread(c: &mut Criterion) {
    for burst in [1, 64] {
        let group = "spsc_single_thread";
        single_thread(c, group, "ours", burst, ours_spsc(CAP));
        single_thread(c, group, "rtrb", burst, rtrb_spsc(CAP));
        single_thread(c, group, "ArrayQueue", burst, array_spsc(CAP));
    }
}

/// Items moved from producer thread(s) to this thread: the cost including cache-line transfer.
fn cross_thread<T: Tx, R: Rx>(
    c: &mut Criterion,
    group: &str,
    id: BenchmarkId,
    burst: usize,
    make: impl Fn() -> (Vec<T>, R),
) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let (txs, rx) = make();
            transfer(txs, rx, iters.max(1024), burst).mul_f64(iters as f64 / iters.max(1024) as f64)
        });
    });
    g.finish();
}

/// One producer, as `transfer` takes a list.
fn one<T, R>((tx, rx): (T, R)) -> (Vec<T>, R) {
    (vec![tx], rx)
}

fn spsc_cross_thread(c: &mut Criterion) {
    for burst in [1, 64] {
        let group = "spsc_cross_thread";
        cross_thread(c, group, BenchmarkId::new("ours", burst), burst, || {
            one(ours_spsc(CAP))
        });
        cross_thread(c, group, BenchmarkId::new("rtrb", burst), burst, || {
            one(rtrb_spsc(CAP))
        });
        cross_thread(
            c,
            group,
            BenchmarkId::new("ArrayQueue", burst),
            burst,
            || one(array_spsc(CAP)),
        );
    }
}

fn mpsc_cross_thread(c: &mut Criterion) {
    for producers in [1, 2] {
        let group = "mpsc_cross_thread";
        cross_thread(c, group, BenchmarkId::new("ours", producers), 1, || {
            ours_mpsc(CAP, producers)
        });
        cross_thread(
            c,
            group,
            BenchmarkId::new("ArrayQueue", producers),
            1,
            || array_mpsc(CAP, producers),
        );
        cross_thread(
            c,
            group,
            BenchmarkId::new("crossbeam_channel", producers),
            1,
            || channel_mpsc(CAP, producers),
        );
    }
}

criterion_group! {
    name = benches;
    config = eventstream_benches::criterion();
    targets = spsc_single_thread, spsc_cross_thread, mpsc_cross_thread
}
criterion_main!(benches);
