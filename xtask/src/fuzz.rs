//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/`, each for a bounded time, installing
//! cargo-fuzz and nightly's pieces when missing.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Arguments of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only this target (repeatable); all of them by default.
    #[arg(long)]
    pub target: Vec<String>,
}

/// The targets `fuzz/Cargo.toml` declares, in its order.
fn targets(root: &Path) -> Result<Vec<String>> {
    let toml =
        std::fs::read_to_string(root.join("fuzz/Cargo.toml")).context("reading fuzz/Cargo.toml")?;
    let mut out = Vec::new();
    let mut in_bin = false;
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name = ") {
            out.push(v.trim_matches('"').to_owned());
        }
    }
    Ok(out)
}

pub fn main(root: &Path, args: &Args) -> Result<()> {
    let all = targets(root)?;
    let chosen: Vec<String> = if args.target.is_empty() {
        all.clone()
    } else {
        for t in &args.target {
            if !all.contains(t) {
                bail!("no fuzz target {t} (there are: {})", all.join(", "));
            }
        }
        args.target.clone()
    };
    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        crate::run(Command::new("cargo").args(["+stable", "install", "cargo-fuzz", "--locked"]))?;
    }
    crate::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    for t in &chosen {
        println!("fuzz: {t} for {} s", args.seconds);
        crate::run(
            Command::new("cargo")
                .current_dir(root.join("fuzz"))
                .args(["+nightly", "fuzz", "run", t, "--"])
                .arg(format!("-max_total_time={}", args.seconds))
                .arg("-rss_limit_mb=4096")
                .arg("-print_final_stats=1"),
        )
        .with_context(|| format!("fuzz target {t} found a failure (see fuzz/artifacts/{t}/)"))?;
    }
    println!(
        "fuzz: {} targets, {} s each, no failure",
        chosen.len(),
        args.seconds
    );
    Ok(())
}
