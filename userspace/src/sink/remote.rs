//! What every sink that talks to another system shares (NATS JetStream, PostgreSQL): the
//! appending side, the batch buffers, the hand-over to an I/O thread, and the accounting.
//!
//! The appending thread (in inline mode, the receive thread) encodes each event once into a
//! batch buffer and hands whole buffers over an SPSC ring to the sink's own I/O thread, which
//! runs a current-thread tokio runtime and the [`Backend`]: the backend delivers a buffer's
//! records, retrying what fails with the same event ids (so the other side can drop what had
//! in fact landed), and counts each record once, as durable or as lost. While the backend is
//! behind or failing, buffers queue up to a bound; past it, appends are refused (the caller
//! counts them as failed), and the data plane never waits on the network.
//!
//! When the other side is down longer than the buffers hold, whole buffers spill to a disk
//! buffer of the sink's own (`sinks.buffer`: one file per outage, framed and CRC-checked) and
//! every later buffer follows them there, so order is kept; the I/O thread delivers what is in
//! memory first, then the file, and once it has caught up the file is removed and buffers go
//! over the ring again. Only a full disk buffer refuses events (counted as failed).
//!
//! Event ids are given at receive: `<node_id>-<run>-<stream>-<n>` (`run` is the appliance's
//! start time, so ids never repeat across runs; `stream` the receive queue, socket or TCP slot,
//! `n` the event's number in it), or for `key: payload_id` routes `id-<sender id, hex>`, so
//! two appliances receiving the same event name it alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use std::{io, thread};

use crate::ring::spsc;
use crate::sink::{EventRef, Sink, SinkHealth, refusal};
use crate::wire::event::{Peer, unix_offset_ns};

/// Bytes before a record's topic and payload in a batch buffer: `len u32` (topic + payload),
/// `seq u64`, `ingest_ns u64`, `priority u8`, `source u8`, `topic_len u16`, `has_sender u8`,
/// `sender_id u64`, `received_unix_ns u64`, the sender ([`Peer::ENCODED`] bytes).
const REC_HEADER: usize = 41 + Peer::ENCODED;
/// Buffers per sink: one being built, the rest queued or being delivered.
const BUFFERS: usize = 8;
/// A batch buffer past this size is handed over before the batch ends.
const BATCH_BYTES: usize = 256 * 1024;
/// A buffer grows up to this while the backend is behind; past it appends are refused.
const MAX_CHUNK: usize = 8 << 20;
/// Longest a healthy but slow backend may hold up the appender.
const BLOCK_LIMIT: Duration = Duration::from_secs(1);
/// Retry backoff after a failed delivery: from the first to the last, doubling.
pub const BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// A batch of records on its way to the I/O thread.
#[derive(Debug, Default)]
pub struct Chunk {
    bytes: Vec<u8>,
    records: u64,
    /// When it was handed over (for the ack latency).
    handed_at: Option<Instant>,
}

/// One record of a [`Chunk`].
#[derive(Clone, Copy, Debug)]
pub struct Rec<'b> {
    /// Offset in the chunk (a handle for retries).
    pub at: usize,
    /// Its ingest sequence (stream and number: [`crate::wire::event::seq_base`]).
    pub seq: u64,
    /// The sender's id, for `key: payload_id` routes.
    pub sender_id: Option<u64>,
    /// Receive time, `CLOCK_MONOTONIC` ns.
    pub ingest_ns: u64,
    /// Receive time, Unix ns.
    pub received_unix_ns: u64,
    /// Who sent it.
    pub peer: Peer,
    /// Priority.
    pub priority: u8,
    /// [`crate::wire::event::Source`] as `u8`.
    pub source: u8,
    /// Topic.
    pub topic: &'b str,
    /// Payload.
    pub payload: &'b [u8],
}

impl Rec<'_> {
    /// The event id: `<ids><stream>-<n>`, or `id-<sender id>` (see the module's text).
    pub fn event_id(&self, ids: &str) -> String {
        use crate::wire::event::STREAM_SHIFT;
        match self.sender_id {
            Some(id) => format!("id-{id:016x}"),
            None => format!(
                "{ids}{}-{}",
                self.seq >> STREAM_SHIFT,
                self.seq & ((1 << STREAM_SHIFT) - 1)
            ),
        }
    }
}

