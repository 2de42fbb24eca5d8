//! The host scripts in `scripts/` against a veth pair in a network namespace this test makes
//! and deletes: `--dry-run` changes nothing and says what it would change, a real run changes
//! it and says so, a second run reports everything unchanged; bad arguments are clear errors.
//!
//! Needs root, iproute2 and ethtool; skips with a message where they are missing, except under
//! CI, where it fails instead. Hugepages are only checked in `--dry-run` and at their current
//! value, so the host's reservation is never changed.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(ns: &str, args: &[&str]) {
    let st = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "ip -n {ns} {args:?}");
}

fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .output()
        .unwrap()
}

fn script(ns: &str, name: &str, args: &[&str]) -> (bool, String) {
    let path = scripts().join(name);
    let mut all = vec![path.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = in_ns(ns, "bash", &all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn feature(ns: &str, iface: &str, name: &str) -> String {
    let out = in_ns(ns, "ethtool", &["-k", iface]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}: "))
                .map(|v| v[..v.find(' ').unwrap_or(v.len())].to_owned())
        })
        .unwrap_or_default()
}

fn rx_channels(ns: &str, iface: &str) -> String {
    let out = in_ns(ns, "ethtool", &["-l", iface]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let current = &text[text.find("Current").unwrap()..];
    current
        .lines()
        .find_map(|l| l.strip_prefix("RX:"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn host_scripts_dry_run_change_and_stay_idempotent() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip("host scripts test needs root");
    }
    for tool in ["ip", "ethtool"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return common::skip(&format!("{tool} is not installed"));
        }
    }
    let ns = Netns(format!("es-scripts-{}", std::process::id()));
    let st = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap();
    assert!(st.success());
    // Two RX queues on the veth so the channel count can move; GRO on so it can go off.
    ip(
        &ns.0,
        &[
            "link",
            "add",
            "sq0",
            "numrxqueues",
            "2",
            "numtxqueues",
            "2",
            "type",
            "veth",
            "peer",
            "name",
            "sq1",
            "numrxqueues",
            "2",
            "numtxqueues",
            "2",
        ],
    );
    ip(&ns.0, &["link", "set", "sq0", "up"]);
    let on = in_ns(&ns.0, "ethtool", &["-K", "sq0", "gro", "on"]);
    assert!(on.status.success());
    let on = in_ns(&ns.0, "ethtool", &["-L", "sq0", "rx", "2"]);
    assert!(
        on.status.success(),
        "{}",
        String::from_utf8_lossy(&on.stderr)
    );
    assert_eq!(feature(&ns.0, "sq0", "generic-receive-offload"), "on");

    // --dry-run: says what it would do, does nothing.
    let (ok, out) = script(
        &ns.0,
        "setup-host.sh",
        &["sq0", "--queues", "1", "--dry-run"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("would change  sq0 rx channels: 2 -> 1"),
        "{out}"
    );
    assert!(out.contains("would change  sq0 gro: on -> off"), "{out}");
    assert!(out.contains("no IRQs of its own"), "{out}");
    assert_eq!(feature(&ns.0, "sq0", "generic-receive-offload"), "on");
    assert_eq!(rx_channels(&ns.0, "sq0"), "2");

    // For real: changes and says so.
    let (ok, out) = script(&ns.0, "setup-host.sh", &["sq0", "--queues", "1"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("changed       sq0 rx channels: 2 -> 1"),
        "{out}"
    );
    assert!(out.contains("changed       sq0 gro: on -> off"), "{out}");
    assert_eq!(feature(&ns.0, "sq0", "generic-receive-offload"), "off");
    assert_eq!(rx_channels(&ns.0, "sq0"), "1");

    // Again: nothing left to change.
    let (ok, out) = script(&ns.0, "setup-host.sh", &["sq0", "--queues", "1"]);
    assert!(ok, "{out}");
    assert!(!out.lines().any(|l| l.starts_with("changed")), "{out}");
    assert!(out.contains("unchanged     sq0 rx channels = 1"), "{out}");

    // Hugepages: at the current value nothing changes; a dry run of another value says so.
    let cur = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .unwrap()
        .trim()
        .to_owned();
    let (ok, out) = script(&ns.0, "hugepages.sh", &[&cur]);
    assert!(
        ok && out.contains(&format!("unchanged     vm.nr_hugepages (2MiB) = {cur}")),
        "{out}"
    );
    let more = (cur.parse::<u64>().unwrap() + 1).to_string();
    let (ok, out) = script(&ns.0, "hugepages.sh", &[&more, "--dry-run"]);
    assert!(ok && out.contains("would change"), "{out}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
            .unwrap()
            .trim(),
        cur
    );

    // Bad input: clear errors, non-zero exit.
    for (name, args, want) in [
        ("set-queues.sh", &["sq0", "9"][..], "at most 2 rx channels"),
        ("set-queues.sh", &["sq0", "zero"][..], "positive integer"),
        ("offloads-off.sh", &["nosuch0"][..], "no interface nosuch0"),
        (
            "hugepages.sh",
            &["1", "--node", "x"][..],
            "--node must be a node number",
        ),
        ("setup-host.sh", &[][..], "usage:"),
    ] {
        let (ok, out) = script(&ns.0, name, args);
        assert!(!ok && out.contains(want), "{name} {args:?}: {out}");
    }
}
