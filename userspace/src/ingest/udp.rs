//! Kernel UDP ingest (the no-XDP path): `recvmmsg` batches straight into arena frames, parsed
//! in place.
//!
//! Each call receives up to `batch` datagrams, each into its own free [`FrameArena`](crate::mem::frames::FrameArena) frame (no
//! intermediate buffer, so the only copy is the kernel's). Each datagram is then frozen as a
//! [`SharedFrame`](crate::mem::frames::SharedFrame), its frames parsed into pooled events that borrow
//! it, and the events pushed to the ingest → dispatcher queue. The frame returns to this thread
//! when the last of its events is released.
//!
use core::mem::MaybeUninit;
use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{Deliver, Handoff, IngestCounters, Tally};
use crate::engine::idle::{Idle, backoff};
use crate::engine::inline::CONTROL_EVERY;
use crate::engine::stage::{self, Pass};
use crate::mem::frames::{FrameOwner, OwnedFrame};
use crate::wire::event::{Peer, Source, Stamp, monotonic_ns};
use crate::wire::protocol::{Limits, RejectReason};

/// Joins `groups` on interface `ifindex` (0: the kernel picks by its routes), and turns
/// `IP_MULTICAST_ALL` off so the socket takes only the groups it joined, not every group some
/// other socket on the host joined for the same port.
///
/// # Errors
/// The first join the kernel refuses, naming the group.
pub fn join_groups(sock: &UdpSocket, groups: &[std::net::IpAddr], ifindex: u32) -> io::Result<()> {
    let s = socket2::SockRef::from(sock);
    let (level, opt) = if sock.local_addr()?.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MULTICAST_ALL)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_ALL)
    };
    if !groups.is_empty() {
        let off: libc::c_int = 0;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live `c_int`; the fd is
        // open for the call.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                opt,
                (&raw const off).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("IP_MULTICAST_ALL off: {e}"),
            ));
        }
    }
    for g in groups {
        let joined = match g {
            std::net::IpAddr::V4(g) => {
                s.join_multicast_v4_n(g, &socket2::InterfaceIndexOrAddress::Index(ifindex))
            }
            std::net::IpAddr::V6(g) => s.join_multicast_v6(g, ifindex),
        };
        joined
            .map_err(|e| io::Error::new(e.kind(), format!("joining multicast group {g}: {e}")))?;
    }
    Ok(())
}

/// Binds a UDP socket: to `device` only when given (`SO_BINDTODEVICE`), `SO_REUSEPORT` when
/// several share the address (`ingest.udp.sockets`),
/// the receive buffer as asked (0 keeps the default), and a receive timeout so the loop
/// notices a stop request.
///
/// The buffer is set with `SO_RCVBUFFORCE` where the process may (`CAP_NET_ADMIN`), so an
/// operator's size is not silently capped at `net.core.rmem_max`; without the capability it
/// falls back to `SO_RCVBUF`, which the kernel caps there.
///
/// # Errors
/// When the address cannot be bound (in use, not local, no permission for a low port).
pub fn bind_udp(
    addr: std::net::SocketAddr,
    rcvbuf: u32,
    reuse_port: bool,
    device: Option<&str>,
) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if let Some(dev) = device {
        s.bind_device(Some(dev.as_bytes()))
            .map_err(|e| io::Error::new(e.kind(), format!("SO_BINDTODEVICE {dev}: {e}")))?;
    }
    s.bind(&addr.into())?;
    let sock = UdpSocket::from(s);
    if rcvbuf != 0 {
        let v = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        let set = |opt| {
            // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live `c_int`; the fd
            // is open.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const v).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        set(libc::SO_RCVBUFFORCE).or_else(|_| set(libc::SO_RCVBUF))?;
    }
    // Each datagram then carries the socket's drop count: kernel drops are counted, not
    // guessed (`IngestCounters::kernel_drops`).
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live `c_int`; the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::warn!(reason = %io::Error::last_os_error(), "SO_RXQ_OVFL refused: kernel drops are read only at exit");
    }
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(sock)
}

/// The socket's drop count (`sk_drops`) from `SO_MEMINFO`, if the kernel gives it.
fn meminfo_drops(fd: libc::c_int) -> Option<u32> {
    // SK_MEMINFO_VARS: nine counters, DROPS the last.
    let mut info = [0u32; 9];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large and live.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    (rc == 0 && len as usize > libc::SK_MEMINFO_DROPS as usize * 4)
        .then(|| info[libc::SK_MEMINFO_DROPS as usize])
}

