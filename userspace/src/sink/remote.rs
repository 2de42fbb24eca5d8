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
//! A disk buffer still holding events when the appliance stops (the shutdown deadline passed
//! with the other side still down) is kept, with how far it was delivered beside it
//! (`<file>.read`); those events count as `failed{reason="shutdown"}` in that run. The next run
//! with the same `sinks.buffer.dir` delivers them before anything else, under the ids they were
//! given (the file names its run), and counts them as `replayed`: apart from its own accepted
//! events, so each run's accounting still balances. A buffer file opens with its format and the
//! id prefix of the run that wrote it (`ESBUF`, version, `ids_len u16`, `ids`); a file in
//! another format is set aside (`.unreadable`) and reported, never guessed at.
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
    /// Makes this a copy of `other` (reusing this one's allocation).
    pub fn copy_from(&mut self, other: &Chunk) {
        self.bytes.clear();
        self.bytes.extend_from_slice(&other.bytes);
        self.records = other.records;
        self.handed_at = other.handed_at;
    }

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
    /// This run's event id prefix.
    ids: String,
    /// Disk buffer files an earlier run left, oldest first, for the I/O thread to deliver.
    leftovers: std::sync::Mutex<Vec<std::path::PathBuf>>,
    has_leftovers: AtomicBool,
    /// While set, what the backend settles is an earlier run's (see the module's text).
    replaying: AtomicBool,
}

/// Bytes before a chunk in a disk buffer file: `len u32`, `records u32`, `crc32c u32`, pad.
const SPOOL_HEADER: usize = 16;
/// A disk buffer file's first bytes: its format and version (the batch-record layout of
/// [`REC_HEADER`]).
const SPOOL_MAGIC: [u8; 6] = *b"ESBUF\x02";

/// A disk buffer file's header: the format, then the id prefix of the run that wrote it.
fn spool_file_header(ids: &str) -> Vec<u8> {
    let mut h = SPOOL_MAGIC.to_vec();
    h.extend_from_slice(&(ids.len() as u16).to_le_bytes());
    h.extend_from_slice(ids.as_bytes());
    h
}

/// Reads a disk buffer file's header: the id prefix of its run, and where its chunks start.
fn read_spool_file_header(f: &mut std::fs::File) -> io::Result<(String, u64)> {
    use std::io::Read as _;
    let mut h = [0u8; SPOOL_MAGIC.len() + 2];
    f.read_exact(&mut h)?;
    if h[..SPOOL_MAGIC.len()] != SPOOL_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a disk buffer of this version",
        ));
    }
    let n = usize::from(u16::from_le_bytes([h[6], h[7]]));
    let mut ids = vec![0u8; n];
    f.read_exact(&mut ids)?;
    let ids = String::from_utf8(ids)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "id prefix is not UTF-8"))?;
    Ok((ids, (h.len() + n) as u64))
}

/// Reads the next framed chunk of a disk buffer file into `into`, checking its CRC; returns
/// its framed length.
fn read_spool_chunk(f: &mut std::fs::File, into: &mut Chunk) -> io::Result<u64> {
    use std::io::Read as _;
    let mut h = [0u8; SPOOL_HEADER];
    f.read_exact(&mut h)?;
    let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
    into.bytes.resize(len, 0);
    f.read_exact(&mut into.bytes)?;
    let crc = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if crc32c::crc32c(&into.bytes) != crc {
        into.bytes.clear();
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a chunk's CRC does not match",
        ));
    }
    into.records = u64::from(u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")));
    Ok((SPOOL_HEADER + len) as u64)
}

/// `<file>.read`: how far a disk buffer file left by a stop was delivered.
fn read_mark(file: &std::path::Path) -> std::path::PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".read");
    p.into()
}

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
        let ep = shared.spool_episode.load(Ordering::Acquire);
        if ep == 0 || shared.spool_written.load(Ordering::Acquire) == 0 {
            return None;
        }
        if ep != self.episode {
            let dir = shared.spool_dir.get()?;
            self.file = std::fs::File::open(dir.join(format!("{ep:016}.buf"))).ok();
            self.episode = ep;
            self.offset = match self.file.as_mut().map(read_spool_file_header) {
                Some(Ok((_, start))) => start,
                _ => {
                    self.file = None;
                    0
                }
            };
        }
        if shared.spool_written.load(Ordering::Acquire) <= self.offset {
            return None;
        }
        let f = self.file.as_mut()?;
        match read_spool_chunk(f, into) {
            Ok(n) => {
                self.offset += n;
                Some(n)
            }
            Err(_) => {
                shared.health.fail(
                    crate::sink::SinkErrorKind::Io,
                    &io::Error::other("the disk buffer could not be read back"),
                );
                None
            }
        }
    }
}

