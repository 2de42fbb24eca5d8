//! The Debian package on this very machine: `cargo xtask deb` builds it, dpkg installs it, the
//! installed systemd unit passes `systemd-analyze verify`, and the installed binary runs the
//! installed config as the unit runs it (as the `eventstream` system user, in its state
//! directory, with `setpriv`): events in, `/metrics`, a clean stop with its report. Then the package is purged
//! (user and state directory gone). Root only, since it changes the machine's packages; it
//! skips with the missing tool named (fails under CI).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemon::{http, read_report, read_until, series};
use eventstream::wire::protocol::encode;

fn ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_package_installs_verifies_runs_and_purges() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip("installing a package needs root");
    }
    for (tool, probe) in [
        ("dpkg", &["dpkg", "--version"][..]),
        ("systemd-analyze", &["systemd-analyze", "--version"]),
        ("cargo-deb", &["cargo", "deb", "--version"]),
        ("setpriv", &["setpriv", "--version"]),
    ] {
        if !ok(probe[0], &probe[1..]) {
            return common::skip(&format!("{tool} is missing (cargo xtask test installs it)"));
        }
    }
    if ok("dpkg", &["-s", "eventstream"]) {
        return common::skip("an eventstream package is installed already; not replacing it");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let deb = run(Command::new("cargo")
        .current_dir(&root)
        .args(["xtask", "deb", "--no-install"])
        .stderr(Stdio::inherit()));
    let deb = deb.trim().lines().last().unwrap().to_owned();
    assert!(deb.ends_with(".deb"), "{deb}");

    let fields = run(Command::new("dpkg-deb").args(["-f", &deb]));
    for want in ["Package: eventstream", "Section: net", "Depends:"] {
        assert!(fields.contains(want), "{want} missing from\n{fields}");
    }
    run(Command::new("dpkg").args(["-i", &deb]));
    let purge = Purge;

    // What it installed, with the modes and owners the unit relies on.
    let listed = run(Command::new("dpkg").args(["-L", "eventstream"]));
    let unit = listed
        .lines()
        .find(|l| l.ends_with("/systemd/system/eventstream.service"))
        .unwrap_or_else(|| panic!("no unit in\n{listed}"))
        .to_owned();
    for path in [
        "/usr/bin/eventstream",
        "/etc/eventstream/eventstream.yaml",
        "/usr/share/eventstream/grafana-dashboard.json",
    ] {
        assert!(listed.lines().any(|l| l == path), "{path} not in\n{listed}");
    }
    assert!(ok("getent", &["passwd", "eventstream"]), "no system user");
    let stat = |p: &str| run(Command::new("stat").args(["-c", "%a %U %G", p]));
    assert_eq!(
        stat("/etc/eventstream/eventstream.yaml").trim(),
        "640 root eventstream"
    );
    assert_eq!(
        stat("/var/lib/eventstream").trim(),
        "750 eventstream eventstream"
    );
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "eventstream"]));
    assert!(
        conffiles.contains("/etc/eventstream/eventstream.yaml"),
        "the config is a conffile: {conffiles}"
    );

    // The unit, as systemd reads it.
    let verify = Command::new("systemd-analyze")
        .args(["verify", &unit])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !said.contains("eventstream.service"),
        "systemd-analyze verify {unit}: {}\n{said}",
        verify.status
    );
    let text = std::fs::read_to_string(&unit).unwrap();
    for key in [
        "User=eventstream",
        "AmbientCapabilities=",
        "CapabilityBoundingSet=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=eventstream",
        "LimitMEMLOCK=infinity",
        "ExecStart=/usr/bin/eventstream run --config /etc/eventstream/eventstream.yaml",
    ] {
        assert!(text.contains(key), "{key} missing from {unit}");
    }

    // The installed binary on the installed config, as the unit runs it.
    let version = run(Command::new("/usr/bin/eventstream").arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    // setpriv execs the daemon itself (no process in between to pass signals on).
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=eventstream",
            "--regid=eventstream",
            "--init-groups",
            "--",
        ])
        .args([
            "/usr/bin/eventstream",
            "run",
            "--config",
            "/etc/eventstream/eventstream.yaml",
        ])
        .current_dir("/var/lib/eventstream")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let udp = read_until(&mut out, "listening udp ");
    read_until(&mut out, "ready");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..100u64 {
        let mut d = Vec::new();
        encode(5, "installed.check", &i.to_be_bytes(), &mut d).unwrap();
        sock.send_to(&d, &udp).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let (code, m) = http("127.0.0.1:8090", "GET", "/metrics", "");
    assert_eq!(code, 200, "{m}");
    assert_eq!(
        series(&m, "eventstream_received_events_total{source=\"udp\"}"),
        100,
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "eventstream_build_info{{version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{m}"
    );
    // SAFETY: kill(2) on our own child.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let r = read_report(&mut out);
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    assert_eq!(n(&r["accepted_events"]), 100, "{r}");
    assert_eq!(
        n(&r["delivered_events"]) + n(&r["dlq"]["no_route"]),
        100,
        "every event delivered or in the DLQ: {r}"
    );
    drop(purge);
    assert!(
        !ok("getent", &["passwd", "eventstream"]),
        "purge left the user"
    );
    assert!(
        !Path::new("/var/lib/eventstream").exists(),
        "purge left the state"
    );
    assert!(!Path::new("/usr/bin/eventstream").exists());
}

/// Purges the package however the test ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "eventstream"])
            .output();
    }
}
