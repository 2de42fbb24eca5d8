//! Duplicate suppression for the transactional worker.
//!
//! The key is a 64-bit hash of (topic, payload) by default, or the first 8 payload bytes (u64 BE)
//! for routes that say events carry their id there (PROTOCOL.md). In pipelined mode the
//! dispatcher routes the transactional class by topic hash, so a key always reaches the same
//! worker, and each worker owns its own [`DedupWindow`]: no sharing, no locks. In inline mode
//! every receive queue's thread runs the transactional step itself, so they share one
//! [`SharedDedupWindow`]: the same table, each slot one 128-bit word `(key, last_seen)` changed
//! only by compare-and-swap (the original engine's CAS deduplicator), so a key always meets the
//! same window whichever queue it arrives on. Neither allocates after start.
//!
//! The window is an open-addressing table of `(key, last_seen)` with linear probing over a short
//! run of slots. A slot whose time is older than the window is free. When every slot of a run is
//! live, the oldest one is evicted and counted: an evicted key can be delivered again, so size
//! the table for the window's traffic (`capacity` >= keys per window).

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// How a route's events are identified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyFrom {
    /// A 64-bit hash of topic and payload.
    #[default]
    TopicAndPayload,
    /// The first 8 payload bytes, big-endian (events shorter than that fall back to the hash).
    PayloadId,
}

/// The dedup key of an event.
#[inline]
pub fn key(from: KeyFrom, topic: &str, payload: &[u8]) -> u64 {
    if from == KeyFrom::PayloadId
        && let Some(id) = payload.first_chunk::<8>()
    {
        return u64::from_be_bytes(*id);
    }
    xxh3_64_with_seed(payload, xxh3_64(topic.as_bytes()))
}

/// Sets what a routed event is known by: the dedup key for the transactional class, and for
/// `key: payload_id` routes (any class) the sender's id, which then is the event's id in every
/// sink (two appliances receiving the same event name it alike).
#[inline(always)]
pub fn identify(ev: &mut crate::wire::event::Event<'_>, target: crate::engine::Target) {
    let by_sender = target.key == KeyFrom::PayloadId;
    if by_sender || target.class == crate::engine::WorkerClass::Transactional {
        ev.key = key(target.key, ev.topic(), ev.payload());
        ev.id_from_payload = by_sender && ev.payload().len() >= 8;
    }
}

/// Slots probed per lookup.
const PROBE: usize = 16;
/// Marks a slot never used (`last_seen` is always at least 1).
const EMPTY: u64 = 0;

/// Keys seen within the last `window_ns`.
#[derive(Debug)]
pub struct DedupWindow {
    keys: Box<[u64]>,
    seen: Box<[u64]>,
    mask: usize,
    window_ns: u64,
    evictions: u64,
}

impl DedupWindow {
    /// A table of at least `capacity` slots (a power of two), allocated now.
    ///
    /// # Panics
    /// If `capacity` is zero.
    pub fn new(capacity: usize, window_ns: u64) -> Self {
        assert!(capacity > 0);
        let n = capacity.next_power_of_two().max(PROBE);
        Self {
            keys: vec![0; n].into_boxed_slice(),
            seen: vec![EMPTY; n].into_boxed_slice(),
            mask: n - 1,
            window_ns,
            evictions: 0,
        }
    }

    /// Live keys evicted because their run was full (each may be delivered again).
    pub const fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Records `key` at `now_ns`; returns `true` if it was already seen within the window (a
    /// duplicate, not to be delivered). `now_ns` must not go backwards.
    #[inline]
    pub fn check_and_insert(&mut self, key: u64, now_ns: u64) -> bool {
        let now = now_ns.max(1);
        let start = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7) as usize;
        let mut free = None;
        let mut oldest = start & self.mask;
        for i in 0..PROBE {
            let s = (start + i) & self.mask;
            let live = self.seen[s] != EMPTY && now - self.seen[s].min(now) < self.window_ns;
            if live && self.keys[s] == key {
                self.seen[s] = now;
                return true;
            }
            if !live && free.is_none() {
                free = Some(s);
            }
            if self.seen[s] < self.seen[oldest] {
                oldest = s;
            }
        }
        let slot = free.unwrap_or_else(|| {
            self.evictions += 1;
            oldest
        });
        self.keys[slot] = key;
        self.seen[slot] = now;
        false
    }

