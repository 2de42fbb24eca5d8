//! The file sink: an append-only log of segments, and the DLQ in the same format.
//!
//! A log is a directory of segments named after the id of their first record
//! (`00000000000000000042.seg`), rolled when a segment would pass `segment_bytes`. Each record:
//!
//! ```text
//! | body_len u32 LE | crc32c u32 LE (of id + body) | id u64 LE | body (body_len bytes) |
//! body: | priority u8 | source u8 | seq u64 LE | ingest_ns u64 LE | [sender] | reason_len u8 |
//!       | reason | topic_len u16 LE | topic | payload (the rest) |
//! sender (when bit 0x80 of `source` is set, as every record written now has it):
//!       | received_unix_ns u64 LE | family u8 (0, 4, 6) | port u16 LE | address [u8; 16] |
//! ```
//!
//! `ingest_ns` is the appliance's monotonic clock (latency within a run); `received_unix_ns` is
//! the same instant on the wall clock, and the sender is the datagram's (or connection's)
//! source address and port. Records written before the sender block existed read back with
//! neither.
//!
//! Ids increase by one per record across segments. Opening a log recovers it: the last segment
//! is scanned, and a torn or corrupt tail (a crash mid-write) is truncated and reported, never
//! silently kept. `fsync` follows the policy: `always` (every flush, in the appending thread),
//! `interval` (every `fsync_interval`, by a background thread, so a slow sync never stalls the
//! receive path), `never` (the OS decides).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::ring::spsc;
use crate::sink::{EventRef, Record, Sink, SinkErrorKind, SinkHealth, refusal};
use crate::wire::event::{Peer, Source, unix_offset_ns};

/// Bit of a record's `source` byte saying the sender block follows the fixed fields.
const HAS_SENDER: u8 = 0x80;
/// Bytes of the sender block: `received_unix_ns u64` and the [`Peer`].
const SENDER_BLOCK: usize = 8 + Peer::ENCODED;

const HEADER: usize = 16;
/// Largest body accepted when reading (a frame is at most 16 MiB plus metadata).
const MAX_BODY: u32 = (16 << 20) + 1024;

/// When written records are made durable.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// After every flush (every worker batch).
    Always,
    /// At most once per interval.
    #[default]
    Interval,
    /// Never explicitly.
    Never,
}

impl Fsync {
    /// The log's writer takes queued buffers on its [`WRITER_TICK`] rather than being woken for
    /// each: under `interval` an acknowledgement waits for the interval's sync, not the write.
    const fn writer_ticks(self) -> bool {
        matches!(self, Self::Interval)
    }
}

/// What recovery found when opening a log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records found.
    pub records: u64,
    /// Bytes cut from the tail of the last segment (0 for a clean log).
    pub truncated_bytes: u64,
    /// Damaged bytes skipped in the middle of segments (the records around them kept).
    pub damaged_bytes: u64,
    /// Id the next record gets.
    pub next_id: u64,
}

/// Takes the log directory's lock (`.lock`, `flock`): two daemons never share a log.
fn lock_dir(dir: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd as _;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o640)
        .open(dir.join(".lock"))?;
    // SAFETY: flock takes an open fd and flags; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by another process (its .lock is held)",
                    dir.display()
                ),
            )
        } else {
            e
        });
    }
    Ok(f)
}

/// A record as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Log id.
    pub id: u64,
    /// Where the event came in.
    pub source: Option<Source>,
    /// The event.
    pub record: Record,
    /// Ingest time, the appliance's monotonic clock.
    pub ingest_ns: u64,
    /// Ingest time on the wall clock, Unix ns (absent in records from before it was kept).
    pub received_unix_ns: Option<u64>,
    /// Who sent it ([`Peer::UNKNOWN`] in records from before it was kept).
    pub peer: Peer,
}

fn segment_name(first_id: u64) -> String {
    format!("{first_id:020}.seg")
}

fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let Some(stem) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
        else {
            continue;
        };
        if let Ok(id) = stem.parse::<u64>() {
            v.push((id, p));
        }
    }
    v.sort();
    Ok(v)
}

/// Decodes a record body (what [`scan_segment`] hands over) into a [`Stored`].
///
/// # Errors
/// `InvalidData` for a body that does not hold the fields it must.
pub fn decode(id: u64, b: &[u8]) -> io::Result<Stored> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record {id}: malformed body"),
        )
    };
    let take = |at: usize, n: usize| b.get(at..at + n).ok_or_else(bad);
    let priority = *b.first().ok_or_else(bad)?;
    let source_byte = *b.get(1).ok_or_else(bad)?;
    let source = match source_byte & !HAS_SENDER {
        0 => Some(Source::Xsk),
        1 => Some(Source::Udp),
        2 => Some(Source::Tcp),
        _ => None,
    };
    let seq = u64::from_le_bytes(take(2, 8)?.try_into().map_err(|_| bad())?);
    let ingest_ns = u64::from_le_bytes(take(10, 8)?.try_into().map_err(|_| bad())?);
    let (received_unix_ns, peer, fixed) = if source_byte & HAS_SENDER != 0 {
        let s = take(18, SENDER_BLOCK)?;
        (
            Some(u64::from_le_bytes(s[..8].try_into().map_err(|_| bad())?)),
            Peer::from_bytes(s[8..].try_into().map_err(|_| bad())?),
            18 + SENDER_BLOCK,
        )
    } else {
        (None, Peer::UNKNOWN, 18)
    };
    let rlen = usize::from(*b.get(fixed).ok_or_else(bad)?);
    let reason = std::str::from_utf8(take(fixed + 1, rlen)?).map_err(|_| bad())?;
    let at = fixed + 1 + rlen;
    let tlen = usize::from(u16::from_le_bytes(
        take(at, 2)?.try_into().map_err(|_| bad())?,
    ));
    let topic = std::str::from_utf8(take(at + 2, tlen)?)
        .map_err(|_| bad())?
        .to_owned();
    let payload = b[at + 2 + tlen..].to_vec();
    let reason: Option<&'static str> = match reason {
        "" => None,
        "no_route" => Some("no_route"),
        "dropping" => Some("dropping"),
        "emergency" => Some("emergency"),
        _ => Some("other"),
    };
    Ok(Stored {
        id,
        source,
        ingest_ns,
        received_unix_ns,
        peer,
        record: Record {
            seq,
            priority,
            topic,
            payload,
            reason,
        },
    })
}

