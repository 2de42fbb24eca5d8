//! `eventstream blast`: the load generator.
//!
//! Three ways to offer load, all sending protocol-v1 frames whose payload starts with the
//! [`crate::engine::latency`] stamp (sequence number, send time) when it has room for one:
//! - **UDP** (default): `sendmmsg` batches of up to 64 datagrams on a connected socket, each
//!   with `--events-per-datagram` frames. The datagrams are encoded once; each batch only
//!   patches the stamps in place.
//! - **TCP** (`--tcp`): the same frames written back to back on one connection.
//! - **AF_XDP TX** (`--xdp-tx --iface IF`): complete Ethernet frames written into an AF_XDP
//!   socket's UMEM and queued on `IF`'s TX queue; no socket layer on the way out. The UDP
//!   checksum is left out (IPv4 allows it), since the stamps change every frame.
//! - **Live frames** (`--live-frames --iface IF`): complete Ethernet frames injected on `IF`'s
//!   RX queue with `BPF_PROG_TEST_RUN` and `BPF_F_TEST_XDP_LIVE_FRAMES` (xdp-trafficgen's
//!   method) through the program pinned for `IF` by `cargo xtask load`, so each frame really
//!   follows the appliance's own verdict: into its AF_XDP socket, or up the kernel stack to the
//!   `recvmmsg` path when no socket is registered. `--xdp-drop` runs the object's drop
//!   program instead: the lab's XDP_DROP ceiling. A veth sender pays for the receiver's work
//!   on its own CPU and tops out far below what the receive path can take; this does not.
//!   Every frame of one run is the same (stamps are not updated), so live frames measure
//!   throughput, not latency.
//!
//! Every run is bounded: by `--count`, `--duration` (default 5 s) or Ctrl-C, whichever comes
//! first. The final tally is one JSON line on stdout; a live line of rate and totals goes to
//! stderr (redrawn in place on a terminal, one line a second otherwise).

use std::io::{self, IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::engine::latency::{STAMP_LEN, realtime_ns, write_stamp};
use crate::wire::packet::UdpSpec;
use crate::wire::protocol;

/// Most datagrams one `sendmmsg` call carries, and the kernel's batch for live frames.
pub const MAX_BATCH: usize = 64;

/// `eventstream blast` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BlastArgs {
    /// Where to send: the appliance's UDP (or, with --tcp, TCP) address.
    #[arg(long)]
    pub to: SocketAddr,
    /// Send over one TCP connection instead of UDP datagrams.
    #[arg(long, conflicts_with = "live_frames")]
    pub tcp: bool,
    /// Offered load in events per second; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Frames per UDP datagram (or per live frame).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub events_per_datagram: u16,
    /// Payload bytes per event; 16 or more carry the stamp (sequence, send time).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Comma-separated topics, used round-robin.
    #[arg(long, value_delimiter = ',', default_value = "blast")]
    pub topics: Vec<String>,
    /// Priority of every frame (0..=255).
    #[arg(long, default_value_t = 5)]
    pub priority: u8,
    /// Stop after this many seconds (default 5 when --count is not given either).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// First sequence number.
    #[arg(long, default_value_t = 0)]
    pub seq_start: u64,
    /// Datagrams per sendmmsg call (1..=64).
    #[arg(long, default_value_t = MAX_BATCH as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub batch: u16,
    /// Run in this network namespace (as made by `ip netns add` or `cargo xtask lab up`).
    #[arg(long)]
    pub netns: Option<String>,
    /// Inject Ethernet frames on --iface with BPF_PROG_TEST_RUN live frames (root).
    #[arg(long, requires = "iface")]
    pub live_frames: bool,
    /// Interface whose RX queue the live frames arrive on (in --netns, if given).
    #[arg(long)]
    pub iface: Option<String>,
    /// RX queue the live frames arrive on.
    #[arg(long, default_value_t = 0)]
    pub queue: u32,
    /// Live frames through the object's drop program (the XDP_DROP ceiling), not the
    /// appliance's pinned program.
    #[arg(long, requires = "live_frames")]
    pub xdp_drop: bool,
    /// The BPF object for --xdp-drop (absolute path); default: the one built into this binary.
    #[arg(long)]
    pub object: Option<PathBuf>,
    /// Send through an AF_XDP TX socket on --iface, queue --queue (root): Ethernet frames
    /// written straight into the socket's UMEM, no kernel socket layer on the way out.
    #[arg(long, requires = "iface", conflicts_with_all = ["tcp", "live_frames"])]
    pub xdp_tx: bool,
    /// Destination MAC for --xdp-tx (default: the kernel's neighbour entry for --to's address).
    #[arg(long)]
    pub dst_mac: Option<String>,
    /// Source IPv4 address of live and AF_XDP TX frames.
    #[arg(long, default_value_t = crate::tools::lab::TX_ADDR)]
    pub from: Ipv4Addr,
    /// No live display.
    #[arg(long)]
    pub quiet: bool,
}

