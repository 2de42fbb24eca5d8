//! `cargo xtask`: developer and operator tasks that are not the daemon itself.
//!
//! - `build-ebpf`: builds the XDP program for `bpfel-unknown-none` (installing nightly's rust-src
//!   and bpf-linker when they are missing) and checks the object has the program and maps the
//!   daemon expects.
//! - `microbench`: runs the criterion benches N times and writes the side-by-side table
//!   (PERF.md): JSON, Markdown, and optionally the README's performance section.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod ebpf;
mod microbench;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "EventStreamCore developer and operator tasks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the XDP program (release) and print the object's path.
    BuildEbpf {
        /// Do not install missing toolchain pieces; fail instead.
        #[arg(long)]
        no_install: bool,
    },
    /// Run the criterion benches several times; write JSON and a Markdown table of ratios.
    Microbench(microbench::Args),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf { no_install } => {
            let obj = ebpf::build(&workspace_root(), !no_install)?;
            println!("{}", obj.display());
            Ok(())
        }
        Cmd::Microbench(args) => microbench::main(&workspace_root(), &args),
    }
}

/// The workspace root (this crate's parent directory).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs `cmd`, failing with its command line when it exits non-zero.
fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {line}"))?;
    if !status.success() {
        bail!("{line} failed: {status}");
    }
    Ok(())
}