/// A damaged stretch of a segment: bytes that hold no valid record, between good ones (or at
/// the end).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment.
    pub segment: PathBuf,
    /// Offset of the first bad byte.
    pub offset: u64,
    /// Bad bytes skipped (to the next good record, or to the end).
    pub bytes: u64,
    /// What the first bad record looked like.
    pub reason: String,
    /// Whether it runs to the end of the segment (a torn tail, on the last one).
    pub at_end: bool,
}

/// The record at `at` of `b`, if it is whole and its CRC holds: `(id, body, length)`.
/// `ids` bounds the ids accepted (a resync must not take random bytes for a record).
fn record_at(
    b: &[u8],
    at: usize,
    ids: core::ops::RangeInclusive<u64>,
) -> Result<(u64, &[u8], usize), String> {
    let mut unlimited = usize::MAX;
    record_within(b, at, ids, &mut unlimited)
}

/// [`record_at`], with the CRC work charged to `budget` (bytes of body); a candidate whose body
/// the budget cannot pay for is refused without reading it, and spends what was left.
fn record_within<'b>(
    b: &'b [u8],
    at: usize,
    ids: core::ops::RangeInclusive<u64>,
    budget: &mut usize,
) -> Result<(u64, &'b [u8], usize), String> {
    let h = b.get(at..at + HEADER).ok_or("torn record header")?;
    let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let id = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if len > MAX_BODY {
        return Err(format!("record length {len} out of range"));
    }
    if !ids.contains(&id) {
        return Err(format!("record id {id} out of sequence"));
    }
    let body = b
        .get(at + HEADER..at + HEADER + len as usize)
        .ok_or("torn record body")?;
    let Some(left) = budget.checked_sub(body.len()) else {
        *budget = 0;
        return Err("resync budget spent".into());
    };
    *budget = left;
    if crc32c::crc32c_append(crc32c::crc32c(&h[8..16]), body) != crc {
        return Err(format!("CRC mismatch in record {id}"));
    }
    Ok((id, body, HEADER + len as usize))
}

/// How far ahead of the last good id a resync looks for the next good record.
const RESYNC_IDS: u64 = 1 << 24;

/// Bytes of record bodies that resyncs may run through CRC32C, per segment byte. A resync tries
/// every offset, and an offset whose header looks right costs a CRC over the length it claims:
/// crafted input (a plausible header every few bytes, each claiming the rest of the segment)
/// would make that quadratic. Real damage (torn writes, zeroed pages, flipped bits) almost never
/// passes the header checks, so it stays far inside this linear budget; past it, the rest of
/// the segment is reported as one damaged stretch.
const RESYNC_CRC_BUDGET_PER_BYTE: usize = 16;

/// Scans one segment's bytes: calls `f` with each good record (id, body) in order, skips what
/// is damaged to the next good record (found by its header, id sequence and CRC), and returns
/// the damage. `first` is the id the segment's name promises for its first record.
pub fn scan_segment(
    path: &Path,
    b: &[u8],
    first: u64,
    mut f: impl FnMut(u64, &[u8]),
) -> (Vec<Damage>, Option<u64>) {
    let (mut at, mut next, mut last) = (0usize, first, None);
    let mut damage = Vec::new();
    let mut budget = b
        .len()
        .saturating_mul(RESYNC_CRC_BUDGET_PER_BYTE)
        .saturating_add(2 * MAX_BODY as usize);
    while at < b.len() {
        match record_at(b, at, next..=next) {
            Ok((id, body, n)) => {
                f(id, body);
                at += n;
                next = id + 1;
                last = Some(id);
            }
            Err(reason) => {
                // Resync: the first offset past `at` where a whole record with a later id and
                // a good CRC starts.
                let ids = next..=next.saturating_add(RESYNC_IDS);
                let found = (at + 1..b.len().saturating_sub(HEADER - 1))
                    .find(|&o| budget > 0 && record_within(b, o, ids.clone(), &mut budget).is_ok());
                let end = found.unwrap_or(b.len());
                let spent = budget == 0 && found.is_none();
                damage.push(Damage {
                    segment: path.to_owned(),
                    offset: at as u64,
                    bytes: (end - at) as u64,
                    reason: if spent {
                        format!("{reason}; no resync: the search budget ran out (crafted input?)")
                    } else {
                        reason
                    },
                    // Never taken for a torn tail: good records may follow what was not searched.
                    at_end: found.is_none() && !spent,
                });
                at = end;
                if let Some(o) = found
                    && let Ok((id, _, _)) = record_at(b, o, ids)
                {
                    next = id;
                }
            }
        }
    }
    (damage, last)
}

/// Streams every good record of the log in `dir`, in id order, one segment in memory at a
/// time; returns the damage found (none for a clean log). A record whose CRC holds but whose
/// body does not decode is damage too.
///
/// # Errors
/// When the directory or a segment cannot be read.
pub fn scan_log(dir: &Path, mut f: impl FnMut(Stored)) -> io::Result<Vec<Damage>> {
    let mut all = Vec::new();
    for (first, path) in segments(dir)? {
        let bytes = fs::read(&path)?;
        let mut bad_bodies = Vec::new();
        let (damage, _) = scan_segment(&path, &bytes, first, |id, body| match decode(id, body) {
            Ok(s) => f(s),
            Err(e) => bad_bodies.push(Damage {
                segment: path.clone(),
                offset: 0,
                bytes: body.len() as u64,
                reason: e.to_string(),
                at_end: false,
            }),
        });
        all.extend(damage);
        all.extend(bad_bodies);
    }
    Ok(all)
}

/// Reads every record of the log in `dir`, in id order, skipping a torn tail of the last
/// segment (recovery would truncate it).
///
/// # Errors
/// When the directory cannot be read, or any other damage is found.
pub fn read_log(dir: &Path) -> io::Result<Vec<Stored>> {
    let mut out = Vec::new();
    let damage = scan_log(dir, |s| out.push(s))?;
    let last = segments(dir)?.pop().map(|(_, p)| p);
    if let Some(d) = damage
        .iter()
        .find(|d| !(d.at_end && Some(&d.segment) == last.as_ref()))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: {} bad bytes at {}: {}",
                d.segment.display(),
                d.bytes,
                d.offset,
                d.reason
            ),
        ));
    }
    Ok(out)
}

