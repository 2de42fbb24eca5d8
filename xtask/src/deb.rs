//! `cargo xtask deb`: the Debian package (cargo-deb): the release binary with the XDP object
//! built in, `/etc/eventstream/eventstream.yaml`, the systemd unit (`config/systemd`) and the
//! maintainer scripts that make its system user (`config/debian`). Installs cargo-deb and the
//! eBPF toolchain when they are missing; prints the package's path.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The cargo-deb release this project builds with.
const CARGO_DEB: &str = "cargo-deb@3.8.0";

/// Arguments of `cargo xtask deb`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Install nothing; fail when cargo-deb or the eBPF toolchain is missing.
    #[arg(long)]
    pub no_install: bool,
}

fn have_cargo_deb() -> bool {
    Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs cargo-deb when it is missing (unless `install` is false).
pub fn ensure_cargo_deb(install: bool) -> Result<()> {
    if have_cargo_deb() {
        return Ok(());
    }
    if !install {
        bail!("cargo-deb is missing: cargo install {CARGO_DEB} --locked");
    }
    eprintln!("deb: installing {CARGO_DEB}");
    crate::run(Command::new("cargo").args(["+stable", "install", CARGO_DEB, "--locked"]))
}

/// Builds the package; returns its path.
pub fn build(root: &Path, args: &Args) -> Result<PathBuf> {
    ensure_cargo_deb(!args.no_install)?;
    // The binary embeds the XDP object: build.rs needs nightly's rust-src and bpf-linker.
    crate::ebpf::build(root, !args.no_install)?;
    let out = root.join("target/debian");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    crate::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["deb", "-p", "eventstream", "--locked", "--output"])
            .arg(&out),
    )?;
    let deb = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("cargo deb left no .deb in {}", out.display()))?;
    Ok(deb)
}
