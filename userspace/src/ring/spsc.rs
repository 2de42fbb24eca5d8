//! Bounded single-producer single-consumer ring: the dispatcher → worker queues.
//!
//! The layout follows rtrb and firedancer's tango rings: two monotonically increasing indices on
//! their own cache lines, each side keeping a private copy of the other side's index so that the
//! shared line is read only when the cached copy says the ring is full (producer) or empty
//! (consumer). Batch operations publish their index once per batch.
//!
//! Indices are `usize` and wrap; the slot of index `i` is `i & mask`. Because the capacity is a
//! power of two, `tail.wrapping_sub(head)` is the number of occupied slots even across the wrap.

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

struct Shared<T> {
    /// Index of the next slot the consumer reads. Written only by the consumer, with `Release`
    /// after it has moved the value out; read by the producer with `Acquire` to learn that the
    /// slot may be overwritten. May lag the consumer's own `head` (never lead it).
    head: CachePadded<AtomicUsize>,
    /// Index of the next slot the producer writes. Written only by the producer, with `Release`
    /// after the value is written; read by the consumer with `Acquire`. May lag the producer's
    /// own `tail` (never lead it).
    tail: CachePadded<AtomicUsize>,
    /// `mask + 1` slots. Invariant: slots with indices in `consumer.head..producer.tail` hold
    /// initialised values; all others are uninitialised.
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
}

// SAFETY: the ring moves `T`s between exactly two threads, and each slot is accessed by one side
// at a time (the index protocol above hands it over with Release/Acquire), so `T: Send` suffices.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    #[inline]
    fn slot(&self, index: usize) -> *mut MaybeUninit<T> {
        debug_assert_eq!(self.slots.len(), self.mask + 1);
        // SAFETY: `index & mask < mask + 1 == slots.len()` (the constructor's invariant), so
        // this is in bounds; it skips a bounds check on the hot path.
        unsafe { self.slots.get_unchecked(index & self.mask) }.get()
    }

    const fn capacity(&self) -> usize {
        self.mask + 1
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Both handles are gone, so their final indices were published (handles publish on every
        // operation; batch guards publish on drop, and a leaked guard only leaks items).
        let head = *self.head.get_mut();
        let tail = *self.tail.get_mut();
        let mut i = head;
        while i != tail {
            // SAFETY: indices in `head..tail` hold initialised values (field invariant), each
            // dropped once here, with exclusive access through `&mut self`.
            unsafe { (*self.slot(i)).assume_init_drop() };
            i = i.wrapping_add(1);
        }
    }
}

/// Creates a ring with room for at least `capacity` items (rounded up to a power of two).
///
/// # Panics
/// If `capacity` is zero or rounds past `usize::MAX / 2`.
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(capacity > 0, "ring capacity must be positive");
    let capacity = capacity
        .checked_next_power_of_two()
        .expect("ring capacity too large");
    assert!(capacity <= usize::MAX / 2, "ring capacity too large");
    let slots = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        slots,
        mask: capacity - 1,
    });
    (
        Producer {
            shared: Arc::clone(&shared),
            tail: 0,
            cached_head: 0,
        },
        Consumer {
            shared,
            head: 0,
            cached_tail: 0,
        },
    )
}

/// The writing end. `Send`, not `Clone`.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    /// The producer's own tail: authoritative, published to `shared.tail`.
    tail: usize,
    /// Last `shared.head` this side read. Invariant: `tail - cached_head <= capacity`.
    cached_head: usize,
}

/// The reading end. `Send`, not `Clone`.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// The consumer's own head: authoritative, published to `shared.head`.
    head: usize,
    /// Last `shared.tail` this side read. Invariant: `head <= cached_tail` (mod wrap).
    cached_tail: usize,
}

impl<T> Producer<T> {
    /// Free slots as far as this side knows, refreshing its copy of the consumer's index.
    pub fn slots(&mut self) -> usize {
        self.cached_head = self.shared.head.load(Ordering::Acquire);
        self.shared.capacity() - self.tail.wrapping_sub(self.cached_head)
    }