/// The `SO_RXQ_OVFL` drop count in one received message's control data, if there is one
/// (the kernel adds it once the socket has dropped anything).
fn ovfl_drops(hdr: &libc::msghdr) -> Option<u32> {
    // SAFETY: `hdr` is a header the kernel just filled: its control pointer and length describe
    // a live buffer of ours, and the CMSG macros stay within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                return Some(core::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// Bytes of control data per message: one `SO_RXQ_OVFL` `u32`, padded (8-byte words).
const CTRL_WORDS: usize = 4;

/// What the receive loop needs.
#[derive(Debug)]
pub struct UdpIngest<'s> {
    /// The bound socket.
    pub socket: &'s UdpSocket,
    /// Datagrams per `recvmmsg`.
    pub batch: usize,
    /// Frame limits.
    pub limits: Limits,
    /// Set to stop the loop (checked at least every receive timeout).
    pub stop: &'s AtomicBool,
    /// Where totals go.
    pub counters: &'s IngestCounters,
    /// The first sequence number ([`crate::wire::event::seq_base`] of this socket's stream).
    pub seq_base: u64,
    /// Longest wait when nothing arrives (the socket's receive timeout; with a side queue's
    /// bell, a `poll` on the socket and the bell): short in inline mode, where the side queue
    /// and batch windows are served between calls.
    pub idle_poll: Duration,
    /// While set (the pipeline is `PAUSED`), stop receiving: the kernel holds what arrives,
    /// and counts what it must drop. Checked once per batch, so a pause takes effect within
    /// one receive timeout (a batch already being received is still delivered).
    pub paused: &'s AtomicBool,
}

impl<'s> UdpIngest<'s> {
    /// Receives until `stop` is set, as a [`stage::Stage`] driven by [`stage::drive`]. Allocates
    /// its batch arrays once, before the first pass.
    ///
    /// # Errors
    /// A sink's (inline mode); receive errors are counted and retried, never returned.
    pub fn run<'a>(
        &self,
        frames: &mut FrameOwner<'a>,
        handoff: impl Handoff<'a>,
    ) -> io::Result<()> {
        self.socket
            .set_read_timeout(Some(self.idle_poll.max(Duration::from_micros(100))))?;
        let batch = self.batch.max(1);
        let mut stage = self.stage(frames, handoff);
        stage::drive(&mut stage, batch)
    }

    /// The receive loop's state, its batch arrays allocated once.
    fn stage<'j, 'f, 'a, H: Handoff<'a>>(
        &'j self,
        frames: &'f mut FrameOwner<'a>,
        handoff: H,
    ) -> UdpStage<'j, 's, 'f, 'a, H> {
        let batch = self.batch.max(1);
        UdpStage {
            job: self,
            frames,
            held: Vec::with_capacity(batch),
            iovecs: Vec::with_capacity(batch),
            msgs: Vec::with_capacity(batch),
            ctrl: vec![[0; CTRL_WORDS]; batch],
            // SAFETY: sockaddr_storage is plain C data for which all-zero is a valid value.
            names: vec![unsafe { MaybeUninit::zeroed().assume_init() }; batch],
            drops: 0,
            errors: 0,
            error_backoff: Duration::from_millis(1),
            seq: self.seq_base,
            tally: Tally::default(),
            spins: 0,
            deliver: Deliver {
                limits: self.limits,
                handoff,
            },
            wait: UdpWait::Received,
            drain_left: STOP_DRAIN_BATCHES,
        }
    }
}

/// What one [`SideUdp::serve`] turn ended on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideTurn {
    /// The socket has nothing more now: wait until it is readable.
    Drained,
    /// It could not go on now (events wait for room in the queue, every frame is in use, the
    /// pipeline is paused, or a receive error backs off): try again at the next tick.
    Blocked,
    /// Its budget of passes is spent with datagrams still coming: serve it again soon.
    Busy,
    /// Ingest stopped and everything it received is on the queue: it is finished.
    Done,
}

