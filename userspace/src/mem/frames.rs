//! `FrameArena`: fixed-size receive frames in one page-aligned region, each carrying a count of
//! the live events that point into it.
//!
//! This is the memory model of an AF_XDP UMEM, used now for kernel receive buffers and later for
//! UMEM itself. A frame is in exactly one of three places:
//! - **free**: on the owner's free list or in the return queue;
//! - **owned**: an [`OwnedFrame`] held by the ingest thread, being filled (by `recvmmsg`, or by
//!   the kernel while it sits on the FILL ring);
//! - **shared**: a [`SharedFrame`] plus the [`FrameLease`]s of the events parsed from it; the
//!   bytes are immutable. When the last lease and the `SharedFrame` are gone, the frame goes to the
//!   return queue, a Vyukov MPSC drained only by the [`FrameOwner`] (the thread that also owns the
//!   FILL ring), so only that thread ever hands frames back to the kernel.
//!
//! The live count is *biased*: sharing stores `BIAS`, minting leases touches no atomic, and
//! dropping the `SharedFrame` subtracts `BIAS - minted`. Each lease subtracts one. The count
//! reaches zero exactly once, after everything is released, and the thread that takes it to zero
//! recycles the frame. The per-event cost is one `fetch_sub` on release.

use core::cell::UnsafeCell;
use core::fmt;
use core::ops::Range;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::mem::{Region, RegionOptions};
use crate::ring::mpsc::MpscQueue;
use crate::wire::event::Peer;

/// Bias stored in a frame's live count while it is being shared; more than any frame can hold.
const BIAS: u32 = 1 << 31;

/// Errors creating an arena.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// Frame size or count out of range.
    #[error("invalid arena geometry: {0}")]
    Geometry(&'static str),
    /// The memory could not be mapped.
    #[error("mapping {bytes} bytes for frames: {reason}")]
    Map {
        /// Bytes asked for.
        bytes: usize,
        /// The kernel's reason.
        reason: io::Error,
    },
}

/// One frame's sender, beside its bytes.
struct PeerSlot(UnsafeCell<Peer>);

// SAFETY: a slot follows its frame's ownership: it is written only through an `OwnedFrame`
// (`&mut`, the one handle that reaches the frame while it is owned) and read only through a
// `SharedFrame` or a `FrameLease`, while the frame is shared and nobody writes it. The hand-over
// from owned to shared to a reader on another thread goes through the same queues (Release /
// Acquire) that publish the frame's bytes.
unsafe impl Sync for PeerSlot {}

/// A region cut into `count` frames of `frame_size` bytes.
pub struct FrameArena {
    region: Region,
    frame_size: u32,
    count: u32,
    /// Per frame: 0 while free or owned; `BIAS + minted - released` while shared.
    live: Box<[AtomicU32]>,
    /// Per frame: who sent what it holds (set by the filler before sharing it).
    peers: Box<[PeerSlot]>,
    /// Frames whose last reference was dropped, on their way back to the owner.
    returns: MpscQueue<u32>,
    /// Whether a [`FrameOwner`] exists (there is at most one).
    owner_taken: AtomicBool,
}

impl FrameArena {
    /// Maps `count` frames of `frame_size` bytes, all free.
    ///
    /// # Errors
    /// [`ArenaError::Geometry`] for a zero or oversized geometry, [`ArenaError::Map`] when the
    /// kernel refuses the memory.
    pub fn new(frame_size: u32, count: u32, opts: RegionOptions) -> Result<Self, ArenaError> {
        if frame_size == 0 || count == 0 {
            return Err(ArenaError::Geometry(
                "frame size and count must be positive",
            ));
        }
        if count >= BIAS {
            return Err(ArenaError::Geometry("too many frames"));
        }
        let bytes = (frame_size as usize)
            .checked_mul(count as usize)
            .ok_or(ArenaError::Geometry("arena size overflows"))?;
        let region =
            Region::new(bytes, opts).map_err(|reason| ArenaError::Map { bytes, reason })?;
        let returns = MpscQueue::new(count as usize);
        for i in 0..count {
            // Cannot fail: the queue holds at least `count` items.
            let _ = returns.push(i);
        }
        Ok(Self {
            region,
            frame_size,
            count,
            live: (0..count).map(|_| AtomicU32::new(0)).collect(),
            peers: (0..count)
                .map(|_| PeerSlot(UnsafeCell::new(Peer::UNKNOWN)))
                .collect(),
            returns,
            owner_taken: AtomicBool::new(false),
        })
    }

