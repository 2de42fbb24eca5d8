//! The XDP program from userspace: load the object, configure it, attach it to an interface,
//! pin it so it outlives the loader, count its verdicts, and register AF_XDP sockets in its map.
//!
//! Two ways to own the attachment:
//! - **pinned** (`cargo xtask load`): program, link and maps live under
//!   `/sys/fs/bpf/eventstream/<iface>/` until `cargo xtask unload`;
//! - **owned by the daemon**: when nothing is pinned for the interface, the daemon loads its own
//!   and holds the `bpf_link`; the kernel detaches it when the daemon exits, crash included.

pub mod defence;
pub mod ring;
pub mod socket;
pub mod sys;
pub mod tx;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::{fmt, io};

use aya::Ebpf;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, XskMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{ProgramInfo, Xdp, XdpMode};
use eventstream_common::{
    ALLOW_MAP, AttachMode, CONFIG_MAP, DROP_PROGRAM_NAME, GROUPS_MAP, PROGRAM_NAME, RATE_MAP,
    STATS_MAP, SourceAddr, VERDICT_COUNT, Verdict, XSKS_MAP, XdpConfig,
};

use defence::{Defence, fill_allow};

/// Where pinned objects live: `<PIN_ROOT>/<iface>/{prog,link,XSKS,CONFIG,STATS,ALLOW,RATE}`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/eventstream";

/// Where `cargo xtask build-ebpf` writes the object, relative to the workspace. The daemon
/// loads the object built into its binary unless `xdp.object` names another (absolute) path.
pub const DEFAULT_OBJECT: &str = "target/ebpf/eventstream.bpf.o";

/// The XDP object built into this binary by `build.rs` (the `embed-xdp` feature, on by default).
#[cfg(feature = "embed-xdp")]
static EMBEDDED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/eventstream-ebpf"));

/// The XDP object built into this binary, if it was built with one (`AYA_BUILD_SKIP=1` at
/// build time leaves it empty).
pub fn embedded_object() -> Option<&'static [u8]> {
    #[cfg(feature = "embed-xdp")]
    return (!EMBEDDED.is_empty()).then_some(EMBEDDED);
    #[cfg(not(feature = "embed-xdp"))]
    None
}

/// Where an XDP object comes from.
#[derive(Clone, Copy, Debug)]
pub enum ObjectSource<'a> {
    /// The one built into this binary.
    Embedded,
    /// A file: an absolute path to an object only root (or this user) can write.
    File(&'a Path),
}

impl<'a> ObjectSource<'a> {
    /// `xdp.object` as configured: empty for the embedded object.
    pub fn from_config(path: &'a Path) -> Self {
        if path.as_os_str().is_empty() {
            Self::Embedded
        } else {
            Self::File(path)
        }
    }
}

/// Errors of the XDP control path.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The object file could not be read.
    #[error("reading XDP object {path}: {reason} (build it with `cargo xtask build-ebpf`)")]
    Object {
        /// The path tried.
        path: PathBuf,
        /// The OS error.
        reason: io::Error,
    },
    /// The kernel or aya refused the object, a program, a map or a link.
    #[error("{what}: {reason}")]
    Bpf {
        /// What was being done.
        what: String,
        /// The underlying error.
        reason: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A privileged operation was refused.
    #[error("{what}: not permitted (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON)")]
    NotPermitted {
        /// What was being done.
        what: String,
    },
    /// The interface does not exist.
    #[error("no network interface {0:?}")]
    NoInterface(String),
    /// Something expected in the object or on bpffs is missing.
    #[error("{0}")]
    Missing(String),
    /// A filesystem operation failed.
    #[error("{what}: {reason}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        reason: io::Error,
    },
}

impl XdpError {
    /// Wraps an aya error, recognising `EPERM`/`EACCES` anywhere in its chain.
    fn bpf<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>, e: E) -> Self {
        let what = what.into();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<io::Error>()
                && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
            {
                return Self::NotPermitted { what };
            }
            cur = err.source();
        }
        Self::Bpf {
            what,
            reason: Box::new(e),
        }
    }

    /// Whether the failure is a missing privilege (callers fall back to kernel UDP).
    pub const fn is_permission(&self) -> bool {
        matches!(self, Self::NotPermitted { .. })
    }
}