/// Totals of one blast.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Events handed to the kernel.
    pub events: u64,
    /// Datagrams (or live frames, or TCP batches) handed to the kernel.
    pub packets: u64,
    /// Bytes of frames (UDP payload or TCP stream) handed to the kernel.
    pub bytes: u64,
    /// Send calls that failed (their datagrams are not counted as sent).
    pub errors: u64,
    /// The last failure, if any.
    pub last_error: Option<i32>,
    /// Time from the first send to the last.
    pub elapsed: Duration,
}

impl Tally {
    /// The tally as the JSON line `blast` prints.
    pub fn to_json(&self, mode: &str) -> serde_json::Value {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        json!({
            "mode": mode,
            "sent_events": self.events,
            "sent_packets": self.packets,
            "sent_bytes": self.bytes,
            "send_errors": self.errors,
            "last_error": self.last_error.map(|e| io::Error::from_raw_os_error(e).to_string()),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "events_per_sec": self.events as f64 / secs,
            "packets_per_sec": self.packets as f64 / secs,
        })
    }
}

/// One datagram's bytes and where its frames' payloads start (for the stamps).
#[derive(Debug, Clone)]
struct Datagram {
    bytes: Vec<u8>,
    payloads: Vec<usize>,
}

/// Encodes `slots` datagrams of `per` frames each; topics go round-robin over all frames.
fn encode_datagrams(args: &BlastArgs, slots: usize) -> Result<Vec<Datagram>> {
    if args.topics.is_empty() || args.topics.iter().any(String::is_empty) {
        bail!("--topics: give at least one non-empty topic");
    }
    let per = usize::from(args.events_per_datagram);
    // A recognisable, position-dependent filler, so receivers can check bytes.
    let payload: Vec<u8> = (0..args.payload_bytes).map(|i| (i % 251) as u8).collect();
    let mut out = Vec::with_capacity(slots);
    let mut k = 0;
    for _ in 0..slots {
        let mut d = Datagram {
            bytes: Vec::new(),
            payloads: Vec::with_capacity(per),
        };
        for _ in 0..per {
            let topic = &args.topics[k % args.topics.len()];
            k += 1;
            let start = d.bytes.len();
            protocol::encode(args.priority, topic, &payload, &mut d.bytes)
                .with_context(|| format!("encoding a frame for topic {topic:?}"))?;
            d.payloads.push(start + protocol::HEADER_LEN + topic.len());
        }
        if !args.tcp && d.bytes.len() > 65_507 {
            bail!(
                "--events-per-datagram {per} x --payload-bytes {}: {} bytes do not fit a UDP \
                 datagram (65 507)",
                args.payload_bytes,
                d.bytes.len()
            );
        }
        out.push(d);
    }
    Ok(out)
}

/// Writes the stamps of every frame in `dgrams`, numbering from `*seq`.
fn stamp(dgrams: &mut [Datagram], seq: &mut u64, now_ns: u64) {
    for d in dgrams {
        for &p in &d.payloads {
            if let Some(slot) = d.bytes.get_mut(p..p + STAMP_LEN) {
                write_stamp(slot, *seq, now_ns);
            }
            *seq += 1;
        }
    }
}

