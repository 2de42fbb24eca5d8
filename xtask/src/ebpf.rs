//! Building the XDP object.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use eventstream_common::{DROP_PROGRAM_NAME, PROGRAM_NAME, STATS_MAP};
use object::{Object, ObjectSection, ObjectSymbol};

use crate::run;

/// The last bpf-linker release that loads nightly's own LLVM (newer ones want a system LLVM 23).
const BPF_LINKER_VERSION: &str = "0.10.4";

/// Builds the eBPF crate and copies the object to `target/ebpf/eventstream.bpf.o`.
pub fn build(root: &Path, install: bool) -> Result<PathBuf> {
    ensure_toolchain(install)?;
    let crate_dir = root.join("ebpf/eventstream-ebpf");
    // The crate's rust-toolchain.toml selects nightly; clear what an outer `cargo +stable`
    // may have set so it takes effect.
    // The flags aya-build gives the same crate when userspace's build.rs embeds it, so this
    // object and the embedded one are the same program (same kernel tag): a program pinned
    // from this file is recognised as ours by a daemon running the embedded one.
    let arch = std::env::consts::ARCH;
    let flags = format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf");
    run(Command::new("cargo")
        .current_dir(&crate_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .args(["build", "--release"]))?;
    let built = crate_dir.join("target/bpfel-unknown-none/release/eventstream-ebpf");
    let out_dir = root.join("target/ebpf");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("eventstream.bpf.o");
    std::fs::copy(&built, &out).with_context(|| format!("copying {}", built.display()))?;
    verify(&out)?;
    Ok(out)
}

/// Installs nightly's rust-src and bpf-linker when missing (or says what is missing).
fn ensure_toolchain(install: bool) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup (the eBPF build needs a rustup-managed nightly)")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        if !install {
            bail!("nightly rust-src is missing: rustup component add rust-src --toolchain nightly");
        }
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_linker {
        let spec = format!("bpf-linker@{BPF_LINKER_VERSION}");
        if !install {
            bail!("bpf-linker is missing: cargo +stable install {spec} --locked");
        }
        run(Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["+stable", "install", &spec, "--locked"]))?;
    }
    Ok(())
}

/// Checks the object holds the XDP program and the maps userspace looks up by name.
fn verify(path: &Path) -> Result<()> {
    let data = std::fs::read(path)?;
    let file =
        object::File::parse(&*data).with_context(|| format!("parsing {}", path.display()))?;
    if file.architecture() != object::Architecture::Bpf {
        bail!(
            "{} is not a BPF object ({:?})",
            path.display(),
            file.architecture()
        );
    }
    let has_section = |name: &str| file.sections().any(|s| s.name() == Ok(name));
    let has_symbol = |name: &str| file.symbols().any(|s| s.name() == Ok(name));
    for (what, ok) in [
        ("section xdp", has_section("xdp")),
        ("section license", has_section("license")),
        ("program symbol", has_symbol(PROGRAM_NAME)),
        ("drop program symbol", has_symbol(DROP_PROGRAM_NAME)),
        ("STATS map symbol", has_symbol(STATS_MAP)),
    ] {
        if !ok {
            bail!("{}: {what} missing", path.display());
        }
    }
    Ok(())
}
