//! The daemon's configuration: `config/eventstream.yaml`, parsed with serde_yaml_ng.
//!
//! Unknown keys are errors (a typo must not silently fall back to a default), and every
//! validation error names the key and the bad value.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::wire::protocol::Limits;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        reason: std::io::Error,
    },
    /// The YAML did not parse or did not match the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// serde_yaml_ng's message, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("{key}: {value} is out of range ({expected})")]
    Invalid {
        /// Dotted key, e.g. `ingest.udp.batch`.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Frame limits.
    pub protocol: ProtocolConfig,
    /// The AF_XDP data path.
    pub xdp: XdpConfig,
    /// Ingest paths.
    pub ingest: IngestConfig,
    /// Event pool.
    pub pool: PoolConfig,
    /// Dispatcher and workers.
    pub engine: EngineConfig,
    /// Topic routes, tried in order after exact matches.
    pub routes: Vec<RouteConfig>,
    /// Pipeline state thresholds.
    pub control: crate::engine::control::ControlConfig,
    /// Metrics and admin HTTP.
    pub admin: AdminConfig,
    /// Where workers and the DLQ write.
    pub sinks: SinksConfig,
    /// Ingest -> dispatcher queue.
    pub queue: QueueConfig,
    /// Who the daemon runs as after setup.
    pub privileges: PrivilegesConfig,
}

/// `privileges:`
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PrivilegesConfig {
    /// `privileges.user`: switch to this user once setup is done (its sink directories must
    /// be writable by it); null stays uid 0 (without capabilities but the one kept).
    pub user: Option<String>,
    /// `privileges.group`: and this group (default: the user's primary group).
    pub group: Option<String>,
}

/// `protocol:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolConfig {
    /// `protocol.max_frame_len`
    pub max_frame_len: u32,
    /// `protocol.max_topic_len`
    pub max_topic_len: u16,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            max_frame_len: l.max_frame_len,
            max_topic_len: l.max_topic_len,
        }
    }
}

impl ProtocolConfig {
    /// As parser limits.
    pub const fn limits(&self) -> Limits {
        Limits {
            max_frame_len: self.max_frame_len,
            max_topic_len: self.max_topic_len,
        }
    }
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AttachPolicy {
    /// Native driver mode, then generic mode.
    #[default]
    Auto,
    /// Native driver mode only.
    Drv,
    /// Generic (skb) mode only.
    Skb,
}

/// `xdp:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct XdpConfig {
    /// `xdp.iface`; empty for none.
    pub iface: String,
    /// `xdp.queues`
    pub queues: u32,
    /// `xdp.port`
    pub port: u16,
    /// `xdp.object`: empty for the object built into the binary, else an absolute path.
    pub object: std::path::PathBuf,
    /// `xdp.attach`
    pub attach: AttachPolicy,
    /// `xdp.zero_copy`
    pub zero_copy: bool,
    /// `xdp.need_wakeup`
    pub need_wakeup: bool,
    /// `xdp.ring_size`
    pub ring_size: u32,
    /// `xdp.frame_size`
    pub frame_size: u32,
    /// `xdp.frames`
    pub frames: u32,
    /// `xdp.batch`
    pub batch: u32,
    /// `xdp.allow_vlan`
    pub allow_vlan: bool,
    /// `xdp.busy_spin_us`: how long an empty RX ring is re-checked before the thread sleeps in
    /// `poll`.
    pub busy_spin_us: u32,
    /// `xdp.allow_sources`: CIDRs allowed to send event datagrams; empty for every source.
    pub allow_sources: Vec<crate::xdp::defence::Cidr>,
    /// `xdp.rate_limit`
    pub rate_limit: RateLimitConfig,
}

/// `xdp.rate_limit:` event datagrams per source, enforced in the XDP program.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// `xdp.rate_limit.packets_per_sec`: per source; 0 for no limit.
    pub packets_per_sec: u32,
    /// `xdp.rate_limit.burst`: bucket depth in datagrams; 0 for one second's worth.
    pub burst: u32,
}

