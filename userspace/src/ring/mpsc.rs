//! Dmitry Vyukov's bounded multi-producer single-consumer queue: the ingest → dispatcher queue,
//! and the return path of released UMEM/receive frames to the ingest thread that owns them.
//!
//! Each slot carries a sequence stamp that says whose turn it is. For the position `pos` that
//! maps to the slot (`pos & mask`):
//! - `seq == pos`: the slot is free for the producer that claims `pos`;
//! - `seq == pos + 1`: the slot holds the value written for `pos`, ready for the consumer;
//! - `seq == pos - capacity + 1` (i.e. less than `pos`): the consumer has not yet emptied the
//!   slot from the previous lap, so the queue is full at `pos`.
//!
//! Producers claim a position with one CAS on `tail`; the consumer needs no read-modify-write at
//! all. A producer that has claimed a slot but not yet stamped it makes the consumer see "empty"
//! at that slot until it does, which is the algorithm's one (short) blocking window.
//!
//! [`channel`] gives safe split handles. [`MpscQueue`] is the shared core, whose consuming
//! methods are `unsafe` because the single-consumer rule is the caller's to keep; the frame
//! arena uses it directly with that rule enforced by its owner type.

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::{Backoff, CachePadded};

struct Slot<T> {
    /// Sequence stamp; see the module docs. Written with Release after the value moves in or
    /// out, read with Acquire before the value is touched.
    seq: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// The shared queue. Producers call [`MpscQueue::push`] from any thread; exactly one thread at a
/// time may consume.
pub struct MpscQueue<T> {
    /// Next position a producer claims. Advanced only by a successful CAS of a producer that saw
    /// the slot free (`seq == pos`).
    tail: CachePadded<AtomicUsize>,
    /// Next position the consumer reads. Written only by the consumer (Relaxed: producers never
    /// read it; it is published for [`MpscQueue::len`] alone). Slot stamps do the synchronising.
    head: CachePadded<AtomicUsize>,
    slots: Box<[Slot<T>]>,
    mask: usize,
}

// SAFETY: values move from producers to the one consumer, each slot handed over by its stamp
// with Release/Acquire; nothing is shared by reference, so `T: Send` suffices.
unsafe impl<T: Send> Sync for MpscQueue<T> {}
// SAFETY: as above; the queue owns its values.
unsafe impl<T: Send> Send for MpscQueue<T> {}

impl<T> MpscQueue<T> {
    /// A queue with room for at least `capacity` items (rounded up to a power of two).
    ///
    /// # Panics
    /// If `capacity` is zero or too large to round up.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "queue capacity must be positive");
        let capacity = capacity
            .checked_next_power_of_two()
            .expect("queue capacity too large");
        assert!(capacity <= usize::MAX / 4, "queue capacity too large");
        let slots = (0..capacity)
            .map(|i| Slot {
                seq: AtomicUsize::new(i),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        Self {
            tail: CachePadded::new(AtomicUsize::new(0)),
            head: CachePadded::new(AtomicUsize::new(0)),
            slots,
            mask: capacity - 1,
        }
    }

    /// Slots in the queue.
    pub const fn capacity(&self) -> usize {
        self.mask + 1
    }

    #[inline]
    fn slot(&self, pos: usize) -> &Slot<T> {
        debug_assert_eq!(self.slots.len(), self.mask + 1);
        // SAFETY: `pos & mask < mask + 1 == slots.len()` (set in `new`): always in bounds.
        unsafe { self.slots.get_unchecked(pos & self.mask) }
    }

    /// Approximate number of queued items (exact when no operation is in flight).
    pub fn len(&self) -> usize {
        let tail = self.tail.load(Ordering::Relaxed);
        let head = self.head.load(Ordering::Relaxed);
        tail.wrapping_sub(head).min(self.capacity())
    }

    /// Whether the queue looks empty (see [`MpscQueue::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `value` from any thread, or hands it back when the queue is full.
    ///
    /// # Errors
    /// `Err(value)` when the queue is full.
    #[inline]
    pub fn push(&self, value: T) -> Result<(), T> {
        let backoff = Backoff::new();
        let mut pos = self.tail.load(Ordering::Relaxed);
        loop {
            let slot = self.slot(pos);
            let seq = slot.seq.load(Ordering::Acquire);
            // Reinterpreting the wrapped difference as signed orders stamps across the wrap.
            let diff = seq.wrapping_sub(pos) as isize;
            if diff == 0 {
                match self.tail.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: the CAS made this producer the only owner of position `pos`,
                        // and `seq == pos` (Acquire) says the consumer has moved the previous
                        // lap's value out; nobody reads the slot until the stamp below.
                        unsafe { (*slot.value.get()).write(value) };
                        slot.seq.store(pos.wrapping_add(1), Ordering::Release);
                        return Ok(());
                    }
                    Err(current) => {
                        pos = current;
                        backoff.spin();
                    }
                }
            } else if diff < 0 {
                return Err(value);
            } else {
                // Another producer claimed `pos` first; catch up.
                pos = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Removes the oldest item, if one is ready.
    ///
    /// # Safety
    /// No other thread may run `pop` or `pop_batch` on this queue at the same time.
    #[inline]
    pub unsafe fn pop(&self) -> Option<T> {
        let pos = self.head.load(Ordering::Relaxed);
        let slot = self.slot(pos);
        if slot.seq.load(Ordering::Acquire) != pos.wrapping_add(1) {
            return None;
        }
        // SAFETY: the stamp `pos + 1` (Acquire) says the producer of `pos` wrote the value and
        // released it; the caller guarantees we are the only consumer, so it is moved out once.
        let value = unsafe { (*slot.value.get()).assume_init_read() };
        slot.seq
            .store(pos.wrapping_add(self.mask + 1), Ordering::Release);
        self.head.store(pos.wrapping_add(1), Ordering::Relaxed);
        Some(value)
    }

    /// Pops up to `max` items, handing each to `f`; returns how many were popped.
    ///
    /// # Safety
    /// As for [`MpscQueue::pop`].
    #[inline]
    pub unsafe fn pop_batch(&self, max: usize, mut f: impl FnMut(T)) -> usize {
        let mut n = 0;
        while n < max {
            // SAFETY: the caller's single-consumer guarantee carries over.
            match unsafe { self.pop() } {
                Some(v) => f(v),
                None => break,
            }
            n += 1;
        }
        n
    }
}

impl<T> Drop for MpscQueue<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no producer or consumer can be running.
        while unsafe { self.pop() }.is_some() {}
    }
}

impl<T> fmt::Debug for MpscQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpscQueue")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .finish()
    }
}

