//! The AF_XDP rings (`FillRing`, `CompletionRing`, `RxRing`, `TxRing`) as views over memory
//! shared with the kernel.
//!
//! Each ring is a producer index, a consumer index, a flags word and a power-of-two array of
//! descriptors. One side produces, the other consumes; each keeps a private copy of both
//! indices and reads the other side's index (Acquire) only when its copy says there is no room
//! (producer) or nothing to read (consumer), and publishes its own once per batch (Release). The
//! kernel pairs these with `smp_load_acquire`/`smp_store_release` on its side.
//!
//! The same code runs over an `mmap` of the socket (see [`super::socket`]) or over plain memory
//! ([`fake_pair`]), where a test plays the kernel with the opposite view of the same ring.

use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::sys::Mapping;

/// What keeps a ring's memory alive.
pub(crate) enum RingMem {
    /// A ring of an AF_XDP socket, mapped from the kernel.
    Mapped(#[allow(dead_code)] Mapping),
    /// A fake ring in plain memory (tests): `words` `u64`s (8-byte aligned) from
    /// `Box::into_raw`, so pointers into it stay valid while the handle moves (a `Box` that
    /// moves re-asserts uniqueness and would invalidate them).
    Heap {
        ptr: core::ptr::NonNull<u64>,
        words: usize,
    },
}

impl Drop for RingMem {
    fn drop(&mut self) {
        if let Self::Heap { ptr, words } = *self {
            let slice = core::ptr::slice_from_raw_parts_mut(ptr.as_ptr(), words);
            // SAFETY: `ptr`/`words` came from `Box::into_raw` of a `[u64]` of that length in
            // `fake_pair`, and are freed once, here.
            drop(unsafe { Box::from_raw(slice) });
        }
    }
}

// SAFETY: the memory is only reached through atomics and the ring protocol.
unsafe impl Send for RingMem {}
// SAFETY: as above.
unsafe impl Sync for RingMem {}

/// Where a ring's parts lie (byte offsets from the start of its memory), as `XDP_MMAP_OFFSETS`
/// reports them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub producer: usize,
    pub consumer: usize,
    pub flags: usize,
    pub desc: usize,
    /// Descriptors in the ring, a power of two.
    pub size: u32,
}

struct Raw<T> {
    _mem: Arc<RingMem>,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    descs: *mut T,
    mask: u32,
    _t: PhantomData<T>,
}

impl<T: Copy> Raw<T> {
    /// # Safety
    /// `base` must point at memory kept alive by `mem`, laid out as `layout` says: three
    /// 4-byte-aligned `u32` words and `layout.size` descriptors of `T`, properly aligned.
    unsafe fn new(mem: Arc<RingMem>, base: *mut u8, layout: Layout) -> Self {
        assert!(
            layout.size.is_power_of_two(),
            "ring size must be a power of two"
        );
        // SAFETY: the caller guarantees every offset lies inside the live mapping.
        unsafe {
            Self {
                _mem: mem,
                producer: base.add(layout.producer).cast(),
                consumer: base.add(layout.consumer).cast(),
                flags: base.add(layout.flags).cast(),
                descs: base.add(layout.desc).cast(),
                mask: layout.size - 1,
                _t: PhantomData,
            }
        }
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: valid for the life of `_mem` (constructor contract); atomics tolerate the
        // other side's concurrent access.
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as in `producer`.
        unsafe { &*self.consumer }
    }

    fn flags(&self) -> &AtomicU32 {
        // SAFETY: as in `producer`.
        unsafe { &*self.flags }
    }

    fn slot(&self, index: u32) -> *mut T {
        // SAFETY: `index & mask < size`, inside the descriptor array (constructor contract).
        unsafe { self.descs.add((index & self.mask) as usize) }
    }
}

// SAFETY: the ring is shared with the kernel (or a test's opposite view) through atomics and the
// index protocol; the handle itself can move between threads, and `T` is plain data.
unsafe impl<T: Copy + Send> Send for Raw<T> {}

/// The side of a ring this process produces into (`FillRing`, `TxRing`).
pub struct ProdRing<T: Copy> {
    raw: Raw<T>,
    /// Our producer index: authoritative, published to the shared word by [`ProdRing::submit`].
    prod: u32,
    /// Last consumer index read from the other side. Invariant: `prod - cons <= size`.
    cons: u32,
}

