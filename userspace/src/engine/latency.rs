//! Latency: the blaster's payload stamp, HDR histograms per thread, and the stages they time.
//!
//! v1 frames carry no timestamp, so the sender's clock travels in the payload when the sender
//! says so. The layout is the blaster's (and anyone's who wants the same measurement):
//!
//! ```text
//! payload[0..8]   sequence number, u64 BE (usable as the event id of PROTOCOL.md)
//! payload[8..16]  send time, nanoseconds since the Unix epoch (CLOCK_REALTIME), u64 BE
//! ```
//!
//! With `engine.latency_from: payload` the realtime worker measures `now - send time` on
//! `CLOCK_REALTIME`; with `ingest` (the default) it measures from the receive stamp on
//! `CLOCK_MONOTONIC`. Each worker records into its own [`LocalLatency`] (no shared write per
//! event) and merges it into the shared [`LatencyHistogram`] at most every
//! [`MERGE_INTERVAL_NS`], with `try_lock`, so a scrape never stalls a worker.
//!
//! The stages of [`Stage`] are timed the same way, but sampled: the first event (the one that
//! waited longest) of one batch in every [`STAGE_SAMPLE_EVERY`], so the cost is one clock read
//! and one histogram record per that many batches, never per event (`engine.stage_latency`;
//! the `engine` criterion bench shows what it costs).

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Deserialize;

/// One batch in this many is sampled for latency by stage.
pub const STAGE_SAMPLE_EVERY: u32 = 8;

/// Which batches are sampled for latency by stage: the first, then one in
/// [`STAGE_SAMPLE_EVERY`].
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchSampler(u32);

impl BatchSampler {
    /// Counts a batch (call once per batch with events); whether it is sampled.
    #[inline]
    pub fn next_batch(&mut self) -> bool {
        self.0 = self.0.wrapping_add(1);
        self.0 % STAGE_SAMPLE_EVERY == 1
    }
}

/// Bytes of the payload stamp.
pub const STAMP_LEN: usize = 16;

/// Largest latency recorded; longer ones saturate here (and show as "≥ 60 s").
pub const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Significant decimal digits kept by the histogram (0.1 % relative error).
const SIGFIG: u8 = 3;

/// How often a worker folds its local histogram into the shared one.
pub const MERGE_INTERVAL_NS: u64 = 100_000_000;

/// Where the realtime worker's latency clock starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyFrom {
    /// The ingest thread's receive stamp (`CLOCK_MONOTONIC`): ingest → worker.
    #[default]
    Ingest,
    /// The sender's stamp in payload bytes 8..16 (`CLOCK_REALTIME`): sender → worker. Events
    /// without a stamp (payload shorter than 16 bytes) are counted as unstamped.
    Payload,
}

/// Writes the stamp into the first [`STAMP_LEN`] bytes of `payload`.
///
/// # Panics
/// If `payload` is shorter than [`STAMP_LEN`]; the blaster sizes its payloads first.
pub fn write_stamp(payload: &mut [u8], seq: u64, send_ns: u64) {
    payload[..8].copy_from_slice(&seq.to_be_bytes());
    payload[8..STAMP_LEN].copy_from_slice(&send_ns.to_be_bytes());
}

/// The `(sequence, send time)` stamp of `payload`, if it is long enough to carry one.
pub fn read_stamp(payload: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let ns = u64::from_be_bytes(payload.get(8..STAMP_LEN)?.try_into().ok()?);
    Some((seq, ns))
}

/// `CLOCK_REALTIME` now, in nanoseconds since the Unix epoch (the stamp's clock; vDSO, no
/// syscall, no allocation).
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, SIGFIG).expect("constant bounds are valid")
}

/// Percentiles of a histogram, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantiles {
    /// Events recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value.
    pub max: u64,
}

/// A stage of an event's way through the appliance, timed on `CLOCK_MONOTONIC` (the
/// `stage` label of `eventstream_stage_latency_seconds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Receive stamp → the router took the event (inline: in the queue's own thread;
    /// pipelined: in the dispatcher, after the ingest → dispatcher ring). Sampled per batch.
    ReceiveToRouted = 0,
    /// The router handed the event on → a worker took it (pipelined mode: across the SPSC
    /// ring; inline mode runs the worker step inside the routing call, so nothing is recorded).
    /// Sampled per batch.
    RoutedToWorker = 1,
}

impl Stage {
    /// All stages, in index order.
    pub const ALL: [Stage; 2] = [Self::ReceiveToRouted, Self::RoutedToWorker];

    /// The label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ReceiveToRouted => "receive_to_routed",
            Self::RoutedToWorker => "routed_to_worker",
        }
    }
}

