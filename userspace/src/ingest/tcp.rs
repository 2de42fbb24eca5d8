//! Kernel TCP ingest, for clients that cannot use UDP (default port 8081).
//!
//! A fixed set of connection slots is made at start, each with its own receive arena, event
//! pool and counters. The [`Acceptor`] (run by the housekeeping thread when the listener is
//! readable) hands a free slot to each new connection and refuses (closes, counts) connections
//! beyond `max_connections` or the per-source cap. A connection is a [`Connection`] future the
//! same thread serves: woken when its socket is readable, at its deadlines, or by the stop, it
//! reads without blocking, reassembles frames with [`StreamDecoder`] and applies the stream
//! rules of PROTOCOL.md: `malformed` and `too_large` close the connection with a logged error, a
//! bad topic rejects that frame only, a stream that ends mid-frame (EOF, reset, or a frame not
//! whole within `frame_timeout`) is `truncated`, and an idle connection is closed after
//! `read_timeout`. TCP clients add no thread, however many connect.
//!
//! Events go to the data plane's side queue through [`TryEnqueue`], which never waits: when
//! the queue or the slot's pool is full, the connection stops reading (TCP's own flow control
//! then holds the sender) and waits on a timer, never blocking the thread it shares.
//!
//! TCP events are not zero-copy: the decoder's buffer is reused across reads, so each complete
//! frame's wire bytes are copied once into an arena frame (several frames per arena frame), and
//! events are minted from there by the same [`Deliver`] step as the other paths. Zero-copy is
//! the AF_XDP path's promise; the kernel has already copied TCP data once anyway.

use core::fmt;
use core::pin::Pin;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Deliver, Handoff as _, IngestCounters, Tally, TryEnqueue};
use crate::mem::frames::{FrameArena, FrameOwner, OwnedFrame};
use crate::mem::pool::{EventPool, Pooled};
use crate::ring::doorbell::Doorbell;
use crate::ring::mpsc;
use crate::wire::event::{Event, Peer, Source, Stamp, monotonic_ns};
use crate::wire::protocol::{Limits, StreamDecoder, encode_into};

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
/// and each time a connection wakes (at least every second), never per event.
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
    /// The queue's consumer's doorbell (inline: the first data-plane thread's), rung after each
    /// read's events are queued, so a sleeping data plane takes them at once.
    pub bell: Option<&'s Doorbell>,
}

/// Ingest stream numbers of TCP connection slots start here (see
/// [`crate::wire::event::seq_base`]): queue `q` is stream `q`, kernel UDP socket `k` is
/// `0x100 + k`, TCP slot `i` is `0x200 + i`.
pub const TCP_STREAMS: u16 = 0x200;

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

/// A connection being served: a future the housekeeping thread polls, borrowing its slot and
/// the queue for no longer than they live.
pub type Connection<'c> = Pin<Box<dyn Future<Output = ()> + 'c>>;

/// The connections the housekeeping thread serves, polled as each is woken (readable, a
/// deadline, the stop, room on the queue).
pub type Connections<'c> = FuturesUnordered<Connection<'c>>;

/// The TCP listener's accepting side, run by the housekeeping thread whenever the listener is
/// readable: each accepted connection gets a free slot and becomes a [`Connection`] the same
/// thread serves, so TCP clients add no thread, however many there are.
///
/// Accept errors never end it: out of descriptors or memory, or a connection aborted before it
/// was taken, each is counted, logged once per burst, and retried after a backoff (10 ms, up to
/// 1 s). Connections beyond `max_connections`, or beyond the per-source cap, are closed at
/// once and counted (`refused`), as is every connection when there is no runtime to serve it.
pub struct Acceptor<'s, 'a, 'p> {
    tcp: &'s TcpIngest<'s>,
    listener: &'s TcpListener,
    slots: &'s [Slot<'s, 'a, 'p>],
    queue: &'s mpsc::Producer<Pooled<'p, Event<'a>>>,
    free_tx: mpsc::Producer<usize>,
    free_rx: mpsc::Consumer<usize>,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Tells every connection that ingest is stopping (sent once, by [`Acceptor::pass_on_stop`]).
    stopping: watch::Sender<bool>,
}

