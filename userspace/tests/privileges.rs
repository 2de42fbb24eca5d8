//! After setup, every thread of the daemon (receive, sink I/O, TCP connections, and the main
//! thread, which is the housekeeping thread serving admin HTTP and TCP accepts) holds no
//! capability on the kernel path and has `no_new_privs`, read from `/proc/PID/task/*/status`.
//!
//! Needs root (otherwise there is nothing to drop); skips saying so, fails under CI.

mod common;
use common::daemon::{read_until, start, stop};

/// `(thread name, CapEff, CapPrm, NoNewPrivs)` for every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, u64, u64, u8)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        out.push((
            field("Name:"),
            u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
            u64::from_str_radix(&field("CapPrm:"), 16).unwrap(),
            field("NoNewPrivs:").parse().unwrap(),
        ));
    }
    out
}

#[test]
fn every_thread_runs_without_capabilities_and_with_no_new_privs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip("needs root: an unprivileged daemon has nothing to drop");
    }
    let root = std::env::temp_dir().join(format!("es-privs-{}", std::process::id()));
    let config = format!(
        "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n    sockets: 2\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: \"127.0.0.1:0\"\nsinks:\n  kind: file\n  dir: \"{}\"\n  dlq_dir: \"{}\"\n",
        root.join("log").display(),
        root.join("dlq").display()
    );
    let (child, mut out, _addr, dir) = start(&config, "privs");
    read_until(&mut out, "ready");
    // A thread names itself once it runs: read until every one has (bounded).
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let seen = loop {
        let seen = threads(child.id());
        if seen.iter().any(|t| t.0.starts_with("log-writer"))
            && seen.iter().any(|t| t.0.starts_with("ingest-udp"))
            || std::time::Instant::now() > until
        {
            break seen;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(
        seen.iter().any(|t| t.0.starts_with("log-writer"))
            && seen.iter().any(|t| t.0.starts_with("ingest-udp"))
            && seen.iter().any(|t| t.0 == "eventstream"),
        "the sink, receive and main (housekeeping) threads are among those checked: {seen:?}"
    );
    for (name, eff, prm, nnp) in &seen {
        assert_eq!(
            (*eff, *prm),
            (0, 0),
            "thread {name} kept capabilities: {seen:?}"
        );
        assert_eq!(*nnp, 1, "thread {name} lacks no_new_privs: {seen:?}");
    }
    let _ = stop(child, out);
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn privileges_user_switches_every_thread_to_that_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip("needs root: only root can switch to another user");
    }
    let Ok((uid, gid)) = eventstream::ops::privs::lookup_user("nobody") else {
        return common::skip("no user `nobody` on this machine");
    };
    let config = "ingest:\n  udp:\n    bind: \"127.0.0.1:0\"\n  tcp:\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: \"127.0.0.1:0\"\nprivileges:\n  user: nobody\n";
    let (child, mut out, _addr, dir) = start(config, "privs-user");
    read_until(&mut out, "ready");
    let pid = child.id();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        let ids = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .split_whitespace()
                .map(|v| v.parse::<u32>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("Uid:"), vec![uid; 4], "{status}");
        assert_eq!(ids("Gid:"), vec![gid; 4], "{status}");
        assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    }
    let _ = stop(child, out);
    let _ = std::fs::remove_dir_all(dir);
}
