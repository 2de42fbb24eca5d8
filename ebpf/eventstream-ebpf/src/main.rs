//! The XDP program: steers event traffic from each RX queue into that queue's AF_XDP socket.
//!
//! For a UDP datagram to the configured event port (IPv4 or IPv6, optionally behind one
//! 802.1Q/802.1ad tag) it redirects into `XSKS[rx_queue_index]`; an empty slot makes the redirect
//! fall back to `XDP_PASS`. Everything else, TCP to the same port included, goes to the kernel
//! with `XDP_PASS`, and so do malformed or truncated packets and IP fragments: the kernel owns
//! the error path and reassembly. Every header read is bounds-checked against `data_end`. Each
//! packet bumps one per-CPU counter per [`Verdict`].
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, PerCpuArray, XskMap};
use aya_ebpf::programs::XdpContext;
use eventstream_common::wire::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_MIN_HLEN,
    IPV6_HLEN, UDP_HLEN, VLAN_HLEN,
};
use eventstream_common::{MAX_QUEUES, VERDICT_COUNT, Verdict, XdpConfig};

/// AF_XDP sockets by RX queue index; filled by userspace.
#[map(name = "XSKS")]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

/// Runtime configuration (one entry); all zero until userspace writes it.
#[map(name = "CONFIG")]
static CONFIG: Array<XdpConfig> = Array::with_max_entries(1, 0);

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

/// Where the UDP header starts, or why the packet is not steerable.
#[inline(always)]
fn udp_offset(ctx: &XdpContext, cfg: &XdpConfig) -> Result<usize, Verdict> {
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
            Ok(off + ihl)
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
            Ok(off + IPV6_HLEN)
        }
        _ => Err(Verdict::Pass),
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
    let off = match udp_offset(ctx, cfg) {
        Ok(off) => off,
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