/// Creates a queue with safe split handles: any number of [`Producer`]s (cloneable), one
/// [`Consumer`].
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let q = Arc::new(MpscQueue::new(capacity));
    (Producer { q: Arc::clone(&q) }, Consumer { q })
}

/// A producing handle. Clone one per producer thread.
pub struct Producer<T> {
    q: Arc<MpscQueue<T>>,
}

impl<T> Clone for Producer<T> {
    fn clone(&self) -> Self {
        Self {
            q: Arc::clone(&self.q),
        }
    }
}

impl<T> Producer<T> {
    /// See [`MpscQueue::push`].
    ///
    /// # Errors
    /// `Err(value)` when the queue is full.
    #[inline]
    pub fn push(&self, value: T) -> Result<(), T> {
        self.q.push(value)
    }

    /// Approximate queue depth.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether the queue looks empty.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Slots in the queue.
    pub fn capacity(&self) -> usize {
        self.q.capacity()
    }
}

/// The consuming handle: `Send`, not `Clone`, so there is only ever one.
pub struct Consumer<T> {
    q: Arc<MpscQueue<T>>,
}

impl<T> Consumer<T> {
    /// Removes the oldest item, if one is ready.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        // SAFETY: `Consumer` is not `Clone` or `Sync` and `pop` takes `&mut self`: one consumer.
        unsafe { self.q.pop() }
    }

    /// Pops up to `max` items into `f`; returns how many.
    #[inline]
    pub fn pop_batch(&mut self, max: usize, f: impl FnMut(T)) -> usize {
        // SAFETY: as in `pop`.
        unsafe { self.q.pop_batch(max, f) }
    }

    /// Approximate queue depth.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether the queue looks empty.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Slots in the queue.
    pub fn capacity(&self) -> usize {
        self.q.capacity()
    }

    /// Whether every producer has been dropped (items may still be queued).
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.q) == 1
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("mpsc::Producer").field(&*self.q).finish()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("mpsc::Consumer").field(&*self.q).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn scaled(n: usize) -> usize {
        if cfg!(miri) { n / 2000 + 10 } else { n }
    }

    #[test]
    fn fifo_full_and_empty() {
        let (p, mut c) = channel::<u32>(3);
        assert_eq!(p.capacity(), 4);
        for i in 0..4 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(4), Err(4));
        assert_eq!(p.len(), 4);
        assert_eq!(c.pop(), Some(0));
        p.push(4).unwrap();
        let mut got = Vec::new();
        assert_eq!(c.pop_batch(10, |v| got.push(v)), 4);
        assert_eq!(got, [1, 2, 3, 4]);
        assert_eq!(c.pop(), None);
        assert!(c.is_empty());
    }

    #[test]
    fn wraps_many_laps() {
        let (p, mut c) = channel::<usize>(2);
        for i in 0..scaled(10_000) {
            p.push(i).unwrap();
            p.push(i + 1).unwrap();
            assert_eq!(c.pop(), Some(i));
            assert_eq!(c.pop(), Some(i + 1));
        }
    }

    #[test]
    fn drop_releases_queued_values() {
        let marker = Arc::new(());
        let (p, c) = channel::<Arc<()>>(8);
        for _ in 0..5 {
            p.push(Arc::clone(&marker)).unwrap();
        }
        assert!(!c.is_abandoned());
        drop(p);
        assert!(c.is_abandoned());
        drop(c);
        assert_eq!(Arc::strong_count(&marker), 1);
    }

    #[test]
    fn many_producers_no_loss_no_dup_per_producer_order() {
        const PRODUCERS: usize = 4;
        let per = scaled(200_000);
        let (p, mut c) = channel::<(usize, usize)>(128);
        let handles: Vec<_> = (0..PRODUCERS)
            .map(|id| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        let mut v = (id, i);
                        while let Err(back) = p.push(v) {
                            v = back;
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        drop(p);
        let mut next = [0usize; PRODUCERS];
        let mut total = 0;
        while total < PRODUCERS * per {
            let n = c.pop_batch(64, |(id, i)| {
                assert_eq!(i, next[id], "producer {id} out of order");
                next[id] += 1;
            });
            total += n;
            if n == 0 {
                std::thread::yield_now();
            }
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(next, [per; PRODUCERS]);
        assert_eq!(c.pop(), None);
    }
}