impl XdpConfig {
    /// What the XDP program enforces on event datagrams.
    pub fn defence(&self) -> crate::xdp::defence::Defence {
        crate::xdp::defence::Defence {
            groups: Vec::new(),
            allow: self.allow_sources.clone(),
            rate_pps: self.rate_limit.packets_per_sec,
            burst: self.rate_limit.burst,
        }
    }
}

impl Default for XdpConfig {
    fn default() -> Self {
        Self {
            iface: String::new(),
            queues: 1,
            port: eventstream_common::DEFAULT_UDP_PORT,
            object: std::path::PathBuf::new(),
            attach: AttachPolicy::Auto,
            zero_copy: true,
            need_wakeup: true,
            ring_size: 2048,
            frame_size: 2048,
            frames: 8192,
            batch: 64,
            allow_vlan: true,
            busy_spin_us: 2000,
            allow_sources: Vec::new(),
            rate_limit: RateLimitConfig::default(),
        }
    }
}

/// `ingest:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// `ingest.udp`
    pub udp: UdpConfig,
    /// `ingest.tcp`
    pub tcp: TcpConfig,
    /// `ingest.bind_to_iface`: with AF_XDP on an interface, the kernel UDP socket beside it and
    /// the TCP listener serve that interface (every address it has, and only it:
    /// `SO_BINDTODEVICE` on the unspecified address, at the configured ports) rather than the
    /// configured addresses.
    pub bind_to_iface: bool,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            udp: UdpConfig::default(),
            tcp: TcpConfig::default(),
            bind_to_iface: true,
        }
    }
}

/// `ingest.tcp:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TcpConfig {
    /// `ingest.tcp.bind`; null turns the listener off.
    pub bind: Option<SocketAddr>,
    /// `ingest.tcp.max_connections`
    pub max_connections: usize,
    /// `ingest.tcp.read_timeout_secs`
    pub read_timeout_secs: u64,
    /// `ingest.tcp.frames_per_connection`
    pub frames_per_connection: u32,
    /// `ingest.tcp.max_connections_per_source`: connections one source address may hold.
    pub max_connections_per_source: usize,
    /// `ingest.tcp.frame_timeout_secs`: longest a frame may take to arrive once begun; a
    /// slower sender is cut off (its partial frame counted as `truncated`).
    pub frame_timeout_secs: u64,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            bind: Some(SocketAddr::from((
                [127, 0, 0, 1],
                eventstream_common::DEFAULT_TCP_PORT,
            ))),
            max_connections: 16,
            read_timeout_secs: 30,
            frames_per_connection: 8,
            max_connections_per_source: 4,
            frame_timeout_secs: 10,
        }
    }
}

/// Most multicast groups the kernel UDP socket joins.
pub const MAX_MULTICAST_GROUPS: usize = 64;

/// `ingest.udp:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct UdpConfig {
    /// `ingest.udp.bind`
    pub bind: SocketAddr,
    /// `ingest.udp.batch`
    pub batch: usize,
    /// `ingest.udp.frame_size`
    pub frame_size: u32,
    /// `ingest.udp.frames`
    pub frames: u32,
    /// `ingest.udp.socket_buffer`
    pub socket_buffer: u32,
    /// `ingest.udp.beside_xdp`: with AF_XDP ingest, bind this socket too, for what the XDP
    /// program passes to the kernel (IP fragments, IPv6 with extension headers).
    pub beside_xdp: bool,
    /// `ingest.udp.cpu`: pin socket `k`'s receive thread to CPU `cpu + k`; null leaves them
    /// to the scheduler.
    pub cpu: Option<u32>,
    /// `ingest.udp.sockets`: `SO_REUSEPORT` sockets bound to `bind` (without AF_XDP), each with
    /// its own receive thread; the kernel spreads flows across them by 4-tuple hash.
    pub sockets: usize,
    /// `ingest.udp.multicast_groups`: groups the kernel UDP socket joins (IPv4 or IPv6, the
    /// bind address's family), so datagrams sent to them are received like unicast ones.
    pub multicast_groups: Vec<std::net::IpAddr>,
    /// `ingest.udp.multicast_iface`: the interface to join them on; "" takes `xdp.iface` (or
    /// `--iface`) when set, else lets the kernel choose by its routes.
    pub multicast_iface: String,
}

