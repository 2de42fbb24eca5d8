//! A doorbell for a consumer that sleeps in `poll`: producers ring it after publishing work to
//! the consumer's queue, and only while the consumer has said it is about to sleep, so a busy
//! consumer costs a producer one fence and one load per batch, and no syscall.
//!
//! The data-plane thread of an inline appliance sleeps in `poll` on its receive socket when
//! nothing arrives; the housekeeping thread feeds its side queue (TCP connections, the socket
//! beside AF_XDP). Without a doorbell those events wait for the sleep's timeout; with it the
//! sleeper is woken as soon as they are queued.
//!
//! The protocol is Dekker's, with a full fence on each side:
//!
//! - consumer: [`Doorbell::arm`] (armed = true, fence), then look at the queue once more; sleep
//!   only if it is empty, in [`poll`] on its own descriptor and [`Doorbell::fd`]; then
//!   [`Doorbell::disarm`];
//! - producer: publish, then [`Doorbell::ring`] (fence, then if armed: disarm and write the
//!   eventfd).
//!
//! Either the consumer's last look sees the producer's item, or the producer sees the bell
//! armed; an item is never left behind a sleep. A ring that arrives after the consumer woke on
//! its own leaves the eventfd readable: the next sleep returns at once and clears it (one
//! spurious wake-up, nothing lost).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};

/// The doorbell: an eventfd and the consumer's "about to sleep" flag.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
    armed: AtomicBool,
    rings: AtomicU64,
}

impl Doorbell {
    /// A new doorbell (a non-blocking eventfd).
    ///
    /// # Errors
    /// The kernel's (`EMFILE`, `ENOMEM`).
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `raw` is a descriptor eventfd just opened, owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
            armed: AtomicBool::new(false),
            rings: AtomicU64::new(0),
        })
    }

    /// The descriptor to `poll` beside the consumer's own (readable once rung).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Consumer: about to sleep. It must then look at its queue once more and sleep only if
    /// that finds nothing; a producer that published before this became visible has published
    /// where that look finds it.
    #[inline]
    pub fn arm(&self) {
        self.armed.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Consumer: awake (the sleep ended, or the last look found work).
    #[inline]
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::Relaxed);
    }

    /// Producer: after publishing work. Writes the eventfd only if the consumer is armed, and
    /// only once per sleep.
    #[inline]
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::Relaxed) {
            self.rings.fetch_add(1, Ordering::Relaxed);
            let one = 1u64;
            // SAFETY: writes the 8 bytes of `one`, which outlives the call, to our eventfd. It
            // can only fail with EAGAIN (the counter is near u64::MAX, so it is readable
            // anyway), which needs no handling.
            let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
        }
    }

    /// Times a producer woke the consumer (written the eventfd).
    pub fn rings(&self) -> u64 {
        self.rings.load(Ordering::Relaxed)
    }

    /// Clears a ring (reads the eventfd's count; nothing to read is fine).
    fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into `n`, which outlives the call, from our eventfd.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut n).cast(), 8) };
    }
}

/// Sleeps in `poll` until `fd` is readable, `bell` is rung, or `timeout_ms` passes (`poll`'s
/// timer, not the jiffy-rounded `SO_RCVTIMEO`); returns whether `fd` is readable. A ring is
/// cleared here. The caller arms and disarms the bell around it (see the module's protocol).
///
/// # Errors
/// `poll`'s, except `EINTR` (which returns `false`).
pub fn poll(fd: BorrowedFd<'_>, bell: Option<&Doorbell>, timeout_ms: i32) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: bell.map_or(-1, |b| b.fd.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let n = if bell.is_some() { 2 } else { 1 };
    // SAFETY: `fds` holds `n` valid pollfd entries and outlives the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EINTR) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    if let Some(b) = bell
        && fds[1].revents & libc::POLLIN != 0
    {
        b.clear();
    }
    Ok(fds[0].revents != 0)
}

// eventfd, pipe and poll are system calls Miri cannot run; the protocol's memory orderings are
// the two fences above.
#[cfg(all(test, not(miri)))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are descriptors pipe2 just opened, owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_ring_while_unarmed_writes_nothing() {
        let bell = Doorbell::new().unwrap();
        bell.ring();
        assert_eq!(bell.rings(), 0);
        let (r, _w) = pipe();
        assert!(!poll(r.as_fd(), Some(&bell), 0).unwrap());
    }

    #[test]
    fn a_ring_wakes_an_armed_sleeper_once_and_is_cleared() {
        let bell = Doorbell::new().unwrap();
        let (r, _w) = pipe();
        bell.arm();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                bell.ring();
                bell.ring(); // the second finds it disarmed already
            });
            let t = Instant::now();
            // Woken by the bell, long before the timeout; the pipe itself is not readable.
            assert!(!poll(r.as_fd(), Some(&bell), 60_000).unwrap());
            assert!(t.elapsed() < Duration::from_secs(30), "woken by the ring");
        });
        bell.disarm();
        assert_eq!(bell.rings(), 1);
        // Cleared: the next sleep is not woken by the old ring.
        assert!(!poll(r.as_fd(), Some(&bell), 0).unwrap());
    }

    #[test]
    fn the_own_descriptor_wakes_the_sleeper_and_is_reported() {
        let bell = Doorbell::new().unwrap();
        let (r, w) = pipe();
        // SAFETY: writes one byte from a live buffer to the pipe's write end.
        let wrote = unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert_eq!(wrote, 1);
        bell.arm();
        assert!(poll(r.as_fd(), Some(&bell), 60_000).unwrap());
        bell.disarm();
        assert!(poll(r.as_fd(), None, 0).unwrap());
    }

    /// The protocol: a producer publishes and rings while the consumer arms, looks, sleeps;
    /// every item is seen, never one left behind a sleep (each sleep's timeout is an hour, so a
    /// lost wake-up would hang the test rather than pass it).
    #[test]
    fn no_item_is_left_behind_a_sleep() {
        const ITEMS: u64 = 20_000;
        let bell = Doorbell::new().unwrap();
        let published = AtomicU64::new(0);
        let (r, _w) = pipe();
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 1..=ITEMS {
                    published.store(i, Ordering::Release);
                    bell.ring();
                    if i % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
            });
            let mut seen = 0;
            while seen < ITEMS {
                let now = published.load(Ordering::Acquire);
                if now > seen {
                    seen = now;
                    continue;
                }
                bell.arm();
                if published.load(Ordering::Acquire) > seen {
                    bell.disarm();
                    continue;
                }
                poll(r.as_fd(), Some(&bell), 3_600_000).unwrap();
                bell.disarm();
            }
        });
    }
}