/// Paces sends to `rate` events/s and bounds the run by count and time.
#[derive(Debug)]
struct Pacer {
    rate: u64,
    limit: Option<u64>,
    until: Instant,
    start: Instant,
    stop: Arc<AtomicBool>,
}

impl Pacer {
    /// How many more events may go now (0 = none yet, `None` = the run is over).
    fn allowance(&self, sent: u64, want: u64) -> Option<u64> {
        loop {
            let now = Instant::now();
            if now >= self.until || self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let left = self.limit.map_or(u64::MAX, |l| l.saturating_sub(sent));
            if left == 0 {
                return None;
            }
            if self.rate == 0 {
                return Some(want.min(left));
            }
            let due = (now - self.start).as_nanos() * u128::from(self.rate) / 1_000_000_000;
            let ok = (due as u64).saturating_sub(sent).min(want).min(left);
            if ok > 0 {
                return Some(ok);
            }
            // Sleep until the next event is due, in short steps so Ctrl-C stays prompt.
            let next_ns = (sent + 1) as u128 * 1_000_000_000 / u128::from(self.rate);
            let wait = Duration::from_nanos(next_ns as u64).saturating_sub(now - self.start);
            std::thread::sleep(wait.min(Duration::from_millis(5)));
        }
    }
}

/// The live status line: redrawn in place on a terminal, one line a second otherwise.
#[derive(Debug)]
struct Display {
    quiet: bool,
    tty: bool,
    last: Instant,
    last_events: u64,
}

impl Display {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            tty: io::stderr().is_terminal(),
            last: Instant::now(),
            last_events: 0,
        }
    }

    fn tick(&mut self, t: &Tally, force: bool) {
        let now = Instant::now();
        let dt = now - self.last;
        if self.quiet || (!force && dt < Duration::from_secs(1)) {
            return;
        }
        let rate = (t.events - self.last_events) as f64 / dt.as_secs_f64().max(1e-9);
        let line = format!(
            "blast: {:>6.1} s  {:>12.0} events/s  {:>12} events  {:>10} packets  {} errors",
            t.elapsed.as_secs_f64(),
            rate,
            t.events,
            t.packets,
            t.errors
        );
        let mut err = io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
        self.last = now;
        self.last_events = t.events;
    }

    fn finish(&mut self, t: &Tally) {
        if self.quiet {
            return;
        }
        if self.tty {
            eprintln!();
        }
        eprintln!(
            "blast: done in {:.2} s: {} events, {} packets, {:.0} events/s, {} errors",
            t.elapsed.as_secs_f64(),
            t.events,
            t.packets,
            t.events as f64 / t.elapsed.as_secs_f64().max(1e-9),
            t.errors
        );
    }
}

fn pacer(args: &BlastArgs, stop: Arc<AtomicBool>) -> Pacer {
    let secs = match (args.duration, args.count) {
        (Some(d), _) => d,
        (None, Some(_)) => 3600.0,
        (None, None) => 5.0,
    };
    let start = Instant::now();
    Pacer {
        rate: args.rate,
        limit: args.count,
        until: start + Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)),
        start,
        stop,
    }
}

