//! The appliance built in process through the library's `daemon::{Umem::map, setup, run}`, the
//! way `eventstream run` builds it: kernel UDP and TCP ingest on loopback, memory sinks, the
//! admin server and TCP accepts on the housekeeping thread. Each run is stopped from outside
//! (`POST /state drain`, or the stop flag SIGTERM sets) and must reconcile exactly.

use std::io::Write as _;
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use eventstream::daemon::{self, Options};
use eventstream::ops::config::Config;
use eventstream::wire::protocol::encode;

mod common;
use common::daemon::{http, series};

/// Sends `datagrams` UDP datagrams of 8 events to `udp` and `frames` single-event frames over
/// one TCP connection to `tcp`, paced so no socket buffer fills; returns the events sent.
fn send(udp: std::net::SocketAddr, tcp: std::net::SocketAddr, datagrams: u32, frames: u32) -> u64 {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut datagram = Vec::new();
    for i in 0..8u8 {
        encode(i, "orders.eu", &[i; 24], &mut datagram).unwrap();
    }
    for n in 0..datagrams {
        sock.send_to(&datagram, udp).unwrap();
        if n % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut stream = Vec::new();
    for i in 0..frames {
        encode(1, "tcp.side", &i.to_le_bytes(), &mut stream).unwrap();
    }
    let mut c = TcpStream::connect(tcp).unwrap();
    c.write_all(&stream).unwrap();
    drop(c);
    u64::from(datagrams) * 8 + u64::from(frames)
}

/// Polls `/metrics` until `eventstream_received_events_total` over every source reaches `n`.
fn wait_received(admin: &str, n: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http(admin, "GET", "/metrics", "");
        assert_eq!(status, 200, "{body}");
        let got: u64 = ["xsk", "udp", "tcp"]
            .iter()
            .map(|s| {
                series(
                    &body,
                    &format!("eventstream_received_events_total{{source=\"{s}\"}}"),
                )
            })
            .sum();
        if got >= n {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "only {got} of {n} events received after 10 s:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn in_process(mode: &str) {
    let text = format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: \"127.0.0.1:0\"\nengine:\n  mode: {mode}\n"
    );
    let cfg = Config::parse(&text, "test").unwrap();
    cfg.validate().unwrap();
    let opts = Options {
        no_xdp: true,
        ..Options::default()
    };
    let umem = daemon::Umem::map(&cfg, &opts).unwrap();
    let setup = daemon::setup(&cfg, &umem, opts).unwrap();
    assert!(!setup.is_xdp());
    let addrs = setup.addresses();
    let (udp, tcp, admin) = (
        addrs.udp.unwrap(),
        addrs.tcp.unwrap(),
        addrs.admin.unwrap().to_string(),
    );
    let report = std::thread::scope(|s| {
        let run = s.spawn(move || daemon::run(setup));
        let sent = send(udp, tcp, 200, 300);
        let metrics = wait_received(&admin, sent);
        assert_eq!(
            series(
                &metrics,
                "eventstream_admin_request_errors_total{error_type=\"bad_request\"}"
            ),
            0
        );
        // The drain command ends the run; the housekeeping thread joins every other thread
        // without blocking, so the admin server answers until it is done.
        let (status, body) = http(&admin, "POST", "/state", "drain");
        assert_eq!(status, 202, "accepted: {body}");
        let report = run.join().unwrap();
        (report, sent)
    });
    let (report, sent) = report;
    report.outcome.unwrap();
    let r = report.json.unwrap();
    assert_eq!(r["engine_mode"], mode, "{r}");
    assert_eq!(r["accepted_events"], sent, "{r}");
    assert_eq!(r["received_events"]["tcp"], 300, "{r}");
    assert_eq!(
        r["delivered_events"], sent,
        "every accepted event reached its sink: {r}"
    );
    assert_eq!(r["state_transitions"]["DRAINING"], 1, "{r}");
}

#[test]
fn inline_appliance_in_process_reconciles_and_drains_on_command() {
    in_process("inline");
}

#[test]
fn pipelined_appliance_in_process_reconciles_and_drains_on_command() {
    in_process("pipelined");
}

#[test]
fn the_stop_flag_ends_a_run_without_an_admin_server() {
    let cfg = Config::parse(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: null\nadmin:\n  bind: null\n",
        "test",
    )
    .unwrap();
    let opts = Options {
        no_xdp: true,
        ..Options::default()
    };
    let umem = daemon::Umem::map(&cfg, &opts).unwrap();
    let setup = daemon::setup(&cfg, &umem, opts).unwrap();
    let (stop, udp) = (setup.stopper(), setup.addresses().udp.unwrap());
    assert_eq!(setup.addresses().admin, None);
    let t = Instant::now();
    let report = std::thread::scope(|s| {
        let run = s.spawn(move || daemon::run(setup));
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut datagram = Vec::new();
        encode(0, "a", b"x", &mut datagram).unwrap();
        for _ in 0..100 {
            sock.send_to(&datagram, udp).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        run.join().unwrap()
    });
    report.outcome.unwrap();
    let r = report.json.unwrap();
    assert_eq!(r["accepted_events"], 100, "{r}");
    assert_eq!(r["delivered_events"], 100, "{r}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        t.elapsed()
    );
}
