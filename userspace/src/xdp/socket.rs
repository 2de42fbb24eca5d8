//! One AF_XDP socket per NIC RX queue, with its UMEM.
//!
//! The UMEM is the queue's [`FrameArena`]: page-aligned (2 MiB hugepages when reserved), bound to
//! the NIC's NUMA node, registered with the kernel as chunks of `frame_size` bytes. Frames lent
//! to the FILL ring are tracked by the arena's owner; an RX descriptor is accepted only if it
//! lies inside one lent frame. Setup order follows the kernel's rules: register the UMEM, size
//! the rings, map them, prefill FILL, then bind (zero-copy first, copy when the driver refuses).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use tracing::{info, warn};

use super::ring::{ConsRing, Layout, ProdRing, RingMem};
use super::sys;
use crate::mem::frames::{FrameArena, FrameOwner};
use crate::ring::doorbell::Doorbell;

/// How the socket ended up bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindMode {
    /// The NIC DMAs straight into the UMEM.
    ZeroCopy,
    /// The kernel copies each frame into the UMEM (generic XDP, or drivers without zero-copy).
    Copy,
}

impl BindMode {
    /// `zerocopy` or `copy`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::ZeroCopy => "zerocopy",
            Self::Copy => "copy",
        }
    }
}

/// Socket options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XskOptions {
    /// Descriptors in the RX, FILL and COMPLETION rings (a power of two).
    pub ring_size: u32,
    /// Ask for `XDP_USE_NEED_WAKEUP`.
    pub need_wakeup: bool,
    /// Try zero-copy before copy mode.
    pub try_zero_copy: bool,
}

impl Default for XskOptions {
    fn default() -> Self {
        Self {
            ring_size: 2048,
            need_wakeup: true,
            try_zero_copy: true,
        }
    }
}

/// Errors setting a socket up.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// A setup step failed.
    #[error("AF_XDP {step} (queue {queue}): {reason}")]
    Setup {
        /// Which step.
        step: &'static str,
        /// The queue.
        queue: u32,
        /// The kernel's reason.
        reason: io::Error,
    },
    /// Bad options.
    #[error("AF_XDP: {0}")]
    Invalid(String),
}

/// Kernel-side drop counters of one socket (`XDP_STATISTICS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskStats {
    /// Frames dropped for other reasons (e.g. the program redirected to a full socket).
    pub rx_dropped: u64,
    /// Invalid descriptors on the FILL ring.
    pub rx_invalid_descs: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found the FILL ring empty.
    pub rx_fill_ring_empty_descs: u64,
}

/// An AF_XDP socket bound to one queue, with its RX, FILL and COMPLETION rings. Borrows the
/// arena that is its UMEM.
#[derive(Debug)]
pub struct XskSocket<'a> {
    _umem: &'a FrameArena,
    fd: OwnedFd,
    /// Received frames (kernel produces).
    pub rx: ConsRing<libc::xdp_desc>,
    /// Frames lent to the kernel to receive into (we produce).
    pub fill: ProdRing<u64>,
    /// Transmitted frames (unused on the RX path; the kernel requires it with the UMEM).
    pub completion: ConsRing<u64>,
    mode: BindMode,
    queue: u32,
    frame_size: u32,
    umem_len: u64,
}

/// Registers the UMEM `addr..addr + len` (chunks of `chunk_size`) on the AF_XDP socket `fd`,
/// sizes its FILL and COMPLETION rings and `data_ring` (`XDP_RX_RING` or `XDP_TX_RING`) to
/// `ring_size`, and maps FILL and COMPLETION. Returns them with the kernel's ring offsets, for
/// mapping the data ring with [`map_ring`]. (The kernel wants FILL and COMPLETION for every UMEM,
/// even where one of them goes unused.)
///
/// # Safety
/// The memory must stay mapped for as long as the socket exists.
pub(super) unsafe fn setup_umem(
    fd: BorrowedFd<'_>,
    addr: *mut u8,
    len: u64,
    chunk_size: u32,
    ring_size: u32,
    data_ring: libc::c_int,
    queue: u32,
) -> Result<(ProdRing<u64>, ConsRing<u64>, libc::xdp_mmap_offsets), XskError> {
    let err = |step| {
        move |reason| XskError::Setup {
            step,
            queue,
            reason,
        }
    };
    let reg = libc::xdp_umem_reg {
        addr: addr as u64,
        len,
        chunk_size,
        headroom: 0,
        flags: 0,
        tx_metadata_len: 0,
    };
    // SAFETY: `xdp_umem_reg` is the option's type; the caller keeps the memory it names mapped
    // for the socket's life.
    unsafe { sys::xdp_setsockopt(fd, libc::XDP_UMEM_REG, &reg) }
        .map_err(err("UMEM registration"))?;
    for opt in [
        libc::XDP_UMEM_FILL_RING,
        libc::XDP_UMEM_COMPLETION_RING,
        data_ring,
    ] {
        // SAFETY: ring-size options take a u32.
        unsafe { sys::xdp_setsockopt(fd, opt, &ring_size) }.map_err(err("ring sizing"))?;
    }
    // SAFETY: `xdp_mmap_offsets` is plain data, valid when zeroed.
    let (off, got) =
        unsafe { sys::xdp_getsockopt::<libc::xdp_mmap_offsets>(fd, libc::XDP_MMAP_OFFSETS) }
            .map_err(err("ring offsets"))?;
    if got != size_of::<libc::xdp_mmap_offsets>() {
        return Err(XskError::Invalid(
            "kernel too old: no ring flags (needs Linux 5.4+)".into(),
        ));
    }
    // SAFETY: one view per ring, each mapped as the kernel laid it out.
    let (fill, completion) = unsafe {
        let (mem, base, layout) = map_ring(
            fd,
            libc::XDP_UMEM_PGOFF_FILL_RING,
            &off.fr,
            8,
            ring_size,
            queue,
            "mapping FILL",
        )?;
        let fill = ProdRing::<u64>::new(mem, base, layout);
        let (mem, base, layout) = map_ring(
            fd,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
            &off.cr,
            8,
            ring_size,
            queue,
            "mapping COMPLETION",
        )?;
        (fill, ConsRing::<u64>::new(mem, base, layout))
    };
    Ok((fill, completion, off))
}