    /// Takes `key` out of the window (its event was not kept after all: a sink refused it), so
    /// the sender's retry is delivered rather than dropped as a duplicate.
    pub fn forget(&mut self, key: u64) {
        let start = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7) as usize;
        for i in 0..PROBE {
            let s = (start + i) & self.mask;
            if self.seen[s] != EMPTY && self.keys[s] == key {
                self.seen[s] = EMPTY;
                return;
            }
        }
    }
}

/// [`DedupWindow`]'s table shared by every thread that runs the transactional step, lock-free.
///
/// Each slot is one `AtomicU128` holding `(key << 64) | last_seen`, so a key and its time change
/// together. A lookup walks the same probe run as [`DedupWindow`]; a live slot with the key is a
/// duplicate (its time is moved forward by CAS), the first free slot is claimed by CAS from
/// exactly the value that was read. A lost race re-reads that slot and decides again, so two
/// threads inserting one key concurrently both see it in the same slot: one inserts, the other
/// finds a duplicate.
#[derive(Debug)]
pub struct SharedDedupWindow {
    slots: Box<[portable_atomic::AtomicU128]>,
    mask: usize,
    window_ns: u64,
    evictions: portable_atomic::AtomicU64,
}

impl SharedDedupWindow {
    /// A table of at least `capacity` slots (a power of two), allocated now.
    ///
    /// # Panics
    /// If `capacity` is zero.
    pub fn new(capacity: usize, window_ns: u64) -> Self {
        assert!(capacity > 0);
        let n = capacity.next_power_of_two().max(PROBE);
        Self {
            slots: (0..n)
                .map(|_| portable_atomic::AtomicU128::new(0))
                .collect(),
            mask: n - 1,
            window_ns,
            evictions: portable_atomic::AtomicU64::new(0),
        }
    }