/// Packets counted per [`Verdict`], summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictCounts(pub [u64; VERDICT_COUNT as usize]);

impl VerdictCounts {
    /// The count for one verdict.
    pub const fn get(&self, v: Verdict) -> u64 {
        self.0[v as usize]
    }

    /// `(label, count)` pairs in counter order.
    pub fn labelled(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Verdict::ALL.iter().map(|v| (v.label(), self.get(*v)))
    }

    /// Element-wise `self - earlier`.
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        let mut d = *self;
        for (x, e) in d.0.iter_mut().zip(earlier.0) {
            *x = x.saturating_sub(e);
        }
        d
    }
}

fn read_stats<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
) -> Result<VerdictCounts, XdpError> {
    let mut c = VerdictCounts::default();
    for (i, slot) in c.0.iter_mut().enumerate() {
        let per_cpu = map
            .get(&(i as u32), 0)
            .map_err(|e| XdpError::bpf("reading STATS", e))?;
        *slot = per_cpu.iter().sum();
    }
    Ok(c)
}

/// The interface index of `iface`.
///
/// # Errors
/// [`XdpError::NoInterface`] when there is none by that name.
pub fn if_index(iface: &str) -> Result<u32, XdpError> {
    let c = std::ffi::CString::new(iface).map_err(|_| XdpError::NoInterface(iface.to_owned()))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(XdpError::NoInterface(iface.to_owned()))
    } else {
        Ok(idx)
    }
}

/// The hardware (MAC) address of `iface` in the calling thread's network namespace (asked of
/// the kernel with `SIOCGIFHWADDR`: `/sys/class/net` shows the namespace /sys was mounted in).
///
/// # Errors
/// [`XdpError::NoInterface`] when there is no such interface.
pub fn if_hwaddr(iface: &str) -> Result<[u8; 6], XdpError> {
    let missing = || XdpError::NoInterface(iface.to_owned());
    if iface.len() >= libc::IFNAMSIZ || iface.contains('\0') {
        return Err(missing());
    }
    let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .or_else(|_| std::net::UdpSocket::bind((std::net::Ipv6Addr::LOCALHOST, 0)))
        .map_err(|_| missing())?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the NUL-terminated name and writes `ifr_hwaddr` of `req`,
    // which lives for the call; the socket is valid.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) };
    if rc != 0 {
        return Err(missing());
    }
    // SAFETY: a successful SIOCGIFHWADDR filled the `ifr_hwaddr` member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(mac)
}

/// Mounts bpffs on `/sys/fs/bpf` if nothing is mounted there (fresh machines have none).
///
/// # Errors
/// When the mount is refused (not root) or the directory cannot be made.
pub fn ensure_bpffs() -> Result<(), XdpError> {
    const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;
    let dir = c"/sys/fs/bpf";
    // SAFETY: `statfs` writes into a zeroed out-struct we own; `dir` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(dir.as_ptr(), &mut st) } == 0
        && st.f_type as libc::c_long == BPF_FS_MAGIC
    {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").map_err(|reason| XdpError::Io {
        what: "creating /sys/fs/bpf".into(),
        reason,
    })?;
    // SAFETY: all pointers are NUL-terminated literals; a bpf mount takes no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            dir.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Err(XdpError::NotPermitted {
                what: "mounting bpffs on /sys/fs/bpf".into(),
            });
        }
        return Err(XdpError::Io {
            what: "mounting bpffs on /sys/fs/bpf".into(),
            reason: e,
        });
    }
    Ok(())
}

/// The object's drop-everything program, loaded (not attached): what the lab bench injects
/// live frames through for the XDP_DROP ceiling.
#[derive(Debug)]
pub struct DropProgram {
    ebpf: Ebpf,
}