    #[inline]
    fn free_cached(&self) -> usize {
        self.shared.capacity() - self.tail.wrapping_sub(self.cached_head)
    }

    /// Appends `value`, or hands it back when the ring is full.
    ///
    /// # Errors
    /// `Err(value)` when the ring is full.
    #[inline]
    pub fn push(&mut self, value: T) -> Result<(), T> {
        if self.free_cached() == 0 && self.slots() == 0 {
            return Err(value);
        }
        // SAFETY: a free slot (`tail - head < capacity`) is not in `head..tail`, so the consumer
        // does not touch it until `tail` is published below; we are its only writer.
        unsafe { (*self.shared.slot(self.tail)).write(value) };
        self.tail = self.tail.wrapping_add(1);
        self.shared.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Moves items from `items` into the ring while there is room, publishing once; returns how
    /// many were pushed. Items are taken from the iterator only when there is a slot for them, so
    /// passing `&mut iter` leaves the rest in `iter`. If the iterator panics, the items it had
    /// already yielded in this call are leaked (never dropped), not lost into the ring.
    #[inline]
    pub fn push_batch<I: IntoIterator<Item = T>>(&mut self, items: I) -> usize {
        let mut items = items.into_iter();
        let mut free = self.free_cached();
        if free < items.size_hint().0.max(1) {
            free = self.slots();
        }
        let shared = &*self.shared;
        let start = self.tail;
        let mut tail = start;
        for _ in 0..free {
            let Some(value) = items.next() else { break };
            // SAFETY: as in `push`: `tail - head < capacity`, so the slot is free, and it stays
            // unpublished until the store below.
            unsafe { (*shared.slot(tail)).write(value) };
            tail = tail.wrapping_add(1);
        }
        self.tail = tail;
        shared.tail.store(tail, Ordering::Release);
        tail.wrapping_sub(start)
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Whether the consumer has been dropped.
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.shared) == 1
    }
}

impl<T> Consumer<T> {
    /// Items ready to pop as far as this side knows, refreshing its copy of the producer's index.
    pub fn len(&mut self) -> usize {
        self.cached_tail = self.shared.tail.load(Ordering::Acquire);
        self.cached_tail.wrapping_sub(self.head)
    }

    /// Whether no item is ready (refreshes like [`Consumer::len`]).
    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    /// Removes the oldest item.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.head == self.cached_tail && self.is_empty() {
            return None;
        }
        // SAFETY: `head != tail`, so slot `head` holds a value the producer published with
        // Release (we loaded `tail` with Acquire); we move it out once and advance past it.
        let value = unsafe { (*self.shared.slot(self.head)).assume_init_read() };
        self.head = self.head.wrapping_add(1);
        self.shared.head.store(self.head, Ordering::Release);
        Some(value)
    }

    /// Pops up to `max` items through an iterator that publishes the consumer index once, when
    /// it is dropped. Items the iterator does not yield stay in the ring.
    pub fn pop_batch(&mut self, max: usize) -> PopBatch<'_, T> {
        let mut ready = self.cached_tail.wrapping_sub(self.head);
        if ready < max {
            ready = self.len();
        }
        PopBatch {
            left: ready.min(max),
            consumer: self,
        }
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Whether the producer has been dropped (items may still be queued).
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.shared) == 1
    }
}

/// Iterator from [`Consumer::pop_batch`].
///
/// The consumer's own index advances with each item, so leaking this iterator is safe: it only
/// delays telling the producer about the freed slots until the next pop.
pub struct PopBatch<'a, T> {
    consumer: &'a mut Consumer<T>,
    left: usize,
}

impl<T> Iterator for PopBatch<'_, T> {
    type Item = T;

    #[inline]
    fn next(&mut self) -> Option<T> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let c = &mut *self.consumer;
        // SAFETY: `left` was bounded by `cached_tail - head`, read with Acquire from the
        // producer's Release, so slot `head` holds a published value; moved out once.
        let value = unsafe { (*c.shared.slot(c.head)).assume_init_read() };
        c.head = c.head.wrapping_add(1);
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<T> ExactSizeIterator for PopBatch<'_, T> {}

