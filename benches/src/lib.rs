//! One harness, many queues: adapters that put our rings and their public peers behind the same
//! two traits, so every bench row runs the identical loop and only the queue differs.
//!
//! Items are `u64`s (a pointer-sized payload, like the `Pooled` handles the pipeline moves).
//! Cross-thread runs spin briefly and then yield when a queue is full or empty: these machines
//! have two cores, and a bench with three threads must not starve the one that would unblock it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

/// Producing side of a queue under test.
pub trait Tx: Send {
    /// One item; hands it back when full.
    fn push(&mut self, v: u64) -> Result<(), u64>;
    /// Up to `n` items `start, start + 1, ...`; returns how many went in.
    fn push_burst(&mut self, start: u64, n: usize) -> usize {
        let mut i = 0;
        while i < n && self.push(start + i as u64).is_ok() {
            i += 1;
        }
        i
    }
}

/// Consuming side of a queue under test.
pub trait Rx: Send {
    /// One item.
    fn pop(&mut self) -> Option<u64>;
    /// Up to `n` items, added into `sum`; returns how many came out.
    fn pop_burst(&mut self, n: usize, sum: &mut u64) -> usize {
        let mut i = 0;
        while i < n {
            let Some(v) = self.pop() else { break };
            *sum = sum.wrapping_add(v);
            i += 1;
        }
        i
    }
}

// ---- ours ----------------------------------------------------------------------------------

impl Tx for eventstream::ring::spsc::Producer<u64> {
    #[inline]
    fn push(&mut self, v: u64) -> Result<(), u64> {
        eventstream::ring::spsc::Producer::push(self, v)
    }
    #[inline]
    fn push_burst(&mut self, start: u64, n: usize) -> usize {
        self.push_batch((0..n as u64).map(|i| start + i))
    }
}

impl Rx for eventstream::ring::spsc::Consumer<u64> {
    #[inline]
    fn pop(&mut self) -> Option<u64> {
        eventstream::ring::spsc::Consumer::pop(self)
    }
    #[inline]
    fn pop_burst(&mut self, n: usize, sum: &mut u64) -> usize {
        let mut k = 0;
        for v in self.pop_batch(n) {
            *sum = sum.wrapping_add(v);
            k += 1;
        }
        k
    }
}

impl Tx for eventstream::ring::mpsc::Producer<u64> {
    #[inline]
    fn push(&mut self, v: u64) -> Result<(), u64> {
        eventstream::ring::mpsc::Producer::push(self, v)
    }
}

impl Rx for eventstream::ring::mpsc::Consumer<u64> {
    #[inline]
    fn pop(&mut self) -> Option<u64> {
        eventstream::ring::mpsc::Consumer::pop(self)
    }
    #[inline]
    fn pop_burst(&mut self, n: usize, sum: &mut u64) -> usize {
        self.pop_batch(n, |v| *sum = sum.wrapping_add(v))
    }
}

// ---- rtrb ----------------------------------------------------------------------------------

impl Tx for rtrb::Producer<u64> {
    #[inline]
    fn push(&mut self, v: u64) -> Result<(), u64> {
        rtrb::Producer::push(self, v).map_err(|rtrb::PushError::Full(v)| v)
    }
    #[inline]
    fn push_burst(&mut self, start: u64, n: usize) -> usize {
        let n = n.min(self.slots());
        match self.write_chunk_uninit(n) {
            Ok(chunk) => chunk.fill_from_iter((0..n as u64).map(|i| start + i)),
            Err(_) => 0,
        }
    }
}

impl Rx for rtrb::Consumer<u64> {
    #[inline]
    fn pop(&mut self) -> Option<u64> {
        rtrb::Consumer::pop(self).ok()
    }
    #[inline]
    fn pop_burst(&mut self, n: usize, sum: &mut u64) -> usize {
        let n = n.min(self.slots());
        match self.read_chunk(n) {
            Ok(chunk) => {
                for v in chunk {
                    *sum = sum.wrapping_add(v);
                }
                n
            }
            Err(_) => 0,
        }
    }
}