impl DropProgram {
    /// Loads the object and its drop program.
    ///
    /// # Errors
    /// As [`XdpProgram::load`].
    pub fn load(object: ObjectSource<'_>) -> Result<Self, XdpError> {
        Ok(Self {
            ebpf: load_object(object, DROP_PROGRAM_NAME)?,
        })
    }

    /// The program's file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        program_fd(&self.ebpf, DROP_PROGRAM_NAME)
    }
}

/// Refuses an object file that someone other than this user (or root) could have written: it is
/// named by an absolute path (never one that depends on the working directory), owned by root
/// or by us, and neither it nor its directory is group- or world-writable (a program loaded
/// into the kernel decides where every packet goes).
fn trusted_object(path: &Path) -> Result<(), XdpError> {
    use std::os::unix::fs::MetadataExt as _;
    if !path.is_absolute() {
        return Err(XdpError::Object {
            path: path.into(),
            reason: io::Error::new(
                io::ErrorKind::InvalidInput,
                "an external XDP object is taken by absolute path only (leave xdp.object empty for the one built into this binary)",
            ),
        });
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let check = |p: &Path, what: &str| -> Result<(), XdpError> {
        let m = std::fs::metadata(p).map_err(|reason| XdpError::Object {
            path: p.into(),
            reason,
        })?;
        let owner_ok = m.uid() == 0 || m.uid() == me;
        let writable_by_others = m.mode() & 0o022 != 0 && !(m.is_dir() && m.mode() & 0o1000 != 0);
        if owner_ok && !writable_by_others {
            return Ok(());
        }
        Err(XdpError::Object {
            path: p.into(),
            reason: io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{what} is {} (owner uid {}, mode {:o}): the XDP object must be writable by root (or this user) alone",
                    if owner_ok {
                        "group- or world-writable"
                    } else {
                        "owned by someone else"
                    },
                    m.uid(),
                    m.mode() & 0o7777
                ),
            ),
        })
    };
    check(path, "the object")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        check(dir, "its directory")?;
    }
    Ok(())
}

/// Reads the object and loads its XDP program `name` into the kernel (not attached).
fn load_object(object: ObjectSource<'_>, name: &str) -> Result<Ebpf, XdpError> {
    let file;
    let (bytes, shown): (&[u8], String) = match object {
        ObjectSource::Embedded => (
            embedded_object().ok_or_else(|| {
                XdpError::Missing(
                    "this binary was built without its XDP object (feature embed-xdp): set xdp.object to one built by `cargo xtask build-ebpf`"
                        .into(),
                )
            })?,
            "the embedded object".into(),
        ),
        ObjectSource::File(path) => {
            trusted_object(path)?;
            file = std::fs::read(path).map_err(|reason| XdpError::Object {
                path: path.into(),
                reason,
            })?;
            (&file, path.display().to_string())
        }
    };
    let mut ebpf = Ebpf::load(bytes).map_err(|e| XdpError::bpf("loading the XDP object", e))?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| XdpError::Missing(format!("program {name} not in {shown}")))?
        .try_into()
        .map_err(|e| XdpError::bpf("program type", e))?;
    prog.load()
        .map_err(|e| XdpError::bpf(format!("loading the XDP program {name}"), e))?;
    Ok(ebpf)
}

/// The descriptor of program `name`, which [`load_object`] loaded.
fn program_fd<'e>(ebpf: &'e Ebpf, name: &str) -> BorrowedFd<'e> {
    let prog: &Xdp = ebpf
        .program(name)
        .and_then(|p| p.try_into().ok())
        .expect("checked in load_object");
    prog.fd().expect("loaded in load_object").as_fd()
}

/// The loaded program and its maps.
#[derive(Debug)]
pub struct XdpProgram {
    ebpf: Ebpf,
}

impl XdpProgram {
    /// Loads the object and the program into the kernel (not attached yet).
    ///
    /// # Errors
    /// [`XdpError::Object`] when the file is missing, relative or writable by others,
    /// [`XdpError::Missing`] when this binary has no embedded object,
    /// [`XdpError::NotPermitted`] without privileges, [`XdpError::Bpf`] when the verifier or
    /// loader refuses it.
    pub fn load(object: ObjectSource<'_>) -> Result<Self, XdpError> {
        Ok(Self {
            ebpf: load_object(object, PROGRAM_NAME)?,
        })
    }

