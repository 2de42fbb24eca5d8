//! The assembly: builds the appliance from a [`Config`] and runs it until it is told to stop.
//!
//! Three steps, so the privileged work is done and over before any event is taken, and tests
//! can build the appliance in process:
//! - [`Umem::map`]: the ingest path decided, the host topology read, UMEM mapped on the NIC's
//!   NUMA node and locked;
//! - [`setup`] (privileged): with an interface, the XDP program (reused from
//!   `cargo xtask load`, or loaded and owned here) and one AF_XDP socket per RX queue over that
//!   UMEM; without one, or where XDP cannot be had (no privileges, no interface, no AF_XDP),
//!   kernel UDP sockets with `recvmmsg`, announced in one log line that says why; the TCP and
//!   admin listeners; then every capability dropped but the one the run needs. It prints one
//!   `listening <what> <addr>` line per bound socket.
//! - [`run`] (unprivileged): sinks opened, one data-plane thread per receive queue (and,
//!   pipelined, the dispatcher, workers and DLQ), `ready` printed, and the rest on one mostly
//!   sleeping housekeeping thread ([`house`]). A stop (SIGINT, SIGTERM, `duration`, or
//!   `POST /state drain`) closes ingest and drains what is queued into the sinks while `/metrics`
//!   keeps answering; the [`Report`] reconciles what was accepted with what was delivered.

pub mod house;
pub mod reload;

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use aya::programs::links::FdLink;
use serde_json::json;
use tracing::{info, warn};

use crate::engine::control::{Command, ControlPlane, PipelineState};
use crate::engine::dedup::{DedupWindow, SharedDedupWindow};
use crate::engine::inline::InlineControl;
use crate::engine::latency::{LatencyFrom, Stage};
use crate::engine::rules::LiveRules;
use crate::engine::{
    Bus, ClassStep, Dedup, Dispatcher, DlqEntry, DlqReason, DlqStep, EngineCounters, FailReason,
    Inline, WorkerClass, WorkerKind, run_dlq, run_worker,
};
use crate::ingest::tcp::TcpLimits;
use crate::ingest::{
    Acceptor, Discard, Enqueue, IngestCounters, RunInline, SideUdp, Slot, TcpIngest, TryEnqueue,
    UdpIngest, XskIngest, bind_udp,
};
use crate::mem::RegionOptions;
use crate::mem::frames::{FrameArena, FrameOwner};
use crate::mem::numa::{self, Placement};
use crate::mem::pool::{EventPool, Pooled};
use crate::mem::topology::{self, PlanInput, Topology};
use crate::ops::admin::MetricsView;
use crate::ops::config::{AttachPolicy, Config, EngineMode, SinkKind, XdpConfig as XdpSection};
use crate::ops::privs;
use crate::ring::doorbell::Doorbell;
use crate::ring::{mpsc, spsc};
use crate::sink::file::{FileSink, SegmentLog};
use crate::sink::{MemorySink, Sink, SinkErrorKind};
use crate::wire::event::{Event, Source};
use crate::wire::protocol::RejectReason;
use crate::xdp::socket::{XskOptions, XskSocket};
use crate::xdp::{ObjectSource, Pinned, XdpProgram, if_index};
use eventstream_common::{AttachMode, XdpConfig};

/// The XDP program this daemon steers with: pinned by `cargo xtask load` (left in place at
/// exit), or loaded here and owned through its `bpf_link` (detached by the kernel at exit).
enum Program {
    Pinned,
    Owned { program: XdpProgram, _link: FdLink },
}

/// The AF_XDP data path, set up before any thread starts (privileged work first).
struct XskSetup<'a> {
    program: Program,
    attach: AttachMode,
    queues: Vec<(XskSocket<'a>, FrameOwner<'a>)>,
    /// `--probe bare-crate`: the queues' sockets are xdpilone's instead of ours.
    crate_queues: Vec<crate::tools::xsk_crate::CrateXsk>,
}

fn attach_program(x: &XdpSection, groups: &[std::net::IpAddr]) -> Result<(Program, AttachMode)> {
    let mut program = XdpProgram::load(ObjectSource::from_config(&x.object))?;
    let defence = crate::xdp::defence::Defence {
        groups: groups.to_vec(),
        ..x.defence()
    };
    if Pinned::list().contains(&x.iface) {
        // A pinned program is reused only when it is this very program (name and tag) and its
        // link steers this interface here; anything else is stale, removed, never trusted.
        let why = match Pinned::open(&x.iface) {
            Ok(pinned) => pinned.stale.clone().or_else(|| pinned.foreign(&program)),
            Err(e) => Some(format!("its pins cannot be read ({e})")),
        };
        if let Some(why) = why {
            warn!(iface = %x.iface, reason = %why, "removing stale XDP pins");
            Pinned::remove(&x.iface)
                .with_context(|| format!("removing the stale pins of {}", x.iface))?;
        } else {
            let pinned = Pinned::open(&x.iface)?;
            Pinned::set_defence(&x.iface, &defence)?;
            let mode = AttachMode::from_u8(pinned.config.attach_mode);
            info!(iface = %x.iface, mode = mode.label(), port = pinned.config.udp_port, "reusing the XDP program pinned by `cargo xtask load`");
            return Ok((Program::Pinned, mode));
        }
    }
    let modes: &[AttachMode] = match x.attach {
        AttachPolicy::Auto => &[AttachMode::Driver, AttachMode::Skb],
        AttachPolicy::Drv => &[AttachMode::Driver],
        AttachPolicy::Skb => &[AttachMode::Skb],
    };
    let mut last = None;
    for &mode in modes {
        match program.attach(&x.iface, mode) {
            Ok(link) => {
                program.set_allow_list(&defence)?;
                program.configure(defence.apply(XdpConfig {
                    udp_port: x.port,
                    allow_vlan: u8::from(x.allow_vlan),
                    attach_mode: mode as u8,
                    ..XdpConfig::default()
                }))?;
                info!(iface = %x.iface, mode = mode.label(), port = x.port, "XDP program attached (owned by this process)");
                return Ok((
                    Program::Owned {
                        program,
                        _link: link,
                    },
                    mode,
                ));
            }
            Err(e) => {
                if e.is_permission() {
                    return Err(e.into());
                }
                warn!(iface = %x.iface, mode = mode.label(), reason = %e, "XDP attach refused");
                last = Some(e);
            }
        }
    }
    Err(last.map_or_else(|| anyhow!("no attach mode allowed"), Into::into))
}

fn setup_xsk<'a>(
    x: &XdpSection,
    groups: &[std::net::IpAddr],
    arenas: &'a [FrameArena],
    probe: Option<Probe>,
) -> Result<XskSetup<'a>> {
    let ifindex = if_index(&x.iface)?;
    let (mut program, attach) = attach_program(x, groups)?;
    let register = |program: &mut Program, q: u32, fd| -> Result<()> {
        match program {
            Program::Pinned => Pinned::register_socket(&x.iface, q, fd)?,
            Program::Owned { program, .. } => program.register_socket(q, fd)?,
        }
        Ok(())
    };
    if probe == Some(Probe::BareCrate) {
        let mut crate_queues = Vec::with_capacity(arenas.len());
        for q in 0..arenas.len() as u32 {
            let sock = crate::tools::xsk_crate::CrateXsk::new(
                ifindex,
                q,
                x.frame_size,
                x.frames,
                x.ring_size,
            )?;
            register(&mut program, q, sock.fd())?;
            crate_queues.push(sock);
        }
        return Ok(XskSetup {
            program,
            attach,
            queues: Vec::new(),
            crate_queues,
        });
    }
    let opts = XskOptions {
        ring_size: x.ring_size,
        need_wakeup: x.need_wakeup,
        try_zero_copy: x.zero_copy,
    };
    let mut queues = Vec::with_capacity(arenas.len());
    for (q, arena) in arenas.iter().enumerate() {
        let mut owner = arena.owner().expect("fresh arena");
        let sock = XskSocket::new(arena, &mut owner, ifindex, q as u32, opts)?;
        register(
            &mut program,
            q as u32,
            std::os::fd::AsRawFd::as_raw_fd(&sock),
        )?;
        queues.push((sock, owner));
    }
    Ok(XskSetup {
        program,
        attach,
        queues,
        crate_queues: Vec::new(),
    })
}