/// One record to append.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'e> {
    /// Where the event came in.
    pub source: Source,
    /// Ingest sequence.
    pub seq: u64,
    /// Ingest time, monotonic.
    pub ingest_ns: u64,
    /// Ingest time, Unix ns.
    pub received_unix_ns: u64,
    /// Who sent it.
    pub peer: Peer,
    /// Priority.
    pub priority: u8,
    /// DLQ reason, empty for delivered events.
    pub reason: &'e str,
    /// Topic.
    pub topic: &'e str,
    /// Payload.
    pub payload: &'e [u8],
}

/// An open log, appending.
///
/// Records are encoded by the appending thread into a batch buffer (an event's bytes are copied
/// once); [`SegmentLog::flush`] hands the buffer to the log's writer thread over an SPSC ring
/// and takes an empty one back from another, so `write`, segment rolls and `fsync` never stall
/// the appender (in inline mode, the receive thread). Under `always` and `never` the hand-over
/// wakes the writer; under `interval` the writer takes what is queued on its own tick (1 ms),
/// so the appender makes no syscall and sends no cross-CPU wake-up a batch. The writer
/// acknowledges records once they are durable by the policy ([`SegmentLog::acked`]): after the
/// sync that covers them for `always` and `interval`, after the write for `never`. A fixed set
/// of buffers is in flight at most; with all of them queued the appender waits (backpressure:
/// the receive rings fill), up to `BLOCK_LIMIT` (1 s) while the writer is healthy, not at all
/// while it is failing: then appends are refused (the caller sends the event to the DLQ or
/// counts it failed) while the writer retries, and taken again once it recovers.
#[derive(Debug)]
pub struct SegmentLog {
    /// Bytes of the segment, counting what is still buffered.
    segment_len: u64,
    segment_bytes: u64,
    next_id: u64,
    /// The batch being built.
    batch: Chunk,
    to_writer: spsc::Producer<Chunk>,
    from_writer: spsc::Consumer<Chunk>,
    shared: Arc<WriterShared>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Records handed to the writer (the writer's `durable` counts up to this).
    handed: u64,
    /// `durable` as last read.
    acked: u64,
    /// `lost` as last read.
    lost: u64,
    /// Bytes a buffer may grow to while the writer is behind.
    max_chunk: usize,
    /// Hand-overs wake the writer (`always`, `never`: acknowledgements wait on its write); an
    /// `interval` writer takes them on its tick ([`WRITER_TICK`]).
    wake_writer: bool,
    /// The directory's lock, held while the log is open.
    _lock: File,
}

/// A batch of whole records on its way to the writer.
#[derive(Debug, Default)]
struct Chunk {
    bytes: Vec<u8>,
    records: u64,
    /// Before writing: close the segment (synced) and start one whose first record has this id.
    roll_to: Option<u64>,
    /// After writing: sync everything now, whatever the policy (shutdown, `sync`).
    sync: bool,
    /// When it was handed over (for the ack latency).
    handed_at: Option<Instant>,
}

/// What the appender and the writer share.
#[derive(Debug)]
struct WriterShared {
    /// Records durable by the policy.
    durable: AtomicU64,
    /// Records the writer took and could not make durable (a failed `fsync`).
    lost: AtomicU64,
    /// `durable + lost`, moved under this lock by the writer and the syncer (never the
    /// appender), so one range is never both.
    resolved: std::sync::Mutex<u64>,
    /// The writer sleeps (parked) and wants an unpark.
    parked: AtomicBool,
    /// Write what is queued, then stop.
    stop: AtomicBool,
    /// Stop now, even with chunks unwritten (the shutdown deadline passed).
    abandon: AtomicBool,
    health: Arc<SinkHealth>,
}

impl WriterShared {
    /// Records `..upto` are resolved: durable if `ok`, else lost.
    fn resolve(&self, upto: u64, ok: bool) {
        let mut r = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if upto <= *r {
            return;
        }
        let n = upto - *r;
        *r = upto;
        if ok {
            self.durable.fetch_add(n, Ordering::AcqRel);
        } else {
            self.lost.fetch_add(n, Ordering::AcqRel);
        }
    }
}

/// Buffers per log: one being built, the rest queued or being written.
const BUFFERS: usize = 8;
/// A batch buffer past this size is handed over before the batch ends.
const BATCH_BYTES: usize = 256 * 1024;
/// A buffer grows up to this while the writer is behind, before the appender waits (by
/// default: [`SegmentLog::with_max_buffered`] sets it).
const MAX_CHUNK: usize = 8 << 20;
/// Longest a healthy but slow writer may hold up the appender before events are refused.
const BLOCK_LIMIT: Duration = Duration::from_secs(1);
/// How long an `interval` log's idle writer sleeps before it looks for queued buffers again.
///
/// Under `interval` an append is acknowledged after the interval's sync, not after its write,
/// so nothing waits on the hand-over: the appender queues its buffer without waking the writer
/// (no futex wake, no cross-CPU interrupt from the receive core per batch), and the writer takes
/// what is queued on this tick: one larger `write` a tick instead of one small one a batch.
/// Measured on the demo (three logs, 31 k datagrams/s): the writers took about a third of the
/// sending core with a wake per batch (~15 k wakes/s).
const WRITER_TICK: Duration = Duration::from_millis(1);
/// Retry backoff after a failed write: from the first to the last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(1));

/// Files an `interval` log still has to sync: the segment being written (a clone of the
/// writer's handle) and segments rolled away since the last sync.
#[derive(Debug, Default)]
struct Unsynced {
    current: Option<File>,
    rolled: Vec<File>,
}

/// Syncs `u`'s files: rolled segments whole, then the current one's data.
fn sync_files(u: &mut Unsynced) -> io::Result<()> {
    for f in u.rolled.drain(..) {
        f.sync_all()?;
    }
    u.current.as_ref().map_or(Ok(()), File::sync_data)
}

/// Writes what is left of `chunk` from `*off` (rolling first if it asks), keeping `*off` at
/// the first byte not yet written, so a retry after an error (a full disk) continues exactly
/// where the failed attempt stopped and never writes a byte twice.
fn write_chunk(
    dir: &Path,
    chunk: &mut Chunk,
    off: &mut usize,
    file: &mut File,
    fsync: Fsync,
    unsynced: &std::sync::Mutex<Unsynced>,
    health: &SinkHealth,
) -> io::Result<()> {
    if let Some(first) = chunk.roll_to {
        let next = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(dir.join(segment_name(first)))?;
        sync_dir(dir)?;
        let old = core::mem::replace(file, next);
        chunk.roll_to = None;
        match fsync {
            // Its records were synced chunk by chunk; this makes its length durable.
            Fsync::Always => {
                if let Err(e) = old.sync_all() {
                    health.fail(SinkErrorKind::Sync, &e);
                }
            }
            Fsync::Interval => {
                let mut u = unsynced.lock().unwrap_or_else(|p| p.into_inner());
                u.rolled.push(old);
                u.current = Some(file.try_clone()?);
            }
            Fsync::Never => {}
        }
    }
    while *off < chunk.bytes.len() {
        match file.write(&chunk.bytes[*off..]) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => *off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The writer thread: writes chunks in order, rolls segments, and resolves records: durable
/// after the write for `never`, after its own sync for `always` (and for a chunk that asks),
/// and for `interval` through a companion syncer thread, so a slow sync never holds up the
/// writes behind it.
///
/// A failed write or roll (`ENOSPC`, `EIO`) is retried with backoff from the byte where it
/// stopped, the chunks behind it waiting in the ring, until it succeeds or the log is
/// abandoned at shutdown; a failed `fsync` counts what it covered as lost (after one, Linux
/// may have dropped the pages: a retry that succeeds proves nothing).
fn writer(
    dir: PathBuf,
    file: File,
    fsync: Fsync,
    interval: Duration,
    mut from: spsc::Consumer<Chunk>,
    mut back: spsc::Producer<Chunk>,
    shared: Arc<WriterShared>,
) {
    // Below the data plane's priority: on a box with fewer cores than threads, a write never
    // preempts a receive thread (it runs when one waits, or on a spare core).
    // SAFETY: setpriority has no memory-safety preconditions; `who` 0 is the calling thread.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    let health = &*shared.health;
    let unsynced = std::sync::Mutex::new(Unsynced {
        current: file.try_clone().ok(),
        rolled: Vec::new(),
    });
    // Records written; for `interval` the syncer turns them durable.
    let written = AtomicU64::new(0);
    let writing_done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut syncer = None;
        if fsync == Fsync::Interval {
            let (unsynced, written, done, shared) = (&unsynced, &written, &writing_done, &shared);
            syncer = Some(scope.spawn(move || {
                // SAFETY: as above.
                let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
                loop {
                    let last = done.load(Ordering::Acquire);
                    let w = written.load(Ordering::Acquire);
                    if w > shared.durable.load(Ordering::Acquire)
                        + shared.lost.load(Ordering::Acquire)
                    {
                        // What was written before this sync is durable after it.
                        let mut u = core::mem::take(
                            &mut *unsynced.lock().unwrap_or_else(|p| p.into_inner()),
                        );
                        let r = sync_files(&mut u);
                        unsynced
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .current
                            .get_or_insert_with(|| u.current.take().expect("kept"));
                        if let Err(e) = &r {
                            shared.health.fail(SinkErrorKind::Sync, e);
                        }
                        shared.resolve(w, r.is_ok());
                    }
                    if last || shared.abandon.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::park_timeout(interval);
                }
            }));
        }
        let mut file = file;
        let mut count = 0u64;
        'chunks: loop {
            if shared.abandon.load(Ordering::Acquire) {
                break;
            }
            let Some(mut chunk) = from.pop() else {
                if shared.stop.load(Ordering::Acquire) && from.is_empty() {
                    break;
                }
                shared.parked.store(true, Ordering::SeqCst);
                if from.is_empty() && !shared.stop.load(Ordering::Acquire) {
                    // `interval`: woken by the tick (the appender does not wake it); else by
                    // the appender, the timeout a backstop.
                    std::thread::park_timeout(if fsync.writer_ticks() {
                        WRITER_TICK
                    } else {
                        Duration::from_millis(5)
                    });
                }
                shared.parked.store(false, Ordering::SeqCst);
                continue;
            };
            let (mut off, mut backoff) = (0usize, BACKOFF.0);
            while let Err(e) = write_chunk(
                &dir, &mut chunk, &mut off, &mut file, fsync, &unsynced, health,
            ) {
                health.fail(SinkErrorKind::of_write(&e), &e);
                std::thread::park_timeout(backoff);
                if shared.abandon.load(Ordering::Acquire) {
                    break 'chunks;
                }
                backoff = (backoff * 2).min(BACKOFF.1);
                health.retried();
            }
            count += chunk.records;
            health.sent(chunk.records, chunk.bytes.len() as u64);
            let mut ok = true;
            if chunk.sync || fsync == Fsync::Always {
                let r = (|| {
                    if fsync == Fsync::Interval {
                        sync_files(&mut unsynced.lock().unwrap_or_else(|p| p.into_inner()))?;
                    }
                    file.sync_data()
                })();
                if let Err(e) = &r {
                    health.fail(SinkErrorKind::Sync, e);
                    ok = false;
                }
                shared.resolve(count, ok);
            } else if fsync == Fsync::Never {
                shared.resolve(count, true);
            }
            if ok {
                health.recovered();
            }
            // Durable now, except with `interval` (its syncer resolves later; not measured).
            if ok
                && (chunk.sync || fsync != Fsync::Interval)
                && let Some(t) = chunk.handed_at.take()
            {
                health.acked_after(t.elapsed(), chunk.records);
            }
            written.store(count, Ordering::Release);
            chunk.bytes.clear();
            chunk.records = 0;
            chunk.roll_to = None;
            chunk.sync = false;
            chunk.handed_at = None;
            // Cannot fail: at most BUFFERS chunks exist, and the ring back holds them all.
            let _ = back.push(chunk);
        }
        writing_done.store(true, Ordering::Release);
        if let Some(s) = &syncer {
            s.thread().unpark();
        }
    });
}