    /// The kernel's tag of the loaded program: a hash of its instructions, the same for every
    /// load of the same object, so a pinned program can be told to be this one.
    ///
    /// # Errors
    /// When the kernel's program info cannot be read.
    pub fn tag(&self) -> Result<u64, XdpError> {
        let prog: &Xdp = self
            .ebpf
            .program(PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("checked in load");
        Ok(prog
            .info()
            .map_err(|e| XdpError::bpf("reading the program's info", e))?
            .tag())
    }

    /// Replaces the source allow-list (the `ALLOW` trie; the program reads it only while
    /// [`XdpConfig::allow_list`] is set) and the multicast groups steered (`GROUPS`).
    ///
    /// # Errors
    /// When a map refuses an update (more than `MAX_ALLOW_ENTRIES` networks, `MAX_GROUPS`
    /// groups).
    pub fn set_allow_list(&mut self, defence: &Defence) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(ALLOW_MAP)
            .ok_or_else(|| XdpError::Missing(format!("map {ALLOW_MAP}")))?;
        let mut trie: LpmTrie<&mut MapData, SourceAddr, u8> =
            LpmTrie::try_from(map).map_err(|e| XdpError::bpf("opening ALLOW", e))?;
        fill_allow(&mut trie, &defence.allow)?;
        let map = self
            .ebpf
            .map_mut(GROUPS_MAP)
            .ok_or_else(|| XdpError::Missing(format!("map {GROUPS_MAP}")))?;
        let mut groups: HashMap<&mut MapData, SourceAddr, u8> =
            HashMap::try_from(map).map_err(|e| XdpError::bpf("opening GROUPS", e))?;
        defence::fill_groups(&mut groups, &defence.groups)
    }

    fn xdp(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("checked in load")
    }

