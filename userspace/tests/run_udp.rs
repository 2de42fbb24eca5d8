//! `eventstream run` end to end on loopback: frames sent over UDP are accepted, delivered and
//! reconciled exactly, bad input is counted by reason, and SIGTERM drains before exit.

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use eventstream::wire::protocol::encode;

mod common;
use common::daemon::{blast, exit_report, http, read_until, series, start, stop};

#[test]
fn udp_events_are_reconciled_and_sigterm_drains() {
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n    frames: 256\n  tcp:\n    bind: \"127.0.0.1:0\"\npool:\n  capacity: 1024\nadmin:\n  bind: \"127.0.0.1:0\"\n";
    let (child, out, addr, dir) = start(config, "run");

    // Bounded load on loopback: 500 datagrams of 8 events, paced so the socket buffer never fills.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut datagram = Vec::new();
    for i in 0..8u8 {
        encode(i, "orders.eu", &[i; 24], &mut datagram).unwrap();
    }
    for n in 0..500 {
        sock.send_to(&datagram, &addr).unwrap();
        if n % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    sock.send_to(&[0, 0, 0, 2, 0, 0, 0], &addr).unwrap(); // malformed: length < 3
    sock.send_to(&[0, 0, 0], &addr).unwrap(); // truncated: shorter than a header
    let mut bad_topic = Vec::new();
    encode(1, "ok", b"", &mut bad_topic).unwrap();
    bad_topic[7] = 0xff; // topic no longer UTF-8
    sock.send_to(&bad_topic, &addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let r = stop(child, out);
    assert_eq!(r["received_datagrams"], 503, "{r}");
    assert_eq!(r["accepted_events"], 4000, "{r}");
    assert_eq!(
        r["delivered_events"], 4000,
        "sent = delivered after the drain: {r}"
    );
    assert_eq!(
        r["delivered"]["realtime"], 4000,
        "the default route is realtime: {r}"
    );
    assert_eq!(r["rejected"]["malformed"], 1, "{r}");
    assert_eq!(r["rejected"]["truncated"], 1, "{r}");
    assert_eq!(r["rejected"]["bad_topic"], 1, "{r}");
    assert_eq!(r["rejected"]["too_large"], 0, "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reuseport_sockets_share_the_load_and_the_tcp_side_queue_is_served() {
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n    sockets: 2\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: \"127.0.0.1:0\"\nengine:\n  mode: inline\n";
    let (child, mut out, addr, dir) = start(config, "reuseport");
    let tcp = read_until(&mut out, "listening tcp ");
    // 32 flows (source ports): the kernel hashes them across both sockets.
    let senders: Vec<UdpSocket> = (0..32)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut datagram = Vec::new();
    for i in 0..4u8 {
        encode(i, "orders.eu", &[i; 16], &mut datagram).unwrap();
    }
    for round in 0..50 {
        for s in &senders {
            s.send_to(&datagram, &addr).unwrap();
        }
        if round % 5 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut frames = Vec::new();
    for i in 0..100u8 {
        encode(i, "orders.tcp", &[i; 8], &mut frames).unwrap();
    }
    let mut conn = std::net::TcpStream::connect(&tcp).unwrap();
    std::io::Write::write_all(&mut conn, &frames).unwrap();
    drop(conn);
    std::thread::sleep(Duration::from_millis(300));
    let r = stop(child, out);
    assert_eq!(r["received_events"]["udp"], 32 * 50 * 4, "{r}");
    assert_eq!(r["received_events"]["tcp"], 100, "{r}");
    assert_eq!(r["delivered_events"], 32 * 50 * 4 + 100, "{r}");
    let per: Vec<u64> = r["udp_sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per.len(), 2, "{r}");
    assert!(
        per.iter().all(|&n| n > 0),
        "both sockets took flows: {per:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_config_and_busy_port_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("es-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "ingest:\n  udp:\n    batch: 0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_eventstream"))
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ingest.udp.batch: 0 is out of range"), "{err}");

    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let ok = dir.join("ok.yaml");
    std::fs::write(
        &ok,
        "admin:\n  bind: null\ningest:\n  tcp:\n    bind: null\n",
    )
    .unwrap();
    let out = common::daemon::command()
        .args(["run", "--no-xdp", "--udp-bind", &port, "--config"])
        .arg(&ok)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ingest.udp.bind") && err.contains("in use"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_interface_falls_back_to_kernel_udp_with_one_clear_line() {
    let dir = std::env::temp_dir().join(format!("es-fb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: null\n",
    )
    .unwrap();
    let out = common::daemon::command()
        .args(["run", "--iface", "nosuch0", "--duration", "1", "--config"])
        .arg(&cfg)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = err.lines().filter(|l| l.contains("falling back")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("no network interface \"nosuch0\""),
        "{}",
        lines[0]
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["source"], "udp");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn routes_dedup_batches_and_no_route_are_accounted_exactly() {
    // The same traffic through both engine modes: run to completion in the receive thread, and
    // over rings to worker threads.
    for mode in ["inline", "pipelined"] {
        routes_dedup_batches_and_no_route_in(mode);
    }
}

fn routes_dedup_batches_and_no_route_in(mode: &str) {
    let config = r#"
ingest:
  udp:
    bind: "127.0.0.1:0"
  tcp:
    bind: "127.0.0.1:0"
admin:
  bind: "127.0.0.1:0"
engine:
  default_route: null
  batch_window_ms: 20
routes:
  - { topic: "orders.>", class: transactional, key: payload_id }
  - { topic: "metrics/#", class: batch }
  - { topic: "rt.*", class: realtime }
"#
    .replace("engine:\n", &format!("engine:\n  mode: {mode}\n"));
    let (child, out, addr, dir) = start(&config, &format!("engine-{mode}"));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let send = |frames: &[(&str, Vec<u8>)]| {
        let mut d = Vec::new();
        for (topic, payload) in frames {
            encode(5, topic, payload, &mut d).unwrap();
        }
        sock.send_to(&d, &addr).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    };
    // 100 orders, each sent twice: the second copy is a duplicate by payload id.
    for round in 0..2 {
        for id in 0..100u64 {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(if round == 0 { b"first" } else { b"again" });
            send(&[("orders.eu.created", p)]);
        }
    }
    for i in 0..50u8 {
        send(&[("metrics/cpu", vec![i]), ("metrics", vec![i])]);
    }
    for i in 0..30u8 {
        send(&[("rt.ticks", vec![i])]);
    }
    for i in 0..20u8 {
        send(&[("nobody.listens", vec![i]), ("rt.too.deep", vec![i])]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let r = stop(child, out);
    assert_eq!(r["engine_mode"], mode, "{r}");
    assert_eq!(r["accepted_events"], 200 + 100 + 30 + 40, "{r}");
    assert_eq!(r["delivered"]["transactional"], 100, "{r}");
    assert_eq!(r["duplicates"], 100, "{r}");
    assert_eq!(r["delivered"]["batch"], 100, "{r}");
    assert_eq!(r["delivered"]["realtime"], 30, "{r}");
    assert_eq!(
        r["dlq"]["no_route"], 40,
        "`rt.*` is one level: rt.too.deep has no route: {r}"
    );
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(
        n(&r["accepted_events"]),
        n(&r["delivered_events"])
            + n(&r["dlq"]["no_route"])
            + n(&r["dlq"]["dropping"])
            + n(&r["dlq"]["emergency"])
            + n(&r["duplicates"]),
        "accepted = delivered + DLQ + duplicates: {r}"
    );
    // The same identity from the metrics table the report renders, family by family.
    let m = r["metrics"].as_object().unwrap();
    let family = |name: &str| -> u64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(&format!("{name}{{")) || k.as_str() == name)
            .map(|(_, v)| v.as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        family("eventstream_received_events_total"),
        family("eventstream_delivered_events_total")
            + family("eventstream_dlq_events_total")
            + family("eventstream_discarded_events_total")
            + family("eventstream_failed_events_total"),
        "received = delivered + dlq + discarded + failed: {r}"
    );
    // Latency by stage: receive -> routed sampled in both modes; routed -> worker only where
    // a ring lies between them.
    let samples = |stage: &str| n(&r["stage_latency"][stage]["count"]);
    assert!(samples("receive_to_routed") >= 1, "{r}");
    if mode == "pipelined" {
        assert!(samples("routed_to_worker") >= 1, "{r}");
    } else {
        assert_eq!(samples("routed_to_worker"), 0, "{r}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn metrics_health_state_and_drain_over_http() {
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: \"127.0.0.1:0\"\n";
    let (child, mut out, addr, dir) = start(config, "admin");
    let admin = read_until(&mut out, "listening admin ");

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut d = Vec::new();
    for _ in 0..10 {
        encode(5, "m.t", b"payload", &mut d).unwrap();
    }
    for _ in 0..20 {
        sock.send_to(&d, &addr).unwrap();
    }
    sock.send_to(&[0, 0, 0, 1, 0, 0, 0], &addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    assert_eq!(http(&admin, "GET", "/healthz", ""), (200, "ok\n".into()));
    assert_eq!(
        http(&admin, "GET", "/state", ""),
        (200, "{\"state\":\"RUNNING\"}\n".into())
    );
    let (code, m) = http(&admin, "GET", "/metrics", "");
    assert_eq!(code, 200);
    for want in [
        "eventstream_received_events_total{source=\"udp\"} 200",
        "eventstream_delivered_events_total{sink=\"memory\",worker=\"realtime\"} 200",
        "eventstream_protocol_errors_total{source=\"udp\",error_type=\"malformed\"} 1",
        "eventstream_dlq_events_total{reason=\"no_route\"} 0",
        "eventstream_discarded_events_total{reason=\"duplicate\",intentional=\"true\"} 0",
        "eventstream_realtime_latency_seconds_bucket{le=\"+Inf\"} 200",
        "eventstream_pipeline_state{state=\"RUNNING\"} 1",
        "eventstream_realtime_latency_seconds_count 200",
        "# TYPE eventstream_received_events_total counter",
    ] {
        assert!(m.lines().any(|l| l == want), "missing `{want}` in\n{m}");
    }
    assert_eq!(http(&admin, "POST", "/state", "explode").0, 400);
    assert_eq!(http(&admin, "GET", "/nowhere", "").0, 404);
    assert_eq!(http(&admin, "POST", "/state", "drain").0, 202);
    let r = exit_report(child, out, "POST /state drain did not stop the daemon");
    assert_eq!(r["delivered_events"], 200, "{r}");
    assert_eq!(r["state_transitions"]["DRAINING"], 1, "{r}");
    // The report renders the same table as /metrics.
    let table = &r["metrics"];
    assert_eq!(
        table["eventstream_received_events_total{source=\"udp\"}"], 200,
        "{r}"
    );
    assert_eq!(
        table["eventstream_realtime_latency_seconds_count"], 200,
        "{r}"
    );
    assert!(
        table["eventstream_uptime_seconds"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    // Receive -> routed is sampled once per batch: at least one sample, at most one per event.
    let routed = r["stage_latency"]["receive_to_routed"]["count"]
        .as_u64()
        .unwrap();
    assert!((1..=201).contains(&routed), "{r}");
    assert!(
        m.lines()
            .any(|l| l.starts_with("eventstream_build_info{version=\"") && l.ends_with(" 1")),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn file_sink_and_dlq_hold_exact_bytes_and_read_back() {
    let root = std::env::temp_dir().join(format!("es-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let config = format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: null\nengine:\n  default_route: null\nroutes:\n  - {{ topic: \"ok.>\", class: realtime }}\nsinks:\n  kind: file\n  dir: \"{}\"\n  dlq_dir: \"{}\"\n  fsync: always\n",
        root.join("log").display(),
        root.join("dlq").display()
    );
    let (child, out, addr, dir) = start(&config, "files");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sender = sock.local_addr().unwrap().to_string();
    let before_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for i in 0..100u32 {
        let mut d = Vec::new();
        encode(7, "ok.events", format!("payload-{i}").as_bytes(), &mut d).unwrap();
        encode(1, "lost.events", &[0xff, 0x00, i as u8], &mut d).unwrap();
        sock.send_to(&d, &addr).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    std::thread::sleep(Duration::from_millis(300));
    let r = stop(child, out);
    assert_eq!(
        (
            r["delivered_events"].as_u64(),
            r["dlq"]["no_route"].as_u64()
        ),
        (Some(100), Some(100)),
        "{r}"
    );

    let cat = |args: &[&str]| -> Vec<serde_json::Value> {
        let o = Command::new(env!("CARGO_BIN_EXE_eventstream"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let log = cat(&["log", "cat", root.join("log").to_str().unwrap()]);
    assert_eq!(log.len(), 100);
    for (i, rec) in log.iter().enumerate() {
        assert_eq!(rec["topic"], "ok.events");
        assert_eq!(
            rec["payload"],
            format!("payload-{i}"),
            "exact bytes, in order"
        );
        assert_eq!(rec["id"], i as u64, "ids increase by one");
        assert_eq!(rec["priority"], 7);
        assert_eq!(
            rec["sender"],
            sender.as_str(),
            "the sender's address and port"
        );
        let at = rec["received_unix_ns"].as_u64().unwrap();
        assert!(
            at >= before_ns && at < before_ns + 60_000_000_000,
            "received on the wall clock: {rec}"
        );
    }
    let dlq = cat(&["dlq", "list", root.join("dlq").to_str().unwrap()]);
    assert_eq!(dlq.len(), 100);
    assert!(dlq.iter().all(|r| r["reason"] == "no_route"
        && r["topic"] == "lost.events"
        && r["payload_len"] == 3
        && r["sender"] == sender.as_str()));
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn paused_ingest_takes_nothing_until_resumed() {
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: \"127.0.0.1:0\"\n";
    let (child, mut out, addr, dir) = start(config, "pause");
    let admin = read_until(&mut out, "listening admin ");
    let received = |admin: &str| -> u64 {
        let (_, m) = http(admin, "GET", "/metrics", "");
        let l = m
            .lines()
            .find(|l| l.starts_with("eventstream_received_events_total{source=\"udp\"}"))
            .unwrap();
        l.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(http(&admin, "POST", "/state", "pause").0, 202);
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(&admin, "GET", "/state", "").1 != "{\"state\":\"PAUSED\"}\n" {
        assert!(Instant::now() < deadline, "never PAUSED");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Ingest sees the flag at its next batch: within one receive timeout (100 ms).
    std::thread::sleep(Duration::from_millis(250));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut d = Vec::new();
    encode(5, "p.t", b"held by the kernel", &mut d).unwrap();
    for _ in 0..50 {
        sock.send_to(&d, &addr).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(received(&admin), 0, "PAUSED ingest takes nothing");
    assert_eq!(http(&admin, "POST", "/state", "resume").0, 202);
    let deadline = Instant::now() + Duration::from_secs(5);
    while received(&admin) < 50 {
        assert!(Instant::now() < deadline, "resumed ingest never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = stop(child, out);
    assert_eq!(
        (
            r["accepted_events"].as_u64(),
            r["delivered_events"].as_u64()
        ),
        (Some(50), Some(50)),
        "{r}"
    );
    assert_eq!(r["state_transitions"]["PAUSED"], 1, "{r}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tcp_stream_rules_and_connection_limit() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\n    max_connections: 1\nadmin:\n  bind: null\n";
    let (child, mut out, _udp, dir) = start(config, "tcp");
    let tcp = read_until(&mut out, "listening tcp ");

    // 1. Frames split at every byte and batched: all arrive; a bad topic is rejected alone.
    let mut good = Vec::new();
    for i in 0..20u8 {
        encode(i, "tcp.events", &[i; 100], &mut good).unwrap();
    }
    let mut bad_topic = Vec::new();
    encode(1, "xx", b"", &mut bad_topic).unwrap();
    bad_topic[7] = 0xff;
    let mut c = TcpStream::connect(&tcp).unwrap();
    for b in &good[..300] {
        c.write_all(&[*b]).unwrap(); // byte by byte across the first frames
    }
    c.write_all(&good[300..]).unwrap();
    c.write_all(&bad_topic).unwrap();
    c.write_all(&good).unwrap(); // the connection is still up after a bad topic
    // 2. While this connection holds the only slot, a second one is refused (closed).
    std::thread::sleep(Duration::from_millis(200));
    let mut second = TcpStream::connect(&tcp).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        second.read(&mut buf).unwrap_or(0),
        0,
        "refused: closed by the server"
    );
    // 3. A malformed frame closes the connection.
    c.write_all(&[0, 0, 0, 1, 0, 0, 0]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        c.read(&mut buf).unwrap_or(0),
        0,
        "malformed: the server closed the connection"
    );
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    // 4. A stream that ends mid-frame is truncated.
    let mut c = TcpStream::connect(&tcp).unwrap();
    c.write_all(&good[..50]).unwrap();
    drop(c);
    std::thread::sleep(Duration::from_millis(300));

    let r = stop(child, out);
    assert_eq!(r["received_events"]["tcp"], 40, "{r}");
    assert_eq!(r["delivered_events"], 40, "{r}");
    assert_eq!(r["rejected"]["bad_topic"], 1, "{r}");
    assert_eq!(r["rejected"]["malformed"], 1, "{r}");
    assert_eq!(r["rejected"]["truncated"], 1, "{r}");
    assert_eq!(r["tcp_refused_connections"], 1, "{r}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_under_load_loses_nothing() {
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: null\nadmin:\n  bind: null\n";
    let (child, out, addr, dir) = start(config, "drainload");
    let sending = std::sync::atomic::AtomicBool::new(true);
    let r = std::thread::scope(|s| {
        // A bounded sender (at most 20 000 datagrams or 3 s) still running when SIGTERM lands.
        s.spawn(|| {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut d = Vec::new();
            for i in 0..8u8 {
                encode(i, "load.t", &[i; 32], &mut d).unwrap();
            }
            let end = Instant::now() + Duration::from_secs(3);
            for n in 0..20_000 {
                if !sending.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > end {
                    break;
                }
                if sock.send_to(&d, &addr).is_err() {
                    break; // the daemon is gone
                }
                if n % 64 == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let r = stop(child, out);
        sending.store(false, std::sync::atomic::Ordering::Relaxed);
        r
    });
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    assert!(n(&r["accepted_events"]) > 0, "{r}");
    assert_eq!(
        n(&r["accepted_events"]),
        8 * n(&r["received_datagrams"]),
        "{r}"
    );
    assert_eq!(
        r["accepted_events"], r["delivered_events"],
        "every accepted event reached a sink: {r}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_original_python_client_over_udp_and_tcp() {
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: null\n";
    let (child, mut out, udp, dir) = start(config, "python");
    let tcp = read_until(&mut out, "listening tcp ");
    let (uh, up) = udp.rsplit_once(':').unwrap();
    let (th, tp) = tcp.rsplit_once(':').unwrap();
    // The original README's client: struct.pack framing, one frame per send.
    let script = format!(
        r#"
import socket, struct
def frame(topic, payload, prio=5):
    f = struct.pack(">I", 1 + 2 + len(topic) + len(payload))
    f += struct.pack("B", prio) + struct.pack(">H", len(topic)) + topic.encode() + payload
    return f
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(25):
    u.sendto(frame("py.udp", b"udp-%d" % i), ("{uh}", {up}))
t = socket.create_connection(("{th}", {tp}))
for i in range(25):
    t.sendall(frame("py.tcp", b"tcp-%d" % i))
t.close()
"#
    );
    let py = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3 runs");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = stop(child, out);
    assert_eq!(r["received_events"]["udp"], 25, "{r}");
    assert_eq!(r["received_events"]["tcp"], 25, "{r}");
    assert_eq!(r["delivered_events"], 50, "{r}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn blaster_over_udp_and_tcp_is_reconciled_with_sender_latency() {
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: null\nengine:\n  latency_from: payload\n";
    let (child, mut out, udp, dir) = start(config, "blast");
    let tcp = read_until(&mut out, "listening tcp ");
    // Paced well below what loopback takes, so nothing is lost in the socket buffer.
    let u = blast(&[
        "--to",
        &udp,
        "--count",
        "20000",
        "--rate",
        "100000",
        "--events-per-datagram",
        "4",
        "--payload-bytes",
        "48",
        "--topics",
        "a.x,b.y",
    ]);
    let t = blast(&[
        "--tcp",
        "--to",
        &tcp,
        "--count",
        "5000",
        "--seq-start",
        "20000",
    ]);
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(n(&u["sent_events"]), 20_000, "{u}");
    assert_eq!(n(&u["sent_packets"]), 5_000, "{u}");
    assert_eq!(n(&u["send_errors"]), 0, "{u}");
    assert_eq!(n(&t["sent_events"]), 5_000, "{t}");
    // Let the TCP connection's last bytes land before the drain.
    std::thread::sleep(Duration::from_millis(300));
    let r = stop(child, out);
    assert_eq!(n(&r["received_events"]["udp"]), 20_000, "{r}");
    assert_eq!(n(&r["received_events"]["tcp"]), 5_000, "{r}");
    assert_eq!(n(&r["delivered"]["realtime"]), 25_000, "{r}");
    assert_eq!(n(&r["latency"]["count"]), 25_000, "{r}");
    assert_eq!(n(&r["latency"]["unstamped"]), 0, "{r}");
    assert!(r["latency"]["p50_us"].as_f64().unwrap() > 0.0, "{r}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn overload_sheds_to_the_dlq_and_recovers_with_every_event_accounted_from_metrics() {
    // Deliberately slow delivery: file sinks that fsync on every flush, on disk (not tmpfs), a
    // 64-slot ingest queue and 64-slot worker rings. A TCP blast (no kernel loss: flow control)
    // of low-priority events outruns the workers by far, the rings fill, the dispatcher waits,
    // the ingest queue passes its watermarks, and DROPPING/EMERGENCY shed to the DLQ.
    let data = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("overload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let config = format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\n\
         admin:\n  bind: \"127.0.0.1:0\"\nqueue:\n  capacity: 64\n\
         engine:\n  ring_capacity: 64\n\
         sinks:\n  kind: file\n  fsync: always\n  dir: \"{0}/log\"\n  dlq_dir: \"{0}/dlq\"\n",
        data.display()
    );
    let (child, mut out, _udp, dir) = start(&config, "overload");
    let tcp = read_until(&mut out, "listening tcp ");
    let admin = read_until(&mut out, "listening admin ");
    const SENT: u64 = 100_000;
    let t = blast(&[
        "--tcp",
        "--to",
        &tcp,
        "--count",
        &SENT.to_string(),
        "--priority",
        "1",
        "--events-per-datagram",
        "16",
        "--topics",
        "load.a,load.b,load.c",
    ]);
    assert_eq!(t["sent_events"].as_u64(), Some(SENT), "{t}");

    // Wait (bounded) until everything received has been delivered or dead-lettered and the
    // pipeline is back to RUNNING.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (code, m) = http(&admin, "GET", "/metrics", "");
        assert_eq!(code, 200);
        let received = series(&m, "eventstream_received_events_total{source=\"tcp\"}");
        let delivered: u64 = ["realtime", "transactional", "batch"]
            .iter()
            .map(|c| {
                series(
                    &m,
                    &format!("eventstream_delivered_events_total{{sink=\"file\",worker=\"{c}\"}}"),
                ) + series(
                    &m,
                    &format!(
                        "eventstream_delivered_events_total{{sink=\"memory\",worker=\"{c}\"}}"
                    ),
                )
            })
            .sum();
        let dlq: u64 = ["no_route", "dropping", "emergency"]
            .iter()
            .map(|r| {
                series(
                    &m,
                    &format!("eventstream_dlq_events_total{{reason=\"{r}\"}}"),
                )
            })
            .sum();
        let running = series(&m, "eventstream_pipeline_state{state=\"RUNNING\"}") == 1;
        if received == SENT && delivered + dlq == received && running {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "not settled in 60 s: received {received}, delivered {delivered}, dlq {dlq}\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let n = |name: &str| series(&metrics, name);
    let shed = n("eventstream_dlq_events_total{reason=\"dropping\"}")
        + n("eventstream_dlq_events_total{reason=\"emergency\"}");
    assert!(
        n("eventstream_pipeline_transitions_total{state=\"DROPPING\"}")
            + n("eventstream_pipeline_transitions_total{state=\"EMERGENCY\"}")
            >= 1,
        "overload never left RUNNING:\n{metrics}"
    );
    assert!(
        n("eventstream_pipeline_transitions_total{state=\"RUNNING\"}") >= 1,
        "{metrics}"
    );
    eprintln!(
        "overload: {shed} of {SENT} shed; transitions DROPPING {} EMERGENCY {} RUNNING {}",
        n("eventstream_pipeline_transitions_total{state=\"DROPPING\"}"),
        n("eventstream_pipeline_transitions_total{state=\"EMERGENCY\"}"),
        n("eventstream_pipeline_transitions_total{state=\"RUNNING\"}"),
    );
    assert!(shed > 0, "nothing shed:\n{metrics}");
    assert!(
        !metrics.contains("sink=\"dlq\""),
        "a DLQ event is not also delivered:\n{metrics}"
    );
    assert_eq!(
        n("eventstream_queue_depth{queue=\"ingest\"}"),
        0,
        "{metrics}"
    );

    // The drain after the storm loses nothing either; the report agrees with /metrics.
    let r = stop(child, out);
    let v = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(v(&r["received_events"]["tcp"]), SENT, "{r}");
    assert_eq!(
        v(&r["delivered_events"]) + v(&r["dlq"]["dropping"]) + v(&r["dlq"]["emergency"]),
        SENT,
        "{r}"
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(data);
}

#[test]
fn a_blaster_that_outruns_the_socket_is_reconciled_with_counted_kernel_drops() {
    // A tiny receive buffer and an unpaced blaster: the kernel must drop, and says how many.
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n    socket_buffer: 4096\n    batch: 8\n  tcp:\n    bind: null\nadmin:\n  bind: \"127.0.0.1:0\"\n";
    let (child, mut out, addr, dir) = start(config, "kdrops");
    let admin = read_until(&mut out, "listening admin ");
    let sent = blast(&[
        "--to",
        &addr,
        "--count",
        "400000",
        "--rate",
        "0",
        "--events-per-datagram",
        "2",
        "--payload-bytes",
        "200",
    ]);
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(n(&sent["send_errors"]), 0, "{sent}");
    std::thread::sleep(Duration::from_millis(300));
    let (_, m) = http(&admin, "GET", "/metrics", "");
    let r = stop(child, out);
    let drops = n(&r["kernel_drops"]);
    eprintln!(
        "sent {} datagrams: received {}, kernel drops {drops}",
        sent["sent_packets"], r["received_datagrams"]
    );
    assert!(drops > 0, "an unpaced blast into a 4 KiB buffer drops: {r}");
    assert!(
        series(
            &m,
            "eventstream_kernel_dropped_datagrams_total{source=\"udp\"}"
        ) > 0,
        "{m}"
    );
    assert_eq!(
        n(&sent["sent_packets"]),
        n(&r["received_datagrams"]) + drops,
        "sent = received + kernel drops, in datagrams: {r}"
    );
    let rejected: u64 = r["rejected"].as_object().unwrap().values().map(n).sum();
    assert_eq!(
        n(&sent["sent_events"]),
        n(&r["accepted_events"]) + rejected + 2 * drops,
        "and in events: {r}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn each_worker_class_may_name_its_own_sink() {
    let root = std::env::temp_dir().join(format!("es-perclass-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let config = format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: null\nadmin:\n  bind: null\nroutes:\n  - {{ topic: \"bulk.>\", class: batch }}\nsinks:\n  kind: memory\n  batch: file\n  dir: \"{}\"\n  dlq_dir: \"{}\"\n",
        root.join("log").display(),
        root.join("dlq").display()
    );
    let (child, out, addr, dir) = start(&config, "perclass");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..50u32 {
        let mut d = Vec::new();
        encode(3, "bulk.items", format!("b-{i}").as_bytes(), &mut d).unwrap();
        encode(3, "live.ticks", format!("r-{i}").as_bytes(), &mut d).unwrap();
        sock.send_to(&d, &addr).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let r = stop(child, out);
    assert_eq!(r["delivered"]["batch"], 50, "{r}");
    assert_eq!(r["delivered"]["realtime"], 50, "{r}");
    let o = Command::new(env!("CARGO_BIN_EXE_eventstream"))
        .args(["log", "cat"])
        .arg(root.join("log").join("batch-0"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let lines = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        lines.lines().count(),
        50,
        "the batch class wrote to its file log"
    );
    assert!(lines.lines().all(|l| l.contains("bulk.items")));
    // Copied out of the receive frames into the batch window, the sender comes along.
    let sender = format!("\"sender\":\"{}\"", sock.local_addr().unwrap());
    assert!(lines.lines().all(|l| l.contains(&sender)), "{lines}");
    assert!(
        !root.join("log").join("realtime-0").exists(),
        "the realtime class stayed in memory"
    );
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tcp_accept_out_of_descriptors_is_counted_and_retried_not_the_end() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        return common::skip("prlimit (util-linux) is not installed");
    }
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: null\n";
    let (child, mut out, _udp, dir) = start(config, "emfile");
    let tcp = read_until(&mut out, "listening tcp ");
    read_until(&mut out, "ready");
    let pid = child.id().to_string();
    // No descriptor to spare (a limit below every one open): the next accept fails with
    // EMFILE. The soft limit only: raising it back needs no privilege.
    assert!(
        Command::new("prlimit")
            .args(["--pid", &pid, "--nofile=3:"])
            .status()
            .unwrap()
            .success()
    );
    let mut first = std::net::TcpStream::connect(&tcp).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        Command::new("prlimit")
            .args(["--pid", &pid, "--nofile=1024:"])
            .status()
            .unwrap()
            .success()
    );
    // The connection waiting in the backlog is taken once descriptors are back.
    let mut d = Vec::new();
    encode(1, "fd.t", b"after", &mut d).unwrap();
    std::io::Write::write_all(&mut first, &d).unwrap();
    drop(first);
    std::thread::sleep(Duration::from_millis(1500));
    let r = stop(child, out);
    assert!(r["tcp_accept_errors"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["received_events"]["tcp"], 1, "accept resumed: {r}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tcp_slow_senders_are_cut_off_sources_are_capped_and_resets_count_as_truncated() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\n    max_connections: 8\n    max_connections_per_source: 2\n    frame_timeout_secs: 1\nadmin:\n  bind: null\n";
    let (child, mut out, _udp, dir) = start(config, "tcp-limits");
    let tcp = read_until(&mut out, "listening tcp ");
    let mut frame = Vec::new();
    encode(1, "slow.t", &[7u8; 64], &mut frame).unwrap();

    // 1. A byte every 300 ms (never idle long enough for the read timeout): cut off once the
    // frame has taken a second, its partial frame counted.
    let mut slow = TcpStream::connect(&tcp).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = Instant::now();
    let mut closed = false;
    for b in &frame[..20] {
        if slow.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if t0.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let mut buf = [0u8; 1];
    assert!(
        closed || slow.read(&mut buf).unwrap_or(0) == 0,
        "the slow sender was cut off"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(slow);

    // 2. Two connections from one address are allowed, a third is refused.
    let a = TcpStream::connect(&tcp).unwrap();
    let b = TcpStream::connect(&tcp).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut third = TcpStream::connect(&tcp).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        third.read(&mut buf).unwrap_or(0),
        0,
        "over the per-source cap: closed"
    );
    drop((a, b, third));
    std::thread::sleep(Duration::from_millis(200));

    // 3. A reset in the middle of a frame counts as truncated, as an EOF does.
    let c = TcpStream::connect(&tcp).unwrap();
    let s = socket2::SockRef::from(&c);
    (&c).write_all(&frame[..30]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.set_linger(Some(Duration::ZERO)).unwrap(); // close with RST
    drop(c);
    std::thread::sleep(Duration::from_millis(300));

    let r = stop(child, out);
    assert_eq!(
        r["rejected"]["truncated"], 2,
        "the slow frame and the reset one: {r}"
    );
    assert_eq!(r["tcp_refused_connections"], 1, "{r}");
    assert_eq!(r["received_events"]["tcp"], 0, "{r}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sighup_and_post_reload_change_routes_and_a_bad_file_changes_nothing() {
    let v1 = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: null\nadmin:\n  bind: \"127.0.0.1:0\"\nengine:\n  default_route: null\nroutes:\n  - { topic: \"a.>\", class: realtime }\n";
    let (child, mut out, addr, dir) = start(v1, "reload");
    let admin = read_until(&mut out, "listening admin ");
    read_until(&mut out, "ready");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let send = |topic: &str, n: usize| {
        for i in 0..n {
            let mut d = Vec::new();
            encode(5, topic, &(i as u32).to_be_bytes(), &mut d).unwrap();
            sock.send_to(&d, &addr).unwrap();
        }
    };
    let metric = |name: &str| series(&http(&admin, "GET", "/metrics", "").1, name);
    let wait_for = |name: &str, want: u64| {
        let end = Instant::now() + Duration::from_secs(10);
        while metric(name) != want {
            assert!(Instant::now() < end, "{name} never reached {want}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    send("a.x", 100);
    send("b.x", 100); // no route yet: the DLQ
    wait_for("eventstream_received_events_total{source=\"udp\"}", 200);

    // The file gains a route for b.>; SIGHUP puts it in force.
    let path = dir.join("eventstream.yaml");
    std::fs::write(
        &path,
        format!("{v1}  - {{ topic: \"b.>\", class: batch }}\n"),
    )
    .unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0);
    wait_for("eventstream_config_reloads_total{result=\"ok\"}", 1);
    send("b.x", 100);
    wait_for("eventstream_received_events_total{source=\"udp\"}", 300);

    // A file that does not validate is refused with its error; the rules in force stay.
    std::fs::write(&path, "routes:\n  - { topic: \"b.>.c\", class: batch }\n").unwrap();
    let (code, body) = http(&admin, "POST", "/config/reload", "");
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("b.>.c"), "names what is wrong: {body}");
    assert_eq!(
        metric("eventstream_config_reloads_total{result=\"error\"}"),
        1
    );
    assert_eq!(http(&admin, "GET", "/config/reload", "").0, 405);
    send("b.x", 100);
    wait_for("eventstream_received_events_total{source=\"udp\"}", 400);
    // And POST puts a good file in force too.
    std::fs::write(&path, v1).unwrap();
    let (code, body) = http(&admin, "POST", "/config/reload", "");
    assert_eq!(code, 200, "{body}");
    send("b.x", 50); // no route again
    wait_for("eventstream_received_events_total{source=\"udp\"}", 450);

    let r = stop(child, out);
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(n(&r["accepted_events"]), 450, "{r}");
    assert_eq!(n(&r["delivered"]["realtime"]), 100, "{r}");
    assert_eq!(
        n(&r["delivered"]["batch"]),
        200,
        "routed by the reloaded rules: {r}"
    );
    assert_eq!(n(&r["dlq"]["no_route"]), 150, "{r}");
    assert_eq!(
        (
            n(&r["config_reloads"]["ok"]),
            n(&r["config_reloads"]["error"])
        ),
        (2, 1),
        "{r}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn many_tcp_connections_share_the_housekeeping_thread_and_a_full_queue_loses_nothing() {
    use std::io::Write;
    const CONNS: usize = 48;
    const FRAMES: u32 = 400;
    // A queue far smaller than what the connections send at once, and two arena frames per
    // connection: connections must wait for room (without blocking the thread they share), and
    // the control plane sheds to the DLQ; every event is accounted either way.
    let config = format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\n    max_connections: {CONNS}\n    max_connections_per_source: {CONNS}\n    frames_per_connection: 2\nqueue:\n  capacity: 64\nadmin:\n  bind: \"127.0.0.1:0\"\n"
    );
    let (child, mut out, _udp, dir) = start(&config, "tcp-many");
    let tcp = read_until(&mut out, "listening tcp ");
    let admin = read_until(&mut out, "listening admin ");
    read_until(&mut out, "ready");
    let pid = child.id();
    let before = common::threads(pid).len();

    let mut conns: Vec<std::net::TcpStream> = (0..CONNS)
        .map(|_| std::net::TcpStream::connect(&tcp).unwrap())
        .collect();
    // Round-robin over the connections, 20 frames at a time: every connection is busy at once.
    let mut sent = 0u64;
    for chunk in 0..FRAMES / 20 {
        for (k, c) in conns.iter_mut().enumerate() {
            let mut bytes = Vec::new();
            for i in 0..20 {
                let n = chunk * 20 + i;
                encode(
                    (n % 8) as u8,
                    &format!("tcp.c{k}"),
                    &n.to_le_bytes(),
                    &mut bytes,
                )
                .unwrap();
            }
            c.write_all(&bytes).unwrap();
            sent += 20;
        }
    }
    // While every connection is open: the admin server answers, and no thread was added.
    let (status, _) = http(&admin, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let during = common::threads(pid).len();
    assert_eq!(
        during, before,
        "{CONNS} open connections added threads: {before} before, {during} during"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = series(
            &http(&admin, "GET", "/metrics", "").1,
            "eventstream_received_events_total{source=\"tcp\"}",
        );
        if got == sent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {got} of {sent} TCP events received after 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(conns);
    let r = stop(child, out);
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(n(&r["received_events"]["tcp"]), sent, "{r}");
    let dlq: u64 = r["dlq"].as_object().unwrap().values().map(n).sum();
    let failed: u64 = r["failed"].as_object().unwrap().values().map(n).sum();
    assert_eq!(
        n(&r["accepted_events"]),
        n(&r["delivered_events"]) + dlq + n(&r["duplicates"]) + failed,
        "accepted = delivered + DLQ + duplicates + failed: {r}"
    );
    assert_eq!(r["tcp_refused_connections"], 0, "{r}");
    let _ = std::fs::remove_dir_all(dir);
}