impl<T> Drop for PopBatch<'_, T> {
    fn drop(&mut self) {
        self.consumer
            .shared
            .head
            .store(self.consumer.head, Ordering::Release);
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("spsc::Producer")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("spsc::Consumer")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl<T> fmt::Debug for PopBatch<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("spsc::PopBatch")
            .field("left", &self.left)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Scales iteration counts down under Miri, which runs ~1000x slower.
    const fn scaled(n: usize) -> usize {
        if cfg!(miri) { n / 1000 + 10 } else { n }
    }

    #[test]
    fn capacity_rounds_up_and_full_hands_the_value_back() {
        let (mut p, mut c) = channel::<u32>(3);
        assert_eq!(p.capacity(), 4);
        for i in 0..4 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(9), Err(9));
        assert_eq!(c.pop(), Some(0));
        p.push(4).unwrap();
        assert_eq!(
            (1..=4).map(|_| c.pop().unwrap()).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn batches_respect_room_and_leave_the_rest() {
        let (mut p, mut c) = channel::<u32>(8);
        let mut src = 0..20;
        assert_eq!(p.push_batch(&mut src), 8);
        assert_eq!(
            src.next(),
            Some(8),
            "items without room are left in the iterator"
        );
        let got: Vec<_> = c.pop_batch(5).collect();
        assert_eq!(got, [0, 1, 2, 3, 4]);
        assert_eq!(p.push_batch(100..110), 5);
        let got: Vec<_> = c.pop_batch(64).collect();
        assert_eq!(got, [5, 6, 7, 100, 101, 102, 103, 104]);
        assert!(c.is_empty());
    }

    #[test]
    fn partially_consumed_and_leaked_batches_are_sound() {
        let (mut p, mut c) = channel::<String>(4);
        assert_eq!(p.push_batch((0..4).map(|i| i.to_string())), 4);
        let mut b = c.pop_batch(4);
        assert_eq!(b.next().as_deref(), Some("0"));
        drop(b);
        let mut b = c.pop_batch(4);
        assert_eq!(b.next().as_deref(), Some("1"));
        core::mem::forget(b);
        // The producer has not been told yet, but the consumer never re-reads slot 1.
        assert_eq!(c.pop().as_deref(), Some("2"));
        assert_eq!(c.pop().as_deref(), Some("3"));
        assert_eq!(p.slots(), 4);
    }

    #[test]
    fn wraps_many_times() {
        let (mut p, mut c) = channel::<usize>(4);
        for i in 0..scaled(10_000) {
            p.push(i).unwrap();
            assert_eq!(c.pop(), Some(i));
        }
    }

    #[test]
    fn drops_queued_items_exactly_once() {
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct D;
        impl Drop for D {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (mut p, mut c) = channel::<D>(8);
        for _ in 0..6 {
            p.push(D).ok().unwrap();
        }
        drop(c.pop());
        drop(c.pop_batch(2).next());
        assert_eq!(DROPS.load(Ordering::Relaxed), 2);
        assert!(!p.is_abandoned());
        drop(c);
        assert!(p.is_abandoned());
        drop(p);
        assert_eq!(DROPS.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn cross_thread_order_and_no_loss() {
        let n = scaled(1_000_000);
        let (mut p, mut c) = channel::<usize>(64);
        let t = std::thread::spawn(move || {
            let mut i = 0;
            while i < n {
                if i % 3 == 0 {
                    let mut src = i..(i + 17).min(n);
                    i += p.push_batch(&mut src);
                } else if p.push(i).is_ok() {
                    i += 1;
                }
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let mut expect = 0;
        while expect < n {
            for v in c.pop_batch(7) {
                assert_eq!(v, expect);
                expect += 1;
            }
            if let Some(v) = c.pop() {
                assert_eq!(v, expect);
                expect += 1;
            }
        }
        t.join().unwrap();
        assert_eq!(c.pop(), None);
    }
}