    /// Writes the program's configuration.
    ///
    /// # Errors
    /// When the map update is refused.
    pub fn configure(&mut self, config: XdpConfig) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(CONFIG_MAP)
            .ok_or_else(|| XdpError::Missing(format!("map {CONFIG_MAP}")))?;
        let mut arr: Array<&mut MapData, XdpConfig> =
            Array::try_from(map).map_err(|e| XdpError::bpf("opening CONFIG", e))?;
        arr.set(0, config, 0)
            .map_err(|e| XdpError::bpf("writing CONFIG", e))
    }

    /// The program's file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        program_fd(&self.ebpf, PROGRAM_NAME)
    }

    /// Runs the program once on `packet` (`BPF_PROG_TEST_RUN`).
    ///
    /// # Errors
    /// The kernel's; see [`sys::prog_test_run`].
    pub fn test_run(&self, packet: &[u8]) -> io::Result<sys::TestRun> {
        sys::prog_test_run(self.fd(), packet, 1, 0)
    }

    /// Verdict counters, summed over CPUs.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn stats(&self) -> Result<VerdictCounts, XdpError> {
        let map = self
            .ebpf
            .map(STATS_MAP)
            .ok_or_else(|| XdpError::Missing(format!("map {STATS_MAP}")))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|e| XdpError::bpf("opening STATS", e))?;
        read_stats(&arr)
    }

    /// Puts the AF_XDP socket `fd` in the slot for RX queue `queue`.
    ///
    /// # Errors
    /// When the map update is refused (queue past the map size, socket not bound).
    pub fn register_socket(&mut self, queue: u32, fd: impl AsRawFd) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(XSKS_MAP)
            .ok_or_else(|| XdpError::Missing(format!("map {XSKS_MAP}")))?;
        let mut xsks: XskMap<&mut MapData> =
            XskMap::try_from(map).map_err(|e| XdpError::bpf("opening XSKS", e))?;
        xsks.set(queue, fd, 0)
            .map_err(|e| XdpError::bpf(format!("registering the socket of queue {queue}"), e))
    }

    /// Attaches to `iface` in `mode` and returns the link; the program stays attached while the
    /// link (or its pin) lives.
    ///
    /// # Errors
    /// [`XdpError::NoInterface`], [`XdpError::NotPermitted`], or the kernel's refusal (a driver
    /// without native XDP refuses `Driver`).
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<FdLink, XdpError> {
        if_index(iface)?;
        let flags = match mode {
            AttachMode::Driver => XdpMode::Driver,
            AttachMode::Skb => XdpMode::Skb,
            AttachMode::Unknown => XdpMode::Default,
        };
        let xdp = self.xdp();
        let id = xdp
            .attach(iface, flags)
            .map_err(|e| XdpError::bpf(format!("attaching to {iface} ({})", mode.label()), e))?;
        let link = xdp
            .take_link(id)
            .map_err(|e| XdpError::bpf("taking the XDP link", e))?;
        FdLink::try_from(link)
            .map_err(|e| XdpError::bpf("XDP link is not a bpf_link (kernel older than 5.9?)", e))
    }

    /// Pins program, link and maps under `<PIN_ROOT>/<iface>/` so they outlive this process.
    ///
    /// # Errors
    /// When bpffs is missing or the pins already exist.
    pub fn pin(&mut self, iface: &str, link: FdLink) -> Result<PinnedLink, XdpError> {
        let dir = pin_dir(iface);
        // 0700: only root may reach the maps (the socket map decides where traffic goes).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|reason| XdpError::Io {
                what: format!("creating {}", dir.display()),
                reason,
            })?;
        for d in [Path::new(PIN_ROOT), dir.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).map_err(
                |reason| XdpError::Io {
                    what: format!("making {} 0700", d.display()),
                    reason,
                },
            )?;
        }
        self.xdp()
            .pin(dir.join("prog"))
            .map_err(|e| XdpError::bpf("pinning the program", e))?;
        for name in [
            XSKS_MAP, CONFIG_MAP, STATS_MAP, ALLOW_MAP, RATE_MAP, GROUPS_MAP,
        ] {
            let map = self
                .ebpf
                .map(name)
                .ok_or_else(|| XdpError::Missing(format!("map {name}")))?;
            map.pin(dir.join(name))
                .map_err(|e| XdpError::bpf(format!("pinning {name}"), e))?;
        }
        link.pin(dir.join("link"))
            .map_err(|e| XdpError::bpf("pinning the link", e))
    }
}

/// The directory name of `iface`'s pins in the calling thread's network namespace: the name
/// itself in the host's namespace (that of PID 1), `<iface>@netns-<inode>` in any other, so
/// the `eth0`s of two containers or two labs never share pins.
fn pin_name(iface: &str) -> String {
    match netns_suffix() {
        Some(sfx) => format!("{iface}{sfx}"),
        None => iface.to_owned(),
    }
}

/// `@netns-<inode>` when the calling thread is not in the host's network namespace.
fn netns_suffix() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mine = std::fs::metadata("/proc/thread-self/ns/net").ok()?.ino();
    let host = std::fs::metadata("/proc/1/ns/net").ok().map(|m| m.ino());
    (host != Some(mine)).then(|| format!("@netns-{mine}"))
}

/// `<PIN_ROOT>/<iface>` (with the namespace suffix `pin_name` adds outside the host's).
pub fn pin_dir(iface: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(pin_name(iface))
}

/// The network namespace a pin directory belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinNamespace {
    /// The host's (PID 1's).
    Host,
    /// A named namespace (`/run/netns/NAME`, as `ip netns` makes them).
    Named(String),
    /// One no name under `/run/netns` refers to: deleted, or held only by a process.
    Unnamed(u64),
}

impl fmt::Display for PinNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host => f.write_str("the host's namespace"),
            Self::Named(n) => write!(f, "netns {n}"),
            Self::Unnamed(i) => write!(f, "netns inode {i} (no /run/netns name: deleted?)"),
        }
    }
}