impl Chunk {
    /// Records in it.
    pub const fn records(&self) -> u64 {
        self.records
    }

    /// The record at `at` and where the next one starts.
    pub fn record(&self, at: usize) -> (Rec<'_>, usize) {
        let b = &self.bytes;
        let h = &b[at..at + REC_HEADER];
        let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
        let topic_len = u16::from_le_bytes([h[22], h[23]]) as usize;
        let body = &b[at + REC_HEADER..at + REC_HEADER + len];
        let rec = Rec {
            at,
            seq: u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")),
            sender_id: (h[24] != 0)
                .then(|| u64::from_le_bytes(h[25..33].try_into().expect("8 bytes"))),
            ingest_ns: u64::from_le_bytes(h[12..20].try_into().expect("8 bytes")),
            received_unix_ns: u64::from_le_bytes(h[33..41].try_into().expect("8 bytes")),
            peer: Peer::from_bytes(h[41..REC_HEADER].try_into().expect("peer bytes")),
            priority: h[20],
            source: h[21],
            topic: std::str::from_utf8(&body[..topic_len]).unwrap_or(""),
            payload: &body[topic_len..],
        };
        (rec, at + REC_HEADER + len)
    }

    /// Every record, in order.
    pub fn iter(&self) -> impl Iterator<Item = Rec<'_>> {
        let mut at = 0;
        core::iter::from_fn(move || {
            (at < self.bytes.len()).then(|| {
                let (r, next) = self.record(at);
                at = next;
                r
            })
        })
    }
}

/// What the appender, the I/O thread and the backend share.
#[derive(Debug)]
pub struct Shared {
    /// Records the other side acknowledged as stored.
    durable: AtomicU64,
    /// Records given up for good (the other side can never take them).
    lost: AtomicU64,
    /// Deliver what is queued, then stop.
    stop: AtomicBool,
    /// Stop now (the shutdown deadline passed).
    abandon: AtomicBool,
    /// Its health, for `/healthz` and `/metrics`.
    pub health: Arc<SinkHealth>,
    /// The disk buffer's directory, once the sink has one.
    spool_dir: std::sync::OnceLock<std::path::PathBuf>,
    /// The disk buffer's current file (its outage number), bytes written to it, bytes the I/O
    /// thread has delivered from it.
    spool_episode: AtomicU64,
    spool_written: AtomicU64,
    spool_read: AtomicU64,
}

/// Bytes before a chunk in a disk buffer file: `len u32`, `records u32`, `crc32c u32`, pad.
const SPOOL_HEADER: usize = 16;

/// The appender's side of the disk buffer.
#[derive(Debug, Default)]
struct Spool {
    /// Bytes it may hold (0: no disk buffer).
    max_bytes: u64,
    /// The file of the outage now being spilled, if one is.
    file: Option<(std::fs::File, std::path::PathBuf)>,
    /// Bytes written to it.
    written: u64,
}

/// The I/O thread's side: reads what the appender spilled, in order.
#[derive(Debug, Default)]
struct SpoolReader {
    episode: u64,
    file: Option<std::fs::File>,
    offset: u64,
}

