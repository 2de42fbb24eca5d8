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
/// Name of the LPM trie of sources allowed to send events (when [`XdpConfig::allow_list`] is on).
pub const ALLOW_MAP: &str = "ALLOW";
/// Name of the LRU map of per-source token buckets (when [`XdpConfig::rate_pps`] is set).
pub const RATE_MAP: &str = "RATE";
/// Name of the hash of multicast groups whose event datagrams are steered (any other group is
/// passed to the kernel, which drops what no socket joined).
pub const GROUPS_MAP: &str = "GROUPS";
/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "eventstream_xdp";
/// Name of the drop-everything program the lab bench measures the XDP_DROP ceiling with.
pub const DROP_PROGRAM_NAME: &str = "eventstream_drop";

/// Maximum number of RX queues the `XskMap` can address.
pub const MAX_QUEUES: u32 = 64;

/// Most multicast groups [`GROUPS_MAP`] holds.
pub const MAX_GROUPS: u32 = 64;

/// Most CIDRs the source allow-list holds.
pub const MAX_ALLOW_ENTRIES: u32 = 4096;
/// Sources whose token buckets are kept at once; the least recently seen is forgotten first
/// (and starts again with a full bucket).
pub const RATE_SOURCES: u32 = 65_536;
/// Highest per-source rate and burst the program accepts: keeps the bucket's arithmetic in
/// 64 bits (refill = elapsed ns, at most [`RATE_MAX_REFILL_NS`], times packets/s).
pub const RATE_MAX_PPS: u32 = 10_000_000;
/// Longest idle time a bucket is refilled for; a full bucket needs at most burst / rate seconds,
/// and the burst is at most 60 s of the rate.
pub const RATE_MAX_REFILL_NS: u64 = 60_000_000_000;

/// A source address as the allow-list and the rate table key it: IPv6 bytes, IPv4 as
/// `::ffff:a.b.c.d` (so an IPv4 CIDR of length `n` is a prefix of length `96 + n`).
pub type SourceAddr = [u8; 16];

/// One source's token bucket in [`RATE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateBucket {
    /// Tokens left, in billionths of a packet.
    pub nano_tokens: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
}

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
    /// Non-zero: only event datagrams from a source in [`ALLOW_MAP`] are steered; the rest are
    /// dropped and counted as [`Verdict::DropDenied`].
    pub allow_list: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// Per-source limit on event datagrams, packets per second (token bucket in [`RATE_MAP`]);
    /// 0 for none. Over the limit: dropped, counted as [`Verdict::DropRateLimited`].
    pub rate_pps: u32,
    /// The bucket's depth, packets (at least 1 when `rate_pps` is set).
    pub rate_burst: u32,
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
            allow_list: 0,
            reserved: [0; 3],
            rate_pps: 0,
            rate_burst: 0,
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
    /// Event traffic from a source outside the allow-list: dropped.
    DropDenied = 5,
    /// Event traffic from a source over its rate limit: dropped.
    DropRateLimited = 6,
}

/// Number of [`Verdict`] counters.
pub const VERDICT_COUNT: u32 = 7;

impl Verdict {
    /// All verdicts, in counter-index order.
    pub const ALL: [Verdict; VERDICT_COUNT as usize] = [
        Verdict::Pass,
        Verdict::Redirect,
        Verdict::PassMalformed,
        Verdict::PassNoSocket,
        Verdict::PassFragment,
        Verdict::DropDenied,
        Verdict::DropRateLimited,
    ];

    /// Stable label for metrics and `xtask status`.
    pub const fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Redirect => "redirect",
            Verdict::PassMalformed => "pass_malformed",
            Verdict::PassNoSocket => "pass_no_socket",
            Verdict::PassFragment => "pass_fragment",
            Verdict::DropDenied => "drop_denied",
            Verdict::DropRateLimited => "drop_rate_limited",
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: `XdpConfig` is `#[repr(C)]`, `Copy`, has no padding (u16 + 4 x u8 + [u8; 3] +
// 2 x u32 = 16 bytes, every field at its natural alignment) and every bit pattern is valid.
unsafe impl aya::Pod for XdpConfig {}

#[cfg(feature = "user")]
// SAFETY: `RateBucket` is `#[repr(C)]`, `Copy`, two u64s with no padding; any bits are valid.
unsafe impl aya::Pod for RateBucket {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_structs_have_the_layout_the_program_reads() {
        assert_eq!(core::mem::size_of::<XdpConfig>(), 16);
        assert_eq!(core::mem::offset_of!(XdpConfig, rate_pps), 8);
        assert_eq!(core::mem::size_of::<RateBucket>(), 16);
        // The bucket's arithmetic stays in 64 bits at the limits.
        let most = RATE_MAX_REFILL_NS.checked_mul(u64::from(RATE_MAX_PPS));
        assert!(most.is_some_and(|m| {
            m.checked_add(u64::from(RATE_MAX_PPS) * 60 * 1_000_000_000)
                .is_some()
        }));
    }
}