// ---- crossbeam -----------------------------------------------------------------------------

/// `crossbeam_queue::ArrayQueue` shared by both sides (it is MPMC; no batch API).
#[derive(Debug, Clone)]
pub struct Array(pub Arc<ArrayQueue<u64>>);

impl Tx for Array {
    #[inline]
    fn push(&mut self, v: u64) -> Result<(), u64> {
        self.0.push(v)
    }
}

impl Rx for Array {
    #[inline]
    fn pop(&mut self) -> Option<u64> {
        self.0.pop()
    }
}

impl Tx for crossbeam_channel::Sender<u64> {
    #[inline]
    fn push(&mut self, v: u64) -> Result<(), u64> {
        self.try_send(v)
            .map_err(crossbeam_channel::TrySendError::into_inner)
    }
}

impl Rx for crossbeam_channel::Receiver<u64> {
    #[inline]
    fn pop(&mut self) -> Option<u64> {
        self.try_recv().ok()
    }
}

// ---- constructors --------------------------------------------------------------------------

impl Array {
    /// A queue of `cap` items; clone it for each side.
    pub fn new(cap: usize) -> Self {
        Self(Arc::new(ArrayQueue::new(cap)))
    }
}

/// Our SPSC ring.
pub fn ours_spsc(
    cap: usize,
) -> (
    eventstream::ring::spsc::Producer<u64>,
    eventstream::ring::spsc::Consumer<u64>,
) {
    eventstream::ring::spsc::channel(cap)
}

/// `rtrb`'s SPSC ring.
pub fn rtrb_spsc(cap: usize) -> (rtrb::Producer<u64>, rtrb::Consumer<u64>) {
    rtrb::RingBuffer::new(cap)
}

/// `ArrayQueue` used as SPSC.
pub fn array_spsc(cap: usize) -> (Array, Array) {
    let q = Array::new(cap);
    (q.clone(), q)
}

/// Our MPSC queue with `n` producers.
pub fn ours_mpsc(
    cap: usize,
    n: usize,
) -> (
    Vec<eventstream::ring::mpsc::Producer<u64>>,
    eventstream::ring::mpsc::Consumer<u64>,
) {
    let (p, c) = eventstream::ring::mpsc::channel(cap);
    (vec![p; n], c)
}

/// `ArrayQueue` with `n` producers.
pub fn array_mpsc(cap: usize, n: usize) -> (Vec<Array>, Array) {
    let q = Array::new(cap);
    (vec![q.clone(); n], q)
}

/// `crossbeam_channel::bounded` with `n` producers.
pub fn channel_mpsc(
    cap: usize,
    n: usize,
) -> (
    Vec<crossbeam_channel::Sender<u64>>,
    crossbeam_channel::Receiver<u64>,
) {
    let (s, r) = crossbeam_channel::bounded(cap);
    (vec![s; n], r)
}

/// The criterion settings every bench uses: short enough for a 2-core CI-sized machine, long
/// enough for tight intervals. `EVENTSTREAM_BENCH_QUICK=1` shortens them further.
pub fn criterion() -> criterion::Criterion {
    let quick = std::env::var_os("EVENTSTREAM_BENCH_QUICK").is_some_and(|v| v == "1");
    let (warm, measure, samples) = if quick {
        (200, 500, 10)
    } else {
        (1000, 2000, 20)
    };
    criterion::Criterion::default()
        .warm_up_time(Duration::from_millis(warm))
        .measurement_time(Duration::from_millis(measure))
        .sample_size(samples)
        .configure_from_args()
}

/// Spin a little, then yield: for full or empty queues in cross-thread runs.
#[inline]
pub fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 32 {
        std::hint::spin_loop();
    } else {
        *spins = 0;
        std::thread::yield_now();
    }
}

