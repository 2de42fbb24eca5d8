//! The netns + veth lab: two network namespaces joined by a veth pair, addresses from the
//! benchmarking range 198.18.0.0/15, fixed MACs and static neighbours (no ARP in the way).
//!
//! ```text
//!   netns <name>-tx                         netns <name>-rx
//!   es-tx 198.18.0.1/30  ◄──── veth ────►  es-rx 198.18.0.2/30   (XDP + AF_XDP here)
//!   02:00:c6:12:00:01                       02:00:c6:12:00:02
//! ```
//!
//! All traffic stays inside these namespaces. [`Lab`] deletes both namespaces when dropped
//! (deleting a namespace deletes its end of the veth pair, and with it the other end), so a test
//! that fails half-way still leaves nothing behind. [`in_netns`] runs a closure on a thread that
//! has entered a namespace: sockets, interface lookups, XDP attach and AF_XDP binds made there
//! belong to it.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

/// Sender-side interface.
pub const TX_IF: &str = "es-tx";
/// Receiver-side interface (where the appliance runs).
pub const RX_IF: &str = "es-rx";
/// Sender address.
pub const TX_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Receiver address.
pub const RX_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Sender MAC.
pub const TX_MAC: [u8; 6] = [0x02, 0x00, 0xc6, 0x12, 0x00, 0x01];
/// Receiver MAC.
pub const RX_MAC: [u8; 6] = [0x02, 0x00, 0xc6, 0x12, 0x00, 0x02];

/// Errors building the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// `ip` is not installed.
    #[error("`ip` (iproute2) not found: install iproute2")]
    NoIp,
    /// A command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// Not allowed to make namespaces.
    #[error("creating network namespaces needs root (CAP_SYS_ADMIN): {0}")]
    NotPermitted(String),
    /// Entering a namespace failed.
    #[error("entering netns {name}: {reason}")]
    Setns {
        /// The namespace.
        name: String,
        /// The kernel's reason.
        reason: io::Error,
    },
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            LabError::NoIp
        } else {
            LabError::Command {
                cmd: format!("ip {}", args.join(" ")),
                stderr: e.to_string(),
            }
        }
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        return Err(LabError::NotPermitted(stderr));
    }
    Err(LabError::Command {
        cmd: format!("ip {}", args.join(" ")),
        stderr,
    })
}

/// A running lab; both namespaces are deleted on drop.
#[derive(Debug)]
pub struct Lab {
    /// Sender namespace.
    pub tx_ns: String,
    /// Receiver namespace.
    pub rx_ns: String,
    keep: bool,
}

impl Lab {
    /// Creates `<name>-tx` and `<name>-rx` joined by veth (removing leftovers of the same name
    /// first, so `up` is idempotent).
    ///
    /// # Errors
    /// [`LabError::NotPermitted`] without root, [`LabError::NoIp`] without iproute2, or the
    /// failing command.
    pub fn up(name: &str) -> Result<Self, LabError> {
        Self::up_with_queues(name, 1)
    }

    /// As [`Lab::up`], with `queues` RX and TX queues on each end of the veth pair: the veth
    /// hands a frame sent on TX queue `q` to the peer's RX queue `q`, so a sender picks the
    /// receiving queue by its own (an AF_XDP TX socket's queue id, or live frames'
    /// `rx_queue_index`).
    ///
    /// # Errors
    /// As [`Lab::up`].
    pub fn up_with_queues(name: &str, queues: u32) -> Result<Self, LabError> {
        let lab = Self {
            tx_ns: format!("{name}-tx"),
            rx_ns: format!("{name}-rx"),
            keep: false,
        };
        lab.remove();
        ip(&["netns", "add", &lab.tx_ns])?;
        ip(&["netns", "add", &lab.rx_ns])?;
        // From here on, dropping `lab` cleans up whatever was made.
        let q = queues.max(1).to_string();
        ip(&[
            "-n",
            &lab.tx_ns,
            "link",
            "add",
            TX_IF,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            RX_IF,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            &lab.rx_ns,
        ])?;
        for (ns, dev, addr, m, peer, peer_mac) in [
            (&lab.tx_ns, TX_IF, TX_ADDR, TX_MAC, RX_ADDR, RX_MAC),
            (&lab.rx_ns, RX_IF, RX_ADDR, RX_MAC, TX_ADDR, TX_MAC),
        ] {
            ip(&["-n", ns, "link", "set", dev, "address", &mac(m)])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &peer.to_string(),
                "lladdr",
                &mac(peer_mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        Ok(lab)
    }

    /// Keeps the namespaces after drop (`cargo xtask lab up`).
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// Deletes the namespaces of a lab called `name`; `true` if any existed.
    pub fn down(name: &str) -> bool {
        Self {
            tx_ns: format!("{name}-tx"),
            rx_ns: format!("{name}-rx"),
            keep: true,
        }
        .remove()
    }

    /// Removes the namespaces, and first the XDP pins made for their interfaces (pins are
    /// keyed by the namespace's inode, which the kernel may give a later namespace).
    fn remove(&self) -> bool {
        let mut any = false;
        for ns in [&self.tx_ns, &self.rx_ns] {
            if Self::exists(ns) {
                let _ = in_netns(ns, || {
                    for iface in crate::xdp::Pinned::list() {
                        let _ = crate::xdp::Pinned::remove(&iface);
                    }
                });
            }
            any |= ip(&["netns", "del", ns]).is_ok();
        }
        any
    }

    /// Whether a namespace of this name exists.
    pub fn exists(ns: &str) -> bool {
        std::path::Path::new("/run/netns").join(ns).exists()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            self.remove();
        }
    }
}

/// Moves the calling thread (and the threads it starts afterwards) into network namespace `ns`.
///
/// Unlike `ip netns exec`, this leaves the mount namespace alone, so `/sys/fs/bpf` is still the
/// host's bpffs and pins made here outlive the process.
///
/// # Errors
/// [`LabError::Setns`] when the namespace does not exist or cannot be entered.
pub fn enter_netns(ns: &str) -> Result<(), LabError> {
    let path = std::path::Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).map_err(|reason| LabError::Setns {
        name: ns.into(),
        reason,
    })?;
    // SAFETY: setns(2) on a valid namespace fd changes only the calling thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(LabError::Setns {
            name: ns.into(),
            reason: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs `f` on a new thread inside network namespace `ns` and returns its result.
///
/// # Errors
/// [`LabError::Setns`] when the namespace cannot be entered.
///
/// # Panics
/// If `f` panics (the panic is propagated).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    let path = std::path::Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).map_err(|reason| LabError::Setns {
        name: ns.into(),
        reason,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a valid namespace fd affects only this thread, which is ours
            // and ends when `f` returns.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(LabError::Setns {
                    name: ns.into(),
                    reason: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
