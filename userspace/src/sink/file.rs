//! The file sink: an append-only log of segments, and the DLQ in the same format.
//!
//! A log is a directory of segments named after the id of their first record
//! (`00000000000000000042.seg`), rolled when a segment would pass `segment_bytes`. Each record:
//!
//! ```text
//! | body_len u32 LE | crc32c u32 LE (of id + body) | id u64 LE | body (body_len bytes) |
//! body: | priority u8 | source u8 | seq u64 LE | ingest_ns u64 LE | reason_len u8 | reason |
//!       | topic_len u16 LE | topic | payload (the rest) |
//! ```
//!
//! Ids increase by one per record across segments. Opening a log recovers it: the last segment
//! is scanned, and a torn or corrupt tail (a crash mid-write) is truncated and reported, never
//! silently kept. `fsync` follows the policy: `always` (every flush), `interval` (at most every
//! `fsync_interval`), `never` (the OS decides).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::sink::{EventRef, Record, Sink};
use crate::wire::event::Source;

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

/// What recovery found when opening a log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records found.
    pub records: u64,
    /// Bytes cut from the tail of the last segment (0 for a clean log).
    pub truncated_bytes: u64,
    /// Id the next record gets.
    pub next_id: u64,
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
    /// Ingest time.
    pub ingest_ns: u64,
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

/// Reads one record at the reader's position: `Ok(None)` at a clean end, `Err` for a torn or
/// corrupt record (with what was wrong).
fn read_record(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<(u64, usize)>> {
    let mut h = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut h[got..])? {
            0 if got == 0 => return Ok(None),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "torn record header",
                ));
            }
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let id = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if len > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record length {len} out of range"),
        ));
    }
    buf.resize(len as usize, 0);
    r.read_exact(buf)
        .map_err(|_| io::Error::new(io::ErrorKind::UnexpectedEof, "torn record body"))?;
    let want = crc32c::crc32c_append(crc32c::crc32c(&h[8..16]), buf);
    if want != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("CRC mismatch in record {id}"),
        ));
    }
    Ok(Some((id, HEADER + len as usize)))
}

fn decode(id: u64, b: &[u8]) -> io::Result<Stored> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record {id}: malformed body"),
        )
    };
    let take = |at: usize, n: usize| b.get(at..at + n).ok_or_else(bad);
    let priority = *b.first().ok_or_else(bad)?;
    let source = match *b.get(1).ok_or_else(bad)? {
        0 => Some(Source::Xsk),
        1 => Some(Source::Udp),
        2 => Some(Source::Tcp),
        _ => None,
    };
    let seq = u64::from_le_bytes(take(2, 8)?.try_into().map_err(|_| bad())?);
    let ingest_ns = u64::from_le_bytes(take(10, 8)?.try_into().map_err(|_| bad())?);
    let rlen = usize::from(*b.get(18).ok_or_else(bad)?);
    let reason = std::str::from_utf8(take(19, rlen)?).map_err(|_| bad())?;
    let at = 19 + rlen;
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
        record: Record {
            seq,
            priority,
            topic,
            payload,
            reason,
        },
    })
}

