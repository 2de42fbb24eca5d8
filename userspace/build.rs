//! Builds the XDP program (`ebpf/eventstream-ebpf`) for the BPF target and leaves the object in
//! `OUT_DIR`, where `xdp::EMBEDDED` includes it into the binary (feature `embed-xdp`, on by
//! default), as aya-template does with aya-build.
//!
//! The eBPF crate is not a member of this workspace (it has its own lock file and toolchain
//! file, and a host build of it cannot link), so aya-build, which builds `--package NAME` in the
//! current directory's workspace, is run from that crate's own directory.

fn main() {
    commit();
    #[cfg(feature = "embed-xdp")]
    embed::build();
}

/// `EVENTSTREAM_COMMIT`: the checkout's commit, for `eventstream_build_info` (`unknown` outside
/// a git checkout). Rerun when the checkout's HEAD or branches move; uncommitted edits are
/// not tracked.
fn commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) if !c.is_empty() => c,
        _ => "unknown".to_owned(),
    };
    println!("cargo:rustc-env=EVENTSTREAM_COMMIT={commit}");
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for f in ["HEAD", "refs/heads", "packed-refs"] {
            println!("cargo:rerun-if-changed={dir}/{f}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}

#[cfg(feature = "embed-xdp")]
mod embed {
    use std::path::{Path, PathBuf};

    const CRATE: &str = "eventstream-ebpf";

    pub fn build() {
        let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
        let ebpf = manifest.join("../ebpf/eventstream-ebpf");
        // What the object is built from; cargo reruns this script only when one changes.
        for input in [
            "../ebpf/eventstream-ebpf/src",
            "../ebpf/eventstream-ebpf/Cargo.toml",
            "../ebpf/eventstream-ebpf/Cargo.lock",
            "../ebpf/eventstream-ebpf/rust-toolchain.toml",
            "../ebpf/eventstream-common/src",
            "../ebpf/eventstream-common/Cargo.toml",
        ] {
            println!("cargo:rerun-if-changed={input}");
        }
        // The nested cargo must not inherit an outer wrapper (cargo miri's, say): it builds for
        // the BPF target with nightly, whatever toolchain runs this script.
        // SAFETY: a build script is single-threaded here; nothing reads the environment
        // concurrently.
        unsafe { std::env::remove_var("RUSTC_WRAPPER") };
        if let Err(e) = std::env::set_current_dir(&ebpf) {
            panic!("{}: {e}", ebpf.display());
        }
        let built = aya_build::build_ebpf(
            [aya_build::Package {
                name: CRATE,
                root_dir: "../ebpf/eventstream-ebpf/src",
                ..Default::default()
            }],
            aya_build::Toolchain::Nightly,
        );
        if let Err(e) = built {
            panic!(
                "building the XDP object failed: {e:#}\n\
                 It needs nightly's rust-src and bpf-linker 0.10.4: `cargo xtask build-ebpf` \
                 installs both. To build without the embedded object instead: \
                 --no-default-features --features hwloc (then set xdp.object)."
            );
        }
        let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join(CRATE);
        // AYA_BUILD_SKIP=1 builds nothing: an empty object, which the binary reports as absent.
        if !Path::new(&out).exists() {
            std::fs::write(&out, b"").expect("writing an empty object to OUT_DIR");
        }
    }
}
