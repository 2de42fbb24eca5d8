//! NUMA placement of long-lived memory (pools, receive buffers, UMEM).
//!
//! The hook is `mbind(2)` with `MPOL_BIND | MPOL_MF_MOVE`: pages already touched are migrated,
//! later faults land on the node. On a one-node machine (most VMs) binding is a no-op and says so.
//! Under Miri, which cannot make the syscall, it reports [`Outcome::Unsupported`].
//!
//! Topology beyond "how many nodes" (cores per node, the NIC's node for ingest pinning) is read
//! from sysfs here and from hwlocality by the daemon.

use std::fs;
use std::io;

/// Where memory should live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Placement {
    /// Wherever the kernel puts it (first touch).
    #[default]
    Any,
    /// On this NUMA node.
    Node(u32),
}

/// What [`bind`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No node was asked for.
    NotRequested,
    /// The machine has one node: nothing to bind.
    SingleNode,
    /// Bound to the node.
    Bound {
        /// The node.
        node: u32,
    },
    /// The kernel refused; memory stays where it was. Not fatal: logged by the caller.
    Failed {
        /// The node asked for.
        node: u32,
        /// The kernel's reason.
        error: String,
    },
    /// The platform (Miri, non-Linux) cannot bind.
    Unsupported,
}

/// Online NUMA node ids, from `/sys/devices/system/node/online` (`[0]` when it cannot be read,
/// as on kernels built without NUMA).
pub fn online_nodes() -> Vec<u32> {
    fs::read_to_string("/sys/devices/system/node/online")
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![0])
}

/// The NUMA node of a network interface's device, `None` when the kernel does not say
/// (virtual devices, one-node machines report -1).
///
/// # Errors
/// When the interface does not exist.
pub fn iface_node(iface: &str) -> io::Result<Option<u32>> {
    let base = format!("/sys/class/net/{iface}");
    if fs::metadata(&base).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {iface:?}"),
        ));
    }
    Ok(fs::read_to_string(format!("{base}/device/numa_node"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|n| u32::try_from(n).ok()))
}

/// Online CPUs, from `/sys/devices/system/cpu/online` (falling back to `0..available`).
pub fn online_cpus() -> Vec<u32> {
    fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (0..n as u32).collect()
        })
}

/// The CPUs of NUMA node `node` (all online CPUs when the node is unknown to sysfs).
pub fn node_cpus(node: u32) -> Vec<u32> {
    fs::read_to_string(format!("/sys/devices/system/node/node{node}/cpulist"))
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(online_cpus)
}

/// Pins the calling thread to `cpu`.
///
/// # Errors
/// `EINVAL` for a CPU that is offline or outside the process's allowed set.
pub fn pin_current_thread(cpu: u32) -> io::Result<()> {
    pin_current_thread_to(&[cpu])
}

/// Confines the calling thread to `cpus`.
///
/// # Errors
/// `EINVAL` when none of `cpus` is online and in the process's allowed set.
pub fn pin_current_thread_to(cpus: &[u32]) -> io::Result<()> {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            // SAFETY: CPU_SET writes one bit of `set`; out-of-range CPUs are ignored by the
            // macro.
            unsafe { libc::CPU_SET(cpu as usize, &mut set) };
        }
        // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size given.
        let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(all(target_os = "linux", not(miri))))]
    {
        let _ = cpus;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The CPUs the calling thread may run on now.
///
/// # Errors
/// `sched_getaffinity`'s.
pub fn current_thread_cpus() -> io::Result<Vec<u32>> {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is the calling thread; `set` is a writable cpu_set_t of the size given.
        let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            // SAFETY: CPU_ISSET reads one bit of `set`, in range by the loop's bound.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .map(|c| c as u32)
            .collect())
    }
    #[cfg(not(all(target_os = "linux", not(miri))))]
    {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// While it lives, the calling thread runs on other CPUs than its own, and so does every
/// thread it starts meanwhile (they keep that placement); dropped, it puts the calling thread's
/// own CPUs back.
#[derive(Debug)]
#[must_use = "the placement ends when this is dropped"]
pub struct Placed {
    previous: Vec<u32>,
}

impl Placed {
    /// Moves the calling thread onto `cpus` until the returned value is dropped.
    ///
    /// # Errors
    /// When the thread's CPUs cannot be read or set.
    pub fn on(cpus: &[u32]) -> io::Result<Self> {
        let previous = current_thread_cpus()?;
        pin_current_thread_to(cpus)?;
        Ok(Self { previous })
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        if let Err(e) = pin_current_thread_to(&self.previous) {
            tracing::warn!(reason = %e, "could not put the thread's CPUs back");
        }
    }
}

/// Parses a kernel list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    if s.is_empty() {
        return Some(out);
    }
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Binds `len` bytes at `addr` to `placement`'s node.
pub fn bind(addr: *const u8, len: usize, placement: Placement) -> Outcome {
    let Placement::Node(node) = placement else {
        return Outcome::NotRequested;
    };
    if cfg!(miri) || !cfg!(target_os = "linux") {
        return Outcome::Unsupported;
    }
    if online_nodes().len() <= 1 {
        return Outcome::SingleNode;
    }
    match mbind(addr, len, node) {
        Ok(()) => Outcome::Bound { node },
        Err(e) => Outcome::Failed {
            node,
            error: e.to_string(),
        },
    }
}

#[cfg(all(target_os = "linux", not(miri)))]
fn mbind(addr: *const u8, len: usize, node: u32) -> io::Result<()> {
    const MPOL_BIND: libc::c_long = 2;
    const MPOL_MF_MOVE: libc::c_ulong = 1 << 1;
    const MASK_BITS: usize = 1024;
    if node as usize >= MASK_BITS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("node {node} >= {MASK_BITS}"),
        ));
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let start = addr as usize & !(page - 1);
    let end = (addr as usize + len).div_ceil(page) * page;
    let mut mask = [0 as libc::c_ulong; MASK_BITS / libc::c_ulong::BITS as usize];
    mask[node as usize / libc::c_ulong::BITS as usize] |= 1 << (node % libc::c_ulong::BITS);
    // SAFETY: mbind only changes the memory policy of the page range (which covers memory we own,
    // rounded to pages); the mask pointer and bit count describe `mask`, live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            start,
            end - start,
            MPOL_BIND,
            mask.as_ptr(),
            MASK_BITS as libc::c_ulong,
            MPOL_MF_MOVE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(all(target_os = "linux", not(miri))))]
fn mbind(_: *const u8, _: usize, _: u32) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "mbind"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_lists() {
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn any_placement_binds_nothing() {
        let v = [0u8; 64];
        assert_eq!(
            bind(v.as_ptr(), v.len(), Placement::Any),
            Outcome::NotRequested
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads sysfs")]
    fn binding_to_node_zero_never_fails_on_a_running_node() {
        let v = vec![0u8; 1 << 16];
        let out = bind(v.as_ptr(), v.len(), Placement::Node(0));
        assert!(
            matches!(out, Outcome::SingleNode | Outcome::Bound { node: 0 }),
            "{out:?}"
        );
        assert!(online_nodes().contains(&0));
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads sysfs")]
    fn missing_interface_is_an_error() {
        let e = iface_node("no-such-if0").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(
            iface_node("lo").unwrap().is_none(),
            "loopback has no device node"
        );
    }
}
