//! `EventPool`: a fixed-capacity object pool, allocated once, with O(1) acquire on the thread
//! that fills it and O(1) lock-free release from any thread.
//!
//! Free slots are linked by index through the slots themselves, in two lists:
//! - the **shared stack**, where releasers push (one CAS each) from any thread;
//! - the **acquirer's private chain**, which only the pool's one [`Acquirer`] touches. It pops
//!   with no atomic operation at all, and when the chain runs dry it takes the whole shared stack
//!   with a single swap.
//!
//! Push-only plus take-all is free of ABA: a pusher links its slot above the head it read and
//! its CAS succeeds only if that value is still the head, which makes the link correct whatever
//! happened in between. (Pop-one, the ABA-prone operation, is never done on the shared stack.)
//! So an acquire costs a few plain loads, a release one CAS on a line the acquirer visits once
//! per refill rather than once per event, and the slot reused next is the one freed last.
//!
//! One acquirer per pool matches the architecture: pools are NUMA-local to the ingest thread
//! that fills them. A [`Pooled`] handle borrows the pool, so the borrow checker proves the pool
//! outlives every event with no reference count touched per event; threads that carry events run
//! inside `std::thread::scope`.

use core::cell::UnsafeCell;
use core::fmt;
use core::mem::{ManuallyDrop, MaybeUninit};
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crossbeam_utils::CachePadded;

use crate::mem::numa::{self, Placement};

/// Default capacity (the original engine's 65 536-event pool).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// End of the free list.
const NIL: u32 = u32::MAX;

struct Slot<T> {
    /// Index of the next free slot while this one is free (in either list); meaningless while
    /// it is in use.
    next: AtomicU32,
    /// Initialised exactly while a [`Pooled`] handle for this slot exists.
    value: UnsafeCell<MaybeUninit<T>>,
}

/// A fixed-capacity pool of `T`s.
pub struct EventPool<T> {
    /// Top of the shared free stack (`NIL` when empty). Releasers push with a Release CAS; the
    /// acquirer empties it with an Acquire swap, which makes every pushed slot's `next` link and
    /// dropped value visible to it.
    shared: CachePadded<AtomicU32>,
    slots: Box<[Slot<T>]>,
    /// Whether an [`Acquirer`] exists (there is at most one).
    acquirer_taken: AtomicBool,
    placement: numa::Outcome,
}

// SAFETY: a value is reachable only through its unique `Pooled` handle; the pool itself only
// moves slot indices between threads with atomics. `T: Send` lets values be created on one
// thread and dropped (released) on another.
unsafe impl<T: Send> Sync for EventPool<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for EventPool<T> {}

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
            shared: CachePadded::new(AtomicU32::new(0)),
            slots,
            acquirer_taken: AtomicBool::new(false),
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

    /// The one acquiring handle: `None` while another exists.
    pub fn acquirer(&self) -> Option<Acquirer<'_, T>> {
        if self.acquirer_taken.swap(true, Ordering::Acquire) {
            return None;
        }
        Some(Acquirer {
            pool: self,
            local: NIL,
        })
    }

    #[inline]
    fn slot(&self, index: u32) -> &Slot<T> {
        &self.slots[index as usize]
    }

    /// Pushes the chain `top ..= bottom` (already linked through `next`) on the shared stack.
    #[inline]
    fn push_chain(&self, top: u32, bottom: u32) {
        let bottom = self.slot(bottom);
        let mut head = self.shared.load(Ordering::Relaxed);
        loop {
            bottom.next.store(head, Ordering::Relaxed);
            match self
                .shared
                .compare_exchange_weak(head, top, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }

    /// Counts the slots on the shared free stack by walking it (slots cached by a live
    /// [`Acquirer`] are not counted). O(capacity), and a snapshot under concurrency: for tests
    /// and diagnostics, not the hot path.
    pub fn free_slots(&self) -> usize {
        let mut index = self.shared.load(Ordering::Acquire);
        let mut n = 0;
        while index != NIL && n <= self.slots.len() {
            n += 1;
            index = self.slot(index).next.load(Ordering::Relaxed);
        }
        n
    }
}

/// The pool's one acquiring handle, held by the thread that fills events. `Send`, not `Sync`.
pub struct Acquirer<'p, T> {
    pool: &'p EventPool<T>,
    /// Head of the private free chain, linked through `next`; owned by this handle alone.
    local: u32,
}

impl<'p, T> Acquirer<'p, T> {
    /// Moves `value` into a free slot.
    ///
    /// # Errors
    /// `Err(value)` when every slot is in use: backpressure, never an allocation.
    #[inline]
    pub fn acquire(&mut self, value: T) -> Result<Pooled<'p, T>, T> {
        if self.local == NIL {
            self.local = self.pool.shared.swap(NIL, Ordering::Acquire);
            if self.local == NIL {
                return Err(value);
            }
        }
        let index = self.local;
        let slot = self.pool.slot(index);
        self.local = slot.next.load(Ordering::Relaxed);
        // SAFETY: `index` came off the private chain, which only this handle touches, so the
        // slot is free and ours alone; its previous value was dropped before it was pushed
        // (Release) and our swap (Acquire) ordered that before this write.
        unsafe { (*slot.value.get()).write(value) };
        Ok(Pooled {
            pool: self.pool,
            slot: NonNull::from(slot),
            index,
        })
    }

    /// The pool.
    pub fn pool(&self) -> &'p EventPool<T> {
        self.pool
    }
}

