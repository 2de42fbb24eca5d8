//! `cargo xtask load | unload | status`: the XDP program on an interface, pinned under bpffs so
//! it outlives the command, and what is attached where.

use std::path::Path;

use anyhow::{Context, Result, bail};
use eventstream::xdp::{ObjectSource, Pinned, XdpProgram, ensure_bpffs, pin_dir};
use eventstream_common::{AttachMode, DEFAULT_UDP_PORT, XdpConfig};

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Interface to attach to.
    #[arg(long)]
    iface: String,
    /// `drv` (native), `skb` (generic), or `auto` (native, then generic).
    #[arg(long, default_value = "auto")]
    mode: String,
    /// UDP port to steer into AF_XDP sockets.
    #[arg(long, default_value_t = DEFAULT_UDP_PORT)]
    port: u16,
    /// Do not steer VLAN-tagged frames.
    #[arg(long)]
    no_vlan: bool,
    /// The object (default: build it first).
    #[arg(long)]
    object: Option<std::path::PathBuf>,
}

pub fn load(root: &Path, a: &LoadArgs) -> Result<()> {
    let modes: &[AttachMode] = match a.mode.as_str() {
        "auto" => &[AttachMode::Driver, AttachMode::Skb],
        "drv" => &[AttachMode::Driver],
        "skb" => &[AttachMode::Skb],
        other => bail!("--mode {other}: expected drv, skb or auto"),
    };
    if a.port == 0 {
        bail!("--port 0: expected 1..=65535");
    }
    if Pinned::list().contains(&a.iface) {
        bail!(
            "a program is already pinned for {}: `cargo xtask unload --iface {0}` first",
            a.iface
        );
    }
    let object = match &a.object {
        Some(p) => p.clone(),
        None => crate::ebpf::build(root, true)?,
    };
    let mode = attach_and_pin(&object, &a.iface, modes, a.port, !a.no_vlan)?;
    println!(
        "attached to {} in {} mode, steering UDP port {}; pinned under {}",
        a.iface,
        mode.label(),
        a.port,
        pin_dir(&a.iface).display()
    );
    Ok(())
}

/// Loads `object`, attaches it to `iface` in the first of `modes` the driver takes, configures
/// it and pins it under [`pin_dir`]; returns the mode.
pub fn attach_and_pin(
    object: &Path,
    iface: &str,
    modes: &[AttachMode],
    port: u16,
    vlan: bool,
) -> Result<AttachMode> {
    ensure_bpffs()?;
    let object =
        std::path::absolute(object).with_context(|| format!("resolving {}", object.display()))?;
    let mut prog = XdpProgram::load(ObjectSource::File(&object))?;
    let mut attached = None;
    for &mode in modes {
        match prog.attach(iface, mode) {
            Ok(link) => {
                attached = Some((link, mode));
                break;
            }
            Err(e) if e.is_permission() => return Err(e.into()),
            Err(e) => eprintln!("{} mode refused on {iface}: {e}", mode.label()),
        }
    }
    let Some((link, mode)) = attached else {
        bail!("could not attach to {iface} in any allowed mode")
    };
    prog.configure(XdpConfig {
        udp_port: port,
        allow_vlan: u8::from(vlan),
        attach_mode: mode as u8,
        ..XdpConfig::default()
    })?;
    prog.pin(iface, link)
        .with_context(|| format!("pinning under {}", pin_dir(iface).display()))?;
    Ok(mode)
}

pub fn unload(iface: &str) -> Result<()> {
    if Pinned::remove(iface)? {
        println!(
            "detached from {iface} and removed {}",
            pin_dir(iface).display()
        );
    } else {
        println!("nothing pinned for {iface}");
    }
    Ok(())
}

pub fn status() -> Result<()> {
    print!("{}", eventstream::xdp::status_text());
    Ok(())
}