/// Binds the socket to `ifindex`/`queue`: zero-copy first when `try_zero_copy` (logging the
/// kernel's reason when it refuses), then copy. `flags` are added to both attempts.
///
/// # Errors
/// [`XskError::Setup`] when the copy-mode bind fails too.
pub(super) fn bind_ladder(
    fd: BorrowedFd<'_>,
    ifindex: u32,
    queue: u32,
    try_zero_copy: bool,
    flags: u16,
    what: &str,
) -> Result<BindMode, XskError> {
    if try_zero_copy {
        match sys::xsk_bind(fd, ifindex, queue, libc::XDP_ZEROCOPY | flags) {
            Ok(()) => return Ok(BindMode::ZeroCopy),
            Err(e) => warn!(
                queue,
                socket = what,
                reason = %e,
                "zero-copy bind refused; falling back to copy mode"
            ),
        }
    }
    sys::xsk_bind(fd, ifindex, queue, libc::XDP_COPY | flags).map_err(|reason| {
        XskError::Setup {
            step: "bind",
            queue,
            reason,
        }
    })?;
    Ok(BindMode::Copy)
}

/// Maps one ring of the socket (`ring_size` entries of `elem` bytes at page offset `pgoff`) and
/// returns the mapping, its base and its layout, ready for one [`ProdRing`] or [`ConsRing`].
///
/// # Errors
/// [`XskError::Setup`] with `step` when the mapping fails.
pub(super) fn map_ring(
    fd: BorrowedFd<'_>,
    pgoff: u64,
    off: &libc::xdp_ring_offset,
    elem: usize,
    ring_size: u32,
    queue: u32,
    step: &'static str,
) -> Result<(Arc<RingMem>, *mut u8, Layout), XskError> {
    let map = sys::mmap_ring(fd, pgoff, off.desc as usize + ring_size as usize * elem).map_err(
        |reason| XskError::Setup {
            step,
            queue,
            reason,
        },
    )?;
    let base = map.as_ptr();
    Ok((
        Arc::new(RingMem::Mapped(map)),
        base,
        layout_of(off, ring_size),
    ))
}

/// A ring's layout from the kernel's offsets.
fn layout_of(off: &libc::xdp_ring_offset, size: u32) -> Layout {
    Layout {
        producer: off.producer as usize,
        consumer: off.consumer as usize,
        flags: off.flags as usize,
        desc: off.desc as usize,
        size,
    }
}

