//! Kernel TCP ingest, for clients that cannot use UDP (default port 8081).
//!
//! A fixed set of connection slots is made at start, each with its own receive arena, event
//! pool and counters; the [`Acceptor`] (run by the housekeeping thread when the listener is
//! readable) hands a free slot to a new connection thread, and refuses (closes, counts)
//! connections beyond `max_connections`. A connection reassembles
//! frames with [`StreamDecoder`] and applies the stream rules of PROTOCOL.md: `malformed` and
//! `too_large` close the connection with a logged error, a bad topic rejects that frame only,
//! a stream that ends mid-frame is `truncated`, and an idle connection is closed after
//! `read_timeout`.
//!
//! TCP events are not zero-copy: the decoder's buffer is reused across reads, so each complete
//! frame's wire bytes are copied once into an arena frame (several frames per arena frame), and
//! events are minted from there by the same [`Deliver`] step as the other paths. Zero-copy is
//! the AF_XDP path's promise; the kernel has already copied TCP data once anyway.

use core::fmt;
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::{Deliver, Enqueue, IngestCounters, Tally};
use crate::engine::idle::backoff;
use crate::mem::frames::{FrameArena, FrameOwner, OwnedFrame};
use crate::mem::pool::{EventPool, Pooled};
use crate::ring::mpsc;
use crate::wire::event::{Event, Peer, Source, Stamp, monotonic_ns};
use crate::wire::protocol::{Limits, StreamDecoder, encode_into};

/// How often a blocked read wakes to check for shutdown and idleness.
const READ_TICK: Duration = Duration::from_millis(200);

/// One connection slot's resources, borrowed for the life of the daemon.
#[derive(Debug)]
pub struct Slot<'s, 'a, 'p> {
    /// Receive frames.
    pub arena: &'a FrameArena,
    /// Event pool.
    pub pool: &'p EventPool<Event<'a>>,
    /// Totals.
    pub counters: &'s IngestCounters,
}

/// The TCP limits an operator may change while the listener runs (a reload): read at accept
/// and per read tick, never per event.
#[derive(Debug, Default)]
pub struct TcpLimits {
    read_timeout_ms: AtomicU64,
    frame_timeout_ms: AtomicU64,
    per_source: AtomicU64,
}

impl TcpLimits {
    /// Limits from the `ingest.tcp` keys.
    pub fn new(read_timeout: Duration, frame_timeout: Duration, per_source: usize) -> Self {
        let l = Self::default();
        l.set(read_timeout, frame_timeout, per_source);
        l
    }

    /// Puts new limits in force for every connection.
    pub fn set(&self, read_timeout: Duration, frame_timeout: Duration, per_source: usize) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.read_timeout_ms
            .store(ms(read_timeout), Ordering::Relaxed);
        self.frame_timeout_ms
            .store(ms(frame_timeout), Ordering::Relaxed);
        self.per_source.store(per_source as u64, Ordering::Relaxed);
    }

    /// Close a connection idle this long.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms.load(Ordering::Relaxed))
    }

    /// Longest a frame may take to arrive once its first byte has.
    pub fn frame_timeout(&self) -> Duration {
        Duration::from_millis(self.frame_timeout_ms.load(Ordering::Relaxed))
    }

    /// Connections one source address may hold at once.
    pub fn per_source(&self) -> usize {
        self.per_source.load(Ordering::Relaxed) as usize
    }
}

/// The TCP listener's settings and shared state.
#[derive(Debug)]
pub struct TcpIngest<'s> {
    /// Frame limits.
    pub limits: Limits,
    /// Timeouts and the per-source cap (reloadable).
    pub tcp_limits: &'s TcpLimits,
    /// Set to stop accepting and close every connection.
    pub stop: &'s AtomicBool,
    /// Connections refused because every slot was taken.
    pub refused: &'s AtomicU64,
    /// Connections open now.
    pub live: &'s AtomicU64,
    /// Accept calls that failed (`EMFILE`, `ENFILE`, `ECONNABORTED`, `ENOBUFS`...), retried.
    pub accept_errors: &'s AtomicU64,
    /// While set (`PAUSED`), connections are not read: TCP's own flow control holds senders.
    pub paused: &'s AtomicBool,
    /// Connections open per source address: touched at accept and at close, never per event.
    pub sources: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// Ingest stream numbers of TCP connection slots start here (see
/// [`crate::wire::event::seq_base`]): queue `q` is stream `q`, kernel UDP socket `k` is
/// `0x100 + k`, TCP slot `i` is `0x200 + i`.
pub const TCP_STREAMS: u16 = 0x200;

/// The next free receive frame, waiting for one to come back if all are in flight.
///
/// It waits through a shutdown too: a frame is only taken for bytes already decoded, and the
/// pipeline keeps draining (and releasing frames) until every ingest thread has finished, so
/// giving up here would drop decoded frames without a count.
fn take_frame<'a>(owner: &mut FrameOwner<'a>) -> OwnedFrame<'a> {
    let mut spins = 0;
    loop {
        if let Some(f) = owner.take() {
            return f;
        }
        backoff(&mut spins);
    }
}