impl Default for UdpConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], eventstream_common::DEFAULT_UDP_PORT)),
            batch: 64,
            frame_size: 2048,
            frames: 4096,
            socket_buffer: 4 << 20,
            beside_xdp: true,
            cpu: None,
            sockets: 1,
            multicast_groups: Vec::new(),
            multicast_iface: String::new(),
        }
    }
}

/// How a route's events are identified for dedup.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyConfig {
    /// Hash of topic and payload.
    #[default]
    Hash,
    /// First 8 payload bytes, u64 BE.
    PayloadId,
}

/// One entry of `routes:`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Topic pattern (`*`/`+` one level, `>` one or more, `#` zero or more).
    pub topic: String,
    /// Worker class.
    pub class: crate::engine::WorkerClass,
    /// Dedup key (transactional routes).
    #[serde(default)]
    pub key: KeyConfig,
}

/// `engine:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// `engine.realtime_workers`
    pub realtime_workers: usize,
    /// `engine.transactional_workers`
    pub transactional_workers: usize,
    /// `engine.batch_workers`
    pub batch_workers: usize,
    /// `engine.ring_capacity`: slots in each dispatcher → worker ring.
    pub ring_capacity: usize,
    /// `engine.default_route`: the class for topics no route matches; none sends them to the DLQ.
    pub default_route: Option<crate::engine::WorkerClass>,
    /// `engine.dedup_window_secs`
    pub dedup_window_secs: u64,
    /// `engine.dedup_capacity`: keys remembered per transactional worker.
    pub dedup_capacity: usize,
    /// `engine.batch_max`
    pub batch_max: usize,
    /// `engine.batch_window_ms`
    pub batch_window_ms: u64,
    /// `engine.memory_sink_capacity`: records the in-memory sink keeps for inspection.
    pub memory_sink_capacity: usize,
    /// `engine.dispatcher_cpu`: pin the dispatcher thread here; null leaves it to the scheduler.
    pub dispatcher_cpu: Option<u32>,
    /// `engine.worker_cpus`: worker `k` (realtime first, then transactional, then batch) is
    /// pinned to `worker_cpus[k % len]`; empty leaves them to the scheduler.
    pub worker_cpus: Vec<u32>,
    /// `engine.latency_from`: where the realtime latency clock starts (`ingest` | `payload`).
    pub latency_from: crate::engine::latency::LatencyFrom,
    /// `engine.node_id`: this appliance's name in event ids (empty: the host name).
    pub node_id: String,
    /// `engine.auto_placement`: with AF_XDP ingest, put the dispatcher and workers that have no
    /// configured core on the NIC node's spare cores.
    pub auto_placement: bool,
    /// `engine.mode`: where the engine runs (`auto` | `inline` | `pipelined`).
    pub mode: EngineMode,
    /// `engine.batch_max_topics`: topics a batch worker groups at once.
    pub batch_max_topics: usize,
    /// `engine.stage_latency`: sample latency by stage (receive → routed, routed → worker), one
    /// event per batch.
    pub stage_latency: bool,
}

/// `engine.mode`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EngineMode {
    /// `inline` unless the machine has a core for every pipelined thread.
    #[default]
    Auto,
    /// Each receive queue's thread runs the whole engine (run to completion).
    Inline,
    /// A dispatcher thread and worker threads joined by SPSC rings.
    Pipelined,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            realtime_workers: 1,
            transactional_workers: 1,
            batch_workers: 1,
            ring_capacity: 16_384,
            default_route: Some(crate::engine::WorkerClass::Realtime),
            dedup_window_secs: 3600,
            dedup_capacity: 1 << 20,
            batch_max: 256,
            batch_window_ms: 100,
            memory_sink_capacity: 10_000,
            dispatcher_cpu: None,
            worker_cpus: Vec::new(),
            latency_from: crate::engine::latency::LatencyFrom::Ingest,
            node_id: String::new(),
            auto_placement: true,
            mode: EngineMode::Auto,
            batch_max_topics: 1024,
            stage_latency: true,
        }
    }
}