/// Sends over UDP with `sendmmsg` until the pacer says stop.
fn blast_udp(args: &BlastArgs, pace: &Pacer, display: &mut Display) -> Result<Tally> {
    let bind: SocketAddr = if args.to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).context("binding the sending UDP socket")?;
    sock.connect(args.to)
        .with_context(|| format!("connecting to {}", args.to))?;
    let batch = usize::from(args.batch);
    let per = u64::from(args.events_per_datagram);
    let mut dgrams = encode_datagrams(args, batch)?;
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(batch);
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(batch);
    for d in &mut dgrams {
        iov.push(libc::iovec {
            iov_base: d.bytes.as_mut_ptr().cast(),
            iov_len: d.bytes.len(),
        });
    }
    for v in &mut iov {
        // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header.
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
        msgs.push(m);
    }
    let mut t = Tally::default();
    let mut seq = args.seq_start;
    while let Some(ok) = pace.allowance(t.events, batch as u64 * per) {
        // Less than one datagram's worth left of --count still sends a whole datagram: a
        // count is rounded up to whole datagrams.
        let n = (ok / per).max(1) as usize;
        // The stamps are written through `dgrams`, whose buffers `iov` points into; the
        // vectors are never resized, so the pointers stay valid.
        stamp(&mut dgrams[..n], &mut seq, realtime_ns());
        // SAFETY: `msgs[..n]` are initialised headers whose iovecs point into `dgrams`, alive
        // and unmoved for the call; the socket is a valid connected UDP socket.
        let rc =
            unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::ENOBUFS) => std::thread::yield_now(),
                code => {
                    t.errors += 1;
                    t.last_error = code;
                }
            }
            // The stamped but unsent sequence numbers are reused by the next batch.
            seq -= n as u64 * per;
        } else {
            let sent = rc as usize;
            seq -= (n - sent) as u64 * per;
            t.packets += sent as u64;
            t.events += sent as u64 * per;
            t.bytes += dgrams[..sent]
                .iter()
                .map(|d| d.bytes.len() as u64)
                .sum::<u64>();
        }
        t.elapsed = pace.start.elapsed();
        display.tick(&t, false);
    }
    Ok(t)
}