/// The kernel UDP socket beside AF_XDP, served by the housekeeping thread instead of a thread
/// of its own: the socket is non-blocking, a turn runs the same receive pass as the threaded
/// loop ([`UdpIngest::run`]) while the socket has datagrams, and its events go to the
/// first data-plane thread's side queue through a hand-off that never waits
/// ([`super::TryEnqueue`]), so the admin server and the tick beside it are never held up by a
/// full queue.
pub struct SideUdp<'j, 's, 'f, 'a, H> {
    stage: UdpStage<'j, 's, 'f, 'a, H>,
    done: bool,
}

impl<'j, 's, 'f, 'a, H: Handoff<'a>> SideUdp<'j, 's, 'f, 'a, H> {
    /// Makes `job`'s socket non-blocking and allocates the batch arrays.
    ///
    /// # Errors
    /// When the socket cannot be made non-blocking.
    pub fn new(
        job: &'j UdpIngest<'s>,
        frames: &'f mut FrameOwner<'a>,
        handoff: H,
    ) -> io::Result<Self> {
        job.socket.set_nonblocking(true)?;
        Ok(Self {
            stage: job.stage(frames, handoff),
            done: false,
        })
    }

    /// The socket's descriptor, for the housekeeping thread's readiness wait.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'s> {
        std::os::fd::AsFd::as_fd(self.stage.job.socket)
    }

    /// Whether it has finished (after [`SideTurn::Done`]).
    pub const fn is_done(&self) -> bool {
        self.done
    }

    /// Receive passes until the socket is empty, the hand-off or the pipeline holds it back, or
    /// `max_passes` are done; the counters are published at the end of the turn.
    ///
    /// # Errors
    /// The hand-off's (none for [`super::TryEnqueue`]).
    pub fn serve(&mut self, max_passes: usize) -> io::Result<SideTurn> {
        if self.done {
            return Ok(SideTurn::Done);
        }
        let batch = self.stage.ctrl.len();
        let mut turn = SideTurn::Busy;
        for _ in 0..max_passes.max(1) {
            match stage::Stage::poll(&mut self.stage, batch)? {
                Pass::Worked(_) => {}
                Pass::Idle => {
                    turn = match self.stage.wait {
                        UdpWait::Received | UdpWait::Sleep => SideTurn::Drained,
                        _ => SideTurn::Blocked,
                    };
                    break;
                }
                Pass::Done => {
                    self.done = true;
                    turn = SideTurn::Done;
                    break;
                }
            }
        }
        stage::Stage::flush(&mut self.stage);
        Ok(turn)
    }
}

impl<H> core::fmt::Debug for SideUdp<'_, '_, '_, '_, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SideUdp")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// How a [`UdpStage`] waits after a pass that found nothing.
#[derive(Clone, Copy, Debug)]
enum UdpWait {
    /// The pass's `recvmmsg` already waited (its receive timeout): go again.
    Received,
    /// The socket is empty: sleep in `poll` on it and the hand-off's bell, up to `idle_poll`.
    Sleep,
    /// Paused: 1 ms.
    Paused,
    /// Every frame holds live events: back off until the pipeline releases some.
    Frames,
    /// The hand-off still holds events it could not pass on (it is not `ready`).
    Blocked,
    /// `recvmmsg` failed: this long before the retry.
    Error(Duration),
}

/// One kernel UDP socket's receive loop as a [`stage::Stage`]: a pass serves the side queue,
/// then receives one `recvmmsg` batch (blocking up to the receive timeout) and parses it.
struct UdpStage<'j, 's, 'f, 'a, H> {
    job: &'j UdpIngest<'s>,
    frames: &'f mut FrameOwner<'a>,
    held: Vec<OwnedFrame<'a>>,
    iovecs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    ctrl: Vec<[u64; CTRL_WORDS]>,
    names: Vec<libc::sockaddr_storage>,
    /// The socket's drop count as last seen (cumulative since it was made).
    drops: u32,
    errors: u64,
    error_backoff: Duration,
    seq: u64,
    tally: Tally,
    spins: u32,
    deliver: Deliver<H>,
    wait: UdpWait,
    /// Batches still to read, without waiting, once stopped.
    drain_left: u32,
}

/// Most `recvmmsg` batches read from a socket after the stop: with 64-datagram batches, 65 536
/// datagrams, more than a default socket buffer holds.
const STOP_DRAIN_BATCHES: u32 = 1024;

