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
    // SAFETY: the kernel reads `data_size_in` bytes from `packet` and writes at most
    // `data_size_out` bytes into `out`, both alive for the call.
    unsafe { test_run(attr) }
}

/// Issues `BPF_PROG_TEST_RUN` with `attr`.
///
/// # Safety
/// Every pointer in `attr` must be valid for the size beside it for the duration of the call.
unsafe fn test_run(mut attr: TestRunAttr) -> io::Result<TestRun> {
    // SAFETY: `attr` is a fully initialised `bpf_attr.test` of the size passed; the caller
    // vouches for the buffers it points to.
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

/// `struct xdp_md` as `BPF_PROG_TEST_RUN` takes it for context (`ctx_in`).
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Injects `repeat` copies of `packet` as if received on interface `ifindex`, RX queue `queue`
/// of the caller's network namespace, through the XDP program `prog` with
/// `BPF_F_TEST_XDP_LIVE_FRAMES`: each frame really follows the verdict (`XDP_REDIRECT` into an
/// AF_XDP socket bound to that queue, `XDP_PASS` up the kernel stack, `XDP_DROP`). The kernel
/// works in batches of `batch_size` (1..=256, 0 = its default of 64) on the calling CPU; a
/// pending signal ends the run early, so the returned count is what was injected.
///
/// # Errors
/// The kernel's: `EINVAL` for a packet shorter than an Ethernet header, a queue past the
/// device's, or a kernel before 5.18; `ENODEV` for an unknown ifindex; `EPERM` without
/// `CAP_BPF`/`CAP_SYS_ADMIN`.
pub fn prog_test_run_live(
    prog: BorrowedFd<'_>,
    packet: &[u8],
    repeat: u32,
    ifindex: u32,
    queue: u32,
    batch_size: u32,
) -> io::Result<TestRun> {
    let len = u32::try_from(packet.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut ctx = XdpMd {
        data_end: len,
        ingress_ifindex: ifindex,
        rx_queue_index: queue,
        ..XdpMd::default()
    };
    let attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: len,
        data_in: packet.as_ptr() as u64,
        repeat: repeat.max(1),
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: (&raw mut ctx) as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size,
        ..TestRunAttr::default()
    };
    // SAFETY: the kernel reads `data_size_in` bytes from `packet` and `ctx_size_in` bytes from
    // `ctx`, both alive for the call, and writes nothing back through pointers in live mode.
    unsafe { test_run(attr) }
}

const BPF_OBJ_GET: libc::c_long = 7;

/// The `obj` member of `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C, align(8))]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Opens the BPF object pinned at `path` (a program, map or link) and returns its descriptor.
///
/// # Errors
/// `ENOENT` when nothing is pinned there, `EPERM` without privileges.
pub fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr.obj`; the kernel reads the
    // NUL-terminated path, alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw mut attr,
            size_of::<ObjGetAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_TYPE_XDP`.
const LINK_TYPE_XDP: u32 = 6;

/// The `info` member of `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C, align(8))]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The interface an XDP link is attached to: `Some(0)` when its device is gone (the link is
/// defunct), `None` when `fd` is not an XDP link.
///
/// # Errors
/// When the kernel refuses the query (`EPERM` without privileges, `EBADF`).
pub fn xdp_link_ifindex(fd: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    // `struct bpf_link_info`: type u32, id u32, prog_id u32, then (8-aligned) the union whose
    // `xdp` member is `ifindex u32`. 128 bytes is more than any kernel's struct.
    let mut info = [0u64; 16];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid `bpf_attr.info`; the kernel writes at most `info_len` bytes
    // into `info`, which is that large and alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let link_type = info[0] as u32;
    Ok((link_type == LINK_TYPE_XDP).then_some(info[2] as u32))
}

// ---- AF_XDP ---------------------------------------------------------------------------------

use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// An `mmap` of part of an AF_XDP socket (one ring), unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the ring views built on it synchronise through
// atomics, and unmapping happens once, from `Drop`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the region `mmap_ring` mapped, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `socket(AF_XDP, SOCK_RAW)`.
///
/// # Errors
/// `EAFNOSUPPORT` on kernels without AF_XDP, `EPERM` without `CAP_NET_RAW`.
pub fn xsk_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Kicks the kernel to transmit what is on the TX ring (`sendto` with no data). Returns
/// `true` when there is no point kicking again now (the ring was processed, or the kernel is
/// busy or out of completion slots until frames are reclaimed) and `false` when it stopped
/// early with more to send (`EAGAIN`: copy mode sends a batch per call).
///
/// # Errors
/// Anything else (`ENETDOWN` when the interface is down, `ENXIO` when it is gone).
pub fn xsk_wakeup_tx(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: a zero-length, non-blocking send with no buffer and no address is the AF_XDP
    // TX wake-up call.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            core::ptr::null(),
            0,
            libc::MSG_DONTWAIT,
            core::ptr::null(),
            0,
        )
    };
    if rc >= 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EINTR) => Ok(false),
        Some(libc::EBUSY | libc::ENOBUFS) => Ok(true),
        _ => Err(e),
    }
}