/// The side of a ring this process consumes from (`RxRing`, `CompletionRing`).
pub struct ConsRing<T: Copy> {
    raw: Raw<T>,
    /// Last producer index read from the other side.
    prod: u32,
    /// Our consumer index: authoritative, published by [`ConsRing::release`].
    cons: u32,
}

impl<T: Copy> ProdRing<T> {
    /// # Safety
    /// As for the ring memory in `Raw::new`; and this must be the only producer view.
    pub(crate) unsafe fn new(mem: Arc<RingMem>, base: *mut u8, layout: Layout) -> Self {
        // SAFETY: forwarded contract.
        let raw = unsafe { Raw::new(mem, base, layout) };
        let prod = raw.producer().load(Ordering::Relaxed);
        let cons = raw.consumer().load(Ordering::Acquire);
        Self { raw, prod, cons }
    }

    /// Descriptors in the ring.
    pub fn size(&self) -> u32 {
        self.raw.mask + 1
    }

    /// Free slots, at least `want` if there are (reads the consumer index only if the cached
    /// copy shows fewer).
    #[inline]
    pub fn free(&mut self, want: u32) -> u32 {
        let free = self.size() - self.prod.wrapping_sub(self.cons);
        if free >= want {
            return free;
        }
        self.cons = self.raw.consumer().load(Ordering::Acquire);
        self.size() - self.prod.wrapping_sub(self.cons)
    }

    /// Writes the `i`-th descriptor after the last submitted one.
    ///
    /// # Panics
    /// If slot `i` is not free (debug builds check against the cached indices).
    #[inline]
    pub fn write(&mut self, i: u32, value: T) {
        debug_assert!(
            i < self.size() - self.prod.wrapping_sub(self.cons),
            "slot {i} not free"
        );
        // SAFETY: in bounds (masked); the slot is free, so the other side is not reading it.
        unsafe {
            self.raw
                .slot(self.prod.wrapping_add(i))
                .write_volatile(value)
        };
    }

    /// Publishes the next `n` written descriptors.
    #[inline]
    pub fn submit(&mut self, n: u32) {
        self.prod = self.prod.wrapping_add(n);
        self.raw.producer().store(self.prod, Ordering::Release);
    }

    /// Whether the kernel asked to be woken (`XDP_RING_NEED_WAKEUP`).
    #[inline]
    pub fn needs_wakeup(&self) -> bool {
        self.raw.flags().load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }
}

impl<T: Copy> ConsRing<T> {
    /// # Safety
    /// As for the ring memory in `Raw::new`; and this must be the only consumer view.
    pub(crate) unsafe fn new(mem: Arc<RingMem>, base: *mut u8, layout: Layout) -> Self {
        // SAFETY: forwarded contract.
        let raw = unsafe { Raw::new(mem, base, layout) };
        let cons = raw.consumer().load(Ordering::Relaxed);
        let prod = raw.producer().load(Ordering::Acquire);
        Self { raw, prod, cons }
    }

    /// Descriptors in the ring.
    pub fn size(&self) -> u32 {
        self.raw.mask + 1
    }

    /// Descriptors ready, up to `max` (reads the producer index only if the cached copy shows
    /// fewer than `max`).
    #[inline]
    pub fn available(&mut self, max: u32) -> u32 {
        let mut n = self.prod.wrapping_sub(self.cons);
        if n < max {
            self.prod = self.raw.producer().load(Ordering::Acquire);
            n = self.prod.wrapping_sub(self.cons);
        }
        n.min(max)
    }

    /// The `i`-th ready descriptor.
    #[inline]
    pub fn read(&self, i: u32) -> T {
        debug_assert!(
            i < self.prod.wrapping_sub(self.cons),
            "descriptor {i} not ready"
        );
        // SAFETY: in bounds (masked); published by the producer (Acquire in `available`).
        unsafe { self.raw.slot(self.cons.wrapping_add(i)).read_volatile() }
    }

    /// Gives the next `n` read descriptors back to the producer.
    #[inline]
    pub fn release(&mut self, n: u32) {
        self.cons = self.cons.wrapping_add(n);
        self.raw.consumer().store(self.cons, Ordering::Release);
    }

    /// Whether the producer asked to be woken (`XDP_RING_NEED_WAKEUP`).
    #[inline]
    pub fn needs_wakeup(&self) -> bool {
        self.raw.flags().load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }
}

