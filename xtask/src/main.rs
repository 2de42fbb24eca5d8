//! `cargo xtask`: developer and operator tasks that are not the daemon itself.
//!
//! - `build-ebpf`: builds the XDP program for `bpfel-unknown-none` (installing nightly's rust-src
//!   and bpf-linker when they are missing) and checks the object has the program and maps the
//!   daemon expects.
//! - `load | unload | status`: the XDP program on an interface, pinned under bpffs.
//! - `lab up | down`: the netns + veth lab.
//! - `demo`: the README's first command: the appliance end to end in the lab.
//! - `bench`: the ingest lab bench (`xdp_drop`, `xsk`, `recvmmsg`, latency), JSON + Markdown.
//! - `deb`: the Debian package (binary, config, systemd unit, system user), with cargo-deb.
//! - `microbench`: runs the criterion benches N times and writes the side-by-side table
//!   (PERF.md): JSON, Markdown, and optionally the README's performance section.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod appliance;
mod bench;
mod deb;
mod demo;
mod ebpf;
mod fuzz;
mod microbench;
mod test;
mod xdp;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "EventStreamCore developer and operator tasks"
)]
struct Cli {
    /// Run in this network namespace (as made by `ip netns add` or `lab up`). Unlike
    /// `ip netns exec`, this keeps the host's /sys/fs/bpf, so pins outlive the command.
    #[arg(long, global = true)]
    netns: Option<String>,
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
    /// Build everything and run the appliance end to end in the lab: blast, reconcile, tear down.
    Demo(demo::Args),
    /// The ingest lab bench: XDP_DROP ceiling, AF_XDP and recvmmsg paths, latency (PERF.md).
    Bench(bench::Args),
    /// Run the criterion benches several times; write JSON and a Markdown table of ratios.
    Microbench(microbench::Args),
    /// Build the Debian package (cargo-deb) and print its path.
    Deb(deb::Args),
    /// Run every fuzz target for a bounded time (cargo-fuzz, nightly).
    Fuzz(fuzz::Args),
    /// The whole test suite, installing what its privileged tests need first (as root).
    Test(test::Args),
    /// Attach the XDP program to an interface and pin it under /sys/fs/bpf/eventstream/IF.
    Load(xdp::LoadArgs),
    /// Detach the pinned program from an interface and remove its pins.
    Unload {
        /// Interface.
        #[arg(long)]
        iface: String,
    },
    /// Show what is attached where, in which mode, with the verdict counters.
    Status,
    /// The netns + veth lab: `up` makes it, `down` removes it.
    Lab {
        /// `up` or `down`.
        action: String,
        /// Name prefix of the two namespaces (`<name>-tx`, `<name>-rx`).
        #[arg(long, default_value = "eslab")]
        name: String,
        /// RX and TX queues of each veth end (`up`).
        #[arg(long, default_value_t = 1)]
        queues: u32,
    },
}

/// Runs the command; an error is printed as its chain of causes and exits 1 (no backtrace,
/// whatever `RUST_BACKTRACE` says).
fn main() -> std::process::ExitCode {
    match xtask_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn xtask_main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(ns) = &cli.netns {
        eventstream::tools::lab::enter_netns(ns)?;
    }
    match cli.cmd {
        Cmd::BuildEbpf { no_install } => {
            let obj = ebpf::build(&workspace_root(), !no_install)?;
            println!("{}", obj.display());
            Ok(())
        }
        Cmd::Demo(args) => demo::main(&workspace_root(), &args),
        Cmd::Bench(args) => bench::main(&workspace_root(), &args),
        Cmd::Microbench(args) => microbench::main(&workspace_root(), &args),
        Cmd::Fuzz(args) => fuzz::main(&workspace_root(), &args),
        Cmd::Deb(args) => {
            let deb = deb::build(&workspace_root(), &args)?;
            println!("{}", deb.display());
            Ok(())
        }
        Cmd::Test(args) => test::main(&workspace_root(), &args),
        Cmd::Load(args) => xdp::load(&workspace_root(), &args),
        Cmd::Unload { iface } => xdp::unload(&iface),
        Cmd::Status => xdp::status(),
        Cmd::Lab {
            action,
            name,
            queues,
        } => lab(&action, &name, queues),
    }
}

fn lab(action: &str, name: &str, queues: u32) -> Result<()> {
    use eventstream::tools::lab::{Lab, RX_ADDR, RX_IF, TX_ADDR, TX_IF};
    match action {
        "up" => {
            let lab = Lab::up_with_queues(name, queues)?;
            println!(
                "lab up: netns {} ({TX_IF} {TX_ADDR}) <-> netns {} ({RX_IF} {RX_ADDR})",
                lab.tx_ns, lab.rx_ns
            );
            lab.keep();
            Ok(())
        }
        "down" => {
            if Lab::down(name) {
                println!("lab {name} removed");
            } else {
                println!("no lab {name}");
            }
            Ok(())
        }
        other => bail!("lab {other}: expected up or down"),
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