/// `setsockopt(SOL_XDP, opt, value)`.
///
/// # Safety
/// `T` must be the plain C type the kernel expects for `opt`, and any address inside it must
/// stay valid for as long as the kernel uses it (`XDP_UMEM_REG`: the UMEM's whole life).
pub unsafe fn xdp_setsockopt<T>(fd: BorrowedFd<'_>, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live `T` of the size passed; the caller vouches for its meaning.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            opt,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    check(rc)
}

/// `getsockopt(SOL_XDP, opt)` into a zeroed `T`; returns it and the length the kernel wrote.
///
/// # Safety
/// `T` must be a plain C type for which all-zero bytes are valid, as the kernel's struct for
/// `opt` is.
pub unsafe fn xdp_getsockopt<T>(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<(T, usize)> {
    // SAFETY: the caller guarantees all-zero is a valid `T`.
    let mut value: T = unsafe { core::mem::zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live out-parameters of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            opt,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    check(rc)?;
    Ok((value, len as usize))
}

/// Maps `len` bytes of a ring at page offset `pgoff` (one of the `XDP_*_PGOFF_*` constants).
///
/// # Errors
/// The kernel's (`ENOMEM`, or `EINVAL` if the ring was not sized first).
pub fn mmap_ring(fd: BorrowedFd<'_>, pgoff: u64, len: usize) -> io::Result<Mapping> {
    // SAFETY: a shared mapping of the socket at a kernel-chosen address touches no existing
    // memory; the result is checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            pgoff as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
    Ok(Mapping { ptr, len })
}

/// `bind(2)` an AF_XDP socket to `ifindex`/`queue` with `flags` (`XDP_COPY`, `XDP_ZEROCOPY`,
/// `XDP_USE_NEED_WAKEUP`).
///
/// # Errors
/// The kernel's: `EOPNOTSUPP` for zero-copy on a driver without it, `EBUSY` if the queue has a
/// socket, `EINVAL` for a queue the device lacks.
pub fn xsk_bind(fd: BorrowedFd<'_>, ifindex: u32, queue: u32, flags: u16) -> io::Result<()> {
    let addr = libc::sockaddr_xdp {
        sxdp_family: libc::AF_XDP as u16,
        sxdp_flags: flags,
        sxdp_ifindex: ifindex,
        sxdp_queue_id: queue,
        sxdp_shared_umem_fd: 0,
    };
    // SAFETY: `addr` is a valid sockaddr_xdp of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
        )
    };
    check(rc)
}

/// Kicks the kernel to process the FILL/RX rings (needed when `XDP_RING_NEED_WAKEUP` is set).
///
/// # Errors
/// Anything but `EAGAIN`/`EBUSY`/`ENOBUFS`/`EINTR`, which only mean "nothing to do now".
pub fn xsk_wakeup_rx(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a zero-length, non-blocking receive with no buffer is the AF_XDP wake-up call.
    let rc = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            core::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            core::ptr::null_mut(),
            core::ptr::null_mut(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR)
        ) {
            return Err(e);
        }
    }
    Ok(())
}