impl<'s, 'a: 's, 'p: 's> Acceptor<'s, 'a, 'p> {
    /// An acceptor over `listener` (made non-blocking), lending `slots` to connections that
    /// push their events into `queue`.
    ///
    /// # Errors
    /// When the listener cannot be made non-blocking.
    pub fn new(
        tcp: &'s TcpIngest<'s>,
        listener: &'s TcpListener,
        slots: &'s [Slot<'s, 'a, 'p>],
        queue: &'s mpsc::Producer<Pooled<'p, Event<'a>>>,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let (free_tx, free_rx) = mpsc::channel::<usize>(slots.len().max(1));
        for i in 0..slots.len() {
            let _ = free_tx.push(i);
        }
        Ok(Self {
            tcp,
            listener,
            slots,
            queue,
            free_tx,
            free_rx,
            backoff: Duration::from_millis(10),
            retry_at: None,
            stopping: watch::Sender::new(false),
        })
    }

    /// The listener's descriptor, for the housekeeping thread's readiness wait.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'s> {
        std::os::fd::AsFd::as_fd(self.listener)
    }

    /// Whether an accept may be tried now: ingest is not stopping and no backoff is running.
    pub fn may_accept(&self) -> bool {
        !self.tcp.stop.load(Ordering::Relaxed) && self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Once ingest is stopping, wakes every connection so it ends now rather than at its next
    /// deadline. Called by the housekeeping thread after each of its turns.
    pub fn pass_on_stop(&self) {
        if self.tcp.stop.load(Ordering::Relaxed) && !*self.stopping.borrow() {
            self.stopping.send_replace(true);
        }
    }

    /// Accepts every connection waiting on the listener; each one given a slot is pushed onto
    /// `conns` (with no runtime to serve them, `None`: each is closed and counted refused).
    pub fn accept_ready(&mut self, mut conns: Option<&mut Connections<'s>>) -> AcceptPass {
        loop {
            if self.tcp.stop.load(Ordering::Relaxed) {
                return AcceptPass::Stopped;
            }
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    self.backoff = Duration::from_millis(10);
                    self.retry_at = None;
                    match conns.as_deref_mut() {
                        Some(conns) => {
                            if let Some(c) = self.start(stream, peer) {
                                conns.push(c);
                            }
                        }
                        None => self.refuse(peer, "no runtime to serve TCP connections"),
                    }
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

    /// Counts a connection refused (it is closed when its stream is dropped).
    fn refuse(&self, peer: std::net::SocketAddr, why: &str) {
        let n = self.tcp.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(%peer, refused = n, "TCP connection refused: {why}");
        }
    }

    /// Gives `stream` a free slot and makes it a connection to serve, or closes it and counts
    /// it refused.
    fn start(&mut self, stream: TcpStream, peer: std::net::SocketAddr) -> Option<Connection<'s>> {
        let tcp = self.tcp;
        let ip = peer.ip();
        {
            let mut m = tcp.sources.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(ip).or_insert(0);
            if *n >= tcp.tcp_limits.per_source() {
                drop(m);
                self.refuse(peer, "too many from this address");
                return None;
            }
            *n += 1;
        }
        let Some(i) = self.free_rx.pop() else {
            tcp.release_source(ip);
            self.refuse(peer, "every connection slot is in use");
            return None;
        };
        tcp.live.fetch_add(1, Ordering::AcqRel);
        let (slot, slot_back, queue) = (&self.slots[i], self.free_tx.clone(), self.queue);
        let stopping = self.stopping.subscribe();
        Some(Box::pin(async move {
            debug!(%peer, slot = i, "TCP connection");
            if let Err(e) = tcp.serve(stream, peer, i, slot, queue, stopping).await {
                debug!(%peer, reason = %e, "TCP connection ended with an error");
            }
            let _ = slot_back.push(i);
            tcp.release_source(ip);
            tcp.live.fetch_sub(1, Ordering::AcqRel);
        }))
    }
}

impl fmt::Debug for Acceptor<'_, '_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("slots", &self.slots.len())
            .field("retry_at", &self.retry_at)
            .finish_non_exhaustive()
    }
}

/// Longest a connection sleeps without looking at its limits again (a reload may change them).
const LIMITS_TICK: Duration = Duration::from_secs(1);

/// How often a paused connection, or one waiting for room on the queue or for a free frame,
/// looks again.
const RETRY_TICK: Duration = Duration::from_millis(1);

/// Events a connection sets aside before its stash grows (it holds at most one arena frame's
/// events: see [`settle`]).
const STASH: usize = 256;

/// Waits until everything `handoff` holds is on the queue. It waits through a stop too: the
/// data plane keeps draining (and releasing frames) until every connection has ended, so giving
/// up here would lose accepted events.
async fn settle<'a>(handoff: &mut TryEnqueue<'_, 'a, '_>) {
    while !handoff.ready() {
        // `TryEnqueue` never fails.
        let _ = handoff.side();
        if !handoff.ready() {
            tokio::time::sleep(RETRY_TICK).await;
        }
    }
}