/// Which sink workers write to.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// Bounded, in memory (nothing survives a restart).
    #[default]
    Memory,
    /// The append-only segment log.
    File,
    /// A NATS JetStream stream (`sinks.nats`); the DLQ stays a file log in `sinks.dlq_dir`.
    Nats,
    /// A PostgreSQL table (`sinks.postgres`); the DLQ stays a file log in `sinks.dlq_dir`.
    Postgres,
    /// A Kafka topic (`sinks.kafka`); the DLQ stays a file log in `sinks.dlq_dir`.
    Kafka,
}

/// `sinks:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SinksConfig {
    /// `sinks.kind`: where every worker class writes, unless its own key below says otherwise.
    pub kind: SinkKind,
    /// `sinks.realtime`: the realtime class's sink, if not `sinks.kind`.
    pub realtime: Option<SinkKind>,
    /// `sinks.transactional`: the transactional class's sink, if not `sinks.kind`.
    pub transactional: Option<SinkKind>,
    /// `sinks.batch`: the batch class's sink, if not `sinks.kind`.
    pub batch: Option<SinkKind>,
    /// `sinks.dir`: one log per worker below it (`<dir>/<class>-<n>`).
    pub dir: std::path::PathBuf,
    /// `sinks.dlq_dir`
    pub dlq_dir: std::path::PathBuf,
    /// `sinks.segment_bytes`
    pub segment_bytes: u64,
    /// `sinks.fsync`
    pub fsync: crate::sink::file::Fsync,
    /// `sinks.fsync_interval_ms`
    pub fsync_interval_ms: u64,
    /// `sinks.shutdown_timeout_secs`: how long a stop waits for sinks to make what they took
    /// durable; what is still in flight then is counted as `failed{reason="shutdown"}`.
    pub shutdown_timeout_secs: u64,
    /// `sinks.max_buffered_bytes`: per file log, what may wait in memory for a slow or failing
    /// disk before events are refused (and counted as `failed{reason="sink_error"}`).
    pub max_buffered_bytes: usize,
    /// `sinks.nats`
    pub nats: crate::sink::nats::NatsConfig,
    /// `sinks.postgres`
    pub postgres: crate::sink::postgres::PostgresConfig,
    /// `sinks.kafka`
    pub kafka: crate::sink::kafka::KafkaConfig,
    /// `sinks.buffer`: the disk buffer of the networked sinks.
    pub buffer: BufferConfig,
}

/// `sinks.buffer:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BufferConfig {
    /// `sinks.buffer.dir`: one directory per sink below it.
    pub dir: std::path::PathBuf,
    /// `sinks.buffer.max_bytes`: per sink; 0 turns the disk buffer off.
    pub max_bytes: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            dir: "data/buffer".into(),
            max_bytes: 1 << 30,
        }
    }
}

impl SinksConfig {
    /// The sink `class` writes to.
    pub fn kind_for(&self, class: crate::engine::WorkerClass) -> SinkKind {
        use crate::engine::WorkerClass;
        match class {
            WorkerClass::Realtime => self.realtime,
            WorkerClass::Transactional => self.transactional,
            WorkerClass::Batch => self.batch,
        }
        .unwrap_or(self.kind)
    }

    /// The DLQ's sink: in memory when every class is, else a file log in `dlq_dir` (turned
    /// away events stay on the box, whatever the workers write to).
    pub fn dlq_kind(&self) -> SinkKind {
        let all_memory = crate::engine::WorkerClass::ALL
            .iter()
            .all(|c| self.kind_for(*c) == SinkKind::Memory);
        if all_memory {
            SinkKind::Memory
        } else {
            SinkKind::File
        }
    }