/// One pin directory under [`PIN_ROOT`], wherever its namespace is.
#[derive(Debug)]
pub struct PinEntry {
    /// The directory's name (`IF` or `IF@netns-INODE`).
    pub dir: String,
    /// The interface.
    pub iface: String,
    /// Its namespace.
    pub netns: PinNamespace,
    /// What is pinned there, read from inside that namespace; why not, when it cannot be.
    pub pinned: Result<Pinned, String>,
}

/// Every pin directory under [`PIN_ROOT`], across network namespaces: each read from inside its
/// own namespace (entered by its `/run/netns` name), so whether its link still steers its
/// interface is judged there. Pins of a namespace that is gone are reported stale.
pub fn survey() -> Vec<PinEntry> {
    use std::os::unix::fs::MetadataExt as _;
    let named: Vec<(u64, String)> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let ino = std::fs::metadata(e.path()).ok()?.ino();
            Some((ino, e.file_name().into_string().ok()?))
        })
        .collect();
    let host = std::fs::metadata("/proc/1/ns/net").ok().map(|m| m.ino());
    let mut dirs: Vec<String> = std::fs::read_dir(PIN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .map(|dir| {
            let (iface, ino) = match dir.split_once("@netns-") {
                Some((i, n)) => (i.to_owned(), n.parse::<u64>().ok()),
                None => (dir.clone(), host),
            };
            let netns = match ino {
                i if i == host => PinNamespace::Host,
                Some(i) => named
                    .iter()
                    .find(|(n, _)| *n == i)
                    .map_or(PinNamespace::Unnamed(i), |(_, name)| {
                        PinNamespace::Named(name.clone())
                    }),
                None => PinNamespace::Unnamed(0),
            };
            let pinned = match &netns {
                PinNamespace::Host => Pinned::open(&iface).map_err(|e| e.to_string()),
                PinNamespace::Named(ns) => crate::tools::lab::in_netns(ns, || {
                    Pinned::open(&iface).map_err(|e| e.to_string())
                })
                .unwrap_or_else(|e| Err(e.to_string())),
                PinNamespace::Unnamed(_) => Err(
                    "its network namespace has no name here: stale unless a process still holds it"
                        .into(),
                ),
            };
            PinEntry {
                dir,
                iface,
                netns,
                pinned,
            }
        })
        .collect()
}

/// [`survey`] as text for people: one line per pin directory (interface, namespace, state,
/// attach mode, program and tag, port), then its verdict counters.
pub fn status_text() -> String {
    use fmt::Write as _;
    let entries = survey();
    if entries.is_empty() {
        return format!("no XDP program pinned under {PIN_ROOT} (cargo xtask load --iface IF)\n");
    }
    let mut s = String::new();
    for e in entries {
        match &e.pinned {
            Ok(p) => {
                let state = match &p.stale {
                    None => "attached".to_owned(),
                    Some(why) => format!("STALE, not trusted ({why})"),
                };
                let _ = writeln!(
                    s,
                    "{} in {}: {state}; {} mode, program {} tag {:016x}, UDP port {}, VLAN {}, allow-list {}, rate limit {}",
                    e.iface,
                    e.netns,
                    AttachMode::from_u8(p.config.attach_mode).label(),
                    p.program_name,
                    p.program_tag,
                    p.config.udp_port,
                    if p.config.allow_vlan != 0 {
                        "steered"
                    } else {
                        "passed"
                    },
                    if p.config.allow_list != 0 {
                        "on"
                    } else {
                        "off"
                    },
                    match p.config.rate_pps {
                        0 => "off".to_owned(),
                        r => format!("{r}/s burst {}", p.config.rate_burst),
                    },
                );
                for (label, n) in p.stats.labelled() {
                    let _ = writeln!(s, "  {label:<18} {n}");
                }
            }
            Err(why) => {
                let _ = writeln!(
                    s,
                    "{} in {}: STALE, not trusted ({why}); pins in {PIN_ROOT}/{}",
                    e.iface, e.netns, e.dir
                );
            }
        }
    }
    s
}