impl<'a, H: Handoff<'a>> UdpStage<'_, '_, '_, 'a, H> {
    /// The hand-off cannot take more yet (events wait for room on its queue): the loop waits
    /// for the data plane, having done `served` events of other work.
    fn blocked(&mut self, served: usize) -> Pass {
        self.wait = UdpWait::Blocked;
        if served > 0 {
            Pass::Worked(served)
        } else {
            Pass::Idle
        }
    }

    /// One `recvmmsg` batch (`flags`: `MSG_WAITFORONE` to wait up to the receive timeout,
    /// `MSG_DONTWAIT` not to wait) into free frames, each datagram parsed and handed on.
    fn receive(&mut self, budget: usize, flags: libc::c_int) -> io::Result<Pass> {
        let job = self.job;
        let fd = job.socket.as_raw_fd();
        let batch = budget.min(self.ctrl.len());
        while self.held.len() < batch {
            match self.frames.take() {
                Some(f) => self.held.push(f),
                None => break,
            }
        }
        if self.held.is_empty() {
            self.wait = UdpWait::Frames;
            return Ok(Pass::Idle);
        }
        self.spins = 0;
        self.iovecs.clear();
        self.msgs.clear();
        for f in &mut self.held {
            let buf = f.bytes_mut();
            self.iovecs.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            });
        }
        for ((iov, c), name) in self
            .iovecs
            .iter_mut()
            .zip(&mut self.ctrl)
            .zip(&mut self.names)
        {
            // SAFETY: mmsghdr is plain C data for which all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            m.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = c.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = size_of_val(c) as _;
            self.msgs.push(m);
        }
        // SAFETY: `msgs` holds `held.len()` headers, each pointing at one iovec that describes
        // one whole owned frame, at its own control buffer and at its own address buffer; the
        // frames, iovecs, buffers and headers all outlive the call, and nothing else touches
        // them during it.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                self.msgs.len() as libc::c_uint,
                flags,
                core::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            self.deliver.handoff.end(false)?;
            match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => self.wait = UdpWait::Received,
                // Anything else (ENOMEM, a socket error such as ECONNREFUSED queued by ICMP):
                // counted, logged once per burst, retried with backoff. Never the end of the
                // appliance.
                _ => {
                    self.errors += 1;
                    job.counters.receive_errors.fetch_add(1, Ordering::Relaxed);
                    if self.errors.is_power_of_two() {
                        tracing::warn!(reason = %e, errors = self.errors, "recvmmsg failed; retrying");
                    }
                    self.wait = UdpWait::Error(self.error_backoff);
                    self.error_backoff = (self.error_backoff * 2).min(Duration::from_millis(100));
                }
            }
            return Ok(Pass::Idle);
        }
        self.error_backoff = Duration::from_millis(1);
        let stamp = Stamp {
            source: Source::Udp,
            ingest_ns: monotonic_ns(),
        };
        let n = n as usize;
        self.deliver.handoff.begin();
        for ((mut frame, msg), name) in self.held.drain(..n).zip(&self.msgs).zip(&self.names) {
            let len = msg.msg_len as usize;
            self.tally.datagrams += 1;
            self.tally.bytes += len as u64;
            if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                // Longer than a frame: its tail is gone, so none of it is trusted.
                self.tally.rejected[RejectReason::Truncated as usize] += 1;
                continue; // `frame` drops here and goes back to the owner
            }
            frame.set_peer(peer_of(name));
            let mut shared = frame.share(0..len);
            self.deliver
                .frame(&mut shared, stamp, &mut self.seq, &mut self.tally)?;
        }
        self.deliver.handoff.end(false)?;
        // The newest count in the batch is the socket's total so far.
        if let Some(d) = self.msgs[..n]
            .iter()
            .rev()
            .find_map(|m| ovfl_drops(&m.msg_hdr))
            && d != self.drops
        {
            job.counters
                .kernel_drops
                .fetch_add(u64::from(d.wrapping_sub(self.drops)), Ordering::Relaxed);
            self.drops = d;
        }
        Ok(Pass::Worked(n))
    }
}