/// One histogram per [`Stage`], merged from the threads' own.
#[derive(Debug, Default)]
pub struct StageLatency {
    /// Indexed by `Stage as usize`.
    pub stages: [LatencyHistogram; Stage::ALL.len()],
}

impl StageLatency {
    /// The merged histogram of `stage`.
    pub fn get(&self, stage: Stage) -> &LatencyHistogram {
        &self.stages[stage as usize]
    }
}

/// The merged latency histogram of all threads recording one measure (read by /metrics and
/// the report), with the exact sum of what was recorded.
#[derive(Debug)]
pub struct LatencyHistogram {
    merged: Mutex<Merged>,
}

#[derive(Debug)]
struct Merged {
    hist: Histogram<u64>,
    sum_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            merged: Mutex::new(Merged {
                hist: new_histogram(),
                sum_ns: 0,
            }),
        }
    }
}

/// A histogram read for exposition: cumulative counts at each bound, count and sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// Upper bounds, in nanoseconds, ascending.
    pub bounds_ns: Vec<u64>,
    /// Events at or below each bound.
    pub cumulative: Vec<u64>,
    /// Events recorded.
    pub count: u64,
    /// Sum of what was recorded, in nanoseconds.
    pub sum_ns: u64,
}

impl LatencyHistogram {
    fn lock(&self) -> std::sync::MutexGuard<'_, Merged> {
        // A worker that panicked mid-merge leaves counts that are still counts.
        self.merged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The histogram at `bounds_ns` (ascending), with its count and sum.
    pub fn buckets(&self, bounds_ns: &[u64]) -> Buckets {
        let (cumulative, count) = self.cumulative(bounds_ns);
        Buckets {
            bounds_ns: bounds_ns.to_vec(),
            cumulative,
            count,
            sum_ns: self.lock().sum_ns,
        }
    }