    /// Bytes per frame.
    pub const fn frame_size(&self) -> u32 {
        self.frame_size
    }

    /// Number of frames.
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// The memory behind the frames.
    pub const fn region(&self) -> &Region {
        &self.region
    }

    /// The one owner handle: `None` while another exists.
    pub fn owner(&self) -> Option<FrameOwner<'_>> {
        if self.owner_taken.swap(true, Ordering::Acquire) {
            return None;
        }
        Some(FrameOwner {
            arena: self,
            free: Vec::with_capacity(self.count as usize),
            lent: vec![false; self.count as usize].into_boxed_slice(),
            lent_count: 0,
        })
    }

    #[inline]
    fn frame_ptr(&self, index: u32) -> *mut u8 {
        debug_assert!(index < self.count);
        // SAFETY: `index < count`, so the offset stays inside the region.
        unsafe {
            self.region
                .as_ptr()
                .add(index as usize * self.frame_size as usize)
        }
    }

    /// Starts loading the cache lines of `len` bytes at byte `offset` of the arena (at most
    /// [`PREFETCH_MAX`]), without waiting for them: the receive loop calls it for the next
    /// descriptor's datagram while it parses the current one, so the parser does not stall on
    /// bytes another core (the kernel's copy) just wrote. Nothing outside the arena is named.
    #[inline]
    pub fn prefetch(&self, offset: u64, len: u32) {
        let size = self.frame_size as u64 * u64::from(self.count);
        let end = offset
            .saturating_add(u64::from(len.min(PREFETCH_MAX)))
            .min(size);
        let base = self.region.as_ptr();
        let mut at = offset & !63;
        while at < end {
            prefetch_line(base.wrapping_add(at as usize));
            at += 64;
        }
    }

    /// Sends a frame whose count reached zero back to the owner.
    #[inline]
    fn recycle(&self, index: u32) {
        let pushed = self.returns.push(index);
        // Each index is in exactly one place, and the queue holds every index at once.
        debug_assert!(pushed.is_ok(), "frame {index} recycled twice");
    }

    #[inline]
    fn drop_refs(&self, index: u32, n: u32) {
        // AcqRel: our reads of the frame happen before the count drops (Release), and the thread
        // that takes it to zero sees every other reader's release (Acquire) before recycling.
        if self.live[index as usize].fetch_sub(n, Ordering::AcqRel) == n {
            self.recycle(index);
        }
    }
}

/// Most bytes [`FrameArena::prefetch`] asks for: a 16-event datagram of 64-byte events.
pub const PREFETCH_MAX: u32 = 2048;

/// A hint to load the cache line at `p`.
#[inline(always)]
fn prefetch_line(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: a prefetch is only a hint: it never faults and makes nothing readable, whatever
    // the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    let _ = p;
}

impl fmt::Debug for FrameArena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameArena")
            .field("frame_size", &self.frame_size)
            .field("count", &self.count)
            .field("region", &self.region)
            .finish()
    }
}

/// The ingest thread's handle: takes free frames, collects returned ones, lends frames to the
/// kernel (the AF_XDP FILL ring) and claims them back. One per arena.
pub struct FrameOwner<'a> {
    arena: &'a FrameArena,
    /// Frames known free, LIFO so the warmest frame is reused first. Never grows past `count`.
    free: Vec<u32>,
    /// Per frame: lent to the kernel and not yet claimed back. A descriptor naming a frame that
    /// is not lent is refused, so a bad descriptor can never create a second owner.
    lent: Box<[bool]>,
    /// Number of `true` entries in `lent`.
    lent_count: u32,
}

impl<'a> FrameOwner<'a> {
    /// Moves returned frames onto the free list; returns how many. One pass per batch.
    pub fn reclaim(&mut self) -> usize {
        let free = &mut self.free;
        // SAFETY: only the unique `FrameOwner` (guarded by `owner_taken`) consumes `returns`,
        // and `&mut self` keeps that to one call at a time.
        unsafe { self.arena.returns.pop_batch(usize::MAX, |i| free.push(i)) }
    }