/// A ring in plain memory seen from both sides: the test plays the kernel with the opposite
/// view. `flags` lets a test raise `XDP_RING_NEED_WAKEUP`.
pub fn fake_pair<T: Copy>(size: u32) -> (ProdRing<T>, ConsRing<T>, FakeFlags) {
    assert!(size.is_power_of_two());
    assert!(align_of::<T>() <= 8);
    // Three index words padded to 64 bytes each, like the kernel's, then the descriptors.
    let desc = 3 * 64;
    let bytes = desc + size as usize * size_of::<T>();
    let words = bytes.div_ceil(8);
    let raw = Box::into_raw(vec![0u64; words].into_boxed_slice());
    let ptr = core::ptr::NonNull::new(raw.cast::<u64>()).expect("Box::into_raw is non-null");
    let base = ptr.as_ptr().cast::<u8>();
    let mem = Arc::new(RingMem::Heap { ptr, words });
    let layout = Layout {
        producer: 0,
        consumer: 64,
        flags: 128,
        desc,
        size,
    };
    // SAFETY: `base` is the start of `mem`'s words (a raw allocation that `mem` frees), laid
    // out exactly as `layout` says and 8-byte aligned; one view of each kind is made.
    let (p, c) = unsafe {
        (
            ProdRing::new(Arc::clone(&mem), base, layout),
            ConsRing::new(Arc::clone(&mem), base, layout),
        )
    };
    // `wrapping_add` needs no unsafe: the word at offset 128 lies inside `mem`, which the
    // returned handle keeps alive, so the pointer is valid whenever it is read.
    let flags = FakeFlags {
        _mem: mem,
        word: base.wrapping_add(128).cast(),
    };
    (p, c, flags)
}

/// The flags word of a fake ring.
pub struct FakeFlags {
    _mem: Arc<RingMem>,
    word: *const AtomicU32,
}

impl FakeFlags {
    /// Sets or clears `XDP_RING_NEED_WAKEUP`.
    pub fn set_need_wakeup(&self, on: bool) {
        // SAFETY: the word lives as long as `_mem`.
        let w = unsafe { &*self.word };
        w.store(
            if on { libc::XDP_RING_NEED_WAKEUP } else { 0 },
            Ordering::Relaxed,
        );
    }
}

impl<T: Copy> fmt::Debug for ProdRing<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProdRing")
            .field("size", &self.size())
            .field("prod", &self.prod)
            .field("cons", &self.cons)
            .finish()
    }
}

impl<T: Copy> fmt::Debug for ConsRing<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsRing")
            .field("size", &self.size())
            .field("prod", &self.prod)
            .field("cons", &self.cons)
            .finish()
    }
}

impl fmt::Debug for FakeFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeFlags").finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produce_and_consume_across_the_wrap() {
        let (mut p, mut c, _) = fake_pair::<u64>(8);
        let mut next = 0u64;
        let mut expect = 0u64;
        for round in 0..100u32 {
            let want = round % 7 + 1;
            let n = p.free(want).min(want);
            for i in 0..n {
                p.write(i, next);
                next += 1;
            }
            p.submit(n);
            let ready = c.available(5);
            for i in 0..ready {
                assert_eq!(c.read(i), expect);
                expect += 1;
            }
            c.release(ready);
        }
        let rest = c.available(u32::MAX);
        for i in 0..rest {
            assert_eq!(c.read(i), expect + u64::from(i));
        }
        assert_eq!(expect + u64::from(rest), next);
    }

    #[test]
    fn producer_sees_a_full_ring_until_the_consumer_releases() {
        let (mut p, mut c, _) = fake_pair::<libc::xdp_desc>(4);
        assert_eq!(p.free(1), 4);
        for i in 0..4 {
            p.write(
                i,
                libc::xdp_desc {
                    addr: u64::from(i) * 2048,
                    len: 60,
                    options: 0,
                },
            );
        }
        p.submit(4);
        assert_eq!(p.free(1), 0);
        assert_eq!(c.available(64), 4);
        assert_eq!(c.read(3).addr, 3 * 2048);
        c.release(2);
        assert_eq!(
            p.free(1),
            2,
            "the producer rereads the consumer index when it runs out"
        );
    }

    #[test]
    fn need_wakeup_flag_is_seen_by_both_views() {
        let (p, c, flags) = fake_pair::<u64>(2);
        assert!(!p.needs_wakeup() && !c.needs_wakeup());
        flags.set_need_wakeup(true);
        assert!(p.needs_wakeup() && c.needs_wakeup());
    }
}