/// What is pinned for one interface.
#[derive(Debug)]
pub struct Pinned {
    /// The interface.
    pub iface: String,
    /// Its configuration map's content.
    pub config: XdpConfig,
    /// Its verdict counters.
    pub stats: VerdictCounts,
    /// The pinned program's name, as the kernel keeps it.
    pub program_name: String,
    /// The pinned program's tag (see [`XdpProgram::tag`]).
    pub program_tag: u64,
    /// Whether the pinned link is attached to this very interface (in this namespace).
    pub attached: bool,
    /// Why the pins are stale, if they are: no link, a link whose device is gone (its
    /// namespace deleted, say), or one attached to another interface (an inode number reused).
    pub stale: Option<String>,
}

fn open_map(dir: &Path, name: &str) -> Result<Map, XdpError> {
    let data = MapData::from_pin(dir.join(name))
        .map_err(|e| XdpError::bpf(format!("opening pinned {name}"), e))?;
    Map::from_map_data(data).map_err(|e| XdpError::bpf(format!("pinned {name}"), e))
}

/// Why the link pinned in `dir` does not steer `iface` here, if it does not.
fn link_staleness(dir: &Path, iface: &str) -> Option<String> {
    use std::os::fd::AsFd as _;
    let link = match sys::obj_get(&dir.join("link")) {
        Ok(fd) => fd,
        Err(e) => return Some(format!("no pinned link ({e})")),
    };
    let want = if_index(iface).ok();
    match sys::xdp_link_ifindex(link.as_fd()) {
        Ok(Some(0)) => {
            Some("its link's device is gone (the namespace or interface was deleted)".into())
        }
        Ok(Some(i)) if Some(i) != want => Some(format!(
            "its link is attached to ifindex {i}, not to {iface} ({})",
            want.map_or("absent".into(), |w| format!("ifindex {w}"))
        )),
        Ok(Some(_)) => None,
        Ok(None) => Some("the pinned link is not an XDP link".into()),
        Err(e) => Some(format!("its link cannot be read ({e})")),
    }
}

impl Pinned {
    /// Reads what `cargo xtask load` pinned for `iface`.
    ///
    /// # Errors
    /// When nothing (or something incomplete) is pinned for it.
    pub fn open(iface: &str) -> Result<Self, XdpError> {
        let dir = pin_dir(iface);
        let cfg = open_map(&dir, CONFIG_MAP)?;
        let cfg: Array<MapData, XdpConfig> =
            Array::try_from(cfg).map_err(|e| XdpError::bpf("pinned CONFIG", e))?;
        let config = cfg
            .get(&0, 0)
            .map_err(|e| XdpError::bpf("reading pinned CONFIG", e))?;
        let stats = open_map(&dir, STATS_MAP)?;
        let stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(stats).map_err(|e| XdpError::bpf("pinned STATS", e))?;
        let info = ProgramInfo::from_pin(dir.join("prog"))
            .map_err(|e| XdpError::bpf("opening the pinned program", e))?;
        let stale = link_staleness(&dir, iface);
        Ok(Self {
            iface: iface.to_owned(),
            config,
            stats: read_stats(&stats)?,
            program_name: info.name_as_str().unwrap_or("?").to_owned(),
            program_tag: info.tag(),
            attached: stale.is_none(),
            stale,
        })
    }

    /// Why this pinned program is not `ours` (name and tag), if it is not.
    pub fn foreign(&self, ours: &XdpProgram) -> Option<String> {
        // The kernel keeps the first 15 bytes of a program's name.
        let want = &PROGRAM_NAME[..PROGRAM_NAME.len().min(15)];
        if self.program_name != want {
            return Some(format!(
                "the pinned program is {:?}, not {want:?}",
                self.program_name
            ));
        }
        match ours.tag() {
            Ok(tag) if tag == self.program_tag => None,
            Ok(tag) => Some(format!(
                "the pinned program's tag {:016x} is not this object's {tag:016x} (another build)",
                self.program_tag
            )),
            Err(e) => Some(format!("this object's tag cannot be read ({e})")),
        }
    }