impl Shared {
    /// `n` records are stored.
    pub fn durable(&self, n: u64) {
        if self.replaying.load(Ordering::Acquire) {
            self.health.replayed(n);
        } else {
            self.durable.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// `n` records can never be stored.
    pub fn lost(&self, n: u64) {
        if self.replaying.load(Ordering::Acquire) {
            // An earlier run counted them as failed already; say so once more, never twice.
            tracing::warn!(sink = %self.health.name, events = n, "events from an earlier run's disk buffer can never be stored");
        } else {
            self.lost.fetch_add(n, Ordering::AcqRel);
        }
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
    /// `shared.health`) until all are counted or [`Shared::abandoned`]. A backend may return
    /// with the last chunk's acknowledgements still on their way (keeping a copy of it), so
    /// that its pipeline does not drain between chunks; [`Backend::settle`] then finishes it.
    async fn deliver(&mut self, chunk: &Chunk, shared: &Shared, ids: &str);

    /// Waits for what earlier deliveries left outstanding, retrying what failed; called when
    /// no chunk is waiting, and before the I/O thread stops.
    async fn settle(&mut self, _shared: &Shared, _ids: &str) {}

    /// Whether [`Backend::settle`] has anything to do.
    fn unsettled(&self) -> bool {
        false
    }

    /// The copy of a chunk whose acknowledgements were still outstanding when the sink was
    /// abandoned (for the disk buffer).
    fn take_unsettled(&mut self) -> Option<Chunk> {
        None
    }
}

/// A [`Sink`] over a [`Backend`] on its own I/O thread.
#[derive(Debug)]
pub struct RemoteSink {
    kind: &'static str,
    batch: Chunk,
    to_io: spsc::Producer<Chunk>,
    from_io: spsc::Consumer<Chunk>,
    shared: Arc<Shared>,
    io: Option<thread::JoinHandle<Undelivered>>,
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

/// Delivers the disk buffer files an earlier run left, oldest first (see the module's text);
/// `false` when the sink was abandoned meanwhile.
async fn replay_leftovers<B: Backend>(backend: &mut B, shared: &Shared) -> bool {
    while shared.has_leftovers.load(Ordering::Acquire) {
        let next = {
            let mut left = shared.leftovers.lock().unwrap_or_else(|e| e.into_inner());
            let next = (!left.is_empty()).then(|| left.remove(0));
            if left.is_empty() {
                shared.has_leftovers.store(false, Ordering::Release);
            }
            next
        };
        let Some(path) = next else { break };
        if !replay_file(backend, shared, &path).await {
            return false;
        }
    }
    true
}

/// Delivers one left-over disk buffer file from where its `.read` mark says it stopped, under
/// its own run's ids; removes it once delivered, or marks how far it got when abandoned.
async fn replay_file<B: Backend>(backend: &mut B, shared: &Shared, path: &std::path::Path) -> bool {
    use std::io::{Seek as _, SeekFrom};
    let name = &shared.health.name;
    let mark = read_mark(path);
    let set_aside = |why: &dyn std::fmt::Display| {
        let to = path.with_extension("unreadable");
        tracing::error!(sink = %name, file = %path.display(), to = %to.display(), reason = %why, "an earlier run's disk buffer cannot be replayed; set aside");
        let _ = std::fs::rename(path, &to);
        let _ = std::fs::remove_file(&mark);
    };
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            set_aside(&e);
            return true;
        }
    };
    let (ids, start) = match read_spool_file_header(&mut f) {
        Ok(h) => h,
        Err(e) => {
            set_aside(&e);
            return true;
        }
    };
    let mut offset = std::fs::read(&mark)
        .ok()
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .filter(|&o| o >= start)
        .unwrap_or(start);
    if let Err(e) = f.seek(SeekFrom::Start(offset)) {
        set_aside(&e);
        return true;
    }
    tracing::info!(sink = %name, file = %path.display(), from = offset, "delivering what an earlier run left in the disk buffer");
    let mut chunk = Chunk::default();
    // What this run delivered before is settled first: only the replay's acks count as replayed.
    if backend.unsettled() && !settle_or_abandon(backend, shared, &shared.ids).await {
        return false;
    }
    shared.replaying.store(true, Ordering::Release);
    let outcome = loop {
        match read_spool_chunk(&mut f, &mut chunk) {
            Ok(n) => {
                shared.health.sent(chunk.records, chunk.bytes.len() as u64);
                if !deliver_or_abandon(backend, &chunk, shared, &ids).await {
                    break Some(false);
                }
                offset += n;
            }
            // The end, or a chunk torn by a crash mid-write: nothing more was ever whole.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Some(true),
            Err(e) => {
                let _ = std::fs::write(&mark, offset.to_le_bytes());
                set_aside(&e);
                break None;
            }
        }
    };
    let outcome = match outcome {
        Some(true) if backend.unsettled() && !settle_or_abandon(backend, shared, &ids).await => {
            Some(false)
        }
        other => other,
    };
    shared.replaying.store(false, Ordering::Release);
    match outcome {
        Some(true) => {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(&mark);
            tracing::info!(sink = %name, file = %path.display(), "an earlier run's disk buffer is delivered");
            true
        }
        Some(false) => {
            let _ = std::fs::write(&mark, offset.to_le_bytes());
            false
        }
        None => true,
    }
}

/// What the I/O thread had not delivered when it stopped: the ring from the appender (with
/// whatever is still queued in it) and, oldest first, the buffers it was delivering when
/// abandoned.
struct Undelivered {
    from: spsc::Consumer<Chunk>,
    current: Vec<Chunk>,
}

/// The I/O thread: sets the backend up (reporting the outcome on `ready`), then delivers
/// buffers in order until stopped; returns what it did not deliver.
fn io_thread<B: Backend>(
    mut backend: B,
    ids: String,
    shared: Arc<Shared>,
    mut from: spsc::Consumer<Chunk>,
    mut back: spsc::Producer<Chunk>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    setup_limit: Duration,
) -> Undelivered {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("starting the sink's runtime: {e}")));
            return Undelivered {
                from,
                current: Vec::new(),
            };
        }
    };
    let mut current = Vec::new();
    let cut_off = rt.block_on(async {
        match tokio::time::timeout(setup_limit, backend.setup()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = ready.send(Err(e));
                return None;
            }
            Err(_) => {
                let _ = ready.send(Err(format!("no answer within {setup_limit:?}")));
                return None;
            }
        }
        let _ = ready.send(Ok(()));
        let mut reader = SpoolReader::default();
        let mut spilled = Chunk::default();
        loop {
            if shared.abandoned() {
                return None;
            }
            // First what an earlier run left (its events are older than any of this run's).
            if shared.has_leftovers.load(Ordering::Acquire)
                && !replay_leftovers(&mut backend, &shared).await
            {
                return None;
            }
            let Some(mut chunk) = from.pop() else {
                // Nothing in memory: what was spilled to disk, in order, if anything.
                if let Some(n) = reader.next(&shared, &mut spilled) {
                    shared
                        .health
                        .sent(spilled.records, spilled.bytes.len() as u64);
                    if !deliver_or_abandon(&mut backend, &spilled, &shared, &ids).await {
                        // Still in the disk buffer: its mark says how far it was delivered.
                        return None;
                    }
                    shared.spool_read.fetch_add(n, Ordering::AcqRel);
                    continue;
                }
                // Nothing waiting: finish what is still outstanding, then maybe stop.
                if backend.unsettled() && !settle_or_abandon(&mut backend, &shared, &ids).await {
                    return None;
                }
                if shared.stop.load(Ordering::Acquire) && from.is_empty() && !backend.unsettled() {
                    return None;
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
                continue;
            };
            shared.health.sent(chunk.records, chunk.bytes.len() as u64);
            if !deliver_or_abandon(&mut backend, &chunk, &shared, &ids).await {
                return Some(chunk);
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
    // Abandoned: the copy the backend kept of a chunk not yet acknowledged is older than the
    // one being delivered.
    current.extend(backend.take_unsettled());
    current.extend(cut_off);
    Undelivered { from, current }
}

/// [`Backend::settle`], unless the sink is abandoned first (see [`deliver_or_abandon`]).
async fn settle_or_abandon<B: Backend>(backend: &mut B, shared: &Shared, ids: &str) -> bool {
    let abandoned = async {
        while !shared.abandoned() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        () = backend.settle(shared, ids) => true,
        () = abandoned => false,
    }
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
            ids: ids.clone(),
            leftovers: std::sync::Mutex::new(Vec::new()),
            has_leftovers: AtomicBool::new(false),
            replaying: AtomicBool::new(false),
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
    ///
    /// Files an earlier run left in `dir` are delivered first (see the module's text); this
    /// run's files are numbered after them.
    #[must_use]
    pub fn with_limits(mut self, bytes: usize, dir: std::path::PathBuf, spool_bytes: u64) -> Self {
        self.max_chunk = (bytes / BUFFERS).max(64 * 1024);
        self.spool.max_bytes = spool_bytes;
        let mut left: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                let ep = p
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".buf")?
                    .parse::<u64>()
                    .ok()?;
                Some((ep, p))
            })
            .collect();
        left.sort();
        if let Some((last, _)) = left.last() {
            tracing::warn!(sink = %self.shared.health.name, files = left.len(), dir = %dir.display(), "an earlier run left events in the disk buffer: delivering them first");
            self.shared.spool_episode.store(*last, Ordering::Release);
            *self
                .shared
                .leftovers
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = left.into_iter().map(|(_, p)| p).collect();
            self.shared.has_leftovers.store(true, Ordering::Release);
        }
        let _ = self.shared.spool_dir.set(dir);
        self
    }

    /// Writes the batch to the disk buffer (starting an outage's file if none is open);
    /// `false` when there is none, it is full, or the write failed.
    fn spill(&mut self) -> bool {
        let batch = core::mem::take(&mut self.batch);
        let spilled = self.write_spill(&batch);
        self.batch = batch;
        if spilled {
            self.handed += self.batch.records;
            self.batch.bytes.clear();
            self.batch.records = 0;
        }
        spilled
    }

    /// Appends `b` to the disk buffer's file (opening one if none is); `false` when there is
    /// no disk buffer, it is full, or the write failed.
    fn write_spill(&mut self, b: &Chunk) -> bool {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if self.spool.max_bytes == 0 {
            return false;
        }
        let framed = (SPOOL_HEADER + b.bytes.len()) as u64;
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
            let header = spool_file_header(&self.shared.ids);
            let mut file = file;
            if let Err(e) = file.write_all(&header) {
                self.shared
                    .health
                    .fail(crate::sink::SinkErrorKind::of_write(&e), &e);
                let _ = std::fs::remove_file(&path);
                return false;
            }
            tracing::warn!(sink = %self.shared.health.name, file = %path.display(), "the other side is behind: buffers spill to disk");
            let start = header.len() as u64;
            // The reader starts past the header: what is read and written counts from there.
            self.shared.spool_read.store(start, Ordering::Release);
            self.shared.spool_written.store(0, Ordering::Release);
            self.shared.spool_episode.store(ep, Ordering::Release);
            self.spool.file = Some((file, path));
            self.spool.written = start;
        }
        let (file, _) = self.spool.file.as_mut().expect("opened above");
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

    /// Stops the I/O thread now and joins it. With a disk buffer, what it had not delivered
    /// (the buffer it was on, those queued behind it) is written there for the next run: still
    /// counted as failed in this one, delivered by the next (after what had spilled already).
    fn abandon(&mut self) {
        self.shared.abandon.store(true, Ordering::Release);
        let Some(Ok(mut left)) = self.io.take().map(thread::JoinHandle::join) else {
            return;
        };
        let mut kept = 0;
        let current = std::mem::take(&mut left.current);
        for chunk in current
            .into_iter()
            .chain(std::iter::from_fn(|| left.from.pop()))
        {
            if chunk.records > 0 && self.write_spill(&chunk) {
                kept += chunk.records;
            }
        }
        if kept > 0 {
            tracing::warn!(sink = %self.shared.health.name, events = kept, "undelivered buffers written to the disk buffer at the stop");
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
        if self.io.is_some() {
            // Whatever was appended is still handed over; the I/O thread delivers what is
            // queued and stops, or is abandoned after a grace period.
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
        }
        // Closed or abandoned: a disk buffer not yet delivered stays, marked for the next run.
        self.end_spill();
        if let Some((_, path)) = &self.spool.file {
            let read = self.shared.spool_read.load(Ordering::Acquire);
            let _ = std::fs::write(read_mark(path), read.to_le_bytes());
            tracing::warn!(
                sink = %self.shared.health.name,
                file = %path.display(),
                events = self.in_flight(),
                "events left undelivered in the disk buffer (counted as failed{{reason=\"shutdown\"}} in this run; the next start delivers them)"
            );
        }
    }
}
