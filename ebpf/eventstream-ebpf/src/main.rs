//! The XDP program: steers event traffic from each RX queue into that queue's AF_XDP socket.
//!
//! For a UDP datagram to the configured event port (IPv4 or IPv6, optionally behind one
//! 802.1Q/802.1ad tag) it redirects into `XSKS[rx_queue_index]`; an empty slot makes the redirect
//! fall back to `XDP_PASS`. Everything else, TCP to the same port included, goes to the kernel
//! with `XDP_PASS`, and so do malformed or truncated packets and IP fragments: the kernel owns
//! the error path and reassembly. Every header read is bounds-checked against `data_end`. Each
//! packet bumps one per-CPU counter per [`Verdict`].
//!
//! Event datagrams to a multicast group are steered only when the group is in `GROUPS` (the
//! groups the appliance joined); to any other group they are passed, and the kernel drops what
//! no socket joined.
//!
//! The first line of defence, both off unless configured: event datagrams from a source outside
//! the allow-list (`ALLOW`, an LPM trie of CIDRs) are dropped, and so are those over their
//! source's rate (a token bucket per source in `RATE`, an LRU map, so a flood of spoofed sources
//! recycles buckets instead of filling the map). Buckets are shared by CPUs and updated without
//! atomics: two CPUs taking a token from one source at the same instant may both succeed, so the
//! limit can be overshot by a packet per CPU per race, never undershot.
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::{Key, LpmTrie};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, XskMap};
use aya_ebpf::programs::XdpContext;
use eventstream_common::wire::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_MIN_HLEN,
    IPV6_HLEN, UDP_HLEN, VLAN_HLEN,
};
use eventstream_common::{
    MAX_ALLOW_ENTRIES, MAX_GROUPS, MAX_QUEUES, RATE_MAX_REFILL_NS, RATE_SOURCES, RateBucket,
    SourceAddr, VERDICT_COUNT, Verdict, XdpConfig,
};

/// AF_XDP sockets by RX queue index; filled by userspace.
#[map(name = "XSKS")]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

/// Multicast groups steered (IPv6 bytes, IPv4 as `::ffff:a.b.c.d`); the value is unused.
#[map(name = "GROUPS")]
static GROUPS: HashMap<SourceAddr, u8> = HashMap::with_max_entries(MAX_GROUPS, 0);

/// Runtime configuration (one entry); all zero until userspace writes it.
#[map(name = "CONFIG")]
static CONFIG: Array<XdpConfig> = Array::with_max_entries(1, 0);

/// Sources allowed to send events, by prefix; the value is unused.
#[map(name = "ALLOW")]
static ALLOW: LpmTrie<SourceAddr, u8> = LpmTrie::with_max_entries(MAX_ALLOW_ENTRIES, 0);

/// Per-source token buckets.
#[map(name = "RATE")]
static RATE: LruHashMap<SourceAddr, RateBucket> = LruHashMap::with_max_entries(RATE_SOURCES, 0);

/// Per-CPU packet counters, one per [`Verdict`].
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICT_COUNT, 0);

#[inline(always)]
fn count(verdict: Verdict) {
    if let Some(slot) = STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: the map returns a valid pointer to this CPU's slot, and an XDP program is not
        // preempted on its CPU, so nothing else writes the slot concurrently.
        unsafe { *slot += 1 };
    }
}

/// `N` bytes at `offset`, if the packet has them.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return None;
    }
    // SAFETY: `[start + offset, start + offset + N)` lies inside the packet (checked just above,
    // in the form the verifier tracks), and `[u8; N]` has alignment 1.
    Some(unsafe { &*((start + offset) as *const [u8; N]) })
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The first 12 bytes of an IPv4-mapped IPv6 address, `::ffff:0:0/96`.
const V4_MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Where a packet's UDP header starts, who sent it and whether it went to a multicast group
/// the program does not steer.
struct Udp {
    off: usize,
    src: SourceAddr,
    other_group: bool,
}

/// Whether `dst` (IPv6 bytes, IPv4 mapped) is a multicast group not in `GROUPS`.
#[inline(always)]
fn other_group(dst: &SourceAddr) -> bool {
    let multicast = if dst[..12] == V4_MAPPED {
        dst[12] & 0xf0 == 0xe0
    } else {
        dst[0] == 0xff
    };
    multicast && GROUPS.get_ptr(dst).is_none()
}

