//! `xsk_bare_crate`: the bench's bare AF_XDP receive loop on a well-kept crate, xdpilone
//! (pure Rust), run beside our own socket code's bare loop (`--probe bare`) in the same bench
//! run, so our hand-written rings are measured against a public implementation of the same
//! job: every RX descriptor straight back to FILL, nothing parsed.
//!
//! The setup follows xdpilone's own examples: one UMEM and socket per queue, FILL and
//! COMPLETION on the socket, an RX ring, bind; the XDP program's `XskMap[queue]` then gets the
//! socket's fd. The loop batches like ours: up to `batch` descriptors per pass, FILL refilled
//! with the same addresses, a kick only when the kernel sets `need_wakeup`, a bounded busy
//! spin, then `poll`. It runs on the same frame depth as ours: FILL is stocked with a ring's
//! worth, and the frames beyond that wait in a spare list that refills FILL whenever it has
//! room (a burst that parks frames in RX does not leave FILL empty).

use core::num::NonZeroU32;
use core::ptr::NonNull;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use xdpilone::{DeviceQueue, IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig, User};

use crate::ingest::{IngestCounters, Tally};
use crate::mem::{Region, RegionOptions};
use crate::wire::event::monotonic_ns;

/// One queue's xdpilone socket, bound and with FILL stocked.
pub struct CrateXsk {
    // Field order is drop order: rings and sockets before the UMEM and its memory.
    rx: RingRx,
    fq: DeviceQueue,
    user: User,
    _sock: Socket,
    _umem: Umem,
    _mem: Region,
    frame_size: u32,
    /// Frames neither in FILL nor with the kernel: they refill FILL when it has room.
    spare: Vec<u64>,
}

// SAFETY: xdpilone's types hold raw pointers into the rings' and the UMEM's mappings, so they
// are not `Send` by default. A `CrateXsk` owns every handle to its socket, rings and memory;
// moving it to the one thread that then uses it alone shares nothing.
unsafe impl Send for CrateXsk {}

impl core::fmt::Debug for CrateXsk {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CrateXsk")
            .field("frame_size", &self.frame_size)
            .finish_non_exhaustive()
    }
}

fn errno(what: &str, e: impl core::fmt::Debug) -> io::Error {
    io::Error::other(format!("xdpilone {what}: {e:?}"))
}

impl CrateXsk {
    /// Binds queue `queue` of `ifindex` with `frames` UMEM frames of `frame_size` bytes and
    /// rings of `ring_size`.
    ///
    /// # Errors
    /// The kernel's, through xdpilone.
    pub fn new(
        ifindex: u32,
        queue: u32,
        frame_size: u32,
        frames: u32,
        ring_size: u32,
    ) -> io::Result<Self> {
        let bytes = frame_size as usize * frames as usize;
        let mem = Region::new(
            bytes,
            RegionOptions {
                hugepages: true,
                lock: true,
                ..Default::default()
            },
        )?;
        let area = NonNull::slice_from_raw_parts(
            NonNull::new(mem.as_ptr()).ok_or_else(|| io::Error::other("null region"))?,
            bytes,
        );
        let config = UmemConfig {
            fill_size: ring_size,
            complete_size: ring_size,
            frame_size,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: `area` is a page-aligned mapping of `bytes` bytes that `_mem` keeps alive for
        // as long as the UMEM (dropped after it, by field order); nothing else uses it.
        let umem = unsafe { Umem::new(config, area) }.map_err(|e| errno("umem", e))?;
        let mut info = IfInfo::invalid();
        info.from_ifindex(ifindex)
            .map_err(|e| errno("ifindex", e))?;
        info.set_queue(queue);
        let sock = Socket::with_shared(&info, &umem).map_err(|e| errno("socket", e))?;
        let mut fq = umem.fq_cq(&sock).map_err(|e| errno("fill/completion", e))?;
        let user = umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: NonZeroU32::new(ring_size),
                    tx_size: None,
                    bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP,
                },
            )
            .map_err(|e| errno("rx ring", e))?;
        let rx = user.map_rx().map_err(|e| errno("map rx", e))?;
        // FILL is stocked before bind, as for our own socket.
        let stock = frames.min(ring_size);
        let mut w = fq.fill(stock);
        w.insert((0..u64::from(stock)).map(|i| i * u64::from(frame_size)));
        w.commit();
        drop(w);
        umem.bind(&user).map_err(|e| errno("bind", e))?;
        // Room for every frame, so the loop never grows it.
        let mut spare = Vec::with_capacity(frames as usize);
        spare.extend((u64::from(stock)..u64::from(frames)).map(|i| i * u64::from(frame_size)));
        Ok(Self {
            rx,
            fq,
            user,
            _sock: sock,
            _umem: umem,
            _mem: mem,
            frame_size,
            spare,
        })
    }

    /// The socket's fd, for `XskMap[queue]`.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.user.as_raw_fd()
    }

    /// Receives until `stop`: descriptors straight back to FILL, datagrams and bytes counted.
    ///
    /// # Errors
    /// `poll`'s.
    pub fn run(
        &mut self,
        batch: u32,
        busy_spin: Duration,
        stop: &AtomicBool,
        counters: &IngestCounters,
    ) -> io::Result<()> {
        let mask = !(u64::from(self.frame_size) - 1);
        let mut addrs = vec![0u64; batch as usize];
        let mut tally = Tally::default();
        let spin_ns = busy_spin.as_nanos() as u64;
        let mut empty_since: Option<u64> = None;
        while !stop.load(Ordering::Relaxed) {
            let mut n = 0usize;
            {
                let mut r = self.rx.receive(batch);
                while let Some(d) = r.read() {
                    addrs[n] = d.addr & mask;
                    tally.bytes += u64::from(d.len);
                    n += 1;
                }
                r.release();
            }
            // Spare frames first (as ours: released frames refill before received ones return),
            // then what was received; xdpilone reserves what its view of the ring says is free,
            // and what does not fit waits in the spare list.
            if !self.spare.is_empty() {
                let mut w = self.fq.fill(self.spare.len().min(batch as usize) as u32);
                let k = w.insert(self.spare.iter().rev().copied()) as usize;
                w.commit();
                drop(w);
                self.spare.truncate(self.spare.len() - k);
            }
            if n > 0 {
                let mut w = self.fq.fill(n as u32);
                let k = w.insert(addrs[..n].iter().copied()) as usize;
                w.commit();
                drop(w);
                self.spare.extend_from_slice(&addrs[k..n]);
                tally.datagrams += n as u64;
                tally.flush(counters);
                empty_since = None;
            }
            if self.fq.needs_wakeup() {
                self.fq.wake();
            }
            if n == 0 {
                let now = monotonic_ns();
                if now - *empty_since.get_or_insert(now) < spin_ns {
                    core::hint::spin_loop();
                    continue;
                }
                let mut pfd = libc::pollfd {
                    fd: self.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                if unsafe { libc::poll(&raw mut pfd, 1, 1) } < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        tally.flush(counters);
        Ok(())
    }
}