/// Makes a directory's entries durable (a new segment's name).
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl SegmentLog {
    /// Opens (creating) the log in `dir`, recovering its last segment.
    ///
    /// # Errors
    /// When the directory or a segment cannot be created, read or truncated.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        fsync: Fsync,
        fsync_interval: Duration,
    ) -> io::Result<(Self, Recovery)> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)?;
        let lock = lock_dir(dir)?;
        let segs = segments(dir)?;
        let mut rec = Recovery::default();
        // Every segment is checked; damage in the middle is skipped and reported (the good
        // records after it stay), and only a torn tail of the last segment is cut.
        for (i, (first, path)) in segs.iter().enumerate() {
            let bytes = fs::read(path)?;
            let mut records = 0u64;
            let (damage, last) = scan_segment(path, &bytes, *first, |_, _| records += 1);
            rec.records += records;
            let is_last = i + 1 == segs.len();
            for d in &damage {
                if d.at_end && is_last {
                    continue;
                }
                tracing::warn!(segment = %path.display(), offset = d.offset, bytes = d.bytes, reason = %d.reason, "damaged records skipped");
                rec.damaged_bytes += d.bytes;
            }
            if is_last {
                rec.next_id = last.map_or(*first, |id| id + 1);
                if let Some(d) = damage.iter().find(|d| d.at_end) {
                    let f = OpenOptions::new().write(true).open(path)?;
                    f.set_len(d.offset)?;
                    f.sync_all()?;
                    rec.truncated_bytes = d.bytes;
                    tracing::warn!(segment = %path.display(), bytes = d.bytes, "truncated a torn tail");
                }
            }
        }
        let (path, len) = match segs.last() {
            None => (dir.join(segment_name(0)), 0),
            Some((_, path)) => (path.clone(), fs::metadata(path)?.len()),
        };
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)?;
        f.seek(SeekFrom::End(0))?;
        sync_dir(dir)?;
        let (to_writer, from_appender) = spsc::channel::<Chunk>(BUFFERS);
        let (mut spare, from_writer) = spsc::channel::<Chunk>(BUFFERS);
        for _ in 1..BUFFERS {
            let _ = spare.push(Chunk {
                bytes: Vec::with_capacity(BATCH_BYTES + 64 * 1024),
                ..Chunk::default()
            });
        }
        let shared = Arc::new(WriterShared {
            durable: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            resolved: std::sync::Mutex::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            health: Arc::new(SinkHealth::new(format!("file:{}", dir.display()))),
        });
        let w = Arc::clone(&shared);
        let wdir = dir.to_owned();
        let interval = fsync_interval.max(Duration::from_millis(1));
        let writer = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer(wdir, f, fsync, interval, from_appender, spare, w))?;
        let log = Self {
            segment_len: len,
            segment_bytes: segment_bytes.max(4096),
            next_id: rec.next_id,
            batch: Chunk {
                bytes: Vec::with_capacity(BATCH_BYTES + 64 * 1024),
                ..Chunk::default()
            },
            to_writer,
            from_writer,
            shared,
            writer: Some(writer),
            handed: 0,
            acked: 0,
            lost: 0,
            max_chunk: MAX_CHUNK,
            wake_writer: !fsync.writer_ticks(),
            _lock: lock,
        };
        Ok((log, rec))
    }

    /// Holds at most about `bytes` appended and not yet written (its buffers together, default
    /// 64 MiB): what a failing or slow disk can leave waiting in memory before appends are
    /// refused.
    #[must_use]
    pub fn with_max_buffered(mut self, bytes: usize) -> Self {
        self.max_chunk = (bytes / BUFFERS).max(64 * 1024);
        self
    }

    /// Id the next record gets.
    pub const fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The log's health (its writer's errors and retries).
    pub fn health(&self) -> &Arc<SinkHealth> {
        &self.shared.health
    }

    /// Why an append is refused now.
    fn refused(&self) -> io::Error {
        refusal(&match self.shared.health.failure() {
            Some(why) => format!("{} is failing: {why}", self.shared.health.name),
            None => format!("{} is full (its writer is behind)", self.shared.health.name),
        })
    }

    /// Hands the batch being built to the writer when it is due; `false` when it had to go and
    /// could not (no free buffer: the writer is failing, or behind past [`BLOCK_LIMIT`]).
    ///
    /// Batches coalesce while the writer is busy: a buffer goes over when the writer has
    /// nothing queued (it is idle, or on its last chunk), when it passes [`BATCH_BYTES`], or
    /// when `must`. A full buffer with no free one to swap in grows up to `max_chunk` (once:
    /// its capacity is kept) before the appender waits: that wait is the backpressure.
    fn hand_over(&mut self, must: bool) -> bool {
        let len = self.batch.bytes.len();
        if len == 0 && self.batch.roll_to.is_none() && !must {
            return true;
        }
        if !must && len < BATCH_BYTES && self.queued() > 0 {
            return true; // the writer has work queued: keep filling this one
        }
        let wait = must || len >= self.max_chunk;
        match self.free_buffer(wait) {
            Some(next) => {
                self.send(next, must);
                true
            }
            None => !wait, // not due yet: keep filling this one
        }
    }

    /// Hands the buffer over now, if it holds anything (a segment boundary); `false` when no
    /// buffer came free.
    fn hand_over_now(&mut self) -> bool {
        if self.batch.bytes.is_empty() && self.batch.roll_to.is_none() {
            return true;
        }
        match self.free_buffer(true) {
            Some(next) => {
                self.send(next, false);
                true
            }
            None => false,
        }
    }

    /// An empty buffer back from the writer. Without `wait`, `None` at once if there is none;
    /// with it, waits while the writer is healthy, up to [`BLOCK_LIMIT`].
    fn free_buffer(&mut self, wait: bool) -> Option<Chunk> {
        let mut spins = 0u32;
        let mut since = None;
        loop {
            if let Some(c) = self.from_writer.pop() {
                return Some(c);
            }
            if !wait
                || self.shared.health.is_failing()
                || self.shared.abandon.load(Ordering::Acquire)
            {
                return None;
            }
            if since.is_none()
                && let Some(w) = &self.writer
            {
                // Every buffer is queued: an `interval` writer asleep until its tick is woken.
                w.thread().unpark();
            }
            let t0 = *since.get_or_insert_with(Instant::now);
            if t0.elapsed() >= BLOCK_LIMIT {
                return None;
            }
            crate::engine::idle::backoff(&mut spins);
        }
    }

    /// Buffers queued for the writer and not yet taken.
    fn queued(&mut self) -> usize {
        self.to_writer.capacity() - self.to_writer.slots()
    }

    /// Queues the batch being built for the writer (`next` takes its place) and wakes it,
    /// unless it is an `interval` writer with one tick's work queued at most: that one takes
    /// the buffer on its tick. A `sync` hand-over, or a queue of two buffers or more (the
    /// writer is behind), wakes it either way.
    fn send(&mut self, next: Chunk, sync: bool) {
        let mut full = core::mem::replace(&mut self.batch, next);
        full.sync = sync;
        full.handed_at = Some(Instant::now());
        self.handed += full.records;
        // Cannot fail: a free buffer came back, so the ring to the writer has a slot for it.
        let pushed = self.to_writer.push(full).is_ok();
        debug_assert!(pushed, "BUFFERS chunks fit in the ring");
        let wake = self.wake_writer || sync || self.queued() > 1;
        if wake
            && self.shared.parked.load(Ordering::SeqCst)
            && let Some(w) = &self.writer
        {
            w.thread().unpark();
        }
    }

    fn roll(&mut self) -> bool {
        if !self.hand_over_now() {
            return false;
        }
        self.batch.roll_to = Some(self.next_id);
        self.segment_len = 0;
        true
    }

    /// Appends one record; returns its id.
    ///
    /// # Errors
    /// A [`refusal`] when the log cannot take it now (its writer is failing, or behind past
    /// every buffer); `InvalidInput` for a topic longer than 65 535 bytes.
    pub fn append(&mut self, e: &Entry<'_>) -> io::Result<u64> {
        let Entry {
            source,
            seq,
            ingest_ns,
            received_unix_ns,
            peer,
            priority,
            reason,
            topic,
            payload,
        } = *e;
        let reason = &reason.as_bytes()[..reason.len().min(255)];
        let topic_len = u16::try_from(topic.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "topic too long"))?;
        let body_len =
            2 + 8 + 8 + SENDER_BLOCK + 1 + reason.len() + 2 + topic.len() + payload.len();
        let len = (HEADER + body_len) as u64;
        if self.segment_len > 0 && self.segment_len + len > self.segment_bytes && !self.roll() {
            return Err(self.refused());
        }
        if self.batch.bytes.len() >= self.max_chunk && !self.hand_over(false) {
            return Err(self.refused());
        }
        let id = self.next_id;
        let b = &mut self.batch.bytes;
        let start = b.len();
        b.extend_from_slice(&(body_len as u32).to_le_bytes());
        b.extend_from_slice(&[0; 4]); // the CRC, filled in below
        b.extend_from_slice(&id.to_le_bytes());
        b.push(priority);
        b.push(source as u8 | HAS_SENDER);
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&ingest_ns.to_le_bytes());
        b.extend_from_slice(&received_unix_ns.to_le_bytes());
        b.extend_from_slice(&peer.to_bytes());
        b.push(reason.len() as u8);
        b.extend_from_slice(reason);
        b.extend_from_slice(&topic_len.to_le_bytes());
        b.extend_from_slice(topic.as_bytes());
        b.extend_from_slice(payload);
        let crc = crc32c::crc32c(&b[start + 8..]);
        b[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.segment_len += len;
        self.next_id += 1;
        self.batch.records += 1;
        if self.batch.bytes.len() >= BATCH_BYTES {
            // Taken either way: it is in the batch, handed over now or with a later one.
            self.hand_over(false);
        }
        Ok(id)
    }

    /// Ends a batch: hands what was appended to the writer when it is due. Durability follows
    /// later, by the policy ([`SegmentLog::acked`]).
    pub fn flush(&mut self) {
        self.hand_over(false);
    }

    /// Records made durable since the last call.
    pub fn acked(&mut self) -> u64 {
        let durable = self.shared.durable.load(Ordering::Acquire);
        let n = durable - self.acked;
        self.acked = durable;
        n
    }

    /// Records lost since the last call (taken, written, and then an `fsync` failed).
    pub fn lost(&mut self) -> u64 {
        let lost = self.shared.lost.load(Ordering::Acquire);
        let n = lost - self.lost;
        self.lost = lost;
        n
    }

    /// Records appended and not yet resolved (durable or lost).
    pub fn in_flight(&self) -> u64 {
        let resolved =
            self.shared.lost.load(Ordering::Acquire) + self.shared.durable.load(Ordering::Acquire);
        (self.handed + self.batch.records).saturating_sub(resolved)
    }

    /// Writes and syncs everything appended so far, regardless of policy, and waits for it
    /// (tests); see [`SegmentLog::sync_until`].
    ///
    /// # Errors
    /// As [`SegmentLog::sync_until`], never `TimedOut`.
    pub fn sync(&mut self) -> io::Result<()> {
        self.sync_until(None)
    }

    /// Writes and syncs everything appended so far, regardless of policy, and waits for it
    /// until `deadline` (shutdown). Past the deadline the writer is abandoned (stopped, its
    /// retries given up) and joined, so [`SegmentLog::in_flight`] is then final: what it counts
    /// was never persisted.
    ///
    /// # Errors
    /// `TimedOut` when the deadline passed first; the first failure of a sync it asked for.
    pub fn sync_until(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        if self.writer.is_none() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "abandoned"));
        }
        let lost_before = self.shared.lost.load(Ordering::Acquire);
        let mut sent = false;
        loop {
            if !sent {
                sent = self.hand_over(true);
            }
            let resolved = self.shared.durable.load(Ordering::Acquire)
                + self.shared.lost.load(Ordering::Acquire);
            if sent && resolved >= self.handed {
                if self.shared.lost.load(Ordering::Acquire) > lost_before {
                    return Err(io::Error::other(format!(
                        "{}: an fsync failed",
                        self.shared.health.name
                    )));
                }
                return Ok(());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.abandon();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: {} records not durable by the shutdown deadline",
                        self.shared.health.name,
                        self.in_flight()
                    ),
                ));
            }
            if let Some(w) = &self.writer {
                w.thread().unpark();
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Stops the writer now, unwritten chunks and retries given up, and joins it.
    fn abandon(&mut self) {
        self.shared.abandon.store(true, Ordering::Release);
        if let Some(w) = self.writer.take() {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

impl Drop for SegmentLog {
    fn drop(&mut self) {
        if self.writer.is_none() {
            return; // abandoned: joined already
        }
        // What was appended but never flushed is still handed over, then the writer writes
        // what is queued and stops; a writer still retrying after a grace period is abandoned.
        self.hand_over(true);
        self.shared.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + BLOCK_LIMIT * 5;
        while let Some(w) = &self.writer
            && !w.is_finished()
            && Instant::now() < deadline
        {
            w.thread().unpark();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.abandon();
    }
}

/// A [`Sink`] over a [`SegmentLog`]; synced on drop (shutdown).
#[derive(Debug)]
pub struct FileSink {
    log: SegmentLog,
    /// Monotonic to Unix time, read once per batch ([`unix_offset_ns`]).
    unix_offset: u64,
}

impl FileSink {
    /// A sink writing to `log`.
    pub fn new(log: SegmentLog) -> Self {
        Self {
            log,
            unix_offset: unix_offset_ns(),
        }
    }
}

impl Sink for FileSink {
    fn append(&mut self, ev: &EventRef<'_>, reason: Option<&'static str>) -> io::Result<()> {
        self.log
            .append(&Entry {
                source: ev.source,
                seq: ev.seq,
                ingest_ns: ev.ingest_ns,
                received_unix_ns: ev.ingest_ns.wrapping_add(self.unix_offset),
                peer: ev.peer,
                priority: ev.priority,
                reason: reason.unwrap_or(""),
                topic: ev.topic,
                payload: ev.payload,
            })
            .map(drop)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.log.flush();
        self.unix_offset = unix_offset_ns();
        Ok(())
    }

    fn acked(&mut self) -> io::Result<u64> {
        Ok(self.log.acked())
    }

    fn lost(&mut self) -> u64 {
        self.log.lost()
    }

    fn in_flight(&self) -> u64 {
        self.log.in_flight()
    }

    fn close(&mut self, deadline: Instant) -> io::Result<()> {
        self.log.sync_until(Some(deadline))
    }

    fn health(&self) -> Option<&Arc<SinkHealth>> {
        Some(self.log.health())
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("es-log-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn append(log: &mut SegmentLog, i: u64) -> u64 {
        let reason = if i.is_multiple_of(2) { "" } else { "no_route" };
        let payload = i.to_be_bytes();
        let e = Entry {
            source: Source::Udp,
            seq: i,
            ingest_ns: 1000 + i,
            received_unix_ns: 1_700_000_000_000_000_000 + i,
            peer: Peer::v4([198, 18, 0, 1], 40_000 + i as u16),
            priority: (i % 8) as u8,
            reason,
            topic: "t.opic",
            payload: &payload,
        };
        log.append(&e).unwrap()
    }

    #[test]
    fn records_round_trip_across_rolled_segments() {
        let d = tmp("roll");
        let (mut log, rec) = SegmentLog::open(&d, 4096, Fsync::Always, Duration::ZERO).unwrap();
        assert_eq!(rec, Recovery::default());
        for i in 0..500 {
            assert_eq!(append(&mut log, i), i, "ids increase by one");
        }
        log.sync().unwrap();
        drop(log);
        assert!(segments(&d).unwrap().len() > 3, "segments rolled by size");
        let all = read_log(&d).unwrap();
        assert_eq!(all.len(), 500);
        for (i, s) in all.iter().enumerate() {
            let i = i as u64;
            assert_eq!(
                (s.id, s.record.seq, s.ingest_ns, s.source),
                (i, i, 1000 + i, Some(Source::Udp))
            );
            assert_eq!(s.received_unix_ns, Some(1_700_000_000_000_000_000 + i));
            assert_eq!(
                s.peer.socket_addr(),
                Some(([198, 18, 0, 1], 40_000 + i as u16).into()),
                "the sender rides with every record"
            );
            assert_eq!(s.record.payload, i.to_be_bytes());
            assert_eq!(
                s.record.reason,
                if i.is_multiple_of(2) {
                    None
                } else {
                    Some("no_route")
                }
            );
        }
        let (log, rec) = SegmentLog::open(&d, 4096, Fsync::Never, Duration::ZERO).unwrap();
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(log.next_id(), 500, "reopening continues the ids");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn records_from_before_the_sender_block_still_read() {
        // The layout written before the sender block: no 0x80 bit, reason right after ingest_ns.
        let mut body = vec![3u8, Source::Tcp as u8];
        body.extend_from_slice(&7u64.to_le_bytes());
        body.extend_from_slice(&99u64.to_le_bytes());
        body.push(0);
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(b"t");
        body.extend_from_slice(b"old");
        let s = decode(5, &body).unwrap();
        assert_eq!(
            (s.record.seq, s.ingest_ns, s.source),
            (7, 99, Some(Source::Tcp))
        );
        assert_eq!((s.received_unix_ns, s.peer), (None, Peer::UNKNOWN));
        assert_eq!(
            (s.record.topic.as_str(), &s.record.payload[..]),
            ("t", &b"old"[..])
        );
    }

    #[test]
    fn an_interval_writer_takes_unwoken_hand_overs_on_its_tick() {
        // Under `interval` a hand-over does not wake the writer: its tick must still take
        // every buffer, in order; the appender only reads `acked` and hands over the batch
        // left building once the queued one is taken.
        let d = tmp("tick");
        let (mut log, _) =
            SegmentLog::open(&d, 1 << 20, Fsync::Interval, Duration::from_millis(5)).unwrap();
        assert!(
            !log.wake_writer,
            "interval hand-overs leave the writer to its tick"
        );
        for i in 0..2000 {
            append(&mut log, i);
            if i % 7 == 6 {
                log.flush(); // many small batches, most while one is already queued
            }
        }
        log.flush();
        let mut acked = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while acked < 2000 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
            acked += log.acked();
            if log.in_flight() > 0 && log.batch.records > 0 {
                log.flush(); // the last batch goes over once the queued one is taken
            }
        }
        assert_eq!(
            acked, 2000,
            "every record durable by the tick and the interval sync"
        );
        assert_eq!(log.in_flight(), 0);
        drop(log);
        let all = read_log(&d).unwrap();
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, s)| s.record.seq == i as u64),
            "coalesced buffers keep the append order"
        );
        assert_eq!(all.len(), 2000);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn records_are_acknowledged_once_durable_by_each_policy() {
        for (tag, fsync) in [
            ("ack-always", Fsync::Always),
            ("ack-interval", Fsync::Interval),
            ("ack-never", Fsync::Never),
        ] {
            let d = tmp(tag);
            let (mut log, _) =
                SegmentLog::open(&d, 8192, fsync, Duration::from_millis(20)).unwrap();
            let mut acked = 0;
            for i in 0..300 {
                append(&mut log, i);
                if i % 50 == 49 {
                    log.flush();
                }
                acked += log.acked();
            }
            log.flush();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while acked < 300 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
                log.flush();
                acked += log.acked();
            }
            assert_eq!(acked, 300, "{tag}: every record acknowledged, none twice");
            assert_eq!(log.in_flight(), 0, "{tag}");
            assert!(
                segments(&d).unwrap().len() > 2,
                "{tag}: segments rolled meanwhile"
            );
            drop(log);
            assert_eq!(read_log(&d).unwrap().len(), 300, "{tag}");
            let _ = fs::remove_dir_all(&d);
        }
    }

    #[test]
    fn a_torn_tail_is_truncated_and_reported() {
        let d = tmp("torn");
        let (mut log, _) = SegmentLog::open(&d, 1 << 20, Fsync::Always, Duration::ZERO).unwrap();
        for i in 0..10 {
            append(&mut log, i);
        }
        log.sync().unwrap();
        drop(log);
        let (_, seg) = segments(&d).unwrap().pop().unwrap();
        let full = fs::metadata(&seg).unwrap().len();
        // A crash mid-write: half a record at the end.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(full - 7).unwrap();
        drop(f);
        let (mut log, rec) = SegmentLog::open(&d, 1 << 20, Fsync::Always, Duration::ZERO).unwrap();
        assert_eq!(rec.records, 9);
        assert!(rec.truncated_bytes > 0);
        assert_eq!(rec.next_id, 9);
        assert_eq!(append(&mut log, 9), 9, "the torn record's id is reused");
        log.sync().unwrap();
        drop(log);
        assert_eq!(read_log(&d).unwrap().len(), 10);
        // Corruption inside a record is caught by the CRC.
        let mut bytes = fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        let (_, rec) = SegmentLog::open(&d, 1 << 20, Fsync::Always, Duration::ZERO).unwrap();
        assert_eq!(rec.records, 9, "the corrupt last record is cut");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_bad_record_in_the_middle_is_skipped_and_the_good_ones_after_it_kept() {
        let d = tmp("middle");
        let (mut log, _) = SegmentLog::open(&d, 1 << 20, Fsync::Always, Duration::ZERO).unwrap();
        for i in 0..20 {
            append(&mut log, i);
        }
        log.sync().unwrap();
        drop(log);
        let (_, seg) = segments(&d).unwrap().pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
        fs::write(&seg, &bytes).unwrap();
        let mut seen = Vec::new();
        let damage = scan_log(&d, |s| seen.push(s.id)).unwrap();
        assert_eq!(damage.len(), 1, "{damage:?}");
        assert!(!damage[0].at_end && damage[0].bytes > 0, "{damage:?}");
        assert_eq!(
            seen.len(),
            19,
            "one record lost, every other kept: {seen:?}"
        );
        assert!(read_log(&d).is_err(), "a reader names the damage");
        let (mut log, rec) = SegmentLog::open(&d, 1 << 20, Fsync::Always, Duration::ZERO).unwrap();
        assert_eq!(
            (rec.records, rec.truncated_bytes, rec.next_id),
            (19, 0, 20),
            "{rec:?}"
        );
        assert!(rec.damaged_bytes > 0);
        assert_eq!(
            append(&mut log, 20),
            20,
            "appends continue after the last good id"
        );
        log.sync().unwrap();
        drop(log);
        let mut seen = Vec::new();
        scan_log(&d, |s| seen.push(s.id)).unwrap();
        assert_eq!(seen.len(), 20);
        assert_eq!(*seen.last().unwrap(), 20);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn crafted_headers_cannot_make_a_resync_quadratic() {
        // A plausible header every 16 bytes, each with an id in the resync window and a length
        // that claims the rest of the segment, each with a wrong CRC: without a budget, every
        // one would cost a CRC over the rest (4 MiB / 16 * 2 MiB = 512 GiB here).
        let len = 4 << 20;
        let mut b = vec![0u8; len];
        for at in (0..len - HEADER).step_by(HEADER) {
            let claim = (len - at - HEADER) as u32;
            b[at..at + 4].copy_from_slice(&claim.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&1u64.to_le_bytes());
        }
        let mut good = 0;
        let (damage, last) = scan_segment(Path::new("crafted"), &b, 0, |_, _| good += 1);
        assert_eq!((good, last), (0, None));
        assert_eq!(damage.len(), 1, "{damage:?}");
        assert_eq!(damage[0].bytes, len as u64, "every byte accounted for");
        assert!(damage[0].reason.contains("budget"), "{damage:?}");
        assert!(
            !damage[0].at_end,
            "unsearched bytes are never taken for a torn tail"
        );
    }

    #[test]
    fn scanning_arbitrary_bytes_never_panics_and_accounts_for_every_byte() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0usize, 1, 15, 16, 17, 100, 4096] {
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let (damage, _) = scan_segment(Path::new("x"), &b, 0, |_, _| {});
            let bad: u64 = damage.iter().map(|d| d.bytes).sum();
            assert_eq!(bad, len as u64, "random bytes are all damage");
        }
    }

    #[test]
    fn a_log_directory_is_locked_and_its_files_are_0640() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tmp("lock");
        let (mut log, _) = SegmentLog::open(&d, 1 << 20, Fsync::Always, Duration::ZERO).unwrap();
        append(&mut log, 0);
        log.sync().unwrap();
        let e = SegmentLog::open(&d, 1 << 20, Fsync::Always, Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");
        let (_, seg) = segments(&d).unwrap().pop().unwrap();
        assert_eq!(
            fs::metadata(&seg).unwrap().permissions().mode() & 0o777,
            0o640
        );
        drop(log);
        assert!(
            SegmentLog::open(&d, 1 << 20, Fsync::Always, Duration::ZERO).is_ok(),
            "free again"
        );
        let _ = fs::remove_dir_all(&d);
    }
}
