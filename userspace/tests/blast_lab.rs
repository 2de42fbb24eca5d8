//! The blaster's kernel paths against the appliance in the netns + veth lab: AF_XDP TX and
//! `sendmmsg` from the sending namespace into the appliance's AF_XDP socket, reconciled
//! exactly against the appliance's report (sent = received + what `XDP_STATISTICS` says the
//! kernel dropped); live frames through the drop program inject exactly the count asked for.
//!
//! Needs root; skips with a message where they are missing, except under
//! CI, where it fails instead.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use eventstream::tools::lab::{RX_ADDR, RX_IF, TX_IF};

const PER: u64 = 2;

fn blast(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_eventstream"))
        .arg("blast")
        .args(args)
        .args(["--quiet", "--duration", "20"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "blast {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn xdp_tx_and_sendmmsg_into_af_xdp_reconcile_and_live_frames_count_exactly() {
    let Some(lab) = common::lab_or_skip("esbl", 1, "the blaster lab test") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("es-blastlab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("eventstream.yaml");
    std::fs::write(
        &config,
        "xdp:\n  iface: \"\"\ningest:\n  udp:\n    bind: \"0.0.0.0:8082\"\n    frame_size: 4096\n  tcp:\n    bind: null\nadmin:\n  bind: \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut child = common::daemon::command()
        .args(["run", "--netns", &lab.rx_ns, "--iface", RX_IF, "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    // Ready once the admin port is up (after the sockets are bound and registered).
    let mut line = String::new();
    while !line.starts_with("listening admin ") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the appliance exited early"
        );
    }
    // Setup done, privileges dropped: only CAP_BPF (CAP_SYS_ADMIN before Linux 5.8) is left,
    // for reading the XDP program's counters.
    // (The admin address is printed while setup is still going on: wait, bounded, for the drop.)
    let bpf = 1u64 << eventstream::ops::privs::bpf_capability();
    let caps = |status: &str, field: &str| {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        if caps(&status, "CapEff:") == bpf || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let caps = |field: &str| caps(&status, field);
    assert_eq!(caps("CapEff:"), bpf, "{status}");
    assert_eq!(caps("CapPrm:"), bpf, "{status}");
    assert_eq!(caps("CapInh:"), 0, "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let to = format!("{RX_ADDR}:8082");
    let per = PER.to_string();
    let tx = blast(&[
        "--netns",
        &lab.tx_ns,
        "--xdp-tx",
        "--iface",
        TX_IF,
        "--to",
        &to,
        "--count",
        "20000",
        "--rate",
        "100000",
        "--events-per-datagram",
        &per,
    ]);
    assert_eq!(tx["mode"], "xdp_tx", "{tx}");
    assert_eq!(tx["sent_events"], 20_000, "{tx}");
    let mm = blast(&[
        "--netns",
        &lab.tx_ns,
        "--to",
        &to,
        "--count",
        "4000",
        "--rate",
        "50000",
        "--events-per-datagram",
        &per,
        "--seq-start",
        "20000",
    ]);
    assert_eq!(mm["sent_events"], 4_000, "{mm}");
    // Datagrams above the MTU arrive as IP fragments: the XDP program passes them, the kernel
    // reassembles them, and the UDP socket bound beside AF_XDP takes them.
    let big = blast(&[
        "--netns",
        &lab.tx_ns,
        "--to",
        &to,
        "--count",
        "10",
        "--rate",
        "1000",
        "--payload-bytes",
        "3000",
        "--seq-start",
        "30000",
    ]);
    assert_eq!(big["sent_events"], 10, "{big}");
    // Up to the largest UDP datagram: reassembled from 41 fragments, received whole.
    let huge = blast(&[
        "--netns",
        &lab.tx_ns,
        "--to",
        &to,
        "--count",
        "5",
        "--rate",
        "100",
        "--payload-bytes",
        "60000",
        "--seq-start",
        "40000",
    ]);
    assert_eq!(huge["sent_events"], 5, "{huge}");

    // The link flaps: down, up, and ingest goes on (the neighbour entry is learnt again first,
    // by ping, so the sender's kernel drops nothing of what follows).
    let ip = |args: &[&str]| {
        let s = Command::new("ip")
            .args(["netns", "exec", &lab.rx_ns, "ip"])
            .args(args)
            .status()
            .unwrap();
        assert!(s.success(), "ip {args:?}");
    };
    ip(&["link", "set", RX_IF, "down"]);
    std::thread::sleep(Duration::from_millis(500));
    ip(&["link", "set", RX_IF, "up"]);
    let up_by = Instant::now() + Duration::from_secs(10);
    while !Command::new("ip")
        .args(["netns", "exec", &lab.tx_ns, "ping", "-c1", "-W1"])
        .arg(RX_ADDR.to_string())
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < up_by, "the link did not come back");
    }
    let after = blast(&[
        "--netns",
        &lab.tx_ns,
        "--to",
        &to,
        "--count",
        "1000",
        "--rate",
        "20000",
        "--events-per-datagram",
        &per,
        "--seq-start",
        "50000",
    ]);
    assert_eq!(after["sent_events"], 1_000, "{after}");

    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the appliance did not drain");
        std::thread::sleep(Duration::from_millis(20));
    }
    let report: serde_json::Value = (&mut out)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(&l).unwrap())
        .expect("a report");
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    let x = &report["xsk"];
    let kernel_dropped = (n(&x["rx_dropped"]) + n(&x["rx_ring_full"])) * PER;
    assert_eq!(
        n(&report["received_events"]["xsk"]) + kernel_dropped,
        25_000,
        "sent = received + counted kernel drops: {report}"
    );
    assert_eq!(n(&x["verdicts"]["redirect"]), 25_000 / PER, "{report}");
    assert_eq!(n(&report["received_events"]["udp"]), 15, "{report}");
    assert_eq!(n(&report["rejected"]["truncated"]), 0, "{report}");
    assert!(n(&x["verdicts"]["pass_fragment"]) >= 20, "{report}");
    common::assert_reconciled(&report);

    // Live frames through the drop program: exactly the count asked for.
    let live = blast(&[
        "--netns",
        &lab.rx_ns,
        "--live-frames",
        "--xdp-drop",
        "--iface",
        RX_IF,
        "--to",
        &to,
        "--count",
        "1000",
    ]);
    assert_eq!(live["mode"], "live_frames", "{live}");
    assert_eq!(live["sent_events"], 1_000, "{live}");
    drop(lab);
    let _ = std::fs::remove_dir_all(dir);
}

/// Two RX queues on the lab's veth, one AF_XDP socket and data-plane thread each: AF_XDP TX on
/// the sender's queue `q` lands on the appliance's RX queue `q`, and each queue's accounting
/// is exact on its own (sent to q = received on q + q's counted kernel drops).
#[test]
fn two_rx_queues_each_get_a_socket_and_exact_accounting() {
    let Some(lab) = common::lab_or_skip("es2q", 2, "the two-queue lab test") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("es-2q-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("eventstream.yaml");
    std::fs::write(
        &config,
        "xdp:\n  queues: 2\ningest:\n  udp:\n    bind: \"0.0.0.0:8082\"\n  tcp:\n    bind: null\nadmin:\n  bind: \"127.0.0.1:0\"\nengine:\n  mode: inline\n",
    )
    .unwrap();
    let mut child = common::daemon::command()
        .args(["run", "--netns", &lab.rx_ns, "--iface", RX_IF, "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != "ready" {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the appliance exited early"
        );
    }
    let to = format!("{RX_ADDR}:8082");
    let per = PER.to_string();
    let sent = [12_000u64, 6_000];
    for (q, count) in sent.iter().enumerate() {
        let tx = blast(&[
            "--netns",
            &lab.tx_ns,
            "--xdp-tx",
            "--iface",
            TX_IF,
            "--queue",
            &q.to_string(),
            "--to",
            &to,
            "--count",
            &count.to_string(),
            "--rate",
            "100000",
            "--events-per-datagram",
            &per,
        ]);
        assert_eq!(tx["sent_events"], *count, "{tx}");
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the appliance did not drain");
        std::thread::sleep(Duration::from_millis(20));
    }
    let report: serde_json::Value = (&mut out)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(&l).unwrap())
        .expect("a report");
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    let queues = report["xsk"]["queues"]
        .as_array()
        .expect("per-queue counts");
    assert_eq!(queues.len(), 2, "{report}");
    for (q, (c, sent)) in queues.iter().zip(sent).enumerate() {
        let dropped = (n(&c["rx_dropped"]) + n(&c["rx_ring_full"])) * PER;
        assert!(n(&c["events"]) > 0, "queue {q} took its traffic: {report}");
        assert_eq!(
            n(&c["events"]) + dropped,
            sent,
            "queue {q}: sent = received + counted kernel drops: {report}"
        );
    }
    assert_eq!(report["engine_mode"], "inline", "{report}");
    common::assert_reconciled(&report);
    drop(lab);
    let _ = std::fs::remove_dir_all(dir);
}
