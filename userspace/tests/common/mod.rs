//! Helpers shared by the privileged integration tests.
#![allow(dead_code)] // each test binary uses its own subset

pub mod counting;
pub mod daemon;
pub mod fake_xsk;

use std::path::PathBuf;

/// Whether we run under CI, where a privileged test must run, never skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Skips the calling test with `why` on a developer machine; fails it under CI.
#[track_caller]
pub fn skip(why: &str) {
    assert!(!in_ci(), "CI must be able to run this test, but: {why}");
    eprintln!("SKIPPED: {why}");
}

/// The XDP object `cargo xtask build-ebpf` writes (or `EVENTSTREAM_BPF_OBJECT`).
pub fn bpf_object() -> Option<PathBuf> {
    let p = std::env::var_os("EVENTSTREAM_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(eventstream::xdp::DEFAULT_OBJECT)
        });
    p.exists().then_some(p)
}

/// A lab of `queues` RX queues called `name` (with the test's pid), or `None` after saying why
/// it cannot be had here: not root, no `ip`, no privilege (a skip, or a failure under CI).
pub fn lab_or_skip(name: &str, queues: u32, what: &str) -> Option<eventstream::tools::lab::Lab> {
    use eventstream::tools::lab::{Lab, LabError};
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(&format!("{what} needs root"));
        return None;
    }
    match Lab::up_with_queues(&format!("{name}{}", std::process::id() % 100_000), queues) {
        Ok(l) => Some(l),
        Err(e @ (LabError::NotPermitted(_) | LabError::NoIp)) => {
            skip(&e.to_string());
            None
        }
        Err(e) => panic!("lab: {e}"),
    }
}

/// UDP from 198.18.0.1:40000 to 198.18.0.2:8082 over IPv4, the fixtures' and fake kernel's frame.
pub fn udp_v4() -> eventstream::wire::packet::UdpSpec {
    eventstream::wire::packet::UdpSpec {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        vlan: None,
        src: std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 1)),
        dst: std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 2)),
        src_port: 40_000,
        dst_port: eventstream_common::DEFAULT_UDP_PORT,
    }
}

/// Asserts the exit report's books balance: accepted = delivered + DLQ (by every reason) +
/// duplicates + failed (by every reason). In inline mode a burst that fills a receive ring past
/// the control plane's watermarks sheds low-priority events to the DLQ by design, so a test that
/// blasts cannot expect every accepted event delivered, only every one accounted.
#[track_caller]
pub fn assert_reconciled(report: &serde_json::Value) {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("a count: {report}"));
    let sum = |v: &serde_json::Value| v.as_object().map_or(0, |m| m.values().map(n).sum::<u64>());
    assert_eq!(
        n(&report["accepted_events"]),
        n(&report["delivered_events"])
            + sum(&report["dlq"])
            + n(&report["duplicates"])
            + sum(&report["failed"]),
        "accepted = delivered + DLQ + duplicates + failed: {report}"
    );
}

/// (name, CPUs it may run on) for every thread of process `pid`.
pub fn threads(pid: u32) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let name = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .and_then(|l| eventstream::mem::numa::parse_cpu_list(l.trim()))
            .unwrap_or_default();
        out.push((name.trim().to_owned(), cpus));
    }
    out
}

/// Rules sending topics that match `pattern` to the realtime class (default control
/// thresholds), for tests of an inline engine where only the hand-off matters.
pub fn realtime_rules(pattern: &str) -> eventstream::engine::rules::LiveRules {
    use eventstream::engine::{Target, WorkerClass, dedup::KeyFrom};
    let mut router = eventstream::engine::route::Router::new();
    router
        .add(
            pattern,
            Target {
                class: WorkerClass::Realtime,
                key: KeyFrom::TopicAndPayload,
            },
        )
        .unwrap();
    eventstream::engine::rules::LiveRules::new(eventstream::engine::rules::Rules {
        router,
        control: eventstream::engine::control::ControlConfig::default(),
    })
}

/// Every worker class on a realtime step into a memory sink.
pub fn realtime_steps<'s>() -> [eventstream::engine::ClassStep<'s>; 3] {
    std::array::from_fn(|_| {
        eventstream::engine::ClassStep::new(
            eventstream::engine::WorkerKind::Realtime {
                from: eventstream::engine::latency::LatencyFrom::Ingest,
            },
            Box::new(eventstream::sink::MemorySink::new(1024, 1 << 16)),
        )
    })
}