impl<'a, H: Handoff<'a>> stage::Stage for UdpStage<'_, '_, '_, 'a, H> {
    fn poll(&mut self, budget: usize) -> io::Result<Pass> {
        let job = self.job;
        let fd = job.socket.as_raw_fd();
        if job.stop.load(Ordering::Relaxed) {
            // Stopped: what other threads queued for this one is served, then windows close.
            let served = self.deliver.handoff.side()?;
            if served > 0 {
                return Ok(Pass::Worked(served));
            }
            if !self.deliver.handoff.is_drained() {
                // Events still wait for room in the queue: the data plane is still draining it.
                return Ok(self.blocked(0));
            }
            // What the socket already holds arrived before the stop: it is read (without
            // waiting, at most `STOP_DRAIN_BATCHES` batches, so a sender that keeps going cannot
            // hold the stop), so it is received rather than gone uncounted with the socket.
            if self.drain_left > 0 {
                if !self.deliver.handoff.ready() {
                    return Ok(self.blocked(0));
                }
                self.drain_left -= 1;
                match self.receive(budget, libc::MSG_DONTWAIT)? {
                    Pass::Worked(n) => return Ok(Pass::Worked(n)),
                    // Every frame in use: the pipeline is still releasing them; again.
                    Pass::Idle if matches!(self.wait, UdpWait::Frames) => {
                        self.drain_left += 1;
                        return Ok(Pass::Idle);
                    }
                    // Empty (or failing): nothing more to read.
                    _ => self.drain_left = 0,
                }
            }
            // Drops after the last datagram received carry no control message: read the total.
            if let Some(d) = meminfo_drops(fd)
                && d.wrapping_sub(self.drops) < u32::MAX / 2
            {
                job.counters
                    .kernel_drops
                    .fetch_add(u64::from(d.wrapping_sub(self.drops)), Ordering::Relaxed);
                self.drops = d;
            }
            self.deliver.handoff.end(true)?;
            return Ok(Pass::Done);
        }
        if job.paused.load(Ordering::Relaxed) {
            // Queued work continues: the side queue is still served.
            let served = self.deliver.handoff.side()?;
            if served == 0 {
                self.deliver.handoff.end(false)?;
                self.wait = UdpWait::Paused;
                return Ok(Pass::Idle);
            }
            return Ok(Pass::Worked(served));
        }
        let served = self.deliver.handoff.side()?;
        if !self.deliver.handoff.ready() {
            return Ok(self.blocked(served));
        }
        if served > 0 {
            // The side queue had work: the socket is read too, without waiting, so neither
            // input starves the other.
            return Ok(match self.receive(budget, libc::MSG_DONTWAIT)? {
                Pass::Worked(n) => Pass::Worked(n + served),
                _ => Pass::Worked(served),
            });
        }
        if self.deliver.handoff.bell().is_none() {
            return self.receive(budget, libc::MSG_WAITFORONE);
        }
        // With a bell (other threads queue work for this one), the wait is in `poll` on the
        // socket and the bell (see `wait`), not in `recvmmsg`: woken by that work too, and on
        // time (the receive timeout counts in jiffies: 1 ms asked waited 8 ms here).
        let pass = self.receive(budget, libc::MSG_DONTWAIT)?;
        if matches!(pass, Pass::Idle) && matches!(self.wait, UdpWait::Received) {
            self.wait = UdpWait::Sleep;
        }
        Ok(pass)
    }

    #[inline]
    fn flush(&mut self) {
        self.tally.flush(self.job.counters);
    }

    fn housekeeping_every(&self) -> Duration {
        CONTROL_EVERY
    }

    /// The hand-off's: the inline control plane.
    fn housekeeping(&mut self, _now: u64) {
        self.deliver.handoff.housekeeping();
    }

