//! The one place where the XDP side makes raw system calls that aya does not wrap: running a
//! program on a packet (`BPF_PROG_TEST_RUN`), and the AF_XDP socket calls. Everything above this
//! module works on safe types, and the AF_XDP ring logic is tested against rings in plain memory.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `BPF_F_TEST_XDP_LIVE_FRAMES`: frames go out through the program's verdict (redirect,
/// transmit) instead of coming back to the caller (Linux 5.18+).
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// The `test` member of `union bpf_attr` (`include/uapi/linux/bpf.h`).
#[repr(C, align(8))]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the kernel rejects (`EINVAL`) an attr whose bytes past the last
    /// field it knows are not all zero, and Rust leaves implicit padding uninitialised.
    _pad: u32,
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (for XDP, the action).
    pub retval: u32,
    /// Bytes of packet after the run (the program may grow or shrink it).
    pub data_len: u32,
    /// Mean nanoseconds per repetition, as the kernel measured it.
    pub duration_ns: u32,
}

/// Runs the program behind `prog` on `packet` `repeat` times (at least once).
///
/// With `flags = BPF_F_TEST_XDP_LIVE_FRAMES` and an XDP program, each repetition injects a real
/// frame that follows the program's verdict: the traffic generator of the lab bench.
///
/// # Errors
/// The kernel's: `EINVAL` for a packet shorter than an Ethernet header, `EPERM` without
/// `CAP_BPF`/`CAP_SYS_ADMIN`.
pub fn prog_test_run(
    prog: BorrowedFd<'_>,
    packet: &[u8],
    repeat: u32,
    flags: u32,
) -> io::Result<TestRun> {
    let mut out = vec![0u8; packet.len() + 256];
    let live = flags & BPF_F_TEST_XDP_LIVE_FRAMES != 0;
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: u32::try_from(packet.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        data_in: packet.as_ptr() as u64,
        repeat: repeat.max(1),
        flags,
        ..TestRunAttr::default()
    };
    if !live {
        attr.data_out = out.as_mut_ptr() as u64;
        attr.data_size_out = out.len() as u32;
    }
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr.test` of the size passed; the
    // kernel reads `data_size_in` bytes from `packet` and writes at most `data_size_out` bytes
    // into `out`, both alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TestRun {
        retval: attr.retval,
        data_len: attr.data_size_out,
        duration_ns: attr.duration,
    })
}
