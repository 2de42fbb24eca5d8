//! Dropping privileges once setup is done (firedancer's rule: privileged setup apart from the
//! run loop).
//!
//! Loading and attaching XDP, binding AF_XDP sockets, locking UMEM and forcing socket buffers
//! need `CAP_BPF`, `CAP_NET_ADMIN`, `CAP_NET_RAW`, `CAP_IPC_LOCK` (or root). The run loop needs
//! none of them but one: reading the XDP program's verdict counters, a `bpf()` call, needs
//! `CAP_BPF` (`CAP_SYS_ADMIN` on kernels before 5.8, which lack `CAP_BPF`). So the daemon, after
//! setup and before it starts a single thread, keeps at most that one capability in its
//! effective and permitted sets, clears the inheritable set, drops the rest from the bounding
//! set, and sets `no_new_privs`. Capabilities are per thread on Linux; every thread the daemon
//! starts afterwards inherits the reduced sets.

use std::io;

/// `CAP_SYS_ADMIN`.
pub const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_BPF` (Linux 5.8+).
pub const CAP_BPF: u32 = 39;

const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets, as bit masks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    /// In force now.
    pub effective: u64,
    /// May be made effective.
    pub permitted: u64,
    /// Passed across `execve`.
    pub inheritable: u64,
}

impl Caps {
    /// Whether capability `cap` is permitted.
    pub const fn permits(&self, cap: u32) -> bool {
        self.permitted & (1 << cap) != 0
    }
}

/// The calling thread's capabilities.
///
/// # Errors
/// The kernel's (none expected).
pub fn current() -> io::Result<Caps> {
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget(2) with a v3 header reads the header and writes two `Data` entries, both
    // live for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |f: fn(&Data) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok(Caps {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

/// Keeps only `keep` (those of it that are permitted now) in the calling thread's effective and
/// permitted sets, clears the inheritable set, drops every other capability from the bounding
/// set where allowed, and sets `no_new_privs`. Returns the sets after.
///
/// # Errors
/// The kernel's refusal of `capset` (it only lowers sets, which is always allowed) or `prctl`.
pub fn retain_only(keep: &[u32]) -> io::Result<Caps> {
    retain_only_as(keep, None)
}

/// As [`retain_only`], switching the process to `user` (`(uid, gid)`, supplementary groups
/// cleared) on the way: after the bounding set is cut (which needs `CAP_SETPCAP`) and before
/// the effective set is (the switch needs `CAP_SETUID`/`CAP_SETGID`), with `PR_SET_KEEPCAPS`
/// so what is kept survives the switch.
///
/// # Errors
/// As [`retain_only`], and the kernel's refusal of the switch.
pub fn retain_only_as(keep: &[u32], user: Option<(u32, u32)>) -> io::Result<Caps> {
    let before = current()?;
    let mask = keep
        .iter()
        .filter(|&&c| before.permits(c))
        .fold(0u64, |m, &c| m | (1 << c));
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for cap in (0..=last).filter(|c| mask & (1 << c) == 0) {
        // SAFETY: prctl(PR_CAPBSET_DROP) takes a capability number and no pointers. It needs
        // CAP_SETPCAP, which we may no longer have; failure leaves the bounding set as it was,
        // and no_new_privs below keeps it from mattering.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
    }
    if let Some((uid, gid)) = user {
        let check = |rc: libc::c_long, what: &str| {
            if rc == 0 {
                Ok(())
            } else {
                let e = io::Error::last_os_error();
                Err(io::Error::new(e.kind(), format!("{what}: {e}")))
            }
        };
        // SAFETY: prctl(PR_SET_KEEPCAPS) takes an integer and no pointers.
        let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
        check(rc.into(), "PR_SET_KEEPCAPS")?;
        // SAFETY: setgroups reads one gid from a live local; the set*id calls take integers.
        // glibc applies them to every thread of the process.
        unsafe {
            check(libc::setgroups(1, &raw const gid).into(), "setgroups")?;
            check(libc::setresgid(gid, gid, gid).into(), "setresgid")?;
            check(libc::setresuid(uid, uid, uid).into(), "setresuid")?;
        }
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    }
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: 0,
        },
        Data {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) with a v3 header reads the header and two `Data` entries, live for the
    // call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    current()
}

/// `name`'s uid and primary gid, from the user database.
///
/// # Errors
/// `NotFound` for an unknown user.
pub fn lookup_user(name: &str) -> io::Result<(u32, u32)> {
    lookup(name, "user", libc::getpwnam_r, |pw: &libc::passwd| {
        (pw.pw_uid, pw.pw_gid)
    })
}

/// `name`'s gid, from the group database.
///
/// # Errors
/// `NotFound` for an unknown group.
pub fn lookup_group(name: &str) -> io::Result<u32> {
    lookup(name, "group", libc::getgrnam_r, |gr: &libc::group| {
        gr.gr_gid
    })
}

/// The signature `getpwnam_r` and `getgrnam_r` share: name, record, buffer, its length, result.
type GetByName<T> = unsafe extern "C" fn(
    *const libc::c_char,
    *mut T,
    *mut libc::c_char,
    libc::size_t,
    *mut *mut T,
) -> libc::c_int;

/// Looks `name` up with `get` (one of the reentrant `get*nam_r` calls, filling a `T` that is
/// plain C data) and hands the record to `pick`.
fn lookup<T, R>(
    name: &str,
    what: &str,
    get: GetByName<T>,
    pick: impl FnOnce(&T) -> R,
) -> io::Result<R> {
    let c = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `T` is `passwd` or `group` (the callers above): plain C data for which all-zero
    // is a valid value to be filled in.
    let mut rec: T = unsafe { core::mem::zeroed() };
    let mut out = core::ptr::null_mut();
    // SAFETY: `get` writes into `rec` and `buf` (of the given length), both live, and sets
    // `out` to `&rec` or null.
    let rc = unsafe {
        get(
            c.as_ptr(),
            &raw mut rec,
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no {what} {name:?}"),
        ));
    }
    Ok(pick(&rec))
}

/// The one capability the run loop needs to read BPF maps on this kernel: `CAP_BPF` where the
/// kernel knows it, `CAP_SYS_ADMIN` otherwise.
pub fn bpf_capability() -> u32 {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    if last >= CAP_BPF {
        CAP_BPF
    } else {
        CAP_SYS_ADMIN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_only_what_it_asks_for() {
        // On its own thread: capabilities are per thread, and the test harness's other threads
        // keep theirs.
        std::thread::spawn(|| {
            let before = current().unwrap();
            let after = retain_only(&[CAP_BPF]).unwrap();
            assert_eq!(after.inheritable, 0);
            assert_eq!(after.effective & !(1 << CAP_BPF), 0, "{after:?}");
            assert_eq!(after.permitted, after.effective);
            // Whatever was permitted of CAP_BPF stays; nothing comes back.
            assert_eq!(after.permits(CAP_BPF), before.permits(CAP_BPF));
            assert!(retain_only(&[CAP_SYS_ADMIN]).unwrap().effective & (1 << CAP_SYS_ADMIN) == 0);
        })
        .join()
        .unwrap();
    }
}
