//! An AF_XDP socket whose FILL and RX rings live in plain memory ([`fake_pair`]), for tests in
//! which a thread plays the kernel.
//!
//! [`fake_pair`]: eventstream::xdp::ring::fake_pair

use std::io;

use eventstream::ring::doorbell::Doorbell;
use eventstream::xdp::ring::{ConsRing, ProdRing};
use eventstream::xdp::socket::{XskRings, XskStats};

/// The ingest side of the fake socket: the user halves of FILL and RX.
pub struct FakeXsk {
    pub fill: ProdRing<u64>,
    pub rx: ConsRing<libc::xdp_desc>,
    pub frame_size: u32,
    pub umem_len: u64,
    /// What `poll` does in place of sleeping until the kernel has something.
    pub on_poll: fn(),
}

impl XskRings for FakeXsk {
    fn rings(&mut self) -> (&mut ProdRing<u64>, &mut ConsRing<libc::xdp_desc>) {
        (&mut self.fill, &mut self.rx)
    }
    fn frame_size(&self) -> u32 {
        self.frame_size
    }
    fn umem_len(&self) -> u64 {
        self.umem_len
    }
    fn wakeup_rx(&self) -> io::Result<()> {
        Ok(())
    }
    fn poll_rx(&self, _timeout_ms: i32, _bell: Option<&Doorbell>) -> io::Result<bool> {
        (self.on_poll)();
        Ok(false)
    }
    fn stats(&self) -> io::Result<XskStats> {
        Ok(XskStats::default())
    }
}
