//! Types and constants shared by the XDP program (`eventstream-ebpf`) and the daemon.
//!
//! Everything here is `#[repr(C)]` and plain data, because the same bytes are read by BPF code
//! in the kernel and by userspace through BPF maps. The `user` feature adds `aya::Pod` impls for
//! the host side; the eBPF build never enables it.
#![no_std]

/// Name of the `XskMap` that maps `rx_queue_index` to an AF_XDP socket.
pub const XSKS_MAP: &str = "XSKS";
/// Name of the one-entry array holding [`XdpConfig`].
pub const CONFIG_MAP: &str = "CONFIG";
/// Name of the per-CPU array of verdict counters, indexed by [`Verdict`].
pub const STATS_MAP: &str = "STATS";
/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "eventstream_xdp";
/// Name of the drop-everything program the lab bench measures the XDP_DROP ceiling with.
pub const DROP_PROGRAM_NAME: &str = "eventstream_drop";

/// Maximum number of RX queues the `XskMap` can address.
pub const MAX_QUEUES: u32 = 64;

/// Default UDP port the XDP program steers into AF_XDP sockets (PROTOCOL.md).
pub const DEFAULT_UDP_PORT: u16 = 8082;
/// Default TCP port of the kernel listener (PROTOCOL.md).
pub const DEFAULT_TCP_PORT: u16 = 8081;

/// Header sizes and numbers from the Ethernet, IP and UDP specs, shared by the XDP program's
/// classifier and userspace's parser of the frames it steers, so the two agree by construction.
pub mod wire {
    /// Ethernet header.
    pub const ETH_HLEN: usize = 14;
    /// One 802.1Q / 802.1ad tag.
    pub const VLAN_HLEN: usize = 4;
    /// IPv4 header without options.
    pub const IPV4_MIN_HLEN: usize = 20;
    /// IPv6 fixed header.
    pub const IPV6_HLEN: usize = 40;
    /// UDP header.
    pub const UDP_HLEN: usize = 8;
    /// EtherType IPv4.
    pub const ETH_P_IP: u16 = 0x0800;
    /// EtherType IPv6.
    pub const ETH_P_IPV6: u16 = 0x86dd;
    /// EtherType 802.1Q.
    pub const ETH_P_8021Q: u16 = 0x8100;
    /// EtherType 802.1ad.
    pub const ETH_P_8021AD: u16 = 0x88a8;
    /// IP protocol number of UDP.
    pub const IPPROTO_UDP: u8 = 17;
}

/// Runtime configuration of the XDP program, written by userspace into [`CONFIG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpConfig {
    /// UDP destination port steered to AF_XDP, host byte order. 0 steers nothing.
    pub udp_port: u16,
    /// Non-zero: also steer frames carrying one 802.1Q / 802.1ad VLAN tag.
    pub allow_vlan: u8,
    /// How userspace attached the program ([`AttachMode`] as `u8`); informational, for
    /// `xtask status`. The program does not read it.
    pub attach_mode: u8,
}

/// How the program is attached to its interface.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Not recorded.
    Unknown = 0,
    /// Native driver mode (`XDP_FLAGS_DRV_MODE`).
    Driver = 1,
    /// Generic mode (`XDP_FLAGS_SKB_MODE`).
    Skb = 2,
}

impl AttachMode {
    /// From the byte stored in [`XdpConfig::attach_mode`].
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Driver,
            2 => Self::Skb,
            _ => Self::Unknown,
        }
    }

    /// `drv`, `skb` or `unknown`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Driver => "drv",
            Self::Skb => "skb",
            Self::Unknown => "unknown",
        }
    }
}

impl Default for XdpConfig {
    fn default() -> Self {
        Self {
            udp_port: DEFAULT_UDP_PORT,
            allow_vlan: 1,
            attach_mode: AttachMode::Unknown as u8,
        }
    }
}

/// What the XDP program did with a packet: the index into the [`STATS_MAP`] counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not event traffic: handed to the kernel stack.
    Pass = 0,
    /// Event traffic redirected into the queue's AF_XDP socket.
    Redirect = 1,
    /// Malformed or truncated headers: handed to the kernel, which owns the error path.
    PassMalformed = 2,
    /// Event traffic on a queue with no AF_XDP socket bound: handed to the kernel.
    PassNoSocket = 3,
    /// An IP fragment (possibly of event traffic): handed to the kernel to reassemble.
    PassFragment = 4,
}

/// Number of [`Verdict`] counters.
pub const VERDICT_COUNT: u32 = 5;

impl Verdict {
    /// All verdicts, in counter-index order.
    pub const ALL: [Verdict; VERDICT_COUNT as usize] = [
        Verdict::Pass,
        Verdict::Redirect,
        Verdict::PassMalformed,
        Verdict::PassNoSocket,
        Verdict::PassFragment,
    ];

    /// Stable label for metrics and `xtask status`.
    pub const fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Redirect => "redirect",
            Verdict::PassMalformed => "pass_malformed",
            Verdict::PassNoSocket => "pass_no_socket",
            Verdict::PassFragment => "pass_fragment",
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: `XdpConfig` is `#[repr(C)]`, `Copy`, has no padding (u16 + u8 + u8) and every bit
// pattern is a valid value.
unsafe impl aya::Pod for XdpConfig {}
