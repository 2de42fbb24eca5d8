//! AF_XDP transmit, for the blaster: frames written straight into a UMEM and handed to the NIC
//! queue through the TX ring, with no socket layer and no per-packet syscall.
//!
//! The UMEM is a locked [`Region`] of `frames` chunks. A chunk is either free (on the free list,
//! ours to write) or in flight (its descriptor is on the TX ring, or the kernel has not yet
//! returned it on the COMPLETION ring); only free chunks are ever written, so the kernel never
//! reads a frame while we change it. The kernel requires a FILL ring for every UMEM; this socket
//! sizes one and never fills it.
//!
//! In copy mode (veth, and NICs without zero-copy) the kernel transmits during the wake-up call,
//! at most a small batch per call (32 on current kernels), so [`XskTx::send`] kicks until the
//! ring is drained or the kernel says it is busy.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use tracing::info;

use super::ring::{ConsRing, ProdRing};
use super::socket::{BindMode, XskError, bind_ladder, map_ring, setup_umem};
use super::sys;
use crate::mem::{Region, RegionOptions};

/// A TX-only AF_XDP socket bound to one queue of one interface.
#[derive(Debug)]
pub struct XskTx {
    // Field order is drop order: the rings and the socket go before the UMEM they use.
    tx: ProdRing<libc::xdp_desc>,
    completion: ConsRing<u64>,
    _fill: ProdRing<u64>,
    fd: OwnedFd,
    umem: Region,
    free: Vec<u32>,
    frame_size: u32,
    mode: BindMode,
}

/// TX frame size (one UMEM chunk; a full 1 500-byte MTU frame fits).
pub const TX_FRAME_SIZE: u32 = 2048;

impl XskTx {
    /// Creates the socket with `frames` UMEM chunks and rings of `ring_size`, and binds it to
    /// `ifindex`/`queue` (zero-copy first when `try_zero_copy`, then copy).
    ///
    /// # Errors
    /// [`XskError::Setup`] naming the step and the kernel's reason (`EPERM` without
    /// `CAP_NET_RAW`, `EINVAL` for a queue the interface lacks).
    pub fn new(
        ifindex: u32,
        queue: u32,
        frames: u32,
        ring_size: u32,
        try_zero_copy: bool,
    ) -> Result<Self, XskError> {
        let err = |step| {
            move |reason| XskError::Setup {
                step,
                queue,
                reason,
            }
        };
        if !ring_size.is_power_of_two() || frames < ring_size {
            return Err(XskError::Invalid(format!(
                "TX ring size {ring_size} must be a power of two no larger than the {frames} frames"
            )));
        }
        let len = TX_FRAME_SIZE as usize * frames as usize;
        let umem = Region::new(
            len,
            RegionOptions {
                hugepages: true,
                lock: true,
                ..RegionOptions::default()
            },
        )
        .map_err(err("UMEM allocation"))?;
        let fd = sys::xsk_socket().map_err(err("socket"))?;
        // SAFETY: the region is kept in `self` and dropped after the socket (field order), and
        // the kernel pins its pages for as long as the socket exists.
        let (fill, completion, off) = unsafe {
            setup_umem(
                fd.as_fd(),
                umem.as_ptr(),
                len as u64,
                TX_FRAME_SIZE,
                ring_size,
                libc::XDP_TX_RING,
                queue,
            )
        }?;
        // SAFETY: one view of the TX ring, mapped as the kernel laid it out.
        let tx = unsafe {
            let (mem, base, layout) = map_ring(
                fd.as_fd(),
                libc::XDP_PGOFF_TX_RING as u64,
                &off.tx,
                size_of::<libc::xdp_desc>(),
                ring_size,
                queue,
                "mapping TX",
            )?;
            ProdRing::<libc::xdp_desc>::new(mem, base, layout)
        };
        let mode = bind_ladder(
            fd.as_fd(),
            ifindex,
            queue,
            try_zero_copy,
            libc::XDP_USE_NEED_WAKEUP,
            "TX",
        )?;
        info!(
            queue,
            mode = mode.label(),
            ring_size,
            frames,
            "AF_XDP TX socket bound"
        );
        Ok(Self {
            umem,
            fd,
            tx,
            completion,
            _fill: fill,
            free: (0..frames).rev().collect(),
            frame_size: TX_FRAME_SIZE,
            mode,
        })
    }

    /// How the socket is bound.
    pub const fn mode(&self) -> BindMode {
        self.mode
    }

    /// Frames the kernel has not returned yet.
    pub fn in_flight(&self) -> usize {
        self.umem.len() / self.frame_size as usize - self.free.len()
    }

    /// Takes back the frames the kernel has finished with.
    pub fn reclaim(&mut self) -> u32 {
        let n = self.completion.available(u32::MAX);
        for i in 0..n {
            let addr = self.completion.read(i);
            let idx = (addr / u64::from(self.frame_size)) as u32;
            // A completion for a frame we did not send would be a kernel bug; never let it
            // create a second owner.
            debug_assert!(!self.free.contains(&idx));
            self.free.push(idx);
        }
        self.completion.release(n);
        n
    }

    /// Queues up to `n` frames: `fill(buf)` writes each frame into a free UMEM chunk and returns
    /// its length (at most [`TX_FRAME_SIZE`]). Then kicks the kernel. Returns how many were
    /// queued: fewer than `n` when the ring or the UMEM is full of frames in flight.
    ///
    /// # Errors
    /// The kernel's, from the wake-up call (other than "busy, try again").
    pub fn send(&mut self, n: u32, mut fill: impl FnMut(&mut [u8]) -> usize) -> io::Result<u32> {
        self.reclaim();
        let k = self.tx.free(n).min(n).min(self.free.len() as u32);
        for i in 0..k {
            let idx = self.free.pop().expect("k <= free.len()");
            let start = idx as usize * self.frame_size as usize;
            // SAFETY: chunk `idx` lies inside the region (idx < frames) and is free: not on the
            // TX ring and returned on COMPLETION, so neither the kernel nor anyone else reads or
            // writes it; this is the only live reference to it.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(
                    self.umem.as_ptr().add(start),
                    self.frame_size as usize,
                )
            };
            let len = fill(buf).min(self.frame_size as usize);
            self.tx.write(
                i,
                libc::xdp_desc {
                    addr: start as u64,
                    len: len as u32,
                    options: 0,
                },
            );
        }
        self.tx.submit(k);
        self.kick()?;
        Ok(k)
    }

    /// Kicks and reclaims until every frame is back or `timeout` passes; returns how many are
    /// still out (frames the kernel has not completed are not known to be sent).
    ///
    /// # Errors
    /// As [`XskTx::send`].
    pub fn flush(&mut self, timeout: std::time::Duration) -> io::Result<usize> {
        let end = std::time::Instant::now() + timeout;
        while self.in_flight() > 0 && std::time::Instant::now() < end {
            self.kick()?;
            if self.reclaim() == 0 {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
        Ok(self.in_flight())
    }

    /// Wakes the kernel to transmit: once when it asked (zero-copy), or until the ring is drained
    /// or it reports itself busy (copy mode transmits inside the call, a batch at a time).
    fn kick(&mut self) -> io::Result<()> {
        if self.mode == BindMode::ZeroCopy && !self.tx.needs_wakeup() {
            return Ok(());
        }
        for _ in 0..(self.tx.size() / 16).max(4) {
            match sys::xsk_wakeup_tx(self.fd.as_fd()) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
