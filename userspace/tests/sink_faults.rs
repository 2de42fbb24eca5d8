//! A sink that fails mid-run loses nothing silently: the file sink on a 1 MiB tmpfs fills up
//! under a blast, `/healthz` names it within a second, the writer retries while events that
//! cannot be kept are counted (`failed{reason}`), the tmpfs is grown and the sink recovers, and
//! the exit report reconciles exactly: accepted = delivered + DLQ + duplicates + failed.
//!
//! Needs root (mount); skips naming what is missing, fails under CI.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::daemon::{blast, http, read_until, series, start, stop};

/// Mounts a tmpfs of `size` on `dir`; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_owned()))
    }

    fn resize(&self, size: &str) {
        let s = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(s.success(), "remount {size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `GET /healthz` until `pred` holds for (status, body), at most `within`.
fn wait_health(admin: &str, within: Duration, pred: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let end = Instant::now() + within;
    loop {
        let (code, body) = http(admin, "GET", "/healthz", "");
        if pred(code, &body) || Instant::now() >= end {
            return (code, body);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_disk_is_retried_counted_reported_and_recovered() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip("needs root to mount a tmpfs");
    }
    let root = std::env::temp_dir().join(format!("es-full-{}", std::process::id()));
    let Some(fs) = Tmpfs::mount(&root, "1m") else {
        return common::skip("`mount -t tmpfs` failed (no mount(8), or no CAP_SYS_ADMIN)");
    };
    let config = format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n    socket_buffer: 8388608\n  tcp:\n    bind: null\nadmin:\n  bind: \"127.0.0.1:0\"\nsinks:\n  kind: file\n  dir: \"{}\"\n  dlq_dir: \"{}\"\n  fsync: interval\n  fsync_interval_ms: 50\n  shutdown_timeout_secs: 2\n  max_buffered_bytes: 2097152\n",
        root.join("log").display(),
        root.join("dlq").display()
    );
    let (child, mut out, addr, dir) = start(&config, "full");
    let admin = read_until(&mut out, "listening admin ");
    assert_eq!(http(&admin, "GET", "/healthz", ""), (200, "ok\n".into()));

    // 100 000 events of ~100 bytes on disk each: ten times what the tmpfs holds.
    let sent = blast(&[
        "--to",
        &addr,
        "--count",
        "100000",
        "--rate",
        "50000",
        "--events-per-datagram",
        "10",
        "--payload-bytes",
        "64",
    ]);
    assert_eq!(sent["sent_events"], 100_000, "{sent}");
    let (code, body) = wait_health(&admin, Duration::from_secs(1), |c, _| c == 503);
    assert_eq!(code, 503, "/healthz names the failing sink: {body}");
    assert!(
        body.contains("failing") && body.contains("No space left on device"),
        "{body}"
    );
    // Past its 2 MiB of buffers the sink refuses, and /metrics accounts for every event:
    // received = delivered + in flight + failed.
    std::thread::sleep(Duration::from_millis(200));
    let (_, m) = http(&admin, "GET", "/metrics", "");
    let failed = series(&m, "eventstream_failed_events_total{reason=\"sink_error\"}");
    assert!(failed > 0, "{m}");
    let sum_of = |prefix: &str| -> u64 {
        m.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(
        sum_of("eventstream_received_events_total{"),
        sum_of("eventstream_delivered_events_total{")
            + sum_of("eventstream_sink_in_flight_events{")
            + failed,
        "received = delivered + in flight + failed while failing: {m}"
    );
    assert!(m.contains("error_type=\"no_space\"} "), "{m}");
    for family in [
        "eventstream_sink_sent_events_total{",
        "eventstream_sink_sent_bytes_total{",
        "eventstream_sink_ack_latency_seconds_count{",
        "eventstream_sink_retries_total{",
    ] {
        assert!(m.contains(family), "{family} in /metrics: {m}");
    }
    assert!(
        m.lines()
            .any(|l| l.starts_with("eventstream_sink_up{") && l.ends_with(" 0")),
        "a sink is down in /metrics: {m}"
    );

    // Room again: the writer's next retry succeeds, and health follows.
    fs.resize("256m");
    let (code, body) = wait_health(&admin, Duration::from_secs(5), |c, _| c == 200);
    assert_eq!((code, body.as_str()), (200, "ok\n"), "recovered");
    let after = blast(&["--to", &addr, "--count", "1000", "--rate", "20000"]);
    assert_eq!(after["sent_events"], 1000, "{after}");
    std::thread::sleep(Duration::from_millis(300));

    let t0 = Instant::now();
    let r = stop(child, out);
    assert!(t0.elapsed() < Duration::from_secs(5), "stopped in time");
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("{v} in {r}"));
    let accepted = n(&r["accepted_events"]);
    let dlq: u64 = r["dlq"].as_object().unwrap().values().map(n).sum();
    let failed: u64 = r["failed"].as_object().unwrap().values().map(n).sum();
    assert!(accepted > 0 && n(&r["failed"]["sink_error"]) > 0, "{r}");
    assert_eq!(
        accepted,
        n(&r["delivered_events"]) + dlq + n(&r["duplicates"]) + failed,
        "accepted = delivered + DLQ + duplicates + failed: {r}"
    );
    assert!(
        n(&r["delivered_events"]) >= 1000,
        "delivers again after recovery: {r}"
    );
    assert!(
        r["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| n(&s["errors"]["no_space"]) > 0 && n(&s["retries"]) > 0),
        "{r}"
    );
    // What the log says it delivered is on disk, every record whole.
    let o = Command::new(env!("CARGO_BIN_EXE_eventstream"))
        .args(["log", "cat"])
        .arg(root.join("log").join("realtime-0"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let on_disk = o.stdout.iter().filter(|&&b| b == b'\n').count() as u64;
    assert_eq!(on_disk, n(&r["delivered"]["realtime"]), "{r}");
    drop(fs);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_stop_while_the_disk_stays_full_ends_in_time_and_counts_what_was_not_persisted() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip("needs root to mount a tmpfs");
    }
    let root = std::env::temp_dir().join(format!("es-full-stop-{}", std::process::id()));
    let Some(fs) = Tmpfs::mount(&root, "512k") else {
        return common::skip("`mount -t tmpfs` failed (no mount(8), or no CAP_SYS_ADMIN)");
    };
    let config = format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n    socket_buffer: 8388608\n  tcp:\n    bind: null\nadmin:\n  bind: null\nsinks:\n  kind: file\n  dir: \"{}\"\n  dlq_dir: \"{}\"\n  fsync: always\n  shutdown_timeout_secs: 1\n",
        root.join("log").display(),
        root.join("dlq").display()
    );
    let (child, out, addr, dir) = start(&config, "full-stop");
    let sent = blast(&[
        "--to",
        &addr,
        "--count",
        "20000",
        "--rate",
        "50000",
        "--payload-bytes",
        "64",
    ]);
    assert_eq!(sent["sent_events"], 20_000, "{sent}");
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let r = stop(child, out);
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "exits within the shutdown timeout: {took:?}"
    );
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("{v} in {r}"));
    let failed: u64 = r["failed"].as_object().unwrap().values().map(n).sum();
    assert!(
        n(&r["failed"]["shutdown"]) > 0,
        "never durable: counted at the deadline: {r}"
    );
    assert_eq!(
        n(&r["accepted_events"]),
        n(&r["delivered_events"]) + n(&r["duplicates"]) + failed,
        "accepted = delivered + duplicates + failed: {r}"
    );
    assert!(
        r["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["failing"].is_string()),
        "{r}"
    );
    drop(fs);
    let _ = std::fs::remove_dir_all(dir);
}