impl<T> Drop for Acquirer<'_, T> {
    fn drop(&mut self) {
        if self.local != NIL {
            let mut bottom = self.local;
            loop {
                let next = self.pool.slot(bottom).next.load(Ordering::Relaxed);
                if next == NIL {
                    break;
                }
                bottom = next;
            }
            self.pool.push_chain(self.local, bottom);
        }
        self.pool.acquirer_taken.store(false, Ordering::Release);
    }
}

impl<T> fmt::Debug for Acquirer<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquirer").field("pool", self.pool).finish()
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
        this.pool.push_chain(this.index, this.index);
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
        self.pool.push_chain(self.index, self.index);
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
        let mut acq = pool.acquirer().unwrap();
        assert!(pool.acquirer().is_none(), "one acquirer per pool");
        let a = acq.acquire(1u64).unwrap();
        let b = acq.acquire(2).unwrap();
        let c = acq.acquire(3).unwrap();
        assert_eq!(
            acq.acquire(4).unwrap_err(),
            4,
            "a full pool hands the value back"
        );
        assert_eq!(pool.free_slots(), 0);
        let idx = b.slot_index();
        drop(b);
        let d = acq.acquire(5).unwrap();
        assert_eq!(d.slot_index(), idx, "the slot freed last is reused first");
        assert_eq!((*a, *c, *d), (1, 3, 5));
        assert_eq!(c.into_inner(), 3);
        assert_eq!(pool.free_slots(), 1);
        drop((a, d));
        drop(acq);
        assert_eq!(pool.free_slots(), 3);
        assert!(
            pool.acquirer().is_some(),
            "a dropped acquirer can be taken again"
        );
    }

    #[test]
    fn dropped_acquirer_returns_its_cached_chain() {
        let pool = EventPool::new(8);
        let mut acq = pool.acquirer().unwrap();
        drop(acq.acquire(0u8).unwrap()); // takes the whole stack into the private chain
        assert_eq!(
            pool.free_slots(),
            1,
            "only the released slot is on the shared stack"
        );
        drop(acq);
        assert_eq!(pool.free_slots(), 8);
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
        let mut acq = pool.acquirer().unwrap();
        let mut h = acq.acquire(D(1)).unwrap();
        *h = D(2); // drops D(1)
        drop(h);
        assert_eq!(DROPS.load(Ordering::Relaxed), 2);
        let h = acq.acquire(D(3)).unwrap();
        let v = h.into_inner();
        assert_eq!(DROPS.load(Ordering::Relaxed), 2);
        drop(v);
        assert_eq!(DROPS.load(Ordering::Relaxed), 3);
        drop(acq);
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
            let mut acq = pool.acquirer().unwrap();
            for i in 0..n {
                let mut v = i;
                let mut ev = loop {
                    match acq.acquire(v) {
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
    fn many_releasers_never_lose_or_duplicate_a_slot() {
        const RELEASERS: usize = 3;
        const CAP: usize = 16;
        let pool = EventPool::new(CAP);
        let rounds = scaled(150_000);
        // One live marker per slot: set on acquire, cleared before release. A slot handed out
        // twice would find its marker already set.
        let live: [AtomicBool; CAP] = core::array::from_fn(|_| AtomicBool::new(false));
        let (tx, rx) = crate::ring::mpsc::channel::<Pooled<'_, usize>>(CAP);
        let rx = std::sync::Mutex::new(rx); // test scaffolding only: releasers share the consumer
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..RELEASERS {
                s.spawn(|| {
                    while !done.load(Ordering::Acquire) {
                        let ev = rx.lock().unwrap().pop();
                        match ev {
                            Some(ev) => {
                                assert!(
                                    live[ev.slot_index() as usize].swap(false, Ordering::SeqCst)
                                );
                                drop(ev);
                            }
                            None => std::thread::yield_now(),
                        }
                    }
                });
            }
            let mut acq = pool.acquirer().unwrap();
            let mut made = 0;
            while made < rounds {
                match acq.acquire(made) {
                    Ok(mut ev) => {
                        assert!(
                            !live[ev.slot_index() as usize].swap(true, Ordering::SeqCst),
                            "slot handed out twice"
                        );
                        *ev += 1;
                        while let Err(back) = tx.push(ev) {
                            ev = back;
                            std::thread::yield_now();
                        }
                        made += 1;
                    }
                    Err(_) => std::thread::yield_now(),
                }
            }
            drop(acq);
            while !tx.is_empty() {
                std::thread::yield_now();
            }
            done.store(true, Ordering::Release);
        });
        assert_eq!(pool.free_slots(), CAP);
    }
}