impl SpoolReader {
    /// The next spilled chunk into `into`; returns its framed length, `None` when nothing is
    /// waiting (or the file cannot be read: reported, and tried again later).
    fn next(&mut self, shared: &Shared, into: &mut Chunk) -> Option<u64> {
        use std::io::Read as _;
        let ep = shared.spool_episode.load(Ordering::Acquire);
        if ep == 0 {
            return None;
        }
        if ep != self.episode {
            let dir = shared.spool_dir.get()?;
            self.file = std::fs::File::open(dir.join(format!("{ep:016}.buf"))).ok();
            self.episode = ep;
            self.offset = 0;
        }
        if shared.spool_written.load(Ordering::Acquire) <= self.offset {
            return None;
        }
        let f = self.file.as_mut()?;
        let mut h = [0u8; SPOOL_HEADER];
        let r = f.read_exact(&mut h).and_then(|()| {
            let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
            into.bytes.resize(len, 0);
            f.read_exact(&mut into.bytes)
        });
        let crc = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if r.is_err() || crc32c::crc32c(&into.bytes) != crc {
            shared.health.fail(
                crate::sink::SinkErrorKind::Io,
                &io::Error::other("the disk buffer could not be read back"),
            );
            into.bytes.clear();
            return None;
        }
        into.records = u64::from(u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")));
        let n = (SPOOL_HEADER + into.bytes.len()) as u64;
        self.offset += n;
        Some(n)
    }
}

impl Shared {
    /// `n` records are stored.
    pub fn durable(&self, n: u64) {
        self.durable.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` records can never be stored.
    pub fn lost(&self, n: u64) {
        self.lost.fetch_add(n, Ordering::AcqRel);
    }

    /// Whether retries must stop (the shutdown deadline passed).
    pub fn abandoned(&self) -> bool {
        self.abandon.load(Ordering::Acquire)
    }
}

/// Runs delivery rounds over the records at `pending` until one fails none (or the sink is
/// abandoned). Each round delivers what it is given and returns the records that failed and
/// the last error; a round's outcome goes to the sink's health, and what failed is retried
/// after a backoff ([`BACKOFF`]), in its original order.
pub async fn retry_rounds(
    shared: &Shared,
    mut pending: Vec<usize>,
    mut round: impl AsyncFnMut(&[usize]) -> (Vec<usize>, Option<String>),
) {
    let mut backoff = BACKOFF.0;
    while !pending.is_empty() {
        let (mut failed, last_error) = round(&pending).await;
        match last_error {
            Some(e) => shared
                .health
                .fail(crate::sink::SinkErrorKind::Broker, &io::Error::other(e)),
            None => shared.health.recovered(),
        }
        if failed.is_empty() || shared.abandoned() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
        shared.health.retried();
        failed.sort_unstable();
        pending = failed;
    }
}

/// The other system, as seen from a sink's I/O thread.
#[allow(async_fn_in_trait)] // driven by our own current-thread runtime: no Send needed
pub trait Backend: Send + 'static {
    /// Connects and checks (or creates) what the sink writes to.
    ///
    /// # Errors
    /// A message for the operator: what failed, and where.
    async fn setup(&mut self) -> Result<(), String>;

    /// Delivers every record of `chunk`, counting each once with [`Shared::durable`] or
    /// [`Shared::lost`]; retries what fails (with [`BACKOFF`], reporting through
    /// `shared.health`) until all are counted or [`Shared::abandoned`].
    async fn deliver(&mut self, chunk: &Chunk, shared: &Shared, ids: &str);
}

/// A [`Sink`] over a [`Backend`] on its own I/O thread.
#[derive(Debug)]
pub struct RemoteSink {
    kind: &'static str,
    batch: Chunk,
    to_io: spsc::Producer<Chunk>,
    from_io: spsc::Consumer<Chunk>,
    shared: Arc<Shared>,
    io: Option<thread::JoinHandle<()>>,
    handed: u64,
    acked: u64,
    lost: u64,
    /// A buffer grows up to this while the other side is behind, before it spills or waits.
    max_chunk: usize,
    spool: Spool,
    /// Monotonic to Unix time, read once per batch ([`unix_offset_ns`]).
    unix_offset: u64,
}

/// Delivers `chunk`, unless the sink is abandoned first: a client library can wait forever
/// (a publish queued behind a connection that never comes back), and the shutdown deadline
/// must still end the thread. `false` when abandoned.
async fn deliver_or_abandon<B: Backend>(
    backend: &mut B,
    chunk: &Chunk,
    shared: &Shared,
    ids: &str,
) -> bool {
    let abandoned = async {
        while !shared.abandoned() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        () = backend.deliver(chunk, shared, ids) => true,
        () = abandoned => false,
    }
}

/// The I/O thread: sets the backend up (reporting the outcome on `ready`), then delivers
/// buffers in order until stopped.
fn io_thread<B: Backend>(
    mut backend: B,
    ids: String,
    shared: Arc<Shared>,
    mut from: spsc::Consumer<Chunk>,
    mut back: spsc::Producer<Chunk>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    setup_limit: Duration,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("starting the sink's runtime: {e}")));
            return;
        }
    };
    rt.block_on(async {
        match tokio::time::timeout(setup_limit, backend.setup()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return drop(ready.send(Err(e))),
            Err(_) => {
                return drop(ready.send(Err(format!("no answer within {setup_limit:?}"))));
            }
        }
        let _ = ready.send(Ok(()));
        let mut reader = SpoolReader::default();
        let mut spilled = Chunk::default();
        loop {
            if shared.abandoned() {
                return;
            }
            let Some(mut chunk) = from.pop() else {
                // Nothing in memory: what was spilled to disk, in order, if anything.
                if let Some(n) = reader.next(&shared, &mut spilled) {
                    shared
                        .health
                        .sent(spilled.records, spilled.bytes.len() as u64);
                    if !deliver_or_abandon(&mut backend, &spilled, &shared, &ids).await {
                        return;
                    }
                    shared.spool_read.fetch_add(n, Ordering::AcqRel);
                    continue;
                }
                if shared.stop.load(Ordering::Acquire) && from.is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
                continue;
            };
            shared.health.sent(chunk.records, chunk.bytes.len() as u64);
            if !deliver_or_abandon(&mut backend, &chunk, &shared, &ids).await {
                return;
            }
            if let Some(t) = chunk.handed_at.take() {
                shared.health.acked_after(t.elapsed(), chunk.records);
            }
            chunk.bytes.clear();
            chunk.records = 0;
            // Cannot fail: at most BUFFERS chunks exist, and the ring back holds them all.
            let _ = back.push(chunk);
        }
    });
}

impl RemoteSink {
    /// Starts `backend` on its I/O thread and waits for its setup. `health` names the sink;
    /// event ids start with `ids`.
    ///
    /// # Errors
    /// The backend's setup failure, or none within `setup_limit`.
    pub fn open<B: Backend>(
        kind: &'static str,
        backend: B,
        health: Arc<SinkHealth>,
        ids: String,
        setup_limit: Duration,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            health,
            spool_dir: std::sync::OnceLock::new(),
            spool_episode: AtomicU64::new(0),
            spool_written: AtomicU64::new(0),
            spool_read: AtomicU64::new(0),
        });
        let (to_io, from_appender) = spsc::channel::<Chunk>(BUFFERS);
        let (mut spare, from_io) = spsc::channel::<Chunk>(BUFFERS);
        for _ in 1..BUFFERS {
            let _ = spare.push(Chunk {
                bytes: Vec::with_capacity(BATCH_BYTES + 64 * 1024),
                records: 0,
                handed_at: None,
            });
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name(format!("{kind}-sink"))
            .spawn(move || {
                io_thread(backend, ids, s, from_appender, spare, ready_tx, setup_limit)
            })?;
        let setup = ready_rx
            .recv()
            .unwrap_or_else(|_| Err("the sink's thread ended during setup".into()));
        if let Err(e) = setup {
            let _ = handle.join();
            return Err(io::Error::other(e));
        }
        Ok(Self {
            kind,
            batch: Chunk {
                bytes: Vec::with_capacity(BATCH_BYTES + 64 * 1024),
                records: 0,
                handed_at: None,
            },
            to_io,
            from_io,
            shared,
            io: Some(handle),
            handed: 0,
            acked: 0,
            lost: 0,
            max_chunk: MAX_CHUNK,
            spool: Spool::default(),
            unix_offset: unix_offset_ns(),
        })
    }

    /// Holds at most about `bytes` in memory while the other side is behind (its buffers
    /// together); past that, buffers spill to a disk buffer in `dir` of at most `spool_bytes`
    /// (0: none, appends are refused instead).
    #[must_use]
    pub fn with_limits(mut self, bytes: usize, dir: std::path::PathBuf, spool_bytes: u64) -> Self {
        self.max_chunk = (bytes / BUFFERS).max(64 * 1024);
        self.spool.max_bytes = spool_bytes;
        let _ = self.shared.spool_dir.set(dir);
        self
    }

    /// Writes the batch to the disk buffer (starting an outage's file if none is open);
    /// `false` when there is none, it is full, or the write failed.
    fn spill(&mut self) -> bool {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if self.spool.max_bytes == 0 {
            return false;
        }
        let framed = (SPOOL_HEADER + self.batch.bytes.len()) as u64;
        if self.spool.written + framed > self.spool.max_bytes {
            return false;
        }
        if self.spool.file.is_none() {
            let Some(dir) = self.shared.spool_dir.get() else {
                return false;
            };
            let ep = self.shared.spool_episode.load(Ordering::Acquire) + 1;
            let path = dir.join(format!("{ep:016}.buf"));
            let opened = std::fs::create_dir_all(dir).and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .mode(0o640)
                    .open(&path)
            });
            let file = match opened {
                Ok(f) => f,
                Err(e) => {
                    self.shared
                        .health
                        .fail(crate::sink::SinkErrorKind::of_write(&e), &e);
                    return false;
                }
            };
            tracing::warn!(sink = %self.shared.health.name, file = %path.display(), "the other side is behind: buffers spill to disk");
            self.shared.spool_read.store(0, Ordering::Release);
            self.shared.spool_written.store(0, Ordering::Release);
            self.shared.spool_episode.store(ep, Ordering::Release);
            self.spool.file = Some((file, path));
            self.spool.written = 0;
        }
        let (file, _) = self.spool.file.as_mut().expect("opened above");
        let b = &self.batch;
        let mut h = [0u8; SPOOL_HEADER];
        h[0..4].copy_from_slice(&(b.bytes.len() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&(b.records as u32).to_le_bytes());
        h[8..12].copy_from_slice(&crc32c::crc32c(&b.bytes).to_le_bytes());
        if let Err(e) = file.write_all(&h).and_then(|()| file.write_all(&b.bytes)) {
            self.shared
                .health
                .fail(crate::sink::SinkErrorKind::of_write(&e), &e);
            return false;
        }
        self.spool.written += framed;
        self.shared.health.spilled(b.records, self.spool.written);
        self.shared
            .spool_written
            .store(self.spool.written, Ordering::Release);
        self.handed += b.records;
        self.batch.bytes.clear();
        self.batch.records = 0;
        true
    }

    /// Ends the outage's file once the I/O thread has delivered all of it.
    fn end_spill(&mut self) {
        if self.spool.file.is_some()
            && self.shared.spool_read.load(Ordering::Acquire) >= self.spool.written
        {
            let (_, path) = self.spool.file.take().expect("checked");
            let _ = std::fs::remove_file(&path);
            self.shared.health.spilled(0, 0);
            tracing::info!(sink = %self.shared.health.name, "the disk buffer is delivered; back to memory");
        }
    }

    /// Hands the batch over when due; `false` when it had to and no buffer came free.
    fn hand_over(&mut self, must: bool) -> bool {
        self.end_spill();
        let len = self.batch.bytes.len();
        if len == 0 {
            return true;
        }
        if self.spool.file.is_some() {
            // Spilling: every buffer follows the earlier ones to disk, so order is kept.
            if !must && len < BATCH_BYTES {
                return true;
            }
            return self.spill() || (!must && len < self.max_chunk);
        }
        if !must && len < BATCH_BYTES && self.to_io.slots() < self.to_io.capacity() {
            return true; // the I/O thread has work queued: keep filling this one
        }
        let wait = must || len >= self.max_chunk;
        let mut spins = 0u32;
        let since = Instant::now();
        let next = loop {
            if let Some(c) = self.from_io.pop() {
                break c;
            }
            // With a disk buffer the data plane never waits on the other side: it spills.
            if !wait
                || self.spool.max_bytes > 0
                || self.shared.health.is_failing()
                || self.shared.abandoned()
                || since.elapsed() >= BLOCK_LIMIT
            {
                // No buffer came free: to disk, if the sink has a disk buffer.
                return !wait || (!self.shared.abandoned() && self.spill());
            }
            crate::engine::idle::backoff(&mut spins);
        };
        let mut full = core::mem::replace(&mut self.batch, next);
        full.handed_at = Some(Instant::now());
        self.handed += full.records;
        // Cannot fail: a free buffer came back, so the ring to the I/O thread has a slot.
        let pushed = self.to_io.push(full).is_ok();
        debug_assert!(pushed, "BUFFERS chunks fit in the ring");
        true
    }

    fn resolved(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire) + self.shared.lost.load(Ordering::Acquire)
    }

    /// Stops the I/O thread now and joins it.
    fn abandon(&mut self) {
        self.shared.abandon.store(true, Ordering::Release);
        if let Some(h) = self.io.take() {
            let _ = h.join();
        }
    }
}

impl Sink for RemoteSink {
    fn append(&mut self, ev: &EventRef<'_>, _reason: Option<&'static str>) -> io::Result<()> {
        let topic_len = u16::try_from(ev.topic.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "topic too long"))?;
        if self.batch.bytes.len() >= self.max_chunk && !self.hand_over(false) {
            let h = &self.shared.health;
            return Err(refusal(&match h.failure() {
                Some(why) => format!("{} is failing: {why}", h.name),
                None => format!("{} is full (the other side is behind)", h.name),
            }));
        }
        let b = &mut self.batch.bytes;
        b.extend_from_slice(&((ev.topic.len() + ev.payload.len()) as u32).to_le_bytes());
        b.extend_from_slice(&ev.seq.to_le_bytes());
        b.extend_from_slice(&ev.ingest_ns.to_le_bytes());
        b.push(ev.priority);
        b.push(ev.source as u8);
        b.extend_from_slice(&topic_len.to_le_bytes());
        b.push(u8::from(ev.sender_id.is_some()));
        b.extend_from_slice(&ev.sender_id.unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&ev.ingest_ns.wrapping_add(self.unix_offset).to_le_bytes());
        b.extend_from_slice(&ev.peer.to_bytes());
        b.extend_from_slice(ev.topic.as_bytes());
        b.extend_from_slice(ev.payload);
        self.batch.records += 1;
        if self.batch.bytes.len() >= BATCH_BYTES {
            self.hand_over(false);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.hand_over(false);
        self.unix_offset = unix_offset_ns();
        Ok(())
    }

    fn acked(&mut self) -> io::Result<u64> {
        let d = self.shared.durable.load(Ordering::Acquire);
        let n = d - self.acked;
        self.acked = d;
        Ok(n)
    }

    fn lost(&mut self) -> u64 {
        let l = self.shared.lost.load(Ordering::Acquire);
        let n = l - self.lost;
        self.lost = l;
        n
    }

    fn in_flight(&self) -> u64 {
        (self.handed + self.batch.records).saturating_sub(self.resolved())
    }

    fn close(&mut self, deadline: Instant) -> io::Result<()> {
        let mut sent = false;
        loop {
            if !sent {
                sent = self.batch.bytes.is_empty() || self.hand_over(true);
            }
            if sent && self.resolved() >= self.handed {
                self.shared.stop.store(true, Ordering::Release);
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.abandon();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: {} events not acknowledged by the shutdown deadline",
                        self.shared.health.name,
                        self.in_flight()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn health(&self) -> Option<&Arc<SinkHealth>> {
        Some(&self.shared.health)
    }

    fn kind(&self) -> &'static str {
        self.kind
    }
}

impl Drop for RemoteSink {
    fn drop(&mut self) {
        if self.io.is_none() {
            return;
        }
        // Whatever was appended is still handed over; the I/O thread delivers what is queued
        // and stops, or is abandoned after a grace period.
        self.hand_over(true);
        self.shared.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + BLOCK_LIMIT * 5;
        while let Some(h) = &self.io
            && !h.is_finished()
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(1));
        }
        self.abandon();
        self.end_spill();
        if let Some((_, path)) = &self.spool.file {
            tracing::warn!(
                sink = %self.shared.health.name,
                file = %path.display(),
                events = self.in_flight(),
                "events left undelivered in the disk buffer (counted as failed{{reason=\"shutdown\"}}; not replayed at the next start)"
            );
        }
    }
}