/// Writes the frames over one TCP connection until the pacer says stop.
fn blast_tcp(args: &BlastArgs, pace: &Pacer, display: &mut Display) -> Result<Tally> {
    let mut stream = TcpStream::connect_timeout(&args.to, Duration::from_secs(5))
        .with_context(|| format!("connecting to {} over TCP", args.to))?;
    stream.set_nodelay(true)?;
    let batch = usize::from(args.batch);
    let per = u64::from(args.events_per_datagram);
    let mut chunks = encode_datagrams(args, batch)?;
    let mut buf = Vec::new();
    let mut t = Tally::default();
    let mut seq = args.seq_start;
    while let Some(ok) = pace.allowance(t.events, batch as u64 * per) {
        let n = (ok / per).max(1) as usize;
        stamp(&mut chunks[..n], &mut seq, realtime_ns());
        buf.clear();
        for c in &chunks[..n] {
            buf.extend_from_slice(&c.bytes);
        }
        if let Err(e) = stream.write_all(&buf) {
            t.errors += 1;
            t.last_error = e.raw_os_error();
            t.elapsed = pace.start.elapsed();
            eprintln!("blast: TCP connection to {} failed: {e}", args.to);
            break;
        }
        t.packets += n as u64;
        t.events += n as u64 * per;
        t.bytes += buf.len() as u64;
        t.elapsed = pace.start.elapsed();
        display.tick(&t, false);
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(t)
}

/// A program to inject live frames through, and the frame.
#[derive(Debug)]
pub struct LiveFrames {
    prog: OwnedFd,
    /// Keeps the drop program's object loaded (its fd is owned by the object).
    _drop: Option<crate::xdp::DropProgram>,
    ifindex: u32,
    queue: u32,
    frame: Vec<u8>,
    events_per_frame: u64,
}

impl LiveFrames {
    /// Prepares live frames for `args` (in the caller's network namespace): the pinned
    /// program of `--iface`, or with `--xdp-drop` the object's drop program.
    ///
    /// # Errors
    /// A missing interface or pin, no privileges, or a frame too large.
    pub fn new(args: &BlastArgs) -> Result<Self> {
        let iface = args
            .iface
            .as_deref()
            .context("--live-frames needs --iface")?;
        let ifindex = crate::xdp::if_index(iface)?;
        let (prog, drop) = if args.xdp_drop {
            let p = crate::xdp::DropProgram::load(args.object.as_deref().map_or(
                crate::xdp::ObjectSource::Embedded,
                crate::xdp::ObjectSource::File,
            ))?;
            (p.fd().try_clone_to_owned()?, Some(p))
        } else {
            let pin = crate::xdp::pin_dir(iface).join("prog");
            let fd = crate::xdp::sys::obj_get(&pin).with_context(|| {
                format!(
                    "opening the program pinned at {} (run `cargo xtask load --iface {iface}` \
                     first, or pass --xdp-drop)",
                    pin.display()
                )
            })?;
            (fd, None)
        };
        // Frames arrive on `iface`: addressed to it, from a made-up local sender.
        let spec = frame_spec(
            args,
            "--live-frames",
            [0x02, 0, 0, 0, 0, 0x01],
            crate::xdp::if_hwaddr(iface)?,
        )?;
        let mut dgram = encode_datagrams(args, 1)?;
        stamp(&mut dgram, &mut args.seq_start.clone(), realtime_ns());
        let frame = spec.frame(&dgram[0].bytes);
        if frame.len() > 3_500 {
            bail!(
                "--live-frames: a {}-byte frame does not fit a page-sized XDP buffer; use fewer \
                 --events-per-datagram or smaller --payload-bytes",
                frame.len()
            );
        }
        Ok(Self {
            prog,
            _drop: drop,
            ifindex,
            queue: args.queue,
            frame,
            events_per_frame: u64::from(args.events_per_datagram),
        })
    }

    /// The frame injected (Ethernet header first).
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }

    fn prog(&self) -> BorrowedFd<'_> {
        self.prog.as_fd()
    }

    /// Injects frames until `pace` says stop.
    fn run(&self, pace: &Pacer, display: &mut Display) -> Result<Tally> {
        let per = self.events_per_frame;
        let mut t = Tally::default();
        // On some kernels each call costs a fixed ~20 ms (seen here for programs that drop
        // or pass, not for redirects), so at full speed the chunk grows until a call takes
        // about 200 ms; paced, each call sends what has come due (the pacer caps it).
        let mut chunk: u64 = if pace.rate == 0 { 8192 } else { 1 << 20 };
        while let Some(ok) = pace.allowance(t.events, chunk * per) {
            let n = (ok / per).max(1);
            let began = Instant::now();
            let run = crate::xdp::sys::prog_test_run_live(
                self.prog(),
                &self.frame,
                n as u32,
                self.ifindex,
                self.queue,
                MAX_BATCH as u32,
            );
            if pace.rate == 0 {
                let per_sec = n as f64 / began.elapsed().as_secs_f64().max(1e-6);
                chunk = ((per_sec * 0.2) as u64).clamp(8192, 1 << 22);
            }
            match run {
                Ok(_) => {
                    t.packets += n;
                    t.events += n * per;
                    t.bytes += n * (self.frame.len() as u64);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Each call registers a page pool with its own memory-model id, released only
                // once every page it lent is back (a passed frame's page lives as long as its
                // skb); the ids can run out (ENOSPC) or the pool's memory (ENOMEM) for a while.
                // Nothing was sent: wait for the kernel to release them and go on.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::ENOMEM)) => {
                    t.errors += 1;
                    t.last_error = e.raw_os_error();
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(e).context(format!(
                        "BPF_PROG_TEST_RUN live frames on ifindex {} queue {}",
                        self.ifindex, self.queue
                    ));
                }
            }
            t.elapsed = pace.start.elapsed();
            display.tick(&t, false);
            if pace.rate != 0 {
                // Paced: at most one call per 2 ms (each carries what came due), so the kernel's
                // per-call page pools stay few.
                let next = began + Duration::from_millis(2);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        }
        Ok(t)
    }
}

/// Ethernet/IPv4/UDP addressing of the frames `--live-frames` and `--xdp-tx` build: from
/// `--from` port 40000 to `--to`.
fn frame_spec(args: &BlastArgs, flag: &str, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Result<UdpSpec> {
    let IpAddr::V4(dst) = args.to.ip() else {
        bail!("{flag}: --to must be an IPv4 address");
    };
    Ok(UdpSpec {
        src_mac,
        dst_mac,
        vlan: None,
        src: args.from.into(),
        dst: dst.into(),
        src_port: 40_000,
        dst_port: args.to.port(),
    })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The MAC of `ip` from the calling thread's network namespace's neighbour table.
fn neighbour(ip: Ipv4Addr) -> Result<[u8; 6]> {
    // /proc/thread-self/net follows this thread's network namespace (--netns).
    let table = std::fs::read_to_string("/proc/thread-self/net/arp")
        .context("reading the neighbour table (/proc/thread-self/net/arp)")?;
    let ip = ip.to_string();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // IP address, HW type, Flags (0x2 complete, 0x4 permanent), HW address, ...
            (f.len() >= 4 && f[0] == ip && f[2] != "0x0").then(|| parse_mac(f[3]))
        })
        .flatten()
        .next()
        .with_context(|| format!("no neighbour entry for {ip}: ping it once, or pass --dst-mac"))
}