/// A networked sink's memory bound (`sinks.max_buffered_bytes`) and disk buffer
/// (`sinks.buffer`, a directory per sink).
fn remote_limits(
    s: &crate::ops::config::SinksConfig,
    sink: crate::sink::remote::RemoteSink,
    name: &str,
) -> crate::sink::remote::RemoteSink {
    sink.with_limits(
        s.max_buffered_bytes,
        s.buffer.dir.join(name),
        s.buffer.max_bytes,
    )
}

/// This appliance's name in event ids: `engine.node_id`, else the host name.
fn node_id(cfg: &Config) -> String {
    if !cfg.engine.node_id.is_empty() {
        return cfg.engine.node_id.clone();
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`, which is live.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(h) if rc == 0 && !h.is_empty() => h.to_owned(),
        _ => "eventstream".into(),
    }
}

/// A worker's sink of `kind`, or the DLQ's, named after `dir`'s last part.
fn open_sink(
    cfg: &Config,
    dir: &std::path::Path,
    kind: SinkKind,
    run: u64,
) -> Result<Box<dyn Sink>> {
    let s = &cfg.sinks;
    let name = dir
        .file_name()
        .map_or_else(|| "sink".into(), |n| n.to_string_lossy().into_owned());
    Ok(match kind {
        SinkKind::Kafka => {
            let sink = crate::sink::kafka::open(&s.kafka, &node_id(cfg), run, &name)
                .with_context(|| format!("the Kafka sink {name} (sinks.kafka)"))?;
            info!(brokers = %s.kafka.brokers, sink = %name, "Kafka sink ready");
            Box::new(remote_limits(s, sink, &name))
        }
        SinkKind::Postgres => {
            let sink = crate::sink::postgres::open(&s.postgres, &node_id(cfg), run, &name)
                .with_context(|| format!("the PostgreSQL sink {name} (sinks.postgres)"))?;
            info!(table = %s.postgres.table, sink = %name, "PostgreSQL sink ready");
            Box::new(remote_limits(s, sink, &name))
        }
        SinkKind::Nats => {
            let name = dir
                .file_name()
                .map_or_else(|| "sink".into(), |n| n.to_string_lossy().into_owned());
            let sink = crate::sink::nats::open(&s.nats, &node_id(cfg), run, &name)
                .with_context(|| format!("the NATS sink {name} (sinks.nats)"))?;
            info!(stream = %s.nats.stream, servers = ?s.nats.servers, sink = %name, "NATS JetStream sink ready");
            Box::new(remote_limits(s, sink, &name))
        }
        SinkKind::Memory => {
            let n = cfg.engine.memory_sink_capacity;
            Box::new(MemorySink::new(n, n.saturating_mul(256)))
        }
        SinkKind::File => {
            let interval = Duration::from_millis(s.fsync_interval_ms);
            let (log, rec) = SegmentLog::open(dir, s.segment_bytes, s.fsync, interval)
                .map_err(|e| {
                    // Sinks open after capabilities are dropped: uid 0 alone does not
                    // override a directory's permissions.
                    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                        // SAFETY: geteuid has no preconditions.
                        let uid = unsafe { libc::geteuid() };
                        format!(" (sinks open after capabilities are dropped: the directory must be writable by uid {uid} itself)")
                    } else {
                        String::new()
                    };
                    anyhow!(
                        "opening the log in {} (sinks.dir / sinks.dlq_dir): {e}{hint}",
                        dir.display()
                    )
                })?;
            info!(dir = %dir.display(), records = rec.records, truncated_bytes = rec.truncated_bytes, next_id = rec.next_id, "file log opened");
            Box::new(FileSink::new(log.with_max_buffered(s.max_buffered_bytes)))
        }
    })
}

/// Drops every capability but the one that reads the XDP program's counters (when AF_XDP is
/// in use), clears the inheritable set, and sets `no_new_privs`; see [`crate::ops::privs`].
///
/// # Errors
/// When the process holds capabilities and cannot drop them: running on with them is refused.
fn drop_privileges(keep_bpf: bool, p: &crate::ops::config::PrivilegesConfig) -> Result<()> {
    let user = match &p.user {
        Some(name) => {
            let (uid, primary) = privs::lookup_user(name).context("privileges.user")?;
            let gid = match &p.group {
                Some(g) => privs::lookup_group(g).context("privileges.group")?,
                None => primary,
            };
            Some((uid, gid))
        }
        None => None,
    };
    let before = privs::current().context("reading this thread's capabilities")?;
    if before.permitted == 0 && user.is_none() {
        info!("running without capabilities: nothing to drop");
        return Ok(());
    }
    let keep: Vec<u32> = if keep_bpf {
        vec![privs::bpf_capability()]
    } else {
        Vec::new()
    };
    let after = privs::retain_only_as(&keep, user).with_context(|| match &p.user {
        Some(u) => format!("dropping capabilities and switching to user {u} after setup"),
        None => "dropping capabilities after setup".into(),
    })?;
    info!(
        user = ?user,
        kept = ?keep,
        effective = format!("{:#x}", after.effective),
        "setup done; capabilities dropped"
    );
    Ok(())
}

/// A TCP listener on `addr`, on `device` only when given (`SO_BINDTODEVICE`).
fn bind_tcp(
    addr: std::net::SocketAddr,
    device: Option<&str>,
) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    if let Some(dev) = device {
        s.bind_device(Some(dev.as_bytes()))?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// The data-plane and engine threads' placement, tallied so that `ready` is said only once each
/// thread runs where the plan puts it (a thread pins itself as it starts; before that the
/// kernel may run it on any CPU).
#[derive(Default)]
struct ThreadsPlaced {
    /// Threads spawned (the main thread's count).
    spawned: AtomicUsize,
    /// Threads that have placed themselves (or had no place to go).
    placed: AtomicUsize,
}

impl ThreadsPlaced {
    /// Counts a thread about to be spawned.
    fn spawning(&self) -> &Self {
        self.spawned.fetch_add(1, Ordering::Relaxed);
        self
    }

    /// Called first thing on a spawned thread: pins it to `cpu` (if the plan has one) and
    /// counts it placed either way.
    fn pin(&self, cpu: Option<u32>, thread: &str) {
        if let Some(cpu) = cpu {
            match numa::pin_current_thread(cpu) {
                Ok(()) => info!(thread, cpu, "thread pinned"),
                Err(e) => warn!(thread, cpu, reason = %e, "could not pin the thread"),
            }
        }
        self.placed.fetch_add(1, Ordering::Release);
    }

    /// Waits (up to `limit`) until every spawned thread has placed itself; false if one has not.
    fn wait(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.placed.load(Ordering::Acquire) < self.spawned.load(Ordering::Relaxed) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        true
    }
}

/// The bench's probes of the AF_XDP path's own limits (`eventstream run --probe`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// `xsk_bare`: RX descriptors straight back to FILL, nothing parsed.
    Bare,
    /// `xsk_parse`: parse every event and release it, no engine.
    Parse,
    /// `xsk_bare_crate`: `bare` on xdpilone's socket code instead of ours.
    BareCrate,
}

/// What `eventstream run` asks for beyond the configuration.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options<'c> {
    /// The configuration file, read again on a reload (SIGHUP, `POST /reload`); `None`: reloads
    /// are refused.
    pub config_path: Option<&'c std::path::Path>,
    /// Kernel UDP ingest even where `xdp.iface` is set.
    pub no_xdp: bool,
    /// Stop after this many seconds (0: no limit).
    pub duration: u64,
    /// One of the bench's probes instead of the engine.
    pub probe: Option<Probe>,
}

/// The memory the AF_XDP sockets are built over: one frame arena (UMEM) per RX queue, on the
/// NIC's NUMA node, hugepage-backed where the host has them, locked. The caller owns it, for
/// as long as the [`Setup`] that lends it to the kernel; mapping and locking it is privileged
/// work, done first.
pub struct Umem {
    want_xdp: bool,
    topo: Topology,
    arenas: Vec<FrameArena>,
}

impl core::fmt::Debug for Umem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Umem")
            .field("want_xdp", &self.want_xdp)
            .field("arenas", &self.arenas.len())
            .finish_non_exhaustive()
    }
}

impl Umem {
    /// Decides the ingest path (saying why in one line when it is kernel UDP), discovers the
    /// host's topology, and maps one arena per `xdp.queues` when AF_XDP is wanted.
    ///
    /// # Errors
    /// When the memory cannot be mapped or locked.
    pub fn map(cfg: &Config, opts: &Options<'_>) -> Result<Self> {
        let x = &cfg.xdp;
        let want_xdp = if opts.no_xdp {
            info!("--no-xdp: kernel UDP ingest (recvmmsg)");
            false
        } else if x.iface.is_empty() {
            info!("xdp.iface is not set: kernel UDP ingest (recvmmsg)");
            false
        } else {
            true
        };
        let topo = Topology::discover(want_xdp.then_some(x.iface.as_str()));
        for line in topo.to_string().lines() {
            info!("topology: {}", line.trim());
        }
        let umem_opts = RegionOptions {
            hugepages: true,
            placement: topo.nic_node.map_or(Placement::Any, Placement::Node),
            lock: true,
        };
        let arenas: Vec<FrameArena> = if want_xdp {
            (0..x.queues)
                .map(|_| FrameArena::new(x.frame_size, x.frames, umem_opts))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        if let Some(a) = arenas.first() {
            let r = a.region();
            info!(queues = arenas.len(), bytes_each = r.len(), pages = ?r.pages(), numa = ?r.numa(), locked = ?r.locked(), "UMEM mapped");
        }
        Ok(Self {
            want_xdp,
            topo,
            arenas,
        })
    }
}

/// Where the appliance listens, with the ports the kernel chose for port 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct Addresses {
    /// The (first) kernel UDP socket.
    pub udp: Option<std::net::SocketAddr>,
    /// The TCP listener.
    pub tcp: Option<std::net::SocketAddr>,
    /// The admin server.
    pub admin: Option<std::net::SocketAddr>,
}

/// The appliance after its privileged setup: XDP program attached, sockets bound, capabilities
/// dropped. [`run`] takes it from here.
pub struct Setup<'c, 'm> {
    cfg: &'c Config,
    opts: Options<'c>,
    stop: Arc<AtomicBool>,
    hup: Arc<AtomicBool>,
    plan: topology::Plan,
    xsk: Option<XskSetup<'m>>,
    udp: Vec<(UdpSocket, FrameArena)>,
    tcp_listener: Option<std::net::TcpListener>,
    admin: Option<(std::net::TcpListener, crate::ops::admin::Policy)>,
    addresses: Addresses,
    started: crate::ops::admin::Started,
}

impl core::fmt::Debug for Setup<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Setup")
            .field("addresses", &self.addresses)
            .field("xdp", &self.xsk.is_some())
            .field("udp_sockets", &self.udp.len())
            .finish_non_exhaustive()
    }
}

impl Setup<'_, '_> {
    /// Where it listens.
    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    /// The stop flag SIGTERM and SIGINT set: set it to stop the run as they do (tests that run
    /// the appliance in process).
    pub fn stopper(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Whether events come from AF_XDP sockets (else kernel UDP).
    pub fn is_xdp(&self) -> bool {
        self.xsk.is_some()
    }
}

/// The privileged part: signal handlers, the XDP program and AF_XDP sockets over `umem`, the
/// kernel UDP sockets, the TCP and admin listeners, then every capability dropped but the one
/// the run needs (see [`crate::ops::privs`]). Prints one `listening <what> <addr>` line per
/// bound socket.
///
/// # Errors
/// A socket that cannot be bound, a bad admin token file, capabilities that cannot be dropped,
/// or the XDP program refused where it was required. Where AF_XDP cannot be had at all, the
/// kernel UDP path is set up instead, with one log line that says why.
pub fn setup<'c, 'm>(cfg: &'c Config, umem: &'m Umem, opts: Options<'c>) -> Result<Setup<'c, 'm>> {
    // First: a stop asked for during setup (which may wait on a broker) is not a kill; the run
    // then ends as soon as it starts, with its report. SIGHUP asks for a reload, never a stop.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))
        .context("installing signal handlers")?;
    let x = &cfg.xdp;
    let xsk = if umem.want_xdp {
        match setup_xsk(
            x,
            &cfg.ingest.udp.multicast_groups,
            &umem.arenas,
            opts.probe,
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("AF_XDP unavailable ({e:#}); falling back to kernel UDP ingest (recvmmsg)");
                None
            }
        }
    } else {
        None
    };

    let e = &cfg.engine;
    let plan = topology::plan(
        &umem.topo,
        &PlanInput {
            queues: xsk.as_ref().map_or(0, |s| s.queues.len() as u32),
            dispatcher_cpu: e.dispatcher_cpu,
            worker_cpus: &e.worker_cpus,
            workers: e.realtime_workers + e.transactional_workers + e.batch_workers,
            auto: e.auto_placement,
        },
    );
    for why in &plan.why {
        info!("placement: {why}");
    }
    let mut addresses = Addresses::default();

    let u = &cfg.ingest.udp;
    // Kernel UDP sockets: `ingest.udp.sockets` of them without AF_XDP, one beside it.
    let mut udp: Vec<(UdpSocket, FrameArena)> = Vec::new();
    let n_udp = match (&xsk, u.beside_xdp) {
        (None, _) => u.sockets,
        (Some(_), true) => 1,
        (Some(_), false) => 0,
    };
    // Beside AF_XDP, the kernel sockets serve the interface itself (ingest.bind_to_iface).
    let device = (xsk.is_some() && cfg.ingest.bind_to_iface).then_some(x.iface.as_str());
    let on_device = |a: std::net::SocketAddr| match device {
        Some(_) if a.is_ipv4() => std::net::SocketAddr::from(([0, 0, 0, 0], a.port())),
        Some(_) => std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, a.port())),
        None => a,
    };
    // Beside AF_XDP the socket takes what the program passes, reassembled IP fragments among
    // them: frames for the largest UDP datagram, so none is cut.
    let (frame_size, frames) = if xsk.is_some() {
        (u.frame_size.max(64 * 1024), u.frames.min(256))
    } else {
        (u.frame_size, u.frames)
    };
    let mut addr = on_device(u.bind);
    for k in 0..n_udp {
        let socket = bind_udp(addr, u.socket_buffer, n_udp > 1, device).with_context(|| {
            format!(
                "binding UDP {addr}{} (ingest.udp.bind)",
                device.map_or(String::new(), |d| format!(" on {d}"))
            )
        })?;
        if !u.multicast_groups.is_empty() {
            let on = if u.multicast_iface.is_empty() {
                device.or((!x.iface.is_empty()).then_some(x.iface.as_str()))
            } else {
                Some(u.multicast_iface.as_str())
            };
            let ifindex = match on {
                Some(name) => if_index(name).with_context(|| {
                    format!("ingest.udp.multicast_iface: no interface {name} here")
                })?,
                None => 0,
            };
            crate::ingest::udp::join_groups(&socket, &u.multicast_groups, ifindex).with_context(
                || {
                    format!(
                        "ingest.udp.multicast_groups on {}",
                        on.unwrap_or("the kernel's route")
                    )
                },
            )?;
            info!(groups = ?u.multicast_groups, iface = on.unwrap_or("(route)"), "multicast groups joined");
        }
        // The rest share the port the first one got (when it asked for port 0).
        addr = socket.local_addr()?;
        let arena = FrameArena::new(
            frame_size,
            frames,
            RegionOptions {
                hugepages: true,
                ..Default::default()
            },
        )?;
        info!(addr = %addr, device = ?device, socket = k, frames, frame_size, pages = ?arena.region().pages(), "kernel UDP ingest bound");
        if k == 0 {
            println!("listening udp {addr}");
            addresses.udp = Some(addr);
        }
        udp.push((socket, arena));
    }
    let t = &cfg.ingest.tcp;
    let tcp_listener = match t.bind {
        Some(addr) => {
            let addr = on_device(addr);
            let l = bind_tcp(addr, device).with_context(|| {
                format!(
                    "binding TCP {addr}{} (ingest.tcp.bind)",
                    device.map_or(String::new(), |d| format!(" on {d}"))
                )
            })?;
            let bound = l.local_addr()?;
            println!("listening tcp {bound}");
            addresses.tcp = Some(bound);
            Some(l)
        }
        None => None,
    };
    let started = crate::ops::admin::Started::now();
    let admin = match cfg.admin.bind {
        Some(addr) => {
            let (listener, bound) = crate::ops::admin::bind(addr)
                .with_context(|| format!("binding admin {addr} (admin.bind)"))?;
            let a = &cfg.admin;
            let token = match &a.token_file {
                Some(path) => {
                    let t = std::fs::read_to_string(path).with_context(|| {
                        format!(
                            "reading the admin token {} (admin.token_file)",
                            path.display()
                        )
                    })?;
                    let t = t.trim().to_owned();
                    if t.len() < 16 {
                        return Err(anyhow!(
                            "the admin token in {} is shorter than 16 characters (admin.token_file)",
                            path.display()
                        ));
                    }
                    Some(t)
                }
                None => None,
            };
            let policy = crate::ops::admin::Policy {
                max_connections: a.max_connections,
                timeout: Duration::from_secs(a.timeout_secs),
                token,
                allowed_hosts: crate::ops::admin::Policy::hosts_for(bound, &a.allowed_hosts),
            };
            println!("listening admin {bound}");
            addresses.admin = Some(bound);
            Some((listener, policy))
        }
        None => None,
    };
    // Every socket is bound and the XDP program set up: before any thread starts (sinks start
    // their I/O threads as they open, and threads inherit the set), keep only what the run
    // loop needs.
    drop_privileges(xsk.is_some(), &cfg.privileges)?;
    Ok(Setup {
        cfg,
        opts,
        stop,
        hup,
        plan,
        xsk,
        udp,
        tcp_listener,
        admin,
        addresses,
        started,
    })
}

/// How a run ended: the reconciliation (printed as one JSON line by `eventstream run`), and
/// the error that ended it, if one did.
#[derive(Debug)]
pub struct Report {
    /// Accepted, delivered, DLQ, duplicates and failures, every metric, latency by stage;
    /// `None` when the run failed before any thread started (a sink that cannot be opened).
    pub json: Option<serde_json::Value>,
    /// `Ok` for a stop (signal, drain command, `duration`); the ingest or sink error otherwise.
    pub outcome: Result<()>,
}

/// Where the stop is: each phase waits for the threads it stopped to finish, without blocking
/// the housekeeping thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Taking traffic.
    Running,
    /// Ingest that feeds others (TCP connections and the beside-XDP socket, both served by the
    /// housekeeping thread, and pipelined receive threads) is stopping.
    Ingest,
    /// Data-plane threads (inline) serve what those queued, close windows, and stop.
    DataPlane,
    /// Pipelined: the dispatcher, workers and DLQ drain their rings into the sinks.
    Engine,
}

/// Once every handle in `handles` has finished, joins them (an error or panic into `result`,
/// labelled `what`) and says true; until then, false, without waiting.
fn join_finished(
    handles: &mut Vec<std::thread::ScopedJoinHandle<'_, std::io::Result<()>>>,
    what: &str,
    result: &mut Result<()>,
) -> bool {
    if !handles
        .iter()
        .all(std::thread::ScopedJoinHandle::is_finished)
    {
        return false;
    }
    for h in handles.drain(..) {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => *result = Err(anyhow::Error::from(e).context(what.to_owned())),
            Err(_) => warn!(thread = what, "a thread panicked"),
        }
    }
    true
}

/// The unprivileged part: opens the sinks, starts one data-plane thread per receive queue (and,
/// pipelined, the dispatcher, workers and DLQ), prints `ready`, and runs the housekeeping
/// thread ([`house`]) here until a signal, a drain command, `duration` seconds, or a thread's
/// failure; then stops ingest, drains what is queued into the sinks, and reports.
///
/// The report is made whatever ended the run (a failed sink included), so what was accepted
/// and what was delivered can still be reconciled from outside.
pub fn run(setup: Setup<'_, '_>) -> Report {
    let mut json = None;
    let outcome = run_with(setup, &mut json);
    if let (Some(json), Err(e)) = (&mut json, &outcome) {
        json["error"] = json!(format!("{e:#}"));
    }
    Report { json, outcome }
}

fn run_with(setup: Setup<'_, '_>, report_out: &mut Option<serde_json::Value>) -> Result<()> {
    let Setup {
        cfg,
        opts,
        stop,
        hup,
        plan,
        xsk,
        udp,
        tcp_listener,
        admin,
        addresses: _,
        started,
    } = setup;
    let (x, u, t) = (&cfg.xdp, &cfg.ingest.udp, &cfg.ingest.tcp);
    let probe = opts.probe;
    // The kernel TCP listener: connection slots made now, so the events they mint can outlive
    // any one connection inside the thread scope.
    let tcp_slots_n = if tcp_listener.is_some() {
        t.max_connections
    } else {
        0
    };
    let tcp_frame = (4 + cfg.protocol.max_frame_len).max(16 * 1024);
    let tcp_arenas: Vec<FrameArena> = (0..tcp_slots_n)
        .map(|_| FrameArena::new(tcp_frame, t.frames_per_connection, RegionOptions::default()))
        .collect::<Result<_, _>>()?;
    let tcp_pools: Vec<EventPool<Event<'_>>> = (0..tcp_slots_n)
        .map(|_| EventPool::new(cfg.pool.capacity.min(4096)))
        .collect();
    let tcp_counters: Vec<IngestCounters> = (0..tcp_slots_n)
        .map(|_| IngestCounters::default())
        .collect();
    let tcp_slots: Vec<Slot<'_, '_, '_>> = (0..tcp_slots_n)
        .map(|i| Slot {
            arena: &tcp_arenas[i],
            pool: &tcp_pools[i],
            counters: &tcp_counters[i],
        })
        .collect();
    let (tcp_refused, tcp_live, tcp_accept_errors) =
        (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));

    // Producers: one per AF_XDP queue, then the kernel UDP socket (alone, or beside AF_XDP).
    let xsk_queues = xsk
        .as_ref()
        .map_or(0, |s| s.queues.len() + s.crate_queues.len());
    let producers = xsk_queues + udp.len();
    let source_of = |i: usize| {
        if i < xsk_queues {
            Source::Xsk
        } else {
            Source::Udp
        }
    };
    let pools: Vec<EventPool<Event<'_>>> = (0..producers)
        .map(|_| EventPool::new(cfg.pool.capacity))
        .collect();
    let counters: Vec<IngestCounters> = (0..producers).map(|_| IngestCounters::default()).collect();
    let (tx, rx) = mpsc::channel::<Pooled<'_, Event<'_>>>(cfg.queue.capacity);
    // What a reload may change: routes and control thresholds (whole, for the data plane) and
    // the TCP limits.
    let live_rules = LiveRules::new(reload::rules_of(cfg)?);
    let (read_timeout, frame_timeout, per_source) = reload::tcp_limits_of(cfg);
    let tcp_limits = TcpLimits::new(read_timeout, frame_timeout, per_source);
    let reloader = reload::Reloader::new(
        opts.config_path.map(Into::into),
        cfg.clone(),
        &live_rules,
        &tcp_limits,
    );
    let e = &cfg.engine;
    // Where the engine runs: inline, in each receive queue's thread (run to completion), unless
    // the machine has a core for every thread of the pipelined mode (receive threads,
    // dispatcher, workers, DLQ).
    let data_plane = if xsk.is_some() { xsk_queues } else { udp.len() };
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let pipelined_threads =
        data_plane + 2 + e.realtime_workers + e.transactional_workers + e.batch_workers;
    let inline = match e.mode {
        EngineMode::Inline => true,
        EngineMode::Pipelined => false,
        EngineMode::Auto => cores < pipelined_threads,
    };
    info!(
        mode = if inline { "inline" } else { "pipelined" },
        cores,
        data_plane_threads = data_plane,
        "engine"
    );
    // Inline: the first data-plane thread serves the side queue (TCP connections, the socket
    // beside AF_XDP) between its batches, and sleeps in `poll` when its socket is quiet; the
    // side queue's producers ring this bell to wake it (without it they wait for the sleep's
    // timeout, `idle_poll`).
    let side_bell = if inline {
        Doorbell::new()
            .inspect_err(|e| {
                warn!(reason = %e, "no doorbell for the side queue (eventfd); TCP events may wait up to 1 ms")
            })
            .ok()
    } else {
        None
    };
    // Forced pipelined on too few cores: waits sleep instead of yielding.
    crate::engine::idle::set_oversubscribed(!inline && pipelined_threads > cores);
    let window_ns = e.dedup_window_secs * 1_000_000_000;
    // Inline: one dedup window shared by every queue's thread, lock-free.
    let shared_dedup = SharedDedupWindow::new(if inline { e.dedup_capacity } else { 1 }, window_ns);
    let kind_of = |class: WorkerClass, shared: bool| -> WorkerKind<'_> {
        match class {
            WorkerClass::Realtime => WorkerKind::Realtime {
                from: e.latency_from,
            },
            WorkerClass::Transactional => WorkerKind::Transactional {
                dedup: if shared {
                    Dedup::Shared(&shared_dedup)
                } else {
                    Dedup::Own(DedupWindow::new(e.dedup_capacity, window_ns))
                },
            },
            WorkerClass::Batch => WorkerKind::Batch {
                max: e.batch_max,
                window: Duration::from_millis(e.batch_window_ms),
                max_topics: e.batch_max_topics,
            },
        }
    };
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>(64);
    let ingest_done = AtomicBool::new(false);
    let engine_counters = EngineCounters::default();
    let depths: Vec<AtomicU32> = (0..data_plane).map(|_| AtomicU32::new(0)).collect();
    let admin_counters = crate::ops::admin::AdminCounters::default();
    // Sinks are opened (and file logs recovered) before any thread starts, so a bad directory
    // is a clean error at start, not a failure mid-run.
    let mut healths = Vec::new();
    // Sinks start their I/O threads as they open (file writers and syncers, network clients,
    // librdkafka's): started from here, on the housekeeping cores, they keep off the receive
    // queues' cores, where a writer woken by a batch would preempt the thread that made it.
    let placed = if plan.housekeeping.is_empty() {
        None
    } else {
        numa::Placed::on(&plan.housekeeping)
            .inspect_err(
                |e| warn!(reason = %e, "sink threads not placed on the housekeeping cores"),
            )
            .ok()
    };
    // Event ids carry the run (its start, in ms since the epoch): no two runs share one.
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut open_sink = |dir: &std::path::Path, kind: SinkKind| -> Result<Box<dyn Sink>> {
        let sink = open_sink(cfg, dir, kind, run_id)?;
        healths.extend(sink.health().cloned());
        Ok(sink)
    };
    let mut engines = Vec::new();
    let mut worker_rxs = Vec::new();
    let mut worker_steps = Vec::new();
    let mut buses = None;
    let mut dlq_ring = None;
    let mut dlq_step = None;
    if inline {
        for (q, depth) in depths.iter().enumerate() {
            let mut steps = Vec::with_capacity(3);
            for class in WorkerClass::ALL {
                let dir = cfg.sinks.dir.join(format!("{}-{q}", class.as_str()));
                steps.push(ClassStep::new(
                    kind_of(class, true),
                    open_sink(&dir, cfg.sinks.kind_for(class))?,
                ));
            }
            let dlq_dir = if q == 0 {
                cfg.sinks.dlq_dir.clone()
            } else {
                cfg.sinks.dlq_dir.join(format!("q{q}"))
            };
            engines.push(
                Inline::new(
                    &live_rules,
                    steps.try_into().expect("one step per class"),
                    DlqStep::new(open_sink(&dlq_dir, cfg.sinks.dlq_kind())?),
                    &engine_counters,
                    depth,
                )
                .stage_latency(cfg.engine.stage_latency),
            );
        }
    } else {
        buses = Some(WorkerClass::ALL.map(|class| {
            let n = match class {
                WorkerClass::Realtime => e.realtime_workers,
                WorkerClass::Transactional => e.transactional_workers,
                WorkerClass::Batch => e.batch_workers,
            };
            let mut producers = Vec::with_capacity(n);
            for _ in 0..n {
                let (p, c) = spsc::channel(e.ring_capacity);
                producers.push(p);
                worker_rxs.push((class, c));
            }
            // Transactional: one key always meets the same dedup window. Batch: one topic, one
            // group.
            Bus::new(producers, class != WorkerClass::Realtime)
        }));
        let mut per_class = [0usize; 3];
        for (class, _) in &worker_rxs {
            let n = &mut per_class[*class as usize];
            let dir = cfg.sinks.dir.join(format!("{}-{n}", class.as_str()));
            worker_steps.push(ClassStep::new(
                kind_of(*class, false),
                open_sink(&dir, cfg.sinks.kind_for(*class))?,
            ));
            *n += 1;
        }
        dlq_ring = Some(spsc::channel::<DlqEntry<'_, '_>>(e.ring_capacity));
        dlq_step = Some(DlqStep::new(open_sink(
            &cfg.sinks.dlq_dir,
            cfg.sinks.dlq_kind(),
        )?));
    }
    let healths = healths;
    drop(placed);

    // Ingest that feeds others (TCP connections, the beside-XDP socket, pipelined receive
    // threads) stops first; data-plane threads (inline) stop after them, having served
    // what those queued.
    let ingest_stop = AtomicBool::new(false);
    let dataplane_stop = AtomicBool::new(false);
    let ingest_threads = producers as u64;
    let ingest_running = AtomicU64::new(ingest_threads);
    let source = if xsk.is_some() {
        Source::Xsk
    } else {
        Source::Udp
    };
    let (attach, bind_modes) = xsk.as_ref().map_or((None, Vec::new()), |s| {
        (
            Some(s.attach),
            s.queues
                .iter()
                .map(|(sock, _)| sock.mode().label())
                .collect(),
        )
    });

    // Kept here for the whole run: `/metrics` and the exit report read its verdict counters.
    let mut xsk = xsk;
    let program = xsk
        .as_mut()
        .map(|s| core::mem::replace(&mut s.program, Program::Pinned));
    let verdicts = || match &program {
        Some(Program::Owned { program, .. }) => program.stats().ok(),
        Some(Program::Pinned) => Pinned::open(&x.iface).ok().map(|p| p.stats),
        None => None,
    };
    let tcp = TcpIngest {
        limits: cfg.protocol.limits(),
        tcp_limits: &tcp_limits,
        stop: &ingest_stop,
        refused: &tcp_refused,
        live: &tcp_live,
        accept_errors: &tcp_accept_errors,
        paused: &engine_counters.paused,
        sources: std::sync::Mutex::default(),
        bell: side_bell.as_ref(),
    };
    // One total over every ingest thread's counters: the per-second log and the exit report.
    let sum = |f: fn(&IngestCounters) -> &AtomicU64| {
        counters
            .iter()
            .chain(&tcp_counters)
            .map(|c| f(c).load(Ordering::Relaxed))
            .sum::<u64>()
    };
    // What `/metrics` and the exit report read: one table over every counter.
    let metrics_view = || MetricsView {
        ingest: counters
            .iter()
            .enumerate()
            .map(|(i, c)| (source_of(i), c))
            .chain(tcp_counters.iter().map(|c| (Source::Tcp, c)))
            .collect(),
        engine: &engine_counters,
        queue: Box::new({
            let tx = tx.clone();
            move || (tx.len(), tx.capacity())
        }),
        sink: WorkerClass::ALL.map(|c| cfg.sinks.label(c)),
        sinks: healths.clone(),
        admin: &admin_counters,
        xdp_verdicts: Box::new(verdicts),
        reload: Box::new(|| reloader.reload()),
        config_reloads: &reloader.counts,
        tcp: crate::ops::admin::TcpAcceptCounters {
            refused: &tcp_refused,
            accept_errors: &tcp_accept_errors,
        },
        started,
    };
    let (admin_listener, admin_policy) = admin.map_or((None, None), |(l, p)| (Some(l), Some(p)));
    // Inline: the control plane runs on the first data-plane thread (the one that serves the
    // side queue), on its stage's housekeeping schedule. Pipelined: in the dispatcher.
    let mut cmd_rx = Some(cmd_rx);
    let mut inline_control = if inline {
        cmd_rx.take().map(|commands| InlineControl {
            plane: ControlPlane::new(cfg.control),
            rules: live_rules.view(),
            commands,
            depths: &depths,
            counters: &engine_counters,
        })
    } else {
        None
    };
    let side_bell_ref = side_bell.as_ref();
    let mut side_rx = Some(rx);
    let mut engines = engines.into_iter();
    let busy_spin = Duration::from_micros(u64::from(x.busy_spin_us));
    // Inline receive threads come back from `poll`/`recvmmsg` at least this often, to serve the
    // side queue and close batch windows.
    let idle_poll = if inline {
        Duration::from_millis(1)
    } else {
        Duration::from_millis(100)
    };
    let placement = ThreadsPlaced::default();
    let outcome = std::thread::scope(|s| -> Result<()> {
        let mut ingest = Vec::new();
        let mut dataplane = Vec::new();
        if let Some(mut setup) = xsk {
            for (q, mut sock) in setup.crate_queues.drain(..).enumerate() {
                let cpu = plan.ingest.get(q).copied();
                let (counters, ingest_running, stop) =
                    (&counters[q], &ingest_running, &ingest_stop);
                let placed = placement.spawning();
                ingest.push(
                    std::thread::Builder::new()
                        .name(format!("ingest-q{q}"))
                        .spawn_scoped(s, move || {
                            placed.pin(cpu, &format!("ingest-q{q}"));
                            let r = sock.run(x.batch, busy_spin, stop, counters);
                            ingest_running.fetch_sub(1, Ordering::AcqRel);
                            r
                        })?,
                );
            }
            for (q, ((mut sock, mut owner), pool)) in
                setup.queues.into_iter().zip(&pools).enumerate()
            {
                let cpu = plan.ingest.get(q).copied();
                let (counters, ingest_running, tx) = (&counters[q], &ingest_running, &tx);
                let placed = placement.spawning();
                let job = XskIngest {
                    batch: x.batch,
                    limits: cfg.protocol.limits(),
                    stop: if inline {
                        &dataplane_stop
                    } else {
                        &ingest_stop
                    },
                    idle_poll,
                    busy_spin,
                    bare: probe == Some(Probe::Bare),
                    counters,
                    seq_base: crate::wire::event::seq_base(q as u16),
                    paused: &engine_counters.paused,
                };
                let mut engine = engines.next();
                let (side, control) = if q == 0 && engine.is_some() {
                    (side_rx.take(), inline_control.take())
                } else {
                    (None, None)
                };
                let h = std::thread::Builder::new()
                    .name(format!("ingest-q{q}"))
                    .spawn_scoped(s, move || {
                        placed.pin(cpu, &format!("ingest-q{q}"));
                        let r = match &mut engine {
                            _ if probe == Some(Probe::Parse) => {
                                job.run(&mut sock, &mut owner, Discard)
                            }
                            Some(engine) => job.run(
                                &mut sock,
                                &mut owner,
                                RunInline {
                                    engine,
                                    side,
                                    ring_depth: (0, 1),
                                    control,
                                    bell: side_bell_ref,
                                },
                            ),
                            None => {
                                let mut acq = pool.acquirer().expect("one acquirer per pool");
                                job.run(
                                    &mut sock,
                                    &mut owner,
                                    Enqueue {
                                        pool: &mut acq,
                                        queue: tx,
                                    },
                                )
                            }
                        };
                        ingest_running.fetch_sub(1, Ordering::AcqRel);
                        r
                    })?;
                if inline {
                    dataplane.push(h)
                } else {
                    ingest.push(h)
                }
            }
        }
        let paused = &engine_counters.paused;
        // Beside AF_XDP, the kernel socket is served by the housekeeping thread (below).
        let mut beside = None;
        for (k, (socket, arena)) in udp.iter().enumerate() {
            if xsk_queues > 0 {
                beside = Some((k, socket, arena));
                continue;
            }
            let (counters, pool) = (&counters[xsk_queues + k], &pools[xsk_queues + k]);
            let cpu = u.cpu.map(|c| c + k as u32);
            let (ingest_running, tx) = (&ingest_running, &tx);
            // Inline, this socket's thread is the data plane.
            let mut engine = engines.next();
            let side = engine.as_ref().and_then(|_| side_rx.take());
            let control = engine.as_ref().and_then(|_| inline_control.take());
            let is_dataplane = engine.is_some();
            let (ingest_stop, dataplane_stop) = (&ingest_stop, &dataplane_stop);
            let placed = placement.spawning();
            let h = std::thread::Builder::new()
                .name(format!("ingest-udp{k}"))
                .spawn_scoped(s, move || {
                    placed.pin(cpu, &format!("ingest-udp{k}"));
                    let mut frames = arena.owner().expect("one owner");
                    let job = UdpIngest {
                        socket,
                        batch: u.batch,
                        limits: cfg.protocol.limits(),
                        stop: if is_dataplane {
                            dataplane_stop
                        } else {
                            ingest_stop
                        },
                        counters,
                        seq_base: crate::wire::event::seq_base(0x100 + k as u16),
                        idle_poll,
                        paused,
                    };
                    let r = match &mut engine {
                        Some(engine) => job.run(
                            &mut frames,
                            RunInline {
                                engine,
                                side,
                                ring_depth: (0, 1),
                                control,
                                bell: side_bell_ref,
                            },
                        ),
                        None => {
                            let mut acq = pool.acquirer().expect("one acquirer");
                            job.run(
                                &mut frames,
                                Enqueue {
                                    pool: &mut acq,
                                    queue: tx,
                                },
                            )
                        }
                    };
                    ingest_running.fetch_sub(1, Ordering::AcqRel);
                    r
                })?;
            if is_dataplane {
                dataplane.push(h)
            } else {
                ingest.push(h)
            }
        }
        // Pipelined: the dispatcher, the workers per class, and the DLQ, each a thread.
        let mut engine_threads = Vec::new();
        if let (Some(buses), Some((dlq_tx, dlq_rx)), Some(dlq_step)) =
            (buses.take(), dlq_ring.take(), dlq_step.take())
        {
            let dispatcher = Dispatcher {
                input: side_rx.take().expect("the queue's consumer"),
                rules: live_rules.view(),
                buses,
                dlq: dlq_tx,
                control: ControlPlane::new(cfg.control),
                commands: cmd_rx.take().expect("the command queue"),
                ingest_done: &ingest_done,
                counters: &engine_counters,
                stage_latency: cfg.engine.stage_latency,
            };
            let dispatcher_cpu = plan.dispatcher;
            let placed = placement.spawning();
            engine_threads.push(
                std::thread::Builder::new()
                    .name("dispatcher".into())
                    .spawn_scoped(s, move || {
                        placed.pin(dispatcher_cpu, "dispatcher");
                        dispatcher.run();
                        Ok(())
                    })?,
            );
            for (k, ((class, rx), step)) in worker_rxs.into_iter().zip(worker_steps).enumerate() {
                let cpu = plan.workers.get(k).copied().flatten();
                let counters = &engine_counters;
                let placed = placement.spawning();
                engine_threads.push(
                    std::thread::Builder::new()
                        .name(format!("worker-{}", class.as_str()))
                        .spawn_scoped(s, move || {
                            placed.pin(cpu, &format!("worker-{}-{k}", class.as_str()));
                            run_worker(step, rx, counters)
                        })?,
                );
            }
            let counters = &engine_counters;
            engine_threads.push(
                std::thread::Builder::new()
                    .name("dlq".into())
                    .spawn_scoped(s, move || run_dlq(dlq_step, dlq_rx, counters))?,
            );
        }
        let view = metrics_view();
        let mut acceptor = match &tcp_listener {
            Some(l) => Some(
                Acceptor::new(&tcp, l, &tcp_slots, &tx)
                    .context("the TCP listener (ingest.tcp.bind)")?,
            ),
            None => None,
        };
        let admin = admin_listener
            .zip(admin_policy.as_ref())
            .map(|(listener, policy)| house::Admin {
                listener,
                view: &view,
                commands: &cmd_tx,
                policy,
                counters: &admin_counters,
            });

        // The housekeeping thread keeps off the receive queues' cores (its 10 ms tick would
        // otherwise preempt them).
        if !plan.housekeeping.is_empty() {
            match numa::pin_current_thread_to(&plan.housekeeping) {
                Ok(()) => {
                    info!(cpus = %topology::cpu_list(&plan.housekeeping), "housekeeping thread placed")
                }
                Err(e) => warn!(reason = %e, "could not place the housekeeping thread"),
            }
        }
        // The kernel socket beside AF_XDP: a receive loop the housekeeping thread serves when
        // the socket is readable, handing its events to the first data-plane thread's side
        // queue without ever waiting for room there.
        let side_done = AtomicBool::new(beside.is_none());
        let (side_job, mut side_frames, mut side_acq, mut side_udp);
        let side = match beside {
            Some((k, socket, arena)) => {
                side_job = UdpIngest {
                    socket,
                    batch: u.batch,
                    limits: cfg.protocol.limits(),
                    stop: &ingest_stop,
                    counters: &counters[xsk_queues + k],
                    seq_base: crate::wire::event::seq_base(0x100 + k as u16),
                    idle_poll,
                    paused,
                };
                side_frames = arena.owner().expect("one owner");
                side_acq = pools[xsk_queues + k]
                    .acquirer()
                    .expect("one acquirer per pool");
                // Room for a batch of datagrams of up to 16 events before the stash grows.
                let handoff =
                    TryEnqueue::new(&mut side_acq, &tx, u.batch.max(1) * 16).ringing(side_bell_ref);
                side_udp = SideUdp::new(&side_job, &mut side_frames, handoff)
                    .context("the kernel UDP socket beside AF_XDP")?;
                Some(house::Side {
                    udp: &mut side_udp,
                    done: &side_done,
                })
            }
            None => None,
        };
        // The housekeeping runtime (its epoll and event descriptors) before the word: from then
        // on the TCP listener is served whatever the descriptor limit does.
        let rt = house::runtime();
        // Every thread is running where the plan puts it and privileges are dropped: say so, for
        // scripts and tests that must not send before the appliance takes traffic.
        if !placement.wait(Duration::from_secs(5)) {
            warn!("a data-plane thread has not placed itself within 5 s; saying ready anyway");
        }
        println!("ready");
        let start = Instant::now();
        let mut last = (start, 0u64);
        // Signals, reloads, the log and the stop's steps: the control plane is not here.
        let period = Duration::from_millis(10);
        let mut phase = Phase::Running;
        let mut result = Ok(());
        let tick = || -> house::Flow {
            loop {
                match phase {
                    Phase::Running => {
                        if hup.swap(false, Ordering::Relaxed) {
                            // Logged and counted by the reloader either way.
                            let _ = reloader.reload();
                        }
                        let now = Instant::now();
                        if now.duration_since(last.0) >= Duration::from_secs(1) {
                            let ev = sum(|c| &c.events);
                            let rate =
                                (ev - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                            info!(
                                source = source.as_str(),
                                events = ev,
                                rate = format!("{rate:.0}/s"),
                                queue = tx.len(),
                                "ingest"
                            );
                            last = (now, ev);
                        }
                        let over = stop.load(Ordering::Relaxed)
                            || ingest_running.load(Ordering::Acquire) != ingest_threads
                            || engine_counters.state() == PipelineState::Draining
                            || (opts.duration > 0
                                && start.elapsed() >= Duration::from_secs(opts.duration));
                        if !over {
                            return house::Flow::Continue;
                        }
                        info!(
                            timeout_secs = cfg.sinks.shutdown_timeout_secs,
                            "stopping: ingest closes, queues drain into the sinks"
                        );
                        engine_counters.set_shutdown_deadline(Duration::from_secs(
                            cfg.sinks.shutdown_timeout_secs,
                        ));
                        // The control plane takes it on its next tick (the data plane's last
                        // housekeeping at the latest).
                        let _ = cmd_tx.push(Command::Drain);
                        ingest_stop.store(true, Ordering::Relaxed);
                        phase = Phase::Ingest;
                    }
                    Phase::Ingest => {
                        // TCP connections end at the stop once what they read is on the queue;
                        // the beside-XDP socket once its stash is.
                        if tcp_live.load(Ordering::Acquire) != 0
                            || !side_done.load(Ordering::Acquire)
                            || !join_finished(&mut ingest, "ingest", &mut result)
                        {
                            return house::Flow::Continue;
                        }
                        dataplane_stop.store(true, Ordering::Relaxed);
                        phase = Phase::DataPlane;
                    }
                    Phase::DataPlane => {
                        if !join_finished(&mut dataplane, "data plane", &mut result) {
                            return house::Flow::Continue;
                        }
                        ingest_done.store(true, Ordering::Release);
                        phase = Phase::Engine;
                    }
                    Phase::Engine => {
                        if !join_finished(&mut engine_threads, "a sink failed", &mut result) {
                            return house::Flow::Continue;
                        }
                        return house::Flow::Done;
                    }
                }
            }
        };
        house::run(rt, period, admin, acceptor.as_mut(), side, tick);
        result
    });

    let mut rejected = serde_json::Map::new();
    for r in RejectReason::ALL {
        rejected.insert(
            r.as_str().to_owned(),
            counters
                .iter()
                .chain(&tcp_counters)
                .map(|c| c.rejected(r))
                .sum::<u64>()
                .into(),
        );
    }
    let lat = engine_counters.latency.quantiles();
    let stage_latency = Stage::ALL
        .iter()
        .map(|st| {
            let q = engine_counters.stages.get(*st).quantiles();
            (
                st.as_str().to_owned(),
                json!({ "count": q.count, "p50_us": q.p50 as f64 / 1e3, "p99_us": q.p99 as f64 / 1e3, "max_us": q.max as f64 / 1e3 }),
            )
        })
        .collect::<serde_json::Map<_, _>>();
    let mut report = json!({
        "source": source.as_str(),
        "engine_mode": if inline { "inline" } else { "pipelined" },
        "received_datagrams": sum(|c| &c.datagrams),
        "received_bytes": sum(|c| &c.bytes),
        "accepted_events": sum(|c| &c.events),
        "delivered_events": engine_counters.delivered_total(),
        "delivered": WorkerClass::ALL.iter().map(|c| (c.as_str().to_owned(), json!(engine_counters.delivered[*c as usize].load(Ordering::Relaxed)))).collect::<serde_json::Map<_, _>>(),
        "dlq": DlqReason::ALL.iter().map(|r| (r.as_str().to_owned(), json!(engine_counters.dlq[*r as usize].load(Ordering::Relaxed)))).collect::<serde_json::Map<_, _>>(),
        "duplicates": engine_counters.duplicates.load(Ordering::Relaxed),
        "failed": FailReason::ALL.iter().map(|r| (r.as_str().to_owned(), json!(engine_counters.failed[*r as usize].load(Ordering::Relaxed)))).collect::<serde_json::Map<_, _>>(),
        "sinks": healths.iter().map(|h| json!({
            "name": h.name,
            "failing": h.failure(),
            "errors": SinkErrorKind::ALL.iter().map(|k| (k.as_str().to_owned(), json!(h.errors(*k)))).collect::<serde_json::Map<_, _>>(),
            "retries": h.retries(),
            "sent_events": h.sent_totals().0,
            "sent_bytes": h.sent_totals().1,
            "spilled_events": h.spill_totals().0,
            "replayed_events": h.replayed_total(),
            "ack_latency_p50_le_us": h.ack_quantile_us(0.5),
            "ack_latency_p99_le_us": h.ack_quantile_us(0.99),
        })).collect::<Vec<_>>(),
        "config_reloads": { "ok": reloader.counts[0].load(Ordering::Relaxed), "error": reloader.counts[1].load(Ordering::Relaxed) },
        "state_transitions": PipelineState::ALL.iter().map(|st| (st.as_str().to_owned(), json!(engine_counters.transitions[*st as usize].load(Ordering::Relaxed)))).collect::<serde_json::Map<_, _>>(),
        "rejected": rejected,
        "received_events": {
            "xsk": counters[..xsk_queues].iter().map(|c| c.events.load(Ordering::Relaxed)).sum::<u64>(),
            "udp": counters[xsk_queues..].iter().map(|c| c.events.load(Ordering::Relaxed)).sum::<u64>(),
            "tcp": tcp_counters.iter().map(|c| c.events.load(Ordering::Relaxed)).sum::<u64>(),
        },
        "udp_sockets": counters[xsk_queues..].iter().map(|c| c.events.load(Ordering::Relaxed)).collect::<Vec<_>>(),
        "tcp_refused_connections": tcp_refused.load(Ordering::Relaxed),
        "tcp_accept_errors": tcp_accept_errors.load(Ordering::Relaxed),
        "kernel_drops": sum(|c| &c.kernel_drops),
        "receive_errors": sum(|c| &c.receive_errors),
        "latency": {
            "from": match cfg.engine.latency_from { LatencyFrom::Ingest => "ingest", LatencyFrom::Payload => "payload" },
            "count": lat.count,
            "p50_us": lat.p50 as f64 / 1e3,
            "p99_us": lat.p99 as f64 / 1e3,
            "p999_us": lat.p999 as f64 / 1e3,
            "max_us": lat.max as f64 / 1e3,
            "unstamped": engine_counters.unstamped.load(Ordering::Relaxed),
        },
        "stage_latency": stage_latency,
        "metrics": crate::ops::admin::collect(&metrics_view()).json(),
    });
    if let Some(attach) = attach {
        let verdicts = verdicts();
        report["xsk"] = json!({
            "iface": x.iface,
            "attach": attach.label(),
            "bind": bind_modes,
            "invalid_descs": sum(|c| &c.invalid_descs),
            "bad_packets": sum(|c| &c.bad_packets),
            "rx_dropped": sum(|c| &c.xsk_rx_dropped),
            "rx_invalid_descs": sum(|c| &c.xsk_rx_invalid_descs),
            "rx_ring_full": sum(|c| &c.xsk_rx_ring_full),
            "rx_fill_ring_empty_descs": sum(|c| &c.xsk_rx_fill_ring_empty_descs),
            "queues": counters[..xsk_queues].iter().map(|c| json!({
                "events": c.events.load(Ordering::Relaxed),
                "datagrams": c.datagrams.load(Ordering::Relaxed),
                "rx_dropped": c.xsk_rx_dropped.load(Ordering::Relaxed),
                "rx_ring_full": c.xsk_rx_ring_full.load(Ordering::Relaxed),
                "rx_fill_ring_empty_descs": c.xsk_rx_fill_ring_empty_descs.load(Ordering::Relaxed),
                "rx_invalid_descs": c.xsk_rx_invalid_descs.load(Ordering::Relaxed),
            })).collect::<Vec<_>>(),
            "verdicts": verdicts.map(|v| v.labelled().map(|(k, n)| (k.to_owned(), json!(n))).collect::<serde_json::Map<_, _>>()),
        });
    }
    *report_out = Some(report);
    outcome
}
