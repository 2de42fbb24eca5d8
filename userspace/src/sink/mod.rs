//! Where delivered events go: the [`Sink`] contract, the bounded in-memory sink, and the file
//! segment log ([`file`]) that also backs the DLQ.

pub mod file;

use std::io;

use crate::engine::Ev;

/// A stored copy of an event, as sinks keep it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Ingest sequence.
    pub seq: u64,
    /// Priority.
    pub priority: u8,
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Why it went to the DLQ, for DLQ records.
    pub reason: Option<&'static str>,
}

/// Where workers deliver.
pub trait Sink: Send {
    /// Writes a group of events (one topic for the batch worker; one event otherwise).
    ///
    /// # Errors
    /// The sink's I/O error.
    fn write(&mut self, events: &[Ev<'_, '_>], reason: Option<&'static str>) -> io::Result<()>;
    /// Makes what was written durable, per the sink's policy.
    ///
    /// # Errors
    /// The sink's I/O error.
    fn flush(&mut self) -> io::Result<()>;
}

/// A bounded in-memory sink for tests and inspection: keeps the newest `capacity` records.
#[derive(Debug, Clone)]
pub struct MemorySink {
    inner: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Record>>>,
    capacity: usize,
}

impl MemorySink {
    /// Keeps at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: std::sync::Arc::default(),
            capacity,
        }
    }

    /// A copy of what it holds, oldest first.
    pub fn records(&self) -> Vec<Record> {
        self.inner
            .lock()
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Sink for MemorySink {
    fn write(&mut self, events: &[Ev<'_, '_>], reason: Option<&'static str>) -> io::Result<()> {
        // One lock per write call (a batch), off the dispatcher's path; this sink is for tests.
        let mut g = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("memory sink poisoned"))?;
        for ev in events {
            if g.len() == self.capacity {
                g.pop_front();
            }
            g.push_back(Record {
                seq: ev.seq,
                priority: ev.priority(),
                topic: ev.topic().to_owned(),
                payload: ev.payload().to_vec(),
                reason,
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