    /// Whether any class writes to `kind`.
    pub fn uses(&self, kind: SinkKind) -> bool {
        crate::engine::WorkerClass::ALL
            .iter()
            .any(|c| self.kind_for(*c) == kind)
    }

    /// The `sink` label of `class`'s delivered events.
    pub fn label(&self, class: crate::engine::WorkerClass) -> &'static str {
        match self.kind_for(class) {
            SinkKind::Memory => "memory",
            SinkKind::File => "file",
            SinkKind::Nats => "nats",
            SinkKind::Postgres => "postgres",
            SinkKind::Kafka => "kafka",
        }
    }
}

impl Default for SinksConfig {
    fn default() -> Self {
        Self {
            kind: SinkKind::Memory,
            realtime: None,
            transactional: None,
            batch: None,
            dir: "data/log".into(),
            dlq_dir: "data/dlq".into(),
            segment_bytes: 64 << 20,
            fsync: crate::sink::file::Fsync::Interval,
            fsync_interval_ms: 1000,
            shutdown_timeout_secs: 10,
            max_buffered_bytes: 64 << 20,
            nats: crate::sink::nats::NatsConfig::default(),
            postgres: crate::sink::postgres::PostgresConfig::default(),
            kafka: crate::sink::kafka::KafkaConfig::default(),
            buffer: BufferConfig::default(),
        }
    }
}

/// `admin:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `admin.bind`; null turns the endpoint off.
    pub bind: Option<SocketAddr>,
    /// `admin.token_file`: a file holding the bearer token `POST` requests must carry
    /// (`Authorization: Bearer <token>`); read once at start.
    pub token_file: Option<std::path::PathBuf>,
    /// `admin.allowed_hosts`: `host:port` names beyond the bound address (and `localhost` on
    /// loopback) that state-changing requests may carry in `Host`/`Origin`.
    pub allowed_hosts: Vec<String>,
    /// `admin.max_connections`
    pub max_connections: usize,
    /// `admin.timeout_secs`: for a request's head, its body, and an idle connection.
    pub timeout_secs: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            bind: Some(SocketAddr::from(([127, 0, 0, 1], 8090))),
            token_file: None,
            allowed_hosts: Vec::new(),
            max_connections: 64,
            timeout_secs: 5,
        }
    }
}

/// `pool:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// `pool.capacity`
    pub capacity: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            capacity: crate::mem::pool::DEFAULT_CAPACITY,
        }
    }
}

/// `queue:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// `queue.capacity`
    pub capacity: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { capacity: 65_536 }
    }
}

fn check<T: PartialOrd + ToString>(
    key: &'static str,
    value: T,
    lo: T,
    hi: T,
    expected: &'static str,
) -> Result<(), ConfigError> {
    if value < lo || value > hi {
        return Err(ConfigError::Invalid {
            key,
            value: value.to_string(),
            expected,
        });
    }
    Ok(())
}