    fn wait(&mut self, _idle: &mut Idle) {
        match self.wait {
            UdpWait::Received => {}
            UdpWait::Sleep => {
                let fd = self.job.socket.as_fd();
                let ms = i32::try_from(self.job.idle_poll.as_millis())
                    .unwrap_or(i32::MAX)
                    .max(1);
                if let Err(e) = super::sleep(&self.deliver.handoff, |bell| {
                    crate::ring::doorbell::poll(fd, bell, ms)
                }) {
                    self.errors += 1;
                    self.job
                        .counters
                        .receive_errors
                        .fetch_add(1, Ordering::Relaxed);
                    if self.errors.is_power_of_two() {
                        tracing::warn!(reason = %e, errors = self.errors, "poll failed; retrying");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            UdpWait::Paused => std::thread::sleep(Duration::from_millis(1)),
            UdpWait::Frames | UdpWait::Blocked => backoff(&mut self.spins),
            UdpWait::Error(d) => std::thread::sleep(d),
        }
    }
}

/// The sender `recvmmsg` wrote into a message's address buffer.
fn peer_of(name: &libc::sockaddr_storage) -> Peer {
    match i32::from(name.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in here (family AF_INET); sockaddr_storage is
            // large enough and aligned for it.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Peer::v4(a.sin_addr.s_addr.to_ne_bytes(), u16::from_be(a.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, a sockaddr_in6 for AF_INET6.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Peer::v6(a.sin6_addr.s6_addr, u16::from_be(a.sin6_port))
        }
        _ => Peer::UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::TryEnqueue;
    use crate::mem::RegionOptions;
    use crate::mem::frames::FrameArena;
    use crate::mem::pool::EventPool;
    use crate::ring::mpsc;
    use crate::wire::protocol::encode;

    /// The beside-XDP socket as the housekeeping thread serves it: with room for 4 events in
    /// the queue, 20 datagrams are read in turns that never wait; what the queue cannot take is
    /// stashed and the socket is not read again until it is gone; every event arrives once, in
    /// order, and the stop is `Done` only once the stash is empty and the socket read dry.
    #[test]
    fn the_side_socket_never_waits_and_loses_nothing() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = socket.local_addr().unwrap();
        let tx_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..20u64 {
            let mut d = Vec::new();
            encode(1, "side.t", &i.to_be_bytes(), &mut d).unwrap();
            tx_sock.send_to(&d, to).unwrap();
        }
        let (stop, paused) = (AtomicBool::new(false), AtomicBool::new(false));
        let counters = IngestCounters::default();
        let job = UdpIngest {
            socket: &socket,
            batch: 8,
            limits: Limits::default(),
            stop: &stop,
            counters: &counters,
            seq_base: 0,
            idle_poll: Duration::from_millis(1),
            paused: &paused,
        };
        let arena = FrameArena::new(2048, 32, RegionOptions::default()).unwrap();
        let mut frames = arena.owner().unwrap();
        let pool = EventPool::new(64);
        let mut acq = pool.acquirer().unwrap();
        let (queue, mut rx) = mpsc::channel(4);
        let mut side =
            SideUdp::new(&job, &mut frames, TryEnqueue::new(&mut acq, &queue, 2)).unwrap();
        let mut got = Vec::new();
        let start = std::time::Instant::now();
        while got.len() < 20 {
            assert!(start.elapsed() < Duration::from_secs(5), "got {got:?}");
            let turn = side.serve(4).unwrap();
            assert_ne!(turn, SideTurn::Done);
            // The consumer takes two per round, so the stash fills and empties.
            for _ in 0..2 {
                if let Some(ev) = rx.pop() {
                    got.push(u64::from_be_bytes(ev.payload()[..8].try_into().unwrap()));
                }
            }
        }
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        assert_eq!(side.serve(4).unwrap(), SideTurn::Drained);
        // A stop with events still stashed is not the end (six datagrams: one pass reads them
        // all, the queue takes four, two wait).
        for i in 20..26u64 {
            let mut d = Vec::new();
            encode(1, "side.t", &i.to_be_bytes(), &mut d).unwrap();
            tx_sock.send_to(&d, to).unwrap();
        }
        while side.serve(16).unwrap() != SideTurn::Blocked {}
        stop.store(true, Ordering::Relaxed);
        assert_eq!(side.serve(16).unwrap(), SideTurn::Blocked);
        // Datagrams already in the socket at the stop are read before it is done.
        for i in 26..29u64 {
            let mut d = Vec::new();
            encode(1, "side.t", &i.to_be_bytes(), &mut d).unwrap();
            tx_sock.send_to(&d, to).unwrap();
        }
        let mut last = Vec::new();
        while side.serve(16).unwrap() != SideTurn::Done {
            while let Some(ev) = rx.pop() {
                last.push(u64::from_be_bytes(ev.payload()[..8].try_into().unwrap()));
            }
        }
        while let Some(ev) = rx.pop() {
            last.push(u64::from_be_bytes(ev.payload()[..8].try_into().unwrap()));
        }
        assert_eq!(last, (20..29).collect::<Vec<_>>());
        assert!(side.is_done());
        assert_eq!(counters.datagrams.load(Ordering::Relaxed), 29);
        assert_eq!(counters.events.load(Ordering::Relaxed), 29);
    }
}