    /// A free frame, reclaiming returned ones first if the free list is empty.
    pub fn take(&mut self) -> Option<OwnedFrame<'a>> {
        if self.free.is_empty() {
            self.reclaim();
        }
        self.free.pop().map(|index| OwnedFrame {
            arena: self.arena,
            index,
        })
    }

    /// Frames on the free list (returned frames not yet reclaimed are not counted).
    pub fn free_len(&self) -> usize {
        self.free.len()
    }

    /// The arena.
    pub const fn arena(&self) -> &'a FrameArena {
        self.arena
    }

    /// Hands `frame` to the kernel (for the FILL ring); returns its index. It stays out of every
    /// list until [`FrameOwner::claim`] takes it back.
    ///
    /// # Panics
    /// If `frame` belongs to another arena.
    pub fn lend(&mut self, frame: OwnedFrame<'a>) -> u32 {
        assert!(
            core::ptr::eq(frame.arena, self.arena),
            "frame from another arena"
        );
        let index = frame.index;
        core::mem::forget(frame);
        debug_assert!(!self.lent[index as usize]);
        self.lent[index as usize] = true;
        self.lent_count += 1;
        index
    }

    /// Takes back a frame the kernel returned (an RX descriptor); `None` if `index` is out of
    /// range or not currently lent (a bad descriptor: count it, and do not touch the frame).
    pub fn claim(&mut self, index: u32) -> Option<OwnedFrame<'a>> {
        let slot = self.lent.get_mut(index as usize)?;
        if !core::mem::replace(slot, false) {
            return None;
        }
        self.lent_count -= 1;
        Some(OwnedFrame {
            arena: self.arena,
            index,
        })
    }

    /// Frames lent to the kernel right now.
    pub const fn lent_len(&self) -> u32 {
        self.lent_count
    }
}

impl Drop for FrameOwner<'_> {
    fn drop(&mut self) {
        for i in self.free.drain(..) {
            self.arena.recycle(i);
        }
        self.arena.owner_taken.store(false, Ordering::Release);
    }
}

impl fmt::Debug for FrameOwner<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameOwner")
            .field("free", &self.free.len())
            .finish()
    }
}

/// A frame held by its filler. Dropping it unshared returns it.
pub struct OwnedFrame<'a> {
    arena: &'a FrameArena,
    index: u32,
}

impl<'a> OwnedFrame<'a> {
    /// The whole frame.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: as in `bytes_mut`; a shared borrow of a frame only this handle reaches.
        unsafe {
            core::slice::from_raw_parts(
                self.arena.frame_ptr(self.index),
                self.arena.frame_size as usize,
            )
        }
    }

    /// The whole frame, to receive into.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: an owned frame is on no free list and has no leases (count 0), so this handle
        // is the only way to reach its bytes; `&mut self` makes the borrow unique.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.arena.frame_ptr(self.index),
                self.arena.frame_size as usize,
            )
        }
    }

    /// Frame index in the arena (its UMEM address is `index * frame_size`).
    pub const fn index(&self) -> u32 {
        self.index
    }

    /// Records who sent what the frame holds; events parsed from it report this sender.
    #[inline]
    pub fn set_peer(&mut self, peer: Peer) {
        // SAFETY: the frame is owned by this handle (`&mut self`), so nothing reads its slot
        // now (see `PeerSlot`).
        unsafe { *self.arena.peers[self.index as usize].0.get() = peer };
    }

    /// Freezes the frame, with `data` the received bytes, so events can be minted from it.
    ///
    /// # Panics
    /// If `data` is not inside the frame.
    pub fn share(self, data: Range<usize>) -> SharedFrame<'a> {
        assert!(
            data.start <= data.end && data.end <= self.arena.frame_size as usize,
            "data {data:?} outside a {}-byte frame",
            self.arena.frame_size
        );
        let this = core::mem::ManuallyDrop::new(self);
        // Relaxed: leases reach other threads only through queues that publish with Release.
        this.arena.live[this.index as usize].store(BIAS, Ordering::Relaxed);
        SharedFrame {
            arena: this.arena,
            index: this.index,
            start: data.start as u32,
            end: data.end as u32,
            minted: 0,
        }
    }
}