    /// Live keys evicted because their run was full.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(core::sync::atomic::Ordering::Relaxed)
    }

    /// As [`DedupWindow::check_and_insert`], from any thread.
    #[inline]
    pub fn check_and_insert(&self, key: u64, now_ns: u64) -> bool {
        use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
        let now = now_ns.max(1);
        let pack = |seen: u64| (u128::from(key) << 64) | u128::from(seen);
        let start = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7) as usize;
        'retry: loop {
            let mut oldest: Option<(usize, u128)> = None;
            for i in 0..PROBE {
                let s = (start + i) & self.mask;
                let mut cur = self.slots[s].load(Acquire);
                loop {
                    let (k, seen) = ((cur >> 64) as u64, cur as u64);
                    let live = seen != EMPTY && now - seen.min(now) < self.window_ns;
                    if live && k == key {
                        // Seen again: move its time forward (a later time from another thread
                        // may already be there; either keeps it inside the window).
                        if seen < now {
                            let _ = self.slots[s].compare_exchange(cur, pack(now), AcqRel, Relaxed);
                        }
                        return true;
                    }
                    if live {
                        if oldest.is_none_or(|(_, o)| (o as u64) > seen) {
                            oldest = Some((s, cur));
                        }
                        break;
                    }
                    // Free (never used or expired): claim it from exactly what was read.
                    match self.slots[s].compare_exchange(cur, pack(now), AcqRel, Acquire) {
                        Ok(_) => return false,
                        Err(now_there) => cur = now_there, // decide again on the new value
                    }
                }
            }
            // The whole run is live: evict the oldest, unless it changed meanwhile.
            let (s, cur) = oldest.expect("PROBE > 0");
            if self.slots[s]
                .compare_exchange(cur, pack(now), AcqRel, Relaxed)
                .is_ok()
            {
                self.evictions.fetch_add(1, Relaxed);
                return false;
            }
            continue 'retry;
        }
    }

    /// As [`DedupWindow::forget`], from any thread: the slot holding `key` is freed by CAS from
    /// exactly what was read (a slot another thread took meanwhile is left alone).
    pub fn forget(&self, key: u64) {
        use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
        let start = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7) as usize;
        for i in 0..PROBE {
            let s = (start + i) & self.mask;
            let cur = self.slots[s].load(Acquire);
            if (cur >> 64) as u64 == key && cur as u64 != EMPTY {
                let _ = self.slots[s].compare_exchange(cur, 0, AcqRel, Relaxed);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn duplicates_within_the_window_only() {
        let mut w = DedupWindow::new(1024, 10 * SEC);
        assert!(!w.check_and_insert(42, SEC));
        assert!(w.check_and_insert(42, 2 * SEC));
        assert!(!w.check_and_insert(43, 2 * SEC));
        assert!(
            w.check_and_insert(42, 11 * SEC),
            "seen again at 2 s, so still inside at 11 s"
        );
        assert!(
            !w.check_and_insert(42, 22 * SEC),
            "expired after the window"
        );
        assert_eq!(w.evictions(), 0);
    }

    #[test]
    fn a_forgotten_key_is_new_again_in_both_tables() {
        let mut own = DedupWindow::new(64, 10 * SEC);
        let shared = SharedDedupWindow::new(64, 10 * SEC);
        for k in [1u64, 2, 3] {
            assert!(!own.check_and_insert(k, SEC));
            assert!(!shared.check_and_insert(k, SEC));
        }
        own.forget(2);
        shared.forget(2);
        assert!(
            !own.check_and_insert(2, 2 * SEC),
            "a refused event's retry is delivered"
        );
        assert!(!shared.check_and_insert(2, 2 * SEC));
        assert!(own.check_and_insert(1, 2 * SEC) && own.check_and_insert(3, 2 * SEC));
        assert!(shared.check_and_insert(1, 2 * SEC) && shared.check_and_insert(3, 2 * SEC));
    }

    #[test]
    fn keys_from_payload_id_or_hash() {
        let mut id = 7u64.to_be_bytes().to_vec();
        id.extend_from_slice(b"rest");
        assert_eq!(key(KeyFrom::PayloadId, "t", &id), 7);
        assert_eq!(
            key(KeyFrom::PayloadId, "t", b"short"),
            key(KeyFrom::TopicAndPayload, "t", b"short")
        );
        assert_ne!(
            key(KeyFrom::TopicAndPayload, "a", b"x"),
            key(KeyFrom::TopicAndPayload, "b", b"x")
        );
        assert_ne!(
            key(KeyFrom::TopicAndPayload, "ab", b"c"),
            key(KeyFrom::TopicAndPayload, "a", b"bc")
        );
    }

    #[test]
    fn a_full_table_evicts_the_oldest_and_counts_it() {
        let mut w = DedupWindow::new(16, 100 * SEC);
        for k in 0..16u64 {
            assert!(!w.check_and_insert(k, SEC + k));
        }
        assert!(!w.check_and_insert(100, 50 * SEC));
        assert_eq!(w.evictions(), 1);
        assert!(
            !w.check_and_insert(0, 51 * SEC),
            "key 0 was the oldest and was evicted"
        );
        for k in 2..16u64 {
            assert!(
                w.check_and_insert(k, 52 * SEC),
                "key {k} is still remembered"
            );
        }
    }

    #[test]
    fn the_shared_window_agrees_with_the_owned_one() {
        let mut own = DedupWindow::new(64, 10 * SEC);
        let shared = SharedDedupWindow::new(64, 10 * SEC);
        let mut x = 0x1234_5678_u64;
        for t in 0..2_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = x % 97;
            let now = SEC + t * (SEC / 50);
            assert_eq!(
                own.check_and_insert(k, now),
                shared.check_and_insert(k, now),
                "key {k} at {t}"
            );
        }
        assert_eq!(own.evictions(), shared.evictions());
    }

    #[test]
    fn the_shared_window_admits_a_key_once_across_threads() {
        let w = SharedDedupWindow::new(1 << 12, 60 * SEC);
        let keys = if cfg!(miri) { 50u64 } else { 1_000 };
        let firsts = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for k in 0..keys {
                        if !w.check_and_insert(k, SEC) {
                            firsts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(firsts.into_inner(), keys, "each key admitted exactly once");
        assert_eq!(w.evictions(), 0);
    }

    #[test]
    fn many_distinct_keys_are_never_false_duplicates() {
        let mut w = DedupWindow::new(1 << 17, 60 * SEC);
        for k in 0..50_000u64 {
            assert!(!w.check_and_insert(key(KeyFrom::TopicAndPayload, "t", &k.to_le_bytes()), SEC));
        }
        for k in 0..50_000u64 {
            assert!(w.check_and_insert(
                key(KeyFrom::TopicAndPayload, "t", &k.to_le_bytes()),
                2 * SEC
            ));
        }
        assert_eq!(
            w.evictions(),
            0,
            "a table at 40% load never fills a probe run here"
        );
    }
}