    /// Writes `defence` into the pinned program of `iface`: the allow-list and the rate
    /// fields of its configuration (the port and VLAN setting are left as pinned).
    ///
    /// # Errors
    /// When a pinned map cannot be opened or refuses the update.
    pub fn set_defence(iface: &str, defence: &Defence) -> Result<(), XdpError> {
        let dir = pin_dir(iface);
        let allow = open_map(&dir, ALLOW_MAP)?;
        let mut trie: LpmTrie<MapData, SourceAddr, u8> =
            LpmTrie::try_from(allow).map_err(|e| XdpError::bpf("pinned ALLOW", e))?;
        fill_allow(&mut trie, &defence.allow)?;
        let groups = open_map(&dir, GROUPS_MAP)?;
        let mut groups: HashMap<MapData, SourceAddr, u8> =
            HashMap::try_from(groups).map_err(|e| XdpError::bpf("pinned GROUPS", e))?;
        defence::fill_groups(&mut groups, &defence.groups)?;
        let cfg = open_map(&dir, CONFIG_MAP)?;
        let mut cfg: Array<MapData, XdpConfig> =
            Array::try_from(cfg).map_err(|e| XdpError::bpf("pinned CONFIG", e))?;
        let now = cfg
            .get(&0, 0)
            .map_err(|e| XdpError::bpf("reading pinned CONFIG", e))?;
        cfg.set(0, defence.apply(now), 0)
            .map_err(|e| XdpError::bpf("writing pinned CONFIG", e))
    }

    /// Interfaces of the calling thread's network namespace with something pinned.
    pub fn list() -> Vec<String> {
        let sfx = netns_suffix();
        let mut v: Vec<String> = std::fs::read_dir(PIN_ROOT)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| match (&sfx, name.split_once("@netns-")) {
                (None, None) => Some(name),
                (Some(s), Some((iface, _))) if name.ends_with(s.as_str()) => Some(iface.to_owned()),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Registers an AF_XDP socket in the pinned `XSKS` map of `iface`.
    ///
    /// # Errors
    /// When the map is not pinned or refuses the update.
    pub fn register_socket(iface: &str, queue: u32, fd: impl AsRawFd) -> Result<(), XdpError> {
        let map = open_map(&pin_dir(iface), XSKS_MAP)?;
        let mut xsks: XskMap<MapData> =
            XskMap::try_from(map).map_err(|e| XdpError::bpf("pinned XSKS", e))?;
        xsks.set(queue, fd, 0)
            .map_err(|e| XdpError::bpf(format!("registering the socket of queue {queue}"), e))
    }

    /// Detaches and removes everything pinned for `iface`; `Ok(false)` when nothing was.
    ///
    /// # Errors
    /// When a pin cannot be removed.
    pub fn remove(iface: &str) -> Result<bool, XdpError> {
        let dir = pin_dir(iface);
        if !dir.exists() {
            return Ok(false);
        }
        let link = dir.join("link");
        if link.exists() {
            // Unpinning drops the last reference to the link: the kernel detaches the program.
            let pinned = PinnedLink::from_pin(&link)
                .map_err(|e| XdpError::bpf("opening the pinned link", e))?;
            drop(pinned.unpin().map_err(|reason| XdpError::Io {
                what: "unpinning the link".into(),
                reason,
            })?);
        }
        std::fs::remove_dir_all(&dir).map_err(|reason| XdpError::Io {
            what: format!("removing {}", dir.display()),
            reason,
        })?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_others_can_write_is_refused_before_it_is_read() {
        let dir = std::env::temp_dir().join(format!("es-obj-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let obj = dir.join("x.bpf.o");
        std::fs::write(&obj, b"not an ELF").unwrap();
        std::fs::set_permissions(&obj, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = XdpProgram::load(ObjectSource::File(&obj))
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by root (or this user) alone"), "{e}");
        std::fs::set_permissions(&obj, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = XdpProgram::load(ObjectSource::File(&obj))
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("alone"),
            "trusted now, refused only as not an object: {e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_object_by_relative_path_is_refused() {
        let e = XdpProgram::load(ObjectSource::File(Path::new(DEFAULT_OBJECT)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute path only"), "{e}");
    }
}