impl Drop for OwnedFrame<'_> {
    fn drop(&mut self) {
        self.arena.recycle(self.index);
    }
}

impl fmt::Debug for OwnedFrame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedFrame")
            .field("index", &self.index)
            .finish()
    }
}

/// A frozen frame from which leases are minted. Dropping it settles the bias.
pub struct SharedFrame<'a> {
    arena: &'a FrameArena,
    index: u32,
    start: u32,
    end: u32,
    minted: u32,
}

impl<'a> SharedFrame<'a> {
    /// The received bytes.
    pub fn data(&self) -> &[u8] {
        &self.frame_bytes()[self.start as usize..self.end as usize]
    }

    /// Where the received bytes start within the frame.
    pub const fn data_offset(&self) -> u32 {
        self.start
    }

    /// The whole frame, with the lifetime of the arena: sound because a shared frame is
    /// immutable until every lease and this handle are gone, and callers only hand these bytes
    /// to leases.
    pub(crate) fn frame_bytes(&self) -> &'a [u8] {
        // SAFETY: a shared frame's bytes are not written until its count reaches zero, which
        // needs this handle dropped; the slice is within the region.
        unsafe {
            core::slice::from_raw_parts(
                self.arena.frame_ptr(self.index),
                self.arena.frame_size as usize,
            )
        }
    }

    /// A new reference to this frame.
    #[inline]
    pub fn lease(&mut self) -> FrameLease<'a> {
        self.minted += 1;
        debug_assert!(self.minted < BIAS);
        FrameLease {
            arena: self.arena,
            index: self.index,
        }
    }

    /// Leases minted so far (and not taken back).
    pub const fn minted(&self) -> u32 {
        self.minted
    }

    /// Takes back a lease minted from this frame, without touching the shared count: the
    /// holder was done with it while this handle still lives (the inline engine's synchronous
    /// path), so the one atomic the handle's drop makes settles it too. A lease of another
    /// frame is dropped as usual.
    #[inline]
    pub fn take_back(&mut self, lease: FrameLease<'a>) {
        if core::ptr::eq(lease.arena, self.arena) && lease.index == self.index && self.minted > 0 {
            // The count still holds this lease's unit inside the bias; forgetting the lease
            // and un-minting it leaves the sum the drops subtract equal to the bias.
            self.minted -= 1;
            core::mem::forget(lease);
        }
    }
}

impl Drop for SharedFrame<'_> {
    fn drop(&mut self) {
        self.arena.drop_refs(self.index, BIAS - self.minted);
    }
}

impl fmt::Debug for SharedFrame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedFrame")
            .field("index", &self.index)
            .field("data", &(self.start..self.end))
            .field("minted", &self.minted)
            .finish()
    }
}

/// One reference to a shared frame; the frame is recycled when the last one drops.
pub struct FrameLease<'a> {
    arena: &'a FrameArena,
    index: u32,
}

impl FrameLease<'_> {
    /// The whole frame. Immutable while any lease exists.
    #[inline]
    pub fn frame(&self) -> &[u8] {
        // SAFETY: the lease keeps the count above zero, so nobody writes the frame; in range.
        unsafe {
            core::slice::from_raw_parts(
                self.arena.frame_ptr(self.index),
                self.arena.frame_size as usize,
            )
        }
    }

    /// Frame index in the arena.
    pub const fn index(&self) -> u32 {
        self.index
    }

    /// Who sent what the frame holds ([`OwnedFrame::set_peer`]).
    #[inline]
    pub fn peer(&self) -> Peer {
        // SAFETY: the lease keeps the frame shared, so its slot is not written (see `PeerSlot`).
        unsafe { *self.arena.peers[self.index as usize].0.get() }
    }
}

impl Drop for FrameLease<'_> {
    #[inline]
    fn drop(&mut self) {
        self.arena.drop_refs(self.index, 1);
    }
}