/// Reads every record of the log in `dir`, in id order, stopping at the first bad record of the
/// last segment (recovery would truncate it) and failing on one in an earlier segment.
///
/// # Errors
/// When the directory cannot be read, or a sealed segment is corrupt.
pub fn read_log(dir: &Path) -> io::Result<Vec<Stored>> {
    let segs = segments(dir)?;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for (i, (_, path)) in segs.iter().enumerate() {
        let mut r = io::BufReader::new(File::open(path)?);
        loop {
            match read_record(&mut r, &mut buf) {
                Ok(Some((id, _))) => out.push(decode(id, &buf)?),
                Ok(None) => break,
                Err(e) if i + 1 == segs.len() => {
                    tracing::warn!(segment = %path.display(), reason = %e, "stopping at a torn tail");
                    break;
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
            }
        }
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
    /// Ingest time.
    pub ingest_ns: u64,
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
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    /// The segment being appended to.
    file: File,
    /// The batch being built: whole records, written with one `write` per flush (or when it
    /// passes [`BATCH_BYTES`]). An event's bytes are copied once, into here.
    batch: Vec<u8>,
    /// Bytes of the segment, counting what is still in `batch`.
    segment_len: u64,
    segment_bytes: u64,
    next_id: u64,
    fsync: Fsync,
    fsync_interval: Duration,
    last_sync: Instant,
}

/// A batch buffer past this size is written out before the batch ends.
const BATCH_BYTES: usize = 256 * 1024;

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
        fs::create_dir_all(dir)?;
        let segs = segments(dir)?;
        let mut rec = Recovery::default();
        let (path, len) = match segs.last() {
            None => (dir.join(segment_name(0)), 0),
            Some((first, path)) => {
                let mut f = OpenOptions::new().read(true).write(true).open(path)?;
                let total = f.metadata()?.len();
                let mut r = io::BufReader::new(&mut f);
                let (mut good, mut buf, mut next) = (0u64, Vec::new(), *first);
                while let Ok(Some((id, n))) = read_record(&mut r, &mut buf) {
                    good += n as u64;
                    next = id + 1;
                    rec.records += 1;
                }
                drop(r);
                if good < total {
                    f.set_len(good)?;
                    f.sync_all()?;
                    rec.truncated_bytes = total - good;
                    tracing::warn!(segment = %path.display(), bytes = total - good, "truncated a torn tail");
                }
                rec.next_id = next;
                (path.clone(), good)
            }
        };
        let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
        f.seek(SeekFrom::End(0))?;
        let log = Self {
            dir: dir.to_owned(),
            file: f,
            batch: Vec::with_capacity(BATCH_BYTES + 64 * 1024),
            segment_len: len,
            segment_bytes: segment_bytes.max(4096),
            next_id: rec.next_id,
            fsync,
            fsync_interval,
            last_sync: Instant::now(),
        };
        Ok((log, rec))
    }

    /// Id the next record gets.
    pub const fn next_id(&self) -> u64 {
        self.next_id
    }

    fn roll(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.file.sync_all()?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(segment_name(self.next_id)))?;
        self.segment_len = 0;
        Ok(())
    }

    /// Writes the batch buffer to the segment (no sync).
    fn write_out(&mut self) -> io::Result<()> {
        if !self.batch.is_empty() {
            let r = self.file.write_all(&self.batch);
            // On error the records stay buffered: the caller retries or gives up on them.
            r?;
            self.batch.clear();
        }
        Ok(())
    }

    /// Appends one record; returns its id.
    ///
    /// # Errors
    /// The file system's.
    pub fn append(&mut self, e: &Entry<'_>) -> io::Result<u64> {
        let Entry {
            source,
            seq,
            ingest_ns,
            priority,
            reason,
            topic,
            payload,
        } = *e;
        let reason = &reason.as_bytes()[..reason.len().min(255)];
        let topic_len = u16::try_from(topic.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "topic too long"))?;
        let body_len = 2 + 8 + 8 + 1 + reason.len() + 2 + topic.len() + payload.len();
        let len = (HEADER + body_len) as u64;
        if self.segment_len > 0 && self.segment_len + len > self.segment_bytes {
            self.roll()?;
        }
        let id = self.next_id;
        let b = &mut self.batch;
        let start = b.len();
        b.extend_from_slice(&(body_len as u32).to_le_bytes());
        b.extend_from_slice(&[0; 4]); // the CRC, filled in below
        b.extend_from_slice(&id.to_le_bytes());
        b.push(priority);
        b.push(source as u8);
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&ingest_ns.to_le_bytes());
        b.push(reason.len() as u8);
        b.extend_from_slice(reason);
        b.extend_from_slice(&topic_len.to_le_bytes());
        b.extend_from_slice(topic.as_bytes());
        b.extend_from_slice(payload);
        let crc = crc32c::crc32c(&b[start + 8..]);
        b[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.segment_len += len;
        self.next_id += 1;
        if self.batch.len() >= BATCH_BYTES {
            self.write_out()?;
        }
        Ok(id)
    }

    /// Writes buffered records to the file, and syncs per the policy.
    ///
    /// # Errors
    /// The file system's.
    pub fn flush(&mut self) -> io::Result<()> {
        self.write_out()?;
        let sync = match self.fsync {
            Fsync::Always => true,
            Fsync::Interval => self.last_sync.elapsed() >= self.fsync_interval,
            Fsync::Never => false,
        };
        if sync {
            self.file.sync_data()?;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    /// Flushes and syncs regardless of policy (at shutdown).
    ///
    /// # Errors
    /// The file system's.
    pub fn sync(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.file.sync_all()
    }
}

/// A [`Sink`] over a [`SegmentLog`]; synced on drop (shutdown).
#[derive(Debug)]
pub struct FileSink {
    log: SegmentLog,
}

impl FileSink {
    /// A sink writing to `log`.
    pub fn new(log: SegmentLog) -> Self {
        Self { log }
    }
}

impl Sink for FileSink {
    fn append(&mut self, ev: &EventRef<'_>, reason: Option<&'static str>) -> io::Result<()> {
        self.log
            .append(&Entry {
                source: ev.source,
                seq: ev.seq,
                ingest_ns: ev.ingest_ns,
                priority: ev.priority,
                reason: reason.unwrap_or(""),
                topic: ev.topic,
                payload: ev.payload,
            })
            .map(drop)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if let Err(e) = self.log.sync() {
            tracing::error!(reason = %e, "final fsync of the file sink failed");
        }
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
}