/// Sends Ethernet frames through an AF_XDP TX socket until the pacer says stop.
fn blast_xdp_tx(args: &BlastArgs, pace: &Pacer, display: &mut Display) -> Result<Tally> {
    use crate::xdp::tx::{TX_FRAME_SIZE, XskTx};
    let iface = args.iface.as_deref().context("--xdp-tx needs --iface")?;
    let ifindex = crate::xdp::if_index(iface)?;
    let dst_mac = match (&args.dst_mac, args.to.ip()) {
        (Some(m), _) => {
            parse_mac(m).with_context(|| format!("--dst-mac {m}: expected aa:bb:cc:dd:ee:ff"))?
        }
        (None, IpAddr::V4(dst)) => neighbour(dst)?,
        (None, IpAddr::V6(_)) => bail!("--xdp-tx: --to must be an IPv4 address"),
    };
    let spec = frame_spec(args, "--xdp-tx", crate::xdp::if_hwaddr(iface)?, dst_mac)?;
    let dgram = encode_datagrams(args, 1)?.remove(0);
    let mut frame = spec.frame(&dgram.bytes);
    if frame.len() > TX_FRAME_SIZE as usize {
        bail!(
            "--xdp-tx: a {}-byte frame does not fit a {TX_FRAME_SIZE}-byte UMEM chunk",
            frame.len()
        );
    }
    // The stamps change per frame, so the UDP checksum cannot stay valid: IPv4 allows none.
    let udp_csum = spec.header_len() - 2;
    frame[udp_csum..udp_csum + 2].fill(0);
    let stamps: Vec<usize> = dgram
        .payloads
        .iter()
        .map(|p| spec.header_len() + p)
        .filter(|p| p + STAMP_LEN <= frame.len())
        .collect();
    let mut tx = XskTx::new(ifindex, args.queue, 4096, 2048, true)
        .with_context(|| format!("AF_XDP TX on {iface} queue {}", args.queue))?;
    let per = u64::from(args.events_per_datagram);
    let mut t = Tally::default();
    let mut seq = args.seq_start;
    while let Some(ok) = pace.allowance(t.events, u64::from(args.batch) * per) {
        let n = (ok / per).max(1) as u32;
        let now = realtime_ns();
        let sent = tx.send(n, |buf| {
            buf[..frame.len()].copy_from_slice(&frame);
            for &p in &stamps {
                write_stamp(&mut buf[p..p + STAMP_LEN], seq, now);
                seq += 1;
            }
            frame.len()
        });
        match sent {
            Ok(0) => std::thread::yield_now(),
            Ok(k) => {
                t.packets += u64::from(k);
                t.events += u64::from(k) * per;
                t.bytes += u64::from(k) * frame.len() as u64;
            }
            Err(e) => {
                return Err(e).context(format!("AF_XDP TX on {iface} after {} events", t.events));
            }
        }
        t.elapsed = pace.start.elapsed();
        display.tick(&t, false);
    }
    // Frames the kernel has not completed are not known to be sent: wait for them, and count
    // any that never come back as not sent.
    let lost = tx.flush(Duration::from_secs(1))? as u64;
    t.packets -= lost;
    t.events -= lost * per;
    t.bytes -= lost * frame.len() as u64;
    Ok(t)
}

