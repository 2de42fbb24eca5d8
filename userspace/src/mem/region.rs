//! Page-aligned memory regions for receive buffers and (later) AF_XDP UMEM.
//!
//! A region is one anonymous mapping: 2 MiB hugepages when the kernel has them reserved, 4 KiB
//! pages otherwise; pre-faulted, and bound to a NUMA node on request. The pages used and the NUMA
//! outcome are recorded so the daemon can log and export them.

use core::fmt;
use core::ptr::NonNull;
use std::io;

use crate::mem::numa::{self, Placement};

/// Size of a huge page on x86-64 and aarch64 (the default hugetlbfs size).
pub const HUGE_PAGE: usize = 2 << 20;
/// Size of a base page.
pub const BASE_PAGE: usize = 4096;

/// Which pages back a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// 2 MiB hugepages (`MAP_HUGETLB`).
    Huge2M,
    /// Ordinary pages.
    Base4K,
    /// The global allocator (Miri, non-Linux): page-aligned, nothing more.
    Heap,
}

/// How to allocate a region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionOptions {
    /// Try hugepages first.
    pub hugepages: bool,
    /// NUMA node for the memory.
    pub placement: Placement,
    /// `mlock` the pages (AF_XDP UMEM), so they are never swapped or migrated under the NIC.
    pub lock: bool,
}

/// An owned, page-aligned, zero-initialised memory region.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    pages: PageKind,
    numa: numa::Outcome,
    /// `Some(Ok)` locked, `Some(Err)` the lock was refused (reported, not fatal), `None` not asked.
    locked: Option<Result<(), String>>,
}

// SAFETY: `Region` owns its mapping like a `Box<[u8]>`; it hands out no references itself.
unsafe impl Send for Region {}
// SAFETY: as above: `&Region` exposes only the address and length.
unsafe impl Sync for Region {}

impl Region {
    /// Maps at least `len` bytes (rounded up to the page size used).
    ///
    /// # Errors
    /// When the kernel refuses the mapping (out of memory, `len` zero).
    pub fn new(len: usize, opts: RegionOptions) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty region"));
        }
        let (ptr, len, pages) = map(len, opts.hugepages)?;
        let numa = numa::bind(ptr.as_ptr(), len, opts.placement);
        let locked = opts.lock.then(|| lock(ptr, len).map_err(|e| e.to_string()));
        Ok(Self {
            ptr,
            len,
            pages,
            numa,
            locked,
        })
    }

    /// Start of the region.
    pub const fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (a whole number of pages).
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Always false: regions are never empty.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Pages backing the region.
    pub const fn pages(&self) -> PageKind {
        self.pages
    }

    /// NUMA placement outcome.
    pub const fn numa(&self) -> &numa::Outcome {
        &self.numa
    }

    /// Whether the pages are locked: `None` if not asked, `Some(Err(reason))` if refused
    /// (RLIMIT_MEMLOCK without CAP_IPC_LOCK).
    pub fn locked(&self) -> Option<Result<(), &str>> {
        self.locked
            .as_ref()
            .map(|r| r.as_ref().map(|_| ()).map_err(String::as_str))
    }
}

#[cfg(all(target_os = "linux", not(miri)))]
fn lock(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: mlock only pins pages of our own live mapping.
    if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(all(target_os = "linux", not(miri))))]
fn lock(_: NonNull<u8>, _: usize) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("len", &self.len)
            .field("pages", &self.pages)
            .field("numa", &self.numa)
            .field("locked", &self.locked)
            .finish()
    }
}

#[cfg(all(target_os = "linux", not(miri)))]
fn map(len: usize, hugepages: bool) -> io::Result<(NonNull<u8>, usize, PageKind)> {
    let attempt = |len: usize, extra: libc::c_int| {
        // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing
        // memory; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | extra,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED)
            .then(|| NonNull::new(p.cast::<u8>()))
            .flatten()
    };
    if hugepages {
        let huge_len = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        if let Some(p) = attempt(huge_len, libc::MAP_HUGETLB) {
            return Ok((p, huge_len, PageKind::Huge2M));
        }
    }
    let base_len = len.div_ceil(BASE_PAGE) * BASE_PAGE;
    attempt(base_len, 0)
        .map(|p| (p, base_len, PageKind::Base4K))
        .ok_or_else(io::Error::last_os_error)
}

#[cfg(all(target_os = "linux", not(miri)))]
fn unmap(ptr: NonNull<u8>, len: usize, _pages: PageKind) {
    // SAFETY: `ptr`/`len` are exactly the mapping `map` returned, unmapped once from `Drop`.
    unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
}

#[cfg(not(all(target_os = "linux", not(miri))))]
fn map(len: usize, _hugepages: bool) -> io::Result<(NonNull<u8>, usize, PageKind)> {
    let len = len.div_ceil(BASE_PAGE) * BASE_PAGE;
    let layout = std::alloc::Layout::from_size_align(len, BASE_PAGE)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `layout` has a non-zero size (checked by `Region::new`).
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    NonNull::new(p)
        .map(|p| (p, len, PageKind::Heap))
        .ok_or_else(|| io::ErrorKind::OutOfMemory.into())
}

#[cfg(not(all(target_os = "linux", not(miri))))]
fn unmap(ptr: NonNull<u8>, len: usize, _pages: PageKind) {
    let layout =
        std::alloc::Layout::from_size_align(len, BASE_PAGE).expect("layout was valid at map");
    // SAFETY: allocated by `map` with this very layout, freed once from `Drop`.
    unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
}

impl Drop for Region {
    fn drop(&mut self) {
        unmap(self.ptr, self.len, self.pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_page_aligned_zeroed_memory() {
        let r = Region::new(10_000, RegionOptions::default()).unwrap();
        assert_eq!(r.as_ptr() as usize % BASE_PAGE, 0);
        assert!(r.len() >= 10_000 && r.len().is_multiple_of(BASE_PAGE));
        // SAFETY: the region is `len` readable bytes, and nothing else refers to it.
        let bytes = unsafe { core::slice::from_raw_parts(r.as_ptr(), r.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
        assert_eq!(r.numa(), &numa::Outcome::NotRequested);
        assert!(r.locked().is_none());
    }

    #[test]
    #[cfg_attr(miri, ignore = "mlock")]
    fn lock_is_attempted_and_reported() {
        let r = Region::new(
            1 << 16,
            RegionOptions {
                lock: true,
                ..Default::default()
            },
        )
        .unwrap();
        // Root (CAP_IPC_LOCK) locks; others within RLIMIT_MEMLOCK too. Either way it is reported.
        assert!(r.locked().is_some());
    }

    #[test]
    #[cfg_attr(miri, ignore = "mmap")]
    fn hugepages_fall_back_to_base_pages() {
        let r = Region::new(
            3 << 20,
            RegionOptions {
                hugepages: true,
                ..Default::default()
            },
        )
        .unwrap();
        match r.pages() {
            PageKind::Huge2M => assert_eq!(r.len(), 4 << 20),
            PageKind::Base4K => assert_eq!(r.len(), 3 << 20),
            PageKind::Heap => panic!("mmap path expected on Linux"),
        }
    }

    #[test]
    fn empty_region_is_an_error() {
        assert!(Region::new(0, RegionOptions::default()).is_err());
    }
}
