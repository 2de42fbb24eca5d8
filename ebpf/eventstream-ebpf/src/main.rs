//! The XDP program: steers event traffic from each RX queue into that queue's AF_XDP socket.
//!
//! For now it passes every packet to the kernel and counts the verdict; steering UDP on the
//! event port into `XskMap[rx_queue_index]` comes with the AF_XDP data path.
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::XdpContext;
use eventstream_common::{VERDICT_COUNT, Verdict};

/// Per-CPU packet counters, one per [`Verdict`].
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICT_COUNT, 0);

#[inline(always)]
fn count(verdict: Verdict) {
    if let Some(slot) = STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: the map returns a valid pointer to this CPU's slot, and XDP programs are not
        // preempted on their CPU, so nothing else writes it concurrently.
        unsafe { *slot += 1 };
    }
}

#[xdp]
pub fn eventstream_xdp(_ctx: XdpContext) -> u32 {
    count(Verdict::Pass);
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
