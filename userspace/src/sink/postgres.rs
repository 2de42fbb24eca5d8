//! The PostgreSQL sink: events land in a table, and count as delivered once the transaction
//! that wrote them has committed.
//!
//! A [`Backend`] of [`RemoteSink`] over tokio-postgres. Each batch of at most `max_in_flight`
//! rows is one transaction, written the cheap way while no event id is seen twice: a binary
//! `COPY` straight into the table, then `COMMIT`. When the primary key refuses a row (a retry
//! of a batch whose `COMMIT` had landed but whose answer was lost, or a second appliance
//! sending the same sender ids), the transaction rolls back and the batch goes the deduplicating
//! way: a binary `COPY` into a temporary staging table, then `INSERT ... SELECT ... ON CONFLICT
//! (event_id) DO NOTHING`; the next [`DEDUP_BATCHES`] batches stay on that way before the cheap
//! one is tried again. A failure anywhere else (the server restarting, a lost connection)
//! rolls the transaction back; the batch is sent again on a new connection after a backoff.
//! Either way no event ever makes a second row.
//!
//! The table is created if missing: `event_id text primary key, topic text, priority
//! smallint, source text (the ingest path: xsk, udp, tcp), received_at timestamptz (the wall
//! clock at receive), payload bytea, sender text (the sender's address and port, NULL when not
//! known)`; a table from before `sender` existed gets the column added.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The columns the sink writes, in the order of the staging `COPY`.
pub const COLUMNS: &str = "event_id, topic, priority, source, received_at, payload, sender";

/// The types of [`COLUMNS`], for a binary `COPY`.
pub const COLUMN_TYPES: [Type; 7] = [
    Type::TEXT,
    Type::TEXT,
    Type::INT2,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::BYTEA,
    Type::TEXT,
];

use serde::Deserialize;
use tokio_postgres::types::{ToSql, Type};

use crate::sink::remote::{BACKOFF, Backend, Chunk, RemoteSink, Shared};
use crate::sink::{SinkErrorKind, SinkHealth};
use crate::wire::event::Source;

/// Batches written the deduplicating way after a duplicate id was seen.
pub const DEDUP_BATCHES: u32 = 64;

/// `sinks.postgres:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `sinks.postgres.url`: a libpq-style connection string or `postgresql://` URL.
    pub url: String,
    /// `sinks.postgres.table`: `name` or `schema.name` (letters, digits, `_`).
    pub table: String,
    /// `sinks.postgres.max_in_flight`: rows per transaction.
    pub max_in_flight: usize,
    /// `sinks.postgres.connect_timeout_secs`: for the first connection and the table check.
    pub connect_timeout_secs: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into(),
            table: "events".into(),
            max_in_flight: 10_000,
            connect_timeout_secs: 10,
        }
    }
}

/// Whether `table` is `name` or `schema.name` of plain identifiers (it is quoted, never
/// interpolated as given).
pub fn valid_table(table: &str) -> bool {
    let parts: Vec<&str> = table.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && !p.starts_with(|c: char| c.is_ascii_digit())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// `table` quoted as an SQL identifier.
fn quoted(table: &str) -> String {
    table
        .split('.')
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(".")
}

/// The PostgreSQL side of a [`RemoteSink`].
struct Postgres {
    cfg: PostgresConfig,
    table: String,
    client: Option<tokio_postgres::Client>,
    /// Batches still to write through the staging table (after a duplicate id).
    dedup_left: u32,
}

impl Postgres {
    /// A fresh connection, its driver task spawned on this thread's runtime.
    async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.cfg.url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        client
            .batch_execute(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS es_stage (LIKE {} INCLUDING DEFAULTS) \
                 ON COMMIT DELETE ROWS",
                self.table
            ))
            .await?;
        Ok(client)
    }

    /// One transaction for the records at `ats`: `COPY` straight into `table`, or with
    /// `dedup` into the staging table and on with `ON CONFLICT (event_id) DO NOTHING`.
    async fn write(
        client: &mut tokio_postgres::Client,
        table: &str,
        chunk: &Chunk,
        ats: &[usize],
        ids: &str,
        dedup: bool,
    ) -> Result<(), tokio_postgres::Error> {
        let tx = client.transaction().await?;
        let into = if dedup { "es_stage" } else { table };
        let sink = tx
            .copy_in(&format!("COPY {into} ({COLUMNS}) FROM STDIN BINARY"))
            .await?;
        let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, &COLUMN_TYPES);
        let mut writer = std::pin::pin!(writer);
        for &at in ats {
            let (r, _) = chunk.record(at);
            let id = r.event_id(ids);
            let source = Source::ALL
                .get(r.source as usize)
                .map_or("?", |s| s.as_str());
            let received = SystemTime::UNIX_EPOCH + Duration::from_nanos(r.received_unix_ns);
            let sender = r.peer.socket_addr().map(|a| a.to_string());
            let row: [&(dyn ToSql + Sync); 7] = [
                &id,
                &r.topic,
                &i16::from(r.priority),
                &source,
                &received,
                &r.payload,
                &sender,
            ];
            writer.as_mut().write(&row).await?;
        }
        writer.finish().await?;
        if dedup {
            tx.execute(
                &format!(
                    "INSERT INTO {table} ({COLUMNS}) SELECT {COLUMNS} FROM es_stage \
                     ON CONFLICT (event_id) DO NOTHING"
                ),
                &[],
            )
            .await?;
        }
        tx.commit().await
    }
}