/// The next free receive frame, waiting for one to come back if all are in flight (the events
/// on the queue hold them; the connection's own stash is empty here, see [`settle`]). It waits
/// through a stop too, as [`settle`] does.
async fn take_frame<'a>(owner: &mut FrameOwner<'a>) -> OwnedFrame<'a> {
    loop {
        if let Some(f) = owner.take() {
            return f;
        }
        tokio::time::sleep(RETRY_TICK).await;
    }
}

impl TcpIngest<'_> {
    /// One connection from `ip` has closed.
    fn release_source(&self, ip: std::net::IpAddr) {
        let mut m = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    /// Serves one connection until EOF, a fatal frame error, idleness, a frame that takes too
    /// long, or the stop. It reads only while what it handed over is on the queue, so a full
    /// pipeline holds the sender through TCP's own flow control.
    async fn serve<'a, 'p>(
        &self,
        stream: TcpStream,
        peer: std::net::SocketAddr,
        slot_index: usize,
        slot: &Slot<'_, 'a, 'p>,
        queue: &mpsc::Producer<Pooled<'p, Event<'a>>>,
        mut stopping: watch::Receiver<bool>,
    ) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let stream = tokio::net::TcpStream::from_std(stream)?;
        let sender = Peer::from(peer);
        let mut owner = slot.arena.owner().expect("one connection per slot");
        let mut acq = slot.pool.acquirer().expect("one connection per slot");
        let mut deliver = Deliver {
            limits: self.limits,
            handoff: TryEnqueue::new(&mut acq, queue, STASH).ringing(self.bell),
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
        let result = loop {
            if self.stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            if self.paused.load(Ordering::Relaxed) {
                // Not read while PAUSED: the socket buffer fills and TCP holds the sender.
                tokio::select! {
                    // The stop (or the acceptor gone, which only happens after it).
                    _ = stopping.wait_for(|s| *s) => break Ok(()),
                    () = tokio::time::sleep(RETRY_TICK * 10) => {}
                }
                last_data = Instant::now();
                frame_began = frame_began.map(|_| Instant::now());
                continue;
            }
            let now = Instant::now();
            let frame_timeout = self.tcp_limits.frame_timeout();
            let frame_deadline = frame_began.map(|t| t + frame_timeout);
            if frame_deadline.is_some_and(|d| now >= d) {
                end_mid_frame(&decoder, &mut tally, "frame timeout");
                info!(%peer, timeout = ?frame_timeout, "TCP frame not complete in time; closing");
                break Ok(());
            }
            let idle_deadline = last_data + self.tcp_limits.read_timeout();
            if now >= idle_deadline {
                info!(%peer, "TCP connection idle past the read timeout; closing");
                break Ok(());
            }
            let wake = frame_deadline
                .map_or(idle_deadline, |d| d.min(idle_deadline))
                .min(now + LIMITS_TICK);
            tokio::select! {
                biased;
                // The stop (or the acceptor gone, which only happens after it).
                _ = stopping.wait_for(|s| *s) => break Ok(()),
                () = tokio::time::sleep_until(wake.into()) => continue,
                ready = stream.readable() => {
                    if let Err(e) = ready {
                        break Err(e);
                    }
                }
            }
            let n = match stream.try_read(decoder.spare()) {
                Ok(0) => {
                    end_mid_frame(&decoder, &mut tally, "EOF");
                    break Ok(());
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
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
                    break Ok(());
                }
                Err(e) => break Err(e),
            };
            last_data = Instant::now();
            decoder.commit(n);
            tally.bytes += n as u64;
            let stamp = Stamp {
                source: Source::Tcp,
                ingest_ns: monotonic_ns(),
            };
            // Complete frames are copied, back to back, into arena frames; each filled frame is
            // shared and its events minted. Before the next is filled, what the last one handed
            // over is on the queue: a stash never holds more than one arena frame's events.
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
                    deliver.handoff.end(false)?;
                    settle(&mut deliver.handoff).await;
                }
                if current.is_none() {
                    let mut frame = take_frame(&mut owner).await;
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
                deliver.handoff.end(false)?;
                settle(&mut deliver.handoff).await;
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
                break Ok(());
            }
            // A connection that is always readable lets the rest of the thread have its turn.
            tokio::task::yield_now().await;
        };
        tally.flush(slot.counters);
        result
    }
}