/// What one [`Acceptor::accept_ready`] pass ended on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptPass {
    /// The listener has nothing more to accept now (`EAGAIN`): wait for it to be readable.
    Drained,
    /// An accept failed (counted and logged); the next try is after a backoff
    /// ([`Acceptor::may_accept`] says when).
    BackingOff,
    /// Ingest is stopping: nothing more is accepted.
    Stopped,
}

/// The TCP listener's accepting side, run by the housekeeping thread whenever the listener is
/// readable: each accepted connection gets a free slot and a scoped thread of its own.
///
/// Accept errors never end it: out of descriptors or memory, or a connection aborted before it
/// was taken, each is counted, logged once per burst, and retried after a backoff (10 ms, up to
/// 1 s). Connections beyond `max_connections`, or beyond the per-source cap, are closed at
/// once and counted (`refused`).
pub struct Acceptor<'scope, 'env, 'a, 'p> {
    tcp: &'scope TcpIngest<'scope>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    listener: &'scope TcpListener,
    slots: &'scope [Slot<'scope, 'a, 'p>],
    queue: &'scope mpsc::Producer<Pooled<'p, Event<'a>>>,
    free_tx: mpsc::Producer<usize>,
    free_rx: mpsc::Consumer<usize>,
    backoff: Duration,
    retry_at: Option<Instant>,
}

impl<'scope, 'env, 'a: 'scope, 'p: 'scope> Acceptor<'scope, 'env, 'a, 'p> {
    /// An acceptor over `listener` (made non-blocking), lending `slots` to connections that
    /// push their events into `queue`.
    ///
    /// # Errors
    /// When the listener cannot be made non-blocking.
    pub fn new(
        tcp: &'scope TcpIngest<'scope>,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        listener: &'scope TcpListener,
        slots: &'scope [Slot<'scope, 'a, 'p>],
        queue: &'scope mpsc::Producer<Pooled<'p, Event<'a>>>,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let (free_tx, free_rx) = mpsc::channel::<usize>(slots.len().max(1));
        for i in 0..slots.len() {
            let _ = free_tx.push(i);
        }
        Ok(Self {
            tcp,
            scope,
            listener,
            slots,
            queue,
            free_tx,
            free_rx,
            backoff: Duration::from_millis(10),
            retry_at: None,
        })
    }

    /// The listener's descriptor, for the housekeeping thread's readiness wait.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'scope> {
        std::os::fd::AsFd::as_fd(self.listener)
    }

    /// Whether an accept may be tried now: ingest is not stopping and no backoff is running.
    pub fn may_accept(&self) -> bool {
        !self.tcp.stop.load(Ordering::Relaxed) && self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Accepts every connection waiting on the listener.
    pub fn accept_ready(&mut self) -> AcceptPass {
        loop {
            if self.tcp.stop.load(Ordering::Relaxed) {
                return AcceptPass::Stopped;
            }
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    self.backoff = Duration::from_millis(10);
                    self.retry_at = None;
                    self.start(stream, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return AcceptPass::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let n = self.tcp.accept_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        warn!(reason = %e, errors = n, "TCP accept failed; retrying");
                    }
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
                    return AcceptPass::BackingOff;
                }
            }
        }
    }

    /// Gives `stream` a free slot and a thread, or closes it and counts it refused.
    fn start(&mut self, stream: TcpStream, peer: std::net::SocketAddr) {
        let tcp = self.tcp;
        let ip = peer.ip();
        {
            let mut m = tcp.sources.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(ip).or_insert(0);
            let limit = tcp.tcp_limits.per_source();
            if *n >= limit {
                drop(m);
                let n = tcp.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(%peer, refused = n, limit, "TCP connection refused: too many from this address");
                }
                return;
            }
            *n += 1;
        }
        let sources = &tcp.sources;
        let release_source = move || {
            let mut m = sources.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        };
        let Some(i) = self.free_rx.pop() else {
            release_source();
            let n = tcp.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(%peer, refused = n, "TCP connection refused: every connection slot is in use");
            }
            return;
        };
        let live = tcp.live;
        live.fetch_add(1, Ordering::AcqRel);
        let (slot, slot_back, queue) = (&self.slots[i], self.free_tx.clone(), self.queue);
        let spawned = std::thread::Builder::new()
            .name(format!("tcp-{i}"))
            .spawn_scoped(self.scope, move || {
                debug!(%peer, slot = i, "TCP connection");
                if let Err(e) = tcp.serve(stream, i, slot, queue) {
                    debug!(%peer, reason = %e, "TCP connection ended with an error");
                }
                let _ = slot_back.push(i);
                release_source();
                live.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            release_source();
            live.fetch_sub(1, Ordering::AcqRel);
            let _ = self.free_tx.push(i);
            warn!(reason = %e, "could not start a TCP connection thread");
        }
    }
}

impl fmt::Debug for Acceptor<'_, '_, '_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("slots", &self.slots.len())
            .field("retry_at", &self.retry_at)
            .finish_non_exhaustive()
    }
}

