//! `EventPool`: a fixed-capacity object pool, allocated once, with O(1) lock-free acquire and
//! release from any thread.
//!
//! Free slots form a Treiber stack threaded through the slots by index. The stack head packs the
//! top index with a 32-bit tag that every successful CAS bumps, so a head that was popped and
//! pushed back between a thread's load and its CAS (ABA) makes the CAS fail. Slots live in one
//! boxed slice that never moves, so reading a slot's `next` link is always a read of valid atomic
//! memory, even when the link is stale (the tag check then discards it).
//!
//! A [`Pooled`] handle borrows the pool: the borrow checker proves the pool outlives every event,
//! with no reference count touched per event. Threads that carry events run inside
//! `std::thread::scope`. Dropping the handle drops the value in place and pushes the slot back;
//! the stack is LIFO, so the slot reused next is the one still warm in cache.

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::{ManuallyDrop, MaybeUninit};
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::numa::{self, Placement};

/// Default capacity (the original engine's 65 536-event pool).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// End of the free list.
const NIL: u32 = u32::MAX;

struct Slot<T> {
    /// Index of the next free slot while this one is free; meaningless while it is in use.
    next: AtomicU32,
    /// Initialised exactly while a [`Pooled`] handle for this slot exists.
    value: UnsafeCell<MaybeUninit<T>>,
}

/// A fixed-capacity pool of `T`s.
pub struct EventPool<T> {
    /// Top of the free stack: low 32 bits the slot index (`NIL` when empty), high 32 bits an ABA
    /// tag incremented by every successful CAS. Acquire on pop pairs with Release on push, so a
    /// slot's `next` link and its dropped value are visible to the thread that pops it next.
    head: CachePadded<AtomicU64>,
    slots: Box<[Slot<T>]>,
    placement: numa::Outcome,
}

// SAFETY: a value is reachable only through its unique `Pooled` handle; the pool itself only
// moves slot indices between threads with atomics. `T: Send` lets values be created on one
// thread and dropped (released) on another.
unsafe impl<T: Send> Sync for EventPool<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for EventPool<T> {}

#[inline]
const fn pack(index: u32, tag: u32) -> u64 {
    ((tag as u64) << 32) | index as u64
}

#[inline]
const fn unpack(head: u64) -> (u32, u32) {
    (head as u32, (head >> 32) as u32)
}

impl<T> EventPool<T> {
    /// A pool of `capacity` slots, allocated now, with no NUMA placement.
    ///
    /// # Panics
    /// If `capacity` is zero or not below `u32::MAX`.
    pub fn new(capacity: usize) -> Self {
        Self::with_placement(capacity, Placement::Any)
    }

    /// A pool whose memory is bound to `placement`'s NUMA node where the machine has several;
    /// the outcome is kept for [`EventPool::placement`] (a failed bind is reported, not fatal).
    ///
    /// # Panics
    /// If `capacity` is zero or not below `u32::MAX`.
    pub fn with_placement(capacity: usize, placement: Placement) -> Self {
        assert!(
            capacity > 0 && capacity < NIL as usize,
            "pool capacity out of range"
        );
        let slots: Box<[Slot<T>]> = (0..capacity)
            .map(|i| Slot {
                next: AtomicU32::new(if i + 1 == capacity { NIL } else { i as u32 + 1 }),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        let bytes = core::mem::size_of_val::<[Slot<T>]>(&slots);
        let placement = numa::bind(slots.as_ptr().cast(), bytes, placement);
        Self {
            head: CachePadded::new(AtomicU64::new(pack(0, 0))),
            slots,
            placement,
        }
    }

    /// Slots in the pool.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Where the pool's memory ended up.
    pub fn placement(&self) -> &numa::Outcome {
        &self.placement
    }

    /// Moves `value` into a free slot.
    ///
    /// # Errors
    /// `Err(value)` when every slot is in use: backpressure, never an allocation.
    #[inline]
    pub fn acquire(&self, value: T) -> Result<Pooled<'_, T>, T> {
        let mut head = self.head.load(Ordering::Acquire);
        let index = loop {
            let (index, tag) = unpack(head);
            if index == NIL {
                return Err(value);
            }
            // Possibly stale if another thread pops `index` meanwhile; the tag then differs and
            // the CAS fails.
            let next = self.slots[index as usize].next.load(Ordering::Relaxed);
            match self.head.compare_exchange_weak(
                head,
                pack(next, tag.wrapping_add(1)),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => break index,
                Err(current) => head = current,
            }
        };
        let slot = &self.slots[index as usize];
        // SAFETY: the successful CAS removed `index` from the free list, so this thread owns the
        // slot exclusively; its previous value was dropped before it was pushed (Release), and
        // our Acquire CAS orders that before this write.
        unsafe { (*slot.value.get()).write(value) };
        Ok(Pooled {
            pool: self,
            slot: NonNull::from(slot),
            index,
        })
    }

    /// Pushes slot `index` (already emptied) back on the free stack.
    #[inline]
    fn release(&self, index: u32) {
        let slot = &self.slots[index as usize];
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            let (top, tag) = unpack(head);
            slot.next.store(top, Ordering::Relaxed);
            match self.head.compare_exchange_weak(
                head,
                pack(index, tag.wrapping_add(1)),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }

    /// Counts free slots by walking the free list. O(capacity) and only a snapshot under
    /// concurrency: for tests and diagnostics, not the hot path.
    pub fn free_slots(&self) -> usize {
        let (mut index, _) = unpack(self.head.load(Ordering::Acquire));
        let mut n = 0;
        while index != NIL && n <= self.slots.len() {
            n += 1;
            index = self.slots[index as usize].next.load(Ordering::Relaxed);
        }
        n
    }
}

impl<T> fmt::Debug for EventPool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventPool")
            .field("capacity", &self.capacity())
            .field("placement", &self.placement)
            .finish()
    }
}

