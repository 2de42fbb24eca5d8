//! Pins that no longer steer their interface are never trusted: after the interface a program
//! was pinned for (a veth inside a lab namespace) is deleted and made again (same name, same namespace, a new device), the
//! pins are reported stale, and the daemon removes them and attaches its own program.
//!
//! Needs root and iproute2; skips naming what is missing, fails under CI.

mod common;

use std::process::{Command, Stdio};

use eventstream::tools::lab::{self, Lab, LabError};
use eventstream::xdp::{ObjectSource, Pinned, XdpProgram, ensure_bpffs};
use eventstream_common::AttachMode;

const IF: &str = "esstale0";
const PEER: &str = "esstale1";

fn ip(ns: &str, args: &[&str]) {
    let s = Command::new("ip")
        .args(["netns", "exec", ns, "ip"])
        .args(args)
        .status()
        .unwrap();
    assert!(s.success(), "ip {args:?}");
}

#[test]
fn stale_pins_are_detected_removed_and_replaced() {
    let name = format!("est{}", std::process::id() % 100_000);
    let lab = match Lab::up(&name) {
        Ok(l) => l,
        Err(e @ (LabError::NotPermitted(_) | LabError::NoIp)) => {
            return common::skip(&e.to_string());
        }
        Err(e) => panic!("{e}"),
    };
    let ns = lab.rx_ns.clone();
    let make_if = || {
        ip(
            &ns,
            &["link", "add", IF, "type", "veth", "peer", "name", PEER],
        );
        ip(&ns, &["link", "set", IF, "up"]);
        ip(&ns, &["link", "set", PEER, "up"]);
    };
    make_if();
    // Pin a program for the dummy interface, as `cargo xtask load` does.
    lab::in_netns(&ns, || {
        ensure_bpffs().unwrap();
        let _ = Pinned::remove(IF);
        let mut prog = XdpProgram::load(ObjectSource::Embedded).unwrap();
        let link = prog.attach(IF, AttachMode::Skb).unwrap();
        prog.pin(IF, link).unwrap();
        let p = Pinned::open(IF).unwrap();
        assert!(
            p.attached && p.stale.is_none(),
            "fresh pins steer their interface"
        );
        assert_eq!(
            p.foreign(&prog),
            None,
            "and are this program (name and tag)"
        );
        let mut other = Pinned::open(IF).unwrap();
        other.program_name = "xdp_dispatcher".into();
        assert!(other.foreign(&prog).unwrap().contains("xdp_dispatcher"));
        let mut rebuilt = Pinned::open(IF).unwrap();
        rebuilt.program_tag ^= 1;
        assert!(rebuilt.foreign(&prog).unwrap().contains("another build"));
    })
    .unwrap();
    // `eventstream status`, from the host's namespace, finds them in the lab's.
    let status = || {
        let o = Command::new(env!("CARGO_BIN_EXE_eventstream"))
            .arg("status")
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout).unwrap()
    };
    let s = status();
    assert!(
        s.contains(&format!("{IF} in netns {ns}: attached; "))
            && s.contains("program eventstream_xdp tag"),
        "{s}"
    );
    // The interface goes away and comes back: the pinned link steers nothing now.
    ip(&ns, &["link", "del", IF]);
    make_if();
    let stale = lab::in_netns(&ns, || Pinned::open(IF).unwrap().stale).unwrap();
    assert!(stale.is_some(), "the pins are reported stale");
    let s = status();
    assert!(
        s.contains(&format!("{IF} in netns {ns}: STALE, not trusted")),
        "{s}"
    );

    // The daemon does not reuse them: it removes them and attaches its own program.
    let cfg = std::env::temp_dir().join(format!("es-stale-{}.yaml", std::process::id()));
    std::fs::write(
        &cfg,
        "xdp:\n  attach: skb\ningest:\n  udp:\n    bind: \"0.0.0.0:0\"\n  tcp:\n    bind: null\nadmin:\n  bind: null\n",
    )
    .unwrap();
    let out = common::daemon::command()
        .args(["run", "--netns", &ns, "--iface", IF, "--duration", "1"])
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("removing stale XDP pins"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["source"], "xsk", "{report}");
    let left = lab::in_netns(&ns, Pinned::list).unwrap();
    assert!(
        !left.contains(&IF.to_owned()),
        "the stale pins are gone: {left:?}"
    );
    let _ = std::fs::remove_file(cfg);
    // Pins made in a lab go with it: none is left for a later namespace to inherit.
    let suffix = lab::in_netns(&ns, || {
        let mut prog = XdpProgram::load(ObjectSource::Embedded).unwrap();
        let link = prog.attach(IF, AttachMode::Skb).unwrap();
        prog.pin(IF, link).unwrap();
        eventstream::xdp::pin_dir(IF)
    })
    .unwrap();
    assert!(suffix.exists());
    drop(lab);
    assert!(!suffix.exists(), "{} outlived its lab", suffix.display());
}