/// Runs a blast and returns its tally (the library entry point of `eventstream blast`; the
/// bench calls it in-process). Stops early when `stop` is set.
///
/// # Errors
/// Bad flags, a socket or program that cannot be opened, or (TCP) a refused connection.
pub fn run(args: &BlastArgs, stop: Arc<AtomicBool>) -> Result<(Tally, &'static str)> {
    if let Some(ns) = &args.netns {
        crate::tools::lab::enter_netns(ns)?;
    }
    if args.payload_bytes < STAMP_LEN {
        tracing::warn!(
            "--payload-bytes {} < {STAMP_LEN}: payloads carry no stamp (no sequence numbers, no \
             sender latency)",
            args.payload_bytes
        );
    }
    // Paced sends wake when the next event is due, not up to 50 us later (the default timer
    // slack), so a paced rate leaves in the small bursts it asks for.
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and changes only this thread's timers.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut display = Display::new(args.quiet);
    let (t, mode) = if args.live_frames {
        let live = LiveFrames::new(args)?;
        (live.run(&pacer(args, stop), &mut display)?, "live_frames")
    } else if args.xdp_tx {
        (
            blast_xdp_tx(args, &pacer(args, stop), &mut display)?,
            "xdp_tx",
        )
    } else if args.tcp {
        (blast_tcp(args, &pacer(args, stop), &mut display)?, "tcp")
    } else {
        (blast_udp(args, &pacer(args, stop), &mut display)?, "udp")
    };
    display.finish(&t);
    Ok((t, mode))
}

/// `eventstream blast`: runs, then prints the tally as one JSON line.
///
/// # Errors
/// As [`run`].
pub fn main(args: &BlastArgs) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let (t, mode) = run(args, stop)?;
    println!("{}", t.to_json(mode));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        blast: BlastArgs,
    }

    fn args(extra: &[&str]) -> BlastArgs {
        let mut v = vec!["blast", "--to", "127.0.0.1:1"];
        v.extend_from_slice(extra);
        Cli::parse_from(v).blast
    }

    #[test]
    fn datagrams_decode_with_stamps_and_topics_round_robin() {
        let a = args(&[
            "--events-per-datagram",
            "3",
            "--payload-bytes",
            "20",
            "--topics",
            "a,bb",
        ]);
        let mut d = encode_datagrams(&a, 2).unwrap();
        let mut seq = 10;
        stamp(&mut d, &mut seq, 99);
        assert_eq!(seq, 16);
        let mut topics = Vec::new();
        let mut seqs = Vec::new();
        for dg in &d {
            for f in protocol::Datagram::new(&dg.bytes, protocol::Limits::default()) {
                let f = f.unwrap();
                topics.push(f.topic.to_owned());
                let (s, ns) = crate::engine::latency::read_stamp(f.payload).unwrap();
                assert_eq!(ns, 99);
                assert_eq!(f.payload.len(), 20);
                assert_eq!(&f.payload[16..], &[16, 17, 18, 19]);
                seqs.push(s);
            }
        }
        assert_eq!(topics, ["a", "bb", "a", "bb", "a", "bb"]);
        assert_eq!(seqs, [10, 11, 12, 13, 14, 15]);
    }

    #[test]
    fn oversized_datagrams_and_empty_topics_are_refused() {
        let a = args(&["--events-per-datagram", "2", "--payload-bytes", "40000"]);
        let e = encode_datagrams(&a, 1).unwrap_err().to_string();
        assert!(e.contains("do not fit a UDP datagram"), "{e}");
        let a = args(&["--topics", "a,"]);
        assert!(encode_datagrams(&a, 1).is_err());
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("02:00:c6:12:00:02"),
            Some([2, 0, 0xc6, 0x12, 0, 2])
        );
        assert_eq!(parse_mac("02:00:c6:12:00"), None);
        assert_eq!(parse_mac("02:00:c6:12:00:02:03"), None);
        assert_eq!(parse_mac("zz:00:c6:12:00:02"), None);
    }

    #[test]
    fn pacer_holds_the_rate_and_the_count() {
        let stop = Arc::new(AtomicBool::new(false));
        let p = Pacer {
            rate: 1000,
            limit: Some(5),
            until: Instant::now() + Duration::from_secs(5),
            start: Instant::now(),
            stop: stop.clone(),
        };
        // At 1000/s, nothing is due before the first millisecond has passed; then the
        // allowance never exceeds the count.
        let first = p.allowance(0, 64).unwrap();
        assert!((1..=5).contains(&first), "{first}");
        assert_eq!(p.allowance(5, 64), None);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(p.allowance(0, 64), None);
    }
}