impl Backend for Postgres {
    async fn setup(&mut self) -> Result<(), String> {
        let (client, conn) = tokio_postgres::connect(&self.cfg.url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connecting to PostgreSQL (sinks.postgres.url): {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {t} (event_id text PRIMARY KEY, topic text NOT NULL, \
                 priority smallint NOT NULL, source text NOT NULL, \
                 received_at timestamptz NOT NULL, payload bytea NOT NULL, sender text); \
                 ALTER TABLE {t} ADD COLUMN IF NOT EXISTS sender text",
                t = self.table
            ))
            .await
            .map_err(|e| {
                format!(
                    "creating table {} (sinks.postgres.table): {e}",
                    self.cfg.table
                )
            })?;
        drop(client);
        let client = self
            .connect()
            .await
            .map_err(|e| format!("preparing the staging table: {e}"))?;
        self.client = Some(client);
        Ok(())
    }

    /// Writes the chunk in transactions of `max_in_flight` rows, each retried (on a new
    /// connection, after a backoff) until it commits or the sink is abandoned.
    async fn deliver(&mut self, chunk: &Chunk, shared: &Shared, ids: &str) {
        let health = &*shared.health;
        let ats: Vec<usize> = chunk.iter().map(|r| r.at).collect();
        for group in ats.chunks(self.cfg.max_in_flight.max(1)) {
            let mut backoff = BACKOFF.0;
            loop {
                let dedup = self.dedup_left > 0;
                let r = match &mut self.client {
                    Some(c) if !c.is_closed() => {
                        Self::write(c, &self.table, chunk, group, ids, dedup).await
                    }
                    _ => match self.connect().await {
                        Ok(c) => {
                            self.client = Some(c);
                            continue;
                        }
                        Err(e) => Err(e),
                    },
                };
                match r {
                    Ok(()) => {
                        shared.durable(group.len() as u64);
                        health.recovered();
                        self.dedup_left = self.dedup_left.saturating_sub(1);
                        break;
                    }
                    // A row whose id is there already: not a failure, the batch goes the
                    // deduplicating way at once (see the module's text).
                    Err(e)
                        if !dedup
                            && e.code()
                                == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
                    {
                        self.dedup_left = DEDUP_BATCHES;
                    }
                    Err(e) => {
                        health.fail(SinkErrorKind::Broker, &io::Error::other(e.to_string()));
                        // The transaction rolled back; the connection may be gone too.
                        if self
                            .client
                            .as_ref()
                            .is_some_and(tokio_postgres::Client::is_closed)
                        {
                            self.client = None;
                        }
                        if shared.abandoned() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF.1);
                        health.retried();
                    }
                }
            }
        }
    }
}

/// Connects, creates the table if missing, and starts a sink writing to it. Event ids are
/// given at receive (see [`crate::sink::remote`]).
///
/// # Errors
/// When the server does not answer, or the table cannot be created.
pub fn open(cfg: &PostgresConfig, node_id: &str, run: u64, name: &str) -> io::Result<RemoteSink> {
    if !valid_table(&cfg.table) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "sinks.postgres.table {:?} is not `name` or `schema.name`",
                cfg.table
            ),
        ));
    }
    RemoteSink::open(
        "postgres",
        Postgres {
            cfg: cfg.clone(),
            table: quoted(&cfg.table),
            client: None,
            dedup_left: 0,
        },
        Arc::new(SinkHealth::new(format!("postgres:{}:{name}", cfg.table))),
        format!("{node_id}-{run}-"),
        Duration::from_secs(cfg.connect_timeout_secs.max(1)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers_and_quoted() {
        assert!(valid_table("events") && valid_table("ops.events_2"));
        for bad in ["", "a.b.c", "ev;drop", "1abc", "a\"b", "ev ents"] {
            assert!(!valid_table(bad), "{bad}");
        }
        assert_eq!(quoted("ops.events"), "\"ops\".\"events\"");
    }
}