impl Config {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, or the key and the bad value.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
            path: shown.clone(),
            reason,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] or [`ConfigError::Invalid`].
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        // An empty file is the default configuration.
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
                path: origin.to_owned(),
                message: e.to_string(),
            })?
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every range.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.protocol;
        check(
            "protocol.max_frame_len",
            p.max_frame_len,
            7,
            16 << 20,
            "7..=16777216",
        )?;
        let x = &self.xdp;
        check(
            "xdp.queues",
            x.queues,
            1,
            eventstream_common::MAX_QUEUES,
            "1..=64",
        )?;
        check("xdp.port", x.port, 1, u16::MAX, "1..=65535")?;
        check("xdp.ring_size", x.ring_size, 64, 16_384, "64..=16384")?;
        if !x.ring_size.is_power_of_two() {
            return Err(ConfigError::Invalid {
                key: "xdp.ring_size",
                value: x.ring_size.to_string(),
                expected: "a power of two",
            });
        }
        if x.frame_size != 2048 && x.frame_size != 4096 {
            return Err(ConfigError::Invalid {
                key: "xdp.frame_size",
                value: x.frame_size.to_string(),
                expected: "2048 or 4096",
            });
        }
        check(
            "xdp.frames",
            x.frames,
            x.ring_size,
            1 << 20,
            "ring_size..=1048576",
        )?;
        check("xdp.batch", x.batch, 1, 1024, "1..=1024")?;
        if !x.object.as_os_str().is_empty() && !x.object.is_absolute() {
            return Err(ConfigError::Invalid {
                key: "xdp.object",
                value: x.object.display().to_string(),
                expected: "an absolute path, or empty for the object built into the binary",
            });
        }
        if x.allow_sources.len() > eventstream_common::MAX_ALLOW_ENTRIES as usize {
            return Err(ConfigError::Invalid {
                key: "xdp.allow_sources",
                value: format!("{} networks", x.allow_sources.len()),
                expected: "at most 4096 networks",
            });
        }
        let r = &x.rate_limit;
        check(
            "xdp.rate_limit.packets_per_sec",
            r.packets_per_sec,
            0,
            eventstream_common::RATE_MAX_PPS,
            "0..=10000000",
        )?;
        check(
            "xdp.rate_limit.burst",
            u64::from(r.burst),
            0,
            60 * u64::from(r.packets_per_sec.max(1)),
            "0..=60 x packets_per_sec",
        )?;
        check(
            "ingest.udp.sockets",
            self.ingest.udp.sockets,
            1,
            64,
            "1..=64",
        )?;
        let u = &self.ingest.udp;
        check(
            "ingest.udp.multicast_groups",
            u.multicast_groups.len(),
            0,
            MAX_MULTICAST_GROUPS,
            "at most 64 groups",
        )?;
        if let Some(g) = u
            .multicast_groups
            .iter()
            .find(|g| !g.is_multicast() || g.is_ipv4() != u.bind.is_ipv4())
        {
            return Err(ConfigError::Invalid {
                key: "ingest.udp.multicast_groups",
                value: g.to_string(),
                expected: "multicast addresses (224.0.0.0/4, ff00::/8) of ingest.udp.bind's family",
            });
        }
        if !u.multicast_groups.is_empty() {
            // A socket bound to one unicast address never sees group traffic; several
            // SO_REUSEPORT sockets on the port would each get a copy.
            if !u.bind.ip().is_unspecified() {
                return Err(ConfigError::Invalid {
                    key: "ingest.udp.bind",
                    value: u.bind.to_string(),
                    expected: "0.0.0.0:PORT or [::]:PORT with ingest.udp.multicast_groups",
                });
            }
            if u.sockets != 1 {
                return Err(ConfigError::Invalid {
                    key: "ingest.udp.sockets",
                    value: u.sockets.to_string(),
                    expected: "1 with ingest.udp.multicast_groups",
                });
            }
        }
        check(
            "xdp.busy_spin_us",
            x.busy_spin_us,
            0,
            1_000_000,
            "0..=1000000",
        )?;
        let u = &self.ingest.udp;
        check("ingest.udp.batch", u.batch, 1, 1024, "1..=1024")?;
        check(
            "ingest.udp.frame_size",
            u.frame_size,
            64,
            65_536,
            "64..=65536",
        )?;
        check("ingest.udp.frames", u.frames, 64, 1 << 20, "64..=1048576")?;
        if (u.frames as usize) < u.batch {
            return Err(ConfigError::Invalid {
                key: "ingest.udp.frames",
                value: u.frames.to_string(),
                expected: "at least ingest.udp.batch",
            });
        }
        check(
            "pool.capacity",
            self.pool.capacity,
            64,
            16 << 20,
            "64..=16777216",
        )?;
        check(
            "queue.capacity",
            self.queue.capacity,
            64,
            16 << 20,
            "64..=16777216",
        )?;
        if self.sinks.uses(SinkKind::Nats) {
            let n = &self.sinks.nats;
            check("sinks.nats.replicas", n.replicas, 1, 5, "1..=5")?;
            check(
                "sinks.nats.max_in_flight",
                n.max_in_flight,
                1,
                65_536,
                "1..=65536",
            )?;
            check(
                "sinks.nats.duplicate_window_secs",
                n.duplicate_window_secs,
                1,
                86_400,
                "1..=86400",
            )?;
            for (key, empty) in [
                ("sinks.nats.servers", n.servers.is_empty()),
                ("sinks.nats.stream", n.stream.is_empty()),
                ("sinks.nats.subject_prefix", n.subject_prefix.is_empty()),
            ] {
                if empty {
                    return Err(ConfigError::Invalid {
                        key,
                        value: "empty".into(),
                        expected: "a non-empty value",
                    });
                }
            }
        }
        if self.sinks.uses(SinkKind::Postgres) {
            let p = &self.sinks.postgres;
            check(
                "sinks.postgres.max_in_flight",
                p.max_in_flight,
                1,
                1_000_000,
                "1..=1000000",
            )?;
            if !crate::sink::postgres::valid_table(&p.table) {
                return Err(ConfigError::Invalid {
                    key: "sinks.postgres.table",
                    value: p.table.clone(),
                    expected: "`name` or `schema.name` of letters, digits and _",
                });
            }
        }
        check(
            "admin.max_connections",
            self.admin.max_connections,
            1,
            4096,
            "1..=4096",
        )?;
        check(
            "admin.timeout_secs",
            self.admin.timeout_secs,
            1,
            300,
            "1..=300",
        )?;
        check(
            "sinks.shutdown_timeout_secs",
            self.sinks.shutdown_timeout_secs,
            0,
            3600,
            "0..=3600",
        )?;
        let t = &self.ingest.tcp;
        check(
            "ingest.tcp.max_connections",
            t.max_connections,
            1,
            4096,
            "1..=4096",
        )?;
        check(
            "ingest.tcp.max_connections_per_source",
            t.max_connections_per_source,
            1,
            4096,
            "1..=4096",
        )?;
        check(
            "ingest.tcp.frame_timeout_secs",
            t.frame_timeout_secs,
            1,
            3600,
            "1..=3600",
        )?;
        check(
            "ingest.tcp.read_timeout_secs",
            t.read_timeout_secs,
            1,
            86_400,
            "1..=86400",
        )?;
        check(
            "ingest.tcp.frames_per_connection",
            t.frames_per_connection,
            2,
            4096,
            "2..=4096",
        )?;
        let e = &self.engine;
        check(
            "engine.realtime_workers",
            e.realtime_workers,
            1,
            64,
            "1..=64",
        )?;
        check(
            "engine.transactional_workers",
            e.transactional_workers,
            1,
            64,
            "1..=64",
        )?;
        check("engine.batch_workers", e.batch_workers, 1, 64, "1..=64")?;
        check(
            "engine.ring_capacity",
            e.ring_capacity,
            64,
            1 << 24,
            "64..=16777216",
        )?;
        check(
            "engine.dedup_window_secs",
            e.dedup_window_secs,
            1,
            7 * 24 * 3600,
            "1..=604800",
        )?;
        check(
            "engine.dedup_capacity",
            e.dedup_capacity,
            1024,
            1 << 28,
            "1024..=268435456",
        )?;
        check("engine.batch_max", e.batch_max, 1, 1 << 20, "1..=1048576")?;
        check(
            "engine.batch_max_topics",
            e.batch_max_topics,
            1,
            1 << 20,
            "1..=1048576",
        )?;
        check(
            "engine.batch_window_ms",
            e.batch_window_ms,
            1,
            3_600_000,
            "1..=3600000",
        )?;
        check(
            "engine.memory_sink_capacity",
            e.memory_sink_capacity,
            1,
            1 << 24,
            "1..=16777216",
        )?;
        let online = crate::mem::numa::online_cpus();
        for &cpu in e.worker_cpus.iter().chain(&e.dispatcher_cpu) {
            if !online.contains(&cpu) {
                return Err(ConfigError::Invalid {
                    key: "engine.worker_cpus / engine.dispatcher_cpu",
                    value: cpu.to_string(),
                    expected: "an online CPU",
                });
            }
        }
        for r in &self.routes {
            if let Err(err) = crate::engine::route::Router::new().add(&r.topic, ()) {
                return Err(ConfigError::Invalid {
                    key: "routes[].topic",
                    value: format!("{:?}", r.topic),
                    expected: err.why,
                });
            }
        }
        if let Err(why) = self.control.validate() {
            return Err(ConfigError::Invalid {
                key: "control",
                value: format!("{:?}", self.control),
                expected: why,
            });
        }
        let k = &self.sinks;
        check(
            "sinks.segment_bytes",
            k.segment_bytes,
            1 << 16,
            1 << 40,
            "65536..=1099511627776",
        )?;
        check(
            "sinks.fsync_interval_ms",
            k.fsync_interval_ms,
            1,
            3_600_000,
            "1..=3600000",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_is_the_default() {
        let text = include_str!("../../../config/eventstream.yaml");
        assert_eq!(
            Config::parse(text, "eventstream.yaml").unwrap(),
            Config::default()
        );
        assert_eq!(Config::parse("", "empty").unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let e = Config::parse("ingest:\n  udp:\n    batch: 0\n", "f").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ingest.udp.batch: 0 is out of range (1..=1024)"
        );
        let e = Config::parse("pool:\n  capacity: 1\n", "f").unwrap_err();
        assert!(e.to_string().starts_with("pool.capacity: 1 "), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors() {
        let e = Config::parse("pool:\n  capacty: 100\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `capacty`"), "{e}");
        assert!(e.starts_with("f.yaml: "), "{e}");
        let e = Config::parse("ingest:\n  udp:\n    bind: nowhere\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid socket address"), "{e}");
    }

    #[test]
    fn xdp_section_is_checked() {
        let e = Config::parse("xdp:\n  ring_size: 1000\n", "f").unwrap_err();
        assert_eq!(
            e.to_string(),
            "xdp.ring_size: 1000 is out of range (a power of two)"
        );
        let e = Config::parse("xdp:\n  frame_size: 3000\n", "f").unwrap_err();
        assert!(e.to_string().starts_with("xdp.frame_size: 3000"), "{e}");
        let e = Config::parse("xdp:\n  attach: native\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `native`"), "{e}");
        let e = Config::parse("engine:\n  worker_cpus: [0, 4096]\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("4096 is out of range (an online CPU)"), "{e}");
        let c = Config::parse("xdp:\n  iface: eth0\n  queues: 4\n  attach: skb\n", "f").unwrap();
        assert_eq!(
            (c.xdp.iface.as_str(), c.xdp.queues, c.xdp.attach),
            ("eth0", 4, AttachPolicy::Skb)
        );
    }

    #[test]
    fn engine_routes_control_sinks_and_tcp_are_checked() {
        for (yaml, want) in [
            (
                "engine:\n  transactional_workers: 0\n",
                "engine.transactional_workers: 0",
            ),
            (
                "engine:\n  dedup_capacity: 10\n",
                "engine.dedup_capacity: 10",
            ),
            (
                "routes:\n  - { topic: \"a.>.b\", class: batch }\n",
                "routes[].topic: \"a.>.b\"",
            ),
            ("control:\n  low_watermark: 0.9\n", "control: "),
            ("sinks:\n  segment_bytes: 10\n", "sinks.segment_bytes: 10"),
            (
                "ingest:\n  tcp:\n    max_connections: 0\n",
                "ingest.tcp.max_connections: 0",
            ),
        ] {
            let e = Config::parse(yaml, "f").unwrap_err().to_string();
            assert!(e.starts_with(want), "{yaml:?}: {e}");
        }
        let e = Config::parse("routes:\n  - { topic: \"x\", class: fast }\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `fast`"), "{e}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = Config::load(Path::new("/nonexistent/eventstream.yaml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }
}