impl TcpIngest<'_> {
    /// Serves one connection until EOF, a fatal frame error, idleness, or shutdown.
    fn serve<'a, 'p>(
        &self,
        mut stream: TcpStream,
        slot_index: usize,
        slot: &Slot<'_, 'a, 'p>,
        queue: &mpsc::Producer<Pooled<'p, Event<'a>>>,
    ) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(READ_TICK))?;
        let peer = stream.peer_addr()?;
        let sender = Peer::from(peer);
        let mut owner = slot.arena.owner().expect("one connection per slot");
        let mut acq = slot.pool.acquirer().expect("one connection per slot");
        let mut deliver = Deliver {
            limits: self.limits,
            handoff: Enqueue {
                pool: &mut acq,
                queue,
            },
        };
        let mut decoder = StreamDecoder::new(self.limits);
        let mut tally = Tally::default();
        // Each slot is one ingest stream; its connections continue its sequence (the slot's
        // count of accepted events, all flushed when the previous connection ended).
        let mut seq = crate::wire::event::seq_base(TCP_STREAMS + slot_index as u16)
            + slot.counters.events.load(Ordering::Acquire);
        let mut last_data = Instant::now();
        // When the frame now in the decoder began to arrive (none: between frames).
        let mut frame_began: Option<Instant> = None;
        let frame_size = slot.arena.frame_size() as usize;
        let end_mid_frame = |decoder: &StreamDecoder, tally: &mut Tally, how: &str| {
            if let Err(e) = decoder.finish() {
                tally.rejected[e.reason() as usize] += 1;
                warn!(%peer, reason = %e, how, "TCP stream ended mid-frame");
            }
        };
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            if self.paused.load(Ordering::Relaxed) {
                // Not read while PAUSED: the socket buffer fills and TCP holds the sender.
                std::thread::sleep(READ_TICK);
                last_data = Instant::now();
                frame_began = frame_began.map(|_| Instant::now());
                continue;
            }
            let frame_timeout = self.tcp_limits.frame_timeout();
            if frame_began.is_some_and(|t| t.elapsed() >= frame_timeout) {
                end_mid_frame(&decoder, &mut tally, "frame timeout");
                info!(%peer, timeout = ?frame_timeout, "TCP frame not complete in time; closing");
                break;
            }
            let n = match stream.read(decoder.spare()) {
                Ok(0) => {
                    end_mid_frame(&decoder, &mut tally, "EOF");
                    break;
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if last_data.elapsed() >= self.tcp_limits.read_timeout() {
                        info!(%peer, "TCP connection idle past the read timeout; closing");
                        break;
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    // A reset ends the stream as EOF does: a partial frame is `truncated`.
                    end_mid_frame(&decoder, &mut tally, "reset");
                    break;
                }
                Err(e) => {
                    tally.flush(slot.counters);
                    return Err(e);
                }
            };
            last_data = Instant::now();
            decoder.commit(n);
            tally.bytes += n as u64;
            let stamp = Stamp {
                source: Source::Tcp,
                ingest_ns: monotonic_ns(),
            };
            // Complete frames are copied, back to back, into arena frames; each filled frame is
            // shared and its events minted.
            let mut current: Option<(OwnedFrame<'a>, usize)> = None;
            let mut fatal = None;
            // Whether a frame ended in this read (what is left then began with it).
            let mut whole_frames = false;
            loop {
                let f = match decoder.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) if e.is_fatal_for_stream() => {
                        fatal = Some(e);
                        break;
                    }
                    Err(e) => {
                        whole_frames = true;
                        tally.rejected[e.reason() as usize] += 1;
                        continue;
                    }
                };
                whole_frames = true;
                let need = f.wire_len();
                if current
                    .as_ref()
                    .is_some_and(|(_, used)| used + need > frame_size)
                {
                    let (frame, used) = current.take().expect("checked");
                    deliver.frame(&mut frame.share(0..used), stamp, &mut seq, &mut tally)?;
                }
                if current.is_none() {
                    let mut frame = take_frame(&mut owner);
                    frame.set_peer(sender);
                    current = Some((frame, 0));
                }
                let (frame, used) = current.as_mut().expect("set above");
                // Cannot fail: the arena's frames hold a maximal frame, and `need` fits.
                let written = encode_into(
                    f.priority,
                    f.topic,
                    f.payload,
                    &mut frame.bytes_mut()[*used..],
                )
                .map_err(io::Error::other)?;
                *used += written;
            }
            if let Some((frame, used)) = current.take() {
                deliver.frame(&mut frame.share(0..used), stamp, &mut seq, &mut tally)?;
            }
            frame_began = match (decoder.buffered(), frame_began) {
                (0, _) => None,
                (_, Some(t)) if !whole_frames => Some(t),
                _ => Some(last_data),
            };
            tally.flush(slot.counters);
            if let Some(e) = fatal {
                slot.counters.rejected[e.reason() as usize].fetch_add(1, Ordering::Relaxed);
                warn!(%peer, reason = %e, "closing the TCP connection");
                break;
            }
        }
        tally.flush(slot.counters);
        Ok(())
    }
}