impl fmt::Debug for FrameLease<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameLease")
            .field("index", &self.index)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena(count: u32) -> FrameArena {
        FrameArena::new(256, count, RegionOptions::default()).unwrap()
    }

    #[test]
    fn one_owner_at_a_time() {
        let a = arena(2);
        let o = a.owner().unwrap();
        assert!(a.owner().is_none());
        drop(o);
        assert!(a.owner().is_some());
    }

    #[test]
    fn frame_returns_after_last_lease_and_share_handle() {
        let a = arena(1);
        let mut o = a.owner().unwrap();
        let mut f = o.take().unwrap();
        assert!(o.take().is_none(), "only one frame");
        f.bytes_mut()[..3].copy_from_slice(b"abc");
        let mut s = f.share(0..3);
        assert_eq!(s.data(), b"abc");
        let (l1, l2) = (s.lease(), s.lease());
        drop(s);
        assert!(o.take().is_none(), "two leases still live");
        assert_eq!(&l2.frame()[..3], b"abc");
        drop(l1);
        assert!(o.take().is_none());
        drop(l2);
        assert!(o.take().is_some(), "last lease returned the frame");
    }

    #[test]
    fn leases_taken_back_settle_with_the_share_handle() {
        let a = arena(2);
        let mut o = a.owner().unwrap();
        let mut s = o.take().unwrap().share(0..0);
        let mut other = o.take().unwrap().share(0..0);
        let (l1, l2, l3) = (s.lease(), s.lease(), s.lease());
        let foreign = other.lease();
        s.take_back(l1);
        s.take_back(l2);
        assert_eq!(s.minted(), 1);
        // Not this frame's: dropped as usual, so `other` still counts it.
        s.take_back(foreign);
        assert_eq!(other.minted(), 1);
        drop(other);
        let held = o.take().expect("the foreign lease was released");
        drop(s);
        assert!(o.take().is_none(), "l3 still holds the frame");
        drop(l3);
        let back = o.take().expect("taken-back leases left nothing behind");
        assert!(o.take().is_none(), "and the frame came back once");
        drop((held, back));
    }

    #[test]
    fn unleased_and_unshared_frames_return_at_once() {
        let a = arena(1);
        let mut o = a.owner().unwrap();
        drop(o.take().unwrap().share(0..0));
        let f = o.take().expect("a share with no leases recycles on drop");
        drop(f);
        assert!(
            o.take().is_some(),
            "an owned frame dropped unshared recycles"
        );
    }

    #[test]
    fn leases_released_on_other_threads() {
        let a = arena(4);
        let mut o = a.owner().unwrap();
        let rounds = if cfg!(miri) { 20 } else { 20_000 };
        let (mut tx, mut rx) = crate::ring::spsc::channel::<FrameLease<'_>>(64);
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut n = 0;
                while n < rounds * 3 {
                    n += rx.pop_batch(64).count();
                    std::thread::yield_now();
                }
            });
            let mut sent = 0;
            while sent < rounds {
                let Some(mut f) = o.take() else {
                    std::thread::yield_now();
                    continue;
                };
                f.bytes_mut()[0] = sent as u8;
                let mut s = f.share(0..1);
                let mut leases = [s.lease(), s.lease(), s.lease()].into_iter();
                drop(s);
                while leases.len() > 0 {
                    tx.push_batch(&mut leases);
                }
                sent += 1;
            }
        });
        o.reclaim();
        assert_eq!(o.free_len(), 4, "every frame came home");
    }

    #[test]
    fn lent_frames_are_claimed_once() {
        let a = arena(2);
        let mut o = a.owner().unwrap();
        let f = o.take().unwrap();
        let i = o.lend(f);
        assert_eq!(o.lent_len(), 1);
        assert!(
            o.claim(i + 1).is_none(),
            "a frame that was not lent is refused"
        );
        assert!(o.claim(99).is_none(), "an index past the arena is refused");
        let mut back = o.claim(i).expect("the lent frame comes back");
        assert!(o.claim(i).is_none(), "and only once");
        back.bytes_mut()[0] = 1;
        assert_eq!(o.lent_len(), 0);
    }

    #[test]
    fn bad_geometry_is_an_error() {
        assert!(matches!(
            FrameArena::new(0, 1, RegionOptions::default()),
            Err(ArenaError::Geometry(_))
        ));
        assert!(matches!(
            FrameArena::new(64, 0, RegionOptions::default()),
            Err(ArenaError::Geometry(_))
        ));
    }
}