    /// p50 / p99 / p99.9 / max of everything merged so far.
    pub fn quantiles(&self) -> Quantiles {
        let m = self.lock();
        let h = &m.hist;
        Quantiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    /// Cumulative counts at each upper bound of `bounds_ns` (ascending), for a Prometheus
    /// histogram; the last element is the total.
    pub fn cumulative(&self, bounds_ns: &[u64]) -> (Vec<u64>, u64) {
        let m = self.lock();
        let h = &m.hist;
        let mut out = vec![0u64; bounds_ns.len()];
        for v in h.iter_recorded() {
            let value = v.value_iterated_to();
            let first = bounds_ns.partition_point(|&b| b < value);
            for slot in &mut out[first..] {
                *slot += v.count_since_last_iteration();
            }
        }
        (out, h.len())
    }
}

/// Sub-buckets per power of two in [`LocalLatency`]: 256, so a recorded value is off by at
/// most 1/256 (0.4 %) of itself; below 512 ns every nanosecond has its own bucket.
const LOCAL_SUB_BITS: u32 = 8;

/// Buckets of [`LocalLatency`]: enough for [`MAX_LATENCY_NS`] (< 2^36).
const LOCAL_BUCKETS: usize = (36 - LOCAL_SUB_BITS as usize + 1) << LOCAL_SUB_BITS;

/// The bucket of `v` (at most [`MAX_LATENCY_NS`]): `v` itself below 512, else the top nine
/// bits of `v` and its power of two. A leading-zero count, a shift and an add.
#[inline(always)]
const fn local_bucket(v: u64) -> usize {
    if v < 2 << LOCAL_SUB_BITS {
        v as usize
    } else {
        let shift = 63 - LOCAL_SUB_BITS - v.leading_zeros();
        ((shift as usize) << LOCAL_SUB_BITS) + (v >> shift) as usize
    }
}

/// The largest value bucket `i` holds (what it is merged as).
const fn local_value(i: usize) -> u64 {
    if i < 2 << LOCAL_SUB_BITS {
        i as u64
    } else {
        let shift = (i >> LOCAL_SUB_BITS) as u32 - 1;
        let m = (i - ((shift as usize) << LOCAL_SUB_BITS)) as u64;
        ((m + 1) << shift) - 1
    }
}

/// One worker's private histogram: a flat array of log-linear buckets, so a record is a
/// bucket index and an add (no bounds growth, no min/max upkeep); it is folded into the shared
/// HDR histogram at most every [`MERGE_INTERVAL_NS`].
#[derive(Debug)]
pub struct LocalLatency {
    counts: Box<[u64]>,
    /// Values recorded since the last merge.
    len: u64,
    sum_ns: u64,
    last_merge_ns: u64,
    /// Events that carried no stamp (with [`LatencyFrom::Payload`]).
    pub unstamped: u64,
}

impl Default for LocalLatency {
    fn default() -> Self {
        Self {
            counts: vec![0; LOCAL_BUCKETS].into_boxed_slice(),
            len: 0,
            sum_ns: 0,
            last_merge_ns: 0,
            unstamped: 0,
        }
    }
}

impl LocalLatency {
    /// Records one latency (saturating at [`MAX_LATENCY_NS`]; 0 counts as 1 ns).
    #[inline]
    pub fn record(&mut self, ns: u64) {
        let ns = ns.clamp(1, MAX_LATENCY_NS);
        self.counts[local_bucket(ns)] += 1;
        self.len += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Values recorded and not yet merged.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing waits to be merged.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Folds the local counts into `shared` if [`MERGE_INTERVAL_NS`] has passed (or `force`),
    /// without waiting for a busy lock unless `force`. Allocation-free: each bucket is recorded
    /// into the shared histogram as its largest value.
    pub fn merge_into(&mut self, shared: &LatencyHistogram, now_ns: u64, force: bool) {
        if self.len == 0
            || (!force && now_ns.saturating_sub(self.last_merge_ns) < MERGE_INTERVAL_NS)
        {
            return;
        }
        let guard = if force {
            Some(shared.lock())
        } else {
            shared.merged.try_lock().ok()
        };
        if let Some(mut merged) = guard {
            let mut left = self.len;
            for (i, c) in self.counts.iter_mut().enumerate() {
                if *c != 0 {
                    let n = core::mem::take(c);
                    merged.hist.saturating_record_n(local_value(i), n);
                    left = left.saturating_sub(n);
                    if left == 0 {
                        break;
                    }
                }
            }
            merged.sum_ns = merged
                .sum_ns
                .saturating_add(core::mem::take(&mut self.sum_ns));
            self.len = 0;
            self.last_merge_ns = now_ns;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_and_needs_sixteen_bytes() {
        let mut p = [0u8; 20];
        write_stamp(&mut p, 7, 1_700_000_000_123_456_789);
        assert_eq!(read_stamp(&p), Some((7, 1_700_000_000_123_456_789)));
        assert_eq!(read_stamp(&p[..15]), None);
        assert_eq!(&p[..8], &7u64.to_be_bytes());
    }

    #[test]
    fn quantiles_and_buckets_from_merged_workers() {
        let shared = LatencyHistogram::default();
        let mut a = LocalLatency::default();
        let mut b = LocalLatency::default();
        for i in 1..=900u64 {
            a.record(i * 1_000); // 1..900 µs
        }
        for _ in 0..100 {
            b.record(50_000_000); // 50 ms
        }
        a.merge_into(&shared, MERGE_INTERVAL_NS, false);
        b.merge_into(&shared, 0, true);
        let q = shared.quantiles();
        assert_eq!(q.count, 1000);
        assert!((499_000..=501_000).contains(&q.p50), "{q:?}");
        assert!((49_900_000..=50_100_000).contains(&q.p99), "{q:?}");
        let (cum, total) = shared.cumulative(&[1_000_000, 100_000_000]);
        assert_eq!(cum, vec![900, 1000]);
        assert_eq!(total, 1000);
        let b = shared.buckets(&[1_000_000]);
        assert_eq!((b.cumulative, b.count), (vec![900], 1000));
        assert_eq!(
            b.sum_ns,
            (1..=900u64).sum::<u64>() * 1_000 + 100 * 50_000_000
        );
    }

    #[test]
    fn merge_waits_for_its_interval_unless_forced() {
        let shared = LatencyHistogram::default();
        let mut a = LocalLatency::default();
        a.record(10);
        a.merge_into(&shared, MERGE_INTERVAL_NS, false);
        a.record(20);
        a.merge_into(&shared, MERGE_INTERVAL_NS + 1, false);
        assert_eq!(shared.quantiles().count, 1);
        a.merge_into(&shared, MERGE_INTERVAL_NS + 1, true);
        assert_eq!(shared.quantiles().count, 2);
        assert!(a.is_empty());
    }

    #[test]
    fn local_buckets_cover_every_value_within_their_precision() {
        let mut last = 0;
        let mut v = 1u64;
        while v <= MAX_LATENCY_NS {
            let i = local_bucket(v);
            assert!(i < LOCAL_BUCKETS, "{v}");
            assert!(i >= last, "buckets rise with the value");
            last = i;
            let top = local_value(i);
            assert!(
                top >= v && (top - v) * 256 <= v,
                "{v} -> bucket {i} up to {top}"
            );
            assert_eq!(local_bucket(top), i, "{v}: a bucket's top value is in it");
            v += 1 + v / 97;
        }
        assert_eq!(local_bucket(511), 511);
        assert_eq!(local_value(local_bucket(512)), 513);
    }
}