/// A value in a pool slot. Derefs to `T`; dropping it drops the value and frees the slot, on
/// whichever thread that happens.
pub struct Pooled<'p, T> {
    pool: &'p EventPool<T>,
    /// Points into `pool.slots[index]`; the value there is initialised while `self` lives.
    slot: NonNull<Slot<T>>,
    index: u32,
}

// SAFETY: a `Pooled` is the unique owner of its value, so sending it sends a `T` (needs
// `T: Send`); releasing it touches the pool only through atomics (`EventPool: Sync`).
unsafe impl<T: Send> Send for Pooled<'_, T> {}
// SAFETY: `&Pooled` gives only `&T`.
unsafe impl<T: Sync> Sync for Pooled<'_, T> {}

impl<T> Pooled<'_, T> {
    /// Moves the value out and frees the slot.
    pub fn into_inner(self) -> T {
        let this = ManuallyDrop::new(self);
        // SAFETY: the value is initialised while the handle lives; `ManuallyDrop` keeps `Drop`
        // from dropping it a second time, and the slot is released right after the move.
        let value = unsafe { (*this.slot.as_ref().value.get()).assume_init_read() };
        this.pool.release(this.index);
        value
    }

    /// The slot index, stable for the life of the handle.
    pub fn slot_index(&self) -> u32 {
        self.index
    }
}

impl<T> Deref for Pooled<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the slot's value is initialised while this handle lives, and the handle is its
        // only owner, so a shared borrow tied to `&self` is sound.
        unsafe { (*self.slot.as_ref().value.get()).assume_init_ref() }
    }
}

impl<T> DerefMut for Pooled<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { (*self.slot.as_ref().value.get()).assume_init_mut() }
    }
}

impl<T> Drop for Pooled<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: the value is initialised and owned by this handle; it is dropped once, before
        // the slot goes back on the free list (the release CAS publishes the drop).
        unsafe { (*self.slot.as_ref().value.get()).assume_init_drop() };
        self.pool.release(self.index);
    }
}

impl<T: fmt::Debug> fmt::Debug for Pooled<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pooled")
            .field("slot", &self.index)
            .field("value", &**self)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const fn scaled(n: usize) -> usize {
        if cfg!(miri) { n / 1000 + 10 } else { n }
    }

    #[test]
    fn exhausts_then_reuses_lifo() {
        let pool = EventPool::new(3);
        let a = pool.acquire(1u64).unwrap();
        let b = pool.acquire(2).unwrap();
        let c = pool.acquire(3).unwrap();
        assert_eq!(
            pool.acquire(4).unwrap_err(),
            4,
            "a full pool hands the value back"
        );
        assert_eq!(pool.free_slots(), 0);
        let idx = b.slot_index();
        drop(b);
        let d = pool.acquire(5).unwrap();
        assert_eq!(d.slot_index(), idx, "the slot freed last is reused first");
        assert_eq!((*a, *c, *d), (1, 3, 5));
        assert_eq!(c.into_inner(), 3);
        assert_eq!(pool.free_slots(), 1);
    }

    #[test]
    fn values_are_dropped_once_on_release() {
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        #[derive(Debug)]
        struct D(#[allow(dead_code)] u32);
        impl Drop for D {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::Relaxed);
            }
        }
        let pool = EventPool::new(2);
        let mut h = pool.acquire(D(1)).unwrap();
        *h = D(2); // drops D(1)
        drop(h);
        assert_eq!(DROPS.load(Ordering::Relaxed), 2);
        let h = pool.acquire(D(3)).unwrap();
        let v = h.into_inner();
        assert_eq!(DROPS.load(Ordering::Relaxed), 2);
        drop(v);
        assert_eq!(DROPS.load(Ordering::Relaxed), 3);
        assert_eq!(pool.free_slots(), 2);
    }

    #[test]
    fn release_from_other_threads() {
        let pool = EventPool::new(64);
        let n = scaled(200_000);
        let (mut tx, mut rx) = crate::ring::spsc::channel(32);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut seen = 0;
                while seen < n {
                    for ev in rx.pop_batch(16) {
                        let ev: Pooled<'_, usize> = ev;
                        assert_eq!(*ev, seen);
                        seen += 1;
                    }
                    std::thread::yield_now();
                }
            });
            for i in 0..n {
                let mut v = i;
                let mut ev = loop {
                    match pool.acquire(v) {
                        Ok(ev) => break ev,
                        Err(back) => {
                            v = back;
                            std::thread::yield_now();
                        }
                    }
                };
                while let Err(back) = tx.push(ev) {
                    ev = back;
                    std::thread::yield_now();
                }
            }
        });
        assert_eq!(pool.free_slots(), 64);
    }

    #[test]
    fn contended_acquire_and_release_keep_every_slot() {
        const THREADS: usize = 4;
        let pool = EventPool::new(8);
        let rounds = scaled(100_000);
        let in_use = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (pool, in_use) = (&pool, &in_use);
                s.spawn(move || {
                    for i in 0..rounds {
                        if let Ok(mut h) = pool.acquire((t, i)) {
                            let now = in_use.fetch_add(1, Ordering::SeqCst) + 1;
                            assert!(now <= 8, "more handles than slots");
                            h.1 += 1;
                            assert_eq!(*h, (t, i + 1), "a slot was handed out twice");
                            in_use.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(pool.free_slots(), 8);
    }
}
