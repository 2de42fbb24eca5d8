//! The PostgreSQL sink against a real PostgreSQL that this test starts in a temporary directory
//! on a private port (initdb runs as the `postgres` user): a server restart in the middle of a
//! blast loses nothing and makes no duplicate row.
//!
//! Needs root, `runuser`, and Debian's PostgreSQL (`.ci/run` installs it): skips naming what is
//! missing, fails instead under CI.

use std::process::Command;
use std::time::{Duration, Instant};

use eventstream::tools::servers::Postgres;

mod common;
use common::daemon::{blast, start, stop};

/// `(rows, distinct event ids)` in `table`.
fn count(pg: &Postgres, table: &str) -> (u64, u64) {
    let s = pg
        .query(&format!(
            "select count(*), count(distinct event_id) from {table}"
        ))
        .unwrap();
    let (a, b) = s.trim().split_once('|').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// Rows of `table` that name a loopback sender and were received in the last hour.
fn with_sender(pg: &Postgres, table: &str) -> u64 {
    pg.query(&format!(
        "select count(*) from {table} where sender like '127.0.0.1:%' \
         and received_at > now() - interval '1 hour'"
    ))
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn a_server_restart_mid_blast_loses_nothing_and_duplicates_nothing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip("needs root to run initdb as the postgres user");
    }
    if Postgres::bin().is_none() {
        return common::skip("PostgreSQL is not installed (Debian: apt-get install postgresql)");
    }
    if Command::new("psql").arg("--version").output().is_err() {
        return common::skip("psql is not installed (Debian: postgresql-client)");
    }
    let port = 25_000 + (std::process::id() % 5000) as u16;
    let pg = Postgres::start(
        &std::env::temp_dir().join(format!("es-pg-{}", std::process::id())),
        port,
    )
    .unwrap();
    // The DLQ in a directory of the daemon's own (its data directory is the postgres user's).
    let dlq = std::env::temp_dir().join(format!("es-pg-dlq-{}", std::process::id()));
    let config = format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n    socket_buffer: 8388608\n  tcp:\n    bind: null\nadmin:\n  bind: null\nengine:\n  node_id: lab1\nsinks:\n  kind: postgres\n  dlq_dir: \"{}\"\n  shutdown_timeout_secs: 30\n  postgres:\n    url: \"{}\"\n    table: es_events\n    max_in_flight: 500\n",
        dlq.display(),
        pg.url()
    );
    let (child, out, addr, dir) = start(&config, "pg-restart");
    let total = 20_000u64;
    let sent = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            blast(&[
                "--to",
                &addr,
                "--count",
                &total.to_string(),
                "--rate",
                "5000",
                "--topics",
                "orders/eu,orders/us",
            ])
        });
        std::thread::sleep(Duration::from_millis(1500));
        let (so_far, _) = count(&pg, "es_events");
        eprintln!("restarting PostgreSQL with {so_far} rows stored");
        assert!(so_far > 0, "rows were landing before the restart");
        pg.ctl("restart").unwrap();
        sender.join().unwrap()
    });
    assert_eq!(sent["sent_events"].as_u64(), Some(total), "{sent}");
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let r = stop(child, out);
    eprintln!("stopped in {:?}; sinks: {}", t0.elapsed(), r["sinks"]);
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(n(&r["accepted_events"]), total, "{r}");
    assert_eq!(
        n(&r["delivered_events"]),
        total,
        "every event committed: {r}"
    );
    let failed: u64 = r["failed"].as_object().unwrap().values().map(n).sum();
    assert_eq!(failed, 0, "{r}");
    assert_eq!(
        count(&pg, "es_events"),
        (total, total),
        "one row per event, none twice"
    );
    assert_eq!(
        with_sender(&pg, "es_events"),
        total,
        "every row names its sender and its wall-clock receive time"
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(dlq);
}

/// Appends `ids` (as sender ids: `key: payload_id` events) to `sink` and waits until each is
/// acknowledged; returns how many were.
fn write_all(mut sink: eventstream::sink::remote::RemoteSink, ids: std::ops::Range<u64>) -> u64 {
    use eventstream::sink::{EventRef, Sink as _};
    use eventstream::wire::event::{Peer, Source};
    let n = ids.end - ids.start;
    for (i, id) in ids.enumerate() {
        let payload = id.to_be_bytes();
        sink.append(
            &EventRef {
                seq: i as u64,
                sender_id: Some(id),
                source: Source::Udp,
                ingest_ns: 0,
                peer: Peer::v4([127, 0, 0, 1], 40_000),
                priority: 1,
                topic: "dup.test",
                payload: &payload,
            },
            None,
        )
        .unwrap();
    }
    let (mut acked, end) = (0, Instant::now() + Duration::from_secs(30));
    while acked < n && Instant::now() < end {
        sink.flush().unwrap();
        acked += sink.acked().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    sink.close(Instant::now() + Duration::from_secs(5)).unwrap();
    acked
}

#[test]
fn ids_written_before_go_through_the_deduplicating_path_and_make_no_second_row() {
    if Postgres::bin().is_none() {
        return common::skip("PostgreSQL is not installed (Debian: apt-get install postgresql)");
    }
    if Command::new("psql").arg("--version").output().is_err() {
        return common::skip("psql is not installed (Debian: postgresql-client)");
    }
    let port = 24_000 + (std::process::id() % 1000) as u16;
    let pg = Postgres::start(
        &std::env::temp_dir().join(format!("es-pgdup-{}", std::process::id())),
        port,
    )
    .unwrap();
    let cfg = eventstream::sink::postgres::PostgresConfig {
        url: pg.url(),
        table: "dups".into(),
        max_in_flight: 100,
        ..Default::default()
    };
    let open = |run| eventstream::sink::postgres::open(&cfg, "lab1", run, "realtime-0").unwrap();
    // One appliance writes 0..1000; a second, later, 500..2000 with the same sender ids (the
    // first half of its batches collide, as a retry after a lost COMMIT would).
    assert_eq!(write_all(open(1), 0..1000), 1000);
    assert_eq!(
        write_all(open(2), 500..2000),
        1500,
        "every event acknowledged, the duplicates too"
    );
    assert_eq!(count(&pg, "dups"), (2000, 2000), "each id once");
}