impl<'a> XskSocket<'a> {
    /// Creates the socket on `arena` (as its UMEM), prefills FILL from `owner`, and binds to
    /// `ifindex`/`queue`. Logs the bind mode and, if zero-copy was refused, the kernel's reason.
    ///
    /// # Errors
    /// [`XskError::Setup`] naming the step and the kernel's reason (`EPERM` without
    /// `CAP_NET_RAW`, `EAFNOSUPPORT` without AF_XDP, `EINVAL` for a queue the NIC lacks).
    pub fn new(
        arena: &'a FrameArena,
        owner: &mut FrameOwner<'_>,
        ifindex: u32,
        queue: u32,
        opts: XskOptions,
    ) -> Result<Self, XskError> {
        let err = |step| {
            move |reason| XskError::Setup {
                step,
                queue,
                reason,
            }
        };
        if !opts.ring_size.is_power_of_two() {
            return Err(XskError::Invalid(format!(
                "ring size {} is not a power of two",
                opts.ring_size
            )));
        }
        let fs = arena.frame_size();
        if !fs.is_power_of_two() || !(2048..=4096).contains(&fs) {
            return Err(XskError::Invalid(format!(
                "frame size {fs} must be 2048 or 4096 (aligned UMEM chunks)"
            )));
        }
        let fd = sys::xsk_socket().map_err(err("socket"))?;
        let umem_len = u64::from(fs) * u64::from(arena.count());
        // SAFETY: the region is the arena's, which the returned socket borrows for its whole
        // life (and the kernel pins the pages for as long as the socket exists).
        let (mut fill, completion, off) = unsafe {
            setup_umem(
                fd.as_fd(),
                arena.region().as_ptr(),
                umem_len,
                fs,
                opts.ring_size,
                libc::XDP_RX_RING,
                queue,
            )
        }?;
        // SAFETY: one view of the RX ring, mapped as the kernel laid it out.
        let rx = unsafe {
            let (mem, base, layout) = map_ring(
                fd.as_fd(),
                libc::XDP_PGOFF_RX_RING as u64,
                &off.rx,
                size_of::<libc::xdp_desc>(),
                opts.ring_size,
                queue,
                "mapping RX",
            )?;
            ConsRing::<libc::xdp_desc>::new(mem, base, layout)
        };

        // Prefill FILL before bind, so the first packets have somewhere to land.
        let want = fill.free(opts.ring_size).min(opts.ring_size);
        let mut n = 0;
        while n < want {
            let Some(frame) = owner.take() else { break };
            fill.write(n, u64::from(owner.lend(frame)) * u64::from(fs));
            n += 1;
        }
        fill.submit(n);

        let wake = if opts.need_wakeup {
            libc::XDP_USE_NEED_WAKEUP
        } else {
            0
        };
        let mode = bind_ladder(fd.as_fd(), ifindex, queue, opts.try_zero_copy, wake, "RX")?;
        info!(
            queue,
            mode = mode.label(),
            ring_size = opts.ring_size,
            frames = arena.count(),
            frame_size = fs,
            "AF_XDP socket bound"
        );
        Ok(Self {
            _umem: arena,
            fd,
            rx,
            fill,
            completion,
            mode,
            queue,
            frame_size: fs,
            umem_len,
        })
    }

    /// How the socket is bound.
    pub const fn mode(&self) -> BindMode {
        self.mode
    }

    /// The queue it serves.
    pub const fn queue(&self) -> u32 {
        self.queue
    }

    /// UMEM chunk size.
    pub const fn frame_size(&self) -> u32 {
        self.frame_size
    }

    /// UMEM length in bytes.
    pub const fn umem_len(&self) -> u64 {
        self.umem_len
    }

    /// The kernel's drop counters for this socket.
    ///
    /// # Errors
    /// The kernel's.
    pub fn stats(&self) -> io::Result<XskStats> {
        // SAFETY: `xdp_statistics` is plain data, valid when zeroed.
        let (s, _) = unsafe {
            sys::xdp_getsockopt::<libc::xdp_statistics>(self.fd.as_fd(), libc::XDP_STATISTICS)
        }?;
        Ok(XskStats {
            rx_dropped: s.rx_dropped,
            rx_invalid_descs: s.rx_invalid_descs,
            rx_ring_full: s.rx_ring_full,
            rx_fill_ring_empty_descs: s.rx_fill_ring_empty_descs,
        })
    }
}

/// What the AF_XDP ingest loop drives: a socket's FILL and RX rings and its kernel calls.
/// [`XskSocket`] is the real one; tests drive the loop with rings in plain memory, playing the
/// kernel from another thread.
pub trait XskRings {
    /// The FILL ring (we produce) and the RX ring (we consume).
    fn rings(&mut self) -> (&mut ProdRing<u64>, &mut ConsRing<libc::xdp_desc>);
    /// UMEM chunk size.
    fn frame_size(&self) -> u32;
    /// UMEM length in bytes.
    fn umem_len(&self) -> u64;
    /// Kicks the kernel to process FILL/RX (called when it set `XDP_RING_NEED_WAKEUP`).
    ///
    /// # Errors
    /// The kernel's.
    fn wakeup_rx(&self) -> io::Result<()>;
    /// Waits up to `timeout_ms` for RX descriptors, or for `bell` to ring (see
    /// [`crate::ring::doorbell`]).
    ///
    /// # Errors
    /// The kernel's.
    fn poll_rx(&self, timeout_ms: i32, bell: Option<&Doorbell>) -> io::Result<bool>;
    /// The kernel's drop counters.
    ///
    /// # Errors
    /// The kernel's.
    fn stats(&self) -> io::Result<XskStats>;
}

impl XskRings for XskSocket<'_> {
    fn rings(&mut self) -> (&mut ProdRing<u64>, &mut ConsRing<libc::xdp_desc>) {
        (&mut self.fill, &mut self.rx)
    }

    fn frame_size(&self) -> u32 {
        self.frame_size
    }

    fn umem_len(&self) -> u64 {
        self.umem_len
    }

    fn wakeup_rx(&self) -> io::Result<()> {
        sys::xsk_wakeup_rx(self.fd.as_fd())
    }

    fn poll_rx(&self, timeout_ms: i32, bell: Option<&Doorbell>) -> io::Result<bool> {
        crate::ring::doorbell::poll(self.fd.as_fd(), bell, timeout_ms)
    }

    fn stats(&self) -> io::Result<XskStats> {
        XskSocket::stats(self)
    }
}

impl AsFd for XskSocket<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for XskSocket<'_> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}