/// Where the UDP header starts and who sent the packet, or why it is not steerable.
#[inline(always)]
fn udp_offset(ctx: &XdpContext, cfg: &XdpConfig) -> Result<Udp, Verdict> {
    let eth = bytes::<ETH_HLEN>(ctx, 0).ok_or(Verdict::PassMalformed)?;
    let mut proto = be16(eth, 12);
    let mut off = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        if cfg.allow_vlan == 0 {
            return Err(Verdict::Pass);
        }
        let tag = bytes::<VLAN_HLEN>(ctx, off).ok_or(Verdict::PassMalformed)?;
        proto = be16(tag, 2);
        off += VLAN_HLEN;
    }
    match proto {
        ETH_P_IP => {
            let ip = bytes::<IPV4_MIN_HLEN>(ctx, off).ok_or(Verdict::PassMalformed)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < IPV4_MIN_HLEN {
                return Err(Verdict::PassMalformed);
            }
            if ip[9] != IPPROTO_UDP {
                return Err(Verdict::Pass);
            }
            // More-fragments set, or a non-zero offset: the kernel reassembles.
            if be16(ip, 6) & 0x3fff != 0 {
                return Err(Verdict::PassFragment);
            }
            let mut src = [0u8; 16];
            src[..12].copy_from_slice(&V4_MAPPED);
            src[12..].copy_from_slice(&ip[12..16]);
            let mut dst = [0u8; 16];
            dst[..12].copy_from_slice(&V4_MAPPED);
            dst[12..].copy_from_slice(&ip[16..20]);
            Ok(Udp {
                off: off + ihl,
                src,
                other_group: other_group(&dst),
            })
        }
        ETH_P_IPV6 => {
            let ip = bytes::<IPV6_HLEN>(ctx, off).ok_or(Verdict::PassMalformed)?;
            if ip[0] >> 4 != 6 {
                return Err(Verdict::PassMalformed);
            }
            // Extension headers (fragments included) are left to the kernel.
            if ip[6] != IPPROTO_UDP {
                return Err(Verdict::Pass);
            }
            let mut src = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            // An IPv4-mapped source never belongs on the wire (RFC 4291 2.5.5.2), and here it
            // would pass for the IPv4 address in the allow-list and the rate table.
            if src[..12] == V4_MAPPED {
                return Err(Verdict::PassMalformed);
            }
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&ip[24..40]);
            Ok(Udp {
                off: off + IPV6_HLEN,
                src,
                other_group: other_group(&dst),
            })
        }
        _ => Err(Verdict::Pass),
    }
}

const NANO: u64 = 1_000_000_000;

/// Whether `src` may send one more event datagram now (and takes the token if so).
#[inline(always)]
fn within_rate(cfg: &XdpConfig, src: &SourceAddr) -> bool {
    let rate = u64::from(cfg.rate_pps);
    // Userspace writes a burst of at least 1 with any rate; a zero here still admits one.
    let cap = u64::from(cfg.rate_burst).max(1) * NANO;
    // SAFETY: bpf_ktime_get_ns takes nothing and only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(bucket) = RATE.get_ptr_mut(src) else {
        // A new source starts with a full bucket, less this packet's token. A failed insert
        // (the map busy) admits the packet: the limit is a defence, not the accounting.
        let fresh = RateBucket {
            nano_tokens: cap - NANO,
            last_ns: now,
        };
        let _ = RATE.insert(src, &fresh, 0);
        return true;
    };
    // SAFETY: the map returned a valid pointer to this source's bucket, live for this program
    // run; another CPU may update it concurrently, which can only admit a packet too many
    // (see the module doc), never corrupt memory.
    let b = unsafe { &mut *bucket };
    let elapsed = now.saturating_sub(b.last_ns).min(RATE_MAX_REFILL_NS);
    let tokens = (b.nano_tokens + elapsed * rate).min(cap);
    b.last_ns = now;
    if tokens >= NANO {
        b.nano_tokens = tokens - NANO;
        true
    } else {
        b.nano_tokens = tokens;
        false
    }
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> (Verdict, u32) {
    let Some(cfg) = CONFIG.get(0) else {
        return (Verdict::Pass, xdp_action::XDP_PASS);
    };
    if cfg.udp_port == 0 {
        return (Verdict::Pass, xdp_action::XDP_PASS);
    }
    let Udp {
        off,
        src,
        other_group,
    } = match udp_offset(ctx, cfg) {
        Ok(found) => found,
        Err(v) => return (v, xdp_action::XDP_PASS),
    };
    // The IPv4 header length is variable, so re-check against the packet end at `off`.
    let Some(udp) = bytes::<UDP_HLEN>(ctx, off) else {
        return (Verdict::PassMalformed, xdp_action::XDP_PASS);
    };
    if be16(udp, 2) != cfg.udp_port {
        return (Verdict::Pass, xdp_action::XDP_PASS);
    }
    if usize::from(be16(udp, 4)) < UDP_HLEN {
        return (Verdict::PassMalformed, xdp_action::XDP_PASS);
    }
    if other_group {
        return (Verdict::Pass, xdp_action::XDP_PASS);
    }
    if cfg.allow_list != 0 && ALLOW.get(&Key::new(128, src)).is_none() {
        return (Verdict::DropDenied, xdp_action::XDP_DROP);
    }
    if cfg.rate_pps != 0 && !within_rate(cfg, &src) {
        return (Verdict::DropRateLimited, xdp_action::XDP_DROP);
    }
    match XSKS.redirect(ctx.rx_queue_index(), u64::from(xdp_action::XDP_PASS)) {
        Ok(action) => (Verdict::Redirect, action),
        Err(action) => (Verdict::PassNoSocket, action),
    }
}

#[xdp]
pub fn eventstream_xdp(ctx: XdpContext) -> u32 {
    let (verdict, action) = classify(&ctx);
    count(verdict);
    action
}

/// The lab's XDP_DROP ceiling: drops every frame, so a `BPF_PROG_TEST_RUN` live-frames run
/// through it measures what the generator and the driver path cost before any socket.
#[xdp]
pub fn eventstream_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