/// Moves `n` items from `producers` (each sending its share in bursts of `burst`) to `rx` on the
/// calling thread; returns the wall time and checks every item arrived exactly once.
pub fn transfer<T: Tx, R: Rx>(producers: Vec<T>, mut rx: R, n: u64, burst: usize) -> Duration {
    let p = producers.len() as u64;
    let share = n / p;
    let total = share * p;
    let start = Instant::now();
    let mut sum = 0u64;
    std::thread::scope(|s| {
        for (k, mut tx) in producers.into_iter().enumerate() {
            s.spawn(move || {
                let (mut i, end) = (k as u64 * share, (k as u64 + 1) * share);
                let mut spins = 0;
                while i < end {
                    let want = burst.min((end - i) as usize);
                    let sent = if want == 1 {
                        usize::from(tx.push(i).is_ok())
                    } else {
                        tx.push_burst(i, want)
                    };
                    if sent == 0 {
                        backoff(&mut spins);
                    }
                    i += sent as u64;
                }
            });
        }
        let mut got = 0u64;
        let mut spins = 0;
        while got < total {
            let n = if burst == 1 {
                rx.pop().map_or(0, |v| {
                    sum = sum.wrapping_add(v);
                    1
                })
            } else {
                rx.pop_burst(burst, &mut sum)
            };
            if n == 0 {
                backoff(&mut spins);
            }
            got += n as u64;
        }
    });
    let elapsed = start.elapsed();
    assert_eq!(
        sum,
        total.wrapping_mul(total.wrapping_sub(1)) / 2,
        "items lost or duplicated"
    );
    elapsed
}

/// A straightforward copying parser, the PERF.md baseline for ours: each frame becomes an owned
/// topic `String` and payload `Vec<u8>`, as a parser without borrowed views would produce.
/// `None` on any bad input (the baseline does not classify errors).
pub fn copying_parse(mut buf: &[u8], out: &mut Vec<(u8, String, Vec<u8>)>) -> Option<()> {
    while !buf.is_empty() {
        if buf.len() < 7 {
            return None;
        }
        let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let topic_len = usize::from(u16::from_be_bytes([buf[5], buf[6]]));
        if length < 3 || topic_len > length - 3 || buf.len() < 4 + length {
            return None;
        }
        let topic = String::from_utf8(buf[7..7 + topic_len].to_vec()).ok()?;
        let payload = buf[7 + topic_len..4 + length].to_vec();
        out.push((buf[4], topic, payload));
        buf = &buf[4 + length..];
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_adapter_moves_every_item() {
        for burst in [1, 64] {
            let (tx, rx) = ours_spsc(256);
            transfer(vec![tx], rx, 10_000, burst);
            let (tx, rx) = rtrb_spsc(256);
            transfer(vec![tx], rx, 10_000, burst);
            let (tx, rx) = array_spsc(256);
            transfer(vec![tx], rx, 10_000, burst);
        }
        for producers in [1, 2] {
            let (txs, rx) = ours_mpsc(256, producers);
            transfer(txs, rx, 10_000, 64);
            let (txs, rx) = array_mpsc(256, producers);
            transfer(txs, rx, 10_000, 64);
            let (txs, rx) = channel_mpsc(256, producers);
            transfer(txs, rx, 10_000, 64);
        }
    }

    #[test]
    fn copying_parser_agrees_with_ours() {
        let mut d = Vec::new();
        for i in 0..16u8 {
            eventstream::wire::protocol::encode(i, "topic.a", &[i; 40], &mut d).unwrap();
        }
        let mut out = Vec::new();
        copying_parse(&d, &mut out).unwrap();
        let ours: Vec<_> = eventstream::wire::protocol::Datagram::new(&d, Default::default())
            .map(|f| {
                f.map(|f| (f.priority, f.topic.to_owned(), f.payload.to_vec()))
                    .unwrap()
            })
            .collect();
        assert_eq!(out, ours);
    }
}
