//! The `eventstream` daemon.
//!
//! `eventstream run --config FILE` starts the pipeline. Until the AF_XDP path and the engine
//! land, `run` is the kernel UDP path (the `--no-xdp` mode) feeding a consumer that counts and
//! releases events: ingest → pool → MPSC queue → consumer, all of the foundation's hot path.
//! SIGINT or SIGTERM (or `--duration`) stops ingest, drains the queue, and prints the
//! reconciliation as one JSON line on stdout.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use eventstream::config::Config;
use eventstream::event::Event;
use eventstream::frames::FrameArena;
use eventstream::ingest::{IngestCounters, UdpIngest, bind_udp};
use eventstream::mem::RegionOptions;
use eventstream::pool::{EventPool, Pooled};
use eventstream::protocol::RejectReason;
use eventstream::ring::mpsc;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "eventstream",
    version,
    about = "Kernel-bypass event-ingest appliance"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the appliance.
    Run {
        /// Configuration file (YAML).
        #[arg(long, default_value = "config/eventstream.yaml")]
        config: PathBuf,
        /// Use the kernel UDP socket even where XDP could attach.
        #[arg(long)]
        no_xdp: bool,
        /// Override `ingest.udp.bind`.
        #[arg(long)]
        udp_bind: Option<std::net::SocketAddr>,
        /// Stop by itself after this many seconds (0: run until SIGINT/SIGTERM).
        #[arg(long, default_value_t = 0)]
        duration: u64,
    },
    /// Validate a configuration file and print it with defaults filled in.
    CheckConfig {
        /// Configuration file (YAML).
        file: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::CheckConfig { file } => {
            let config = Config::load(&file)?;
            println!("{config:#?}");
            println!("{}: ok", file.display());
            Ok(())
        }
        Cmd::Run {
            config,
            no_xdp,
            udp_bind,
            duration,
        } => {
            let mut cfg = Config::load(&config)?;
            if let Some(addr) = udp_bind {
                cfg.ingest.udp.bind = addr;
            }
            run(&cfg, no_xdp, duration)
        }
    }
}

/// What the consumer saw.
#[derive(Default)]
struct Delivered {
    events: AtomicU64,
    payload_bytes: AtomicU64,
}

fn run(cfg: &Config, no_xdp: bool, duration: u64) -> Result<()> {
    if no_xdp {
        info!("--no-xdp: kernel UDP ingest (recvmmsg)");
    } else {
        info!("the AF_XDP path is not built yet: kernel UDP ingest (recvmmsg) serves instead");
    }
    let u = &cfg.ingest.udp;
    let socket = bind_udp(u.bind, u.socket_buffer)
        .with_context(|| format!("binding UDP {} (ingest.udp.bind)", u.bind))?;
    let local = socket.local_addr()?;
    let arena = FrameArena::new(
        u.frame_size,
        u.frames,
        RegionOptions {
            hugepages: true,
            ..Default::default()
        },
    )?;
    info!(frames = u.frames, frame_size = u.frame_size, pages = ?arena.region().pages(), "receive frames mapped");
    let pool: EventPool<Event<'_>> = EventPool::new(cfg.pool.capacity);
    let (tx, mut rx) = mpsc::channel::<Pooled<'_, Event<'_>>>(cfg.queue.capacity);

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let ingest_stop = AtomicBool::new(false);
    let ingest_done = AtomicBool::new(false);
    let counters = IngestCounters::default();
    let delivered = Delivered::default();
    // Printed for scripts and tests that bind port 0.
    println!("listening udp {local}");

    std::thread::scope(|s| -> Result<()> {
        let ingest = s.spawn(|| {
            let mut frames = arena.owner().expect("one owner");
            let mut acquirer = pool.acquirer().expect("one acquirer");
            let job = UdpIngest {
                socket: &socket,
                batch: u.batch,
                limits: cfg.protocol.limits(),
                stop: &ingest_stop,
                counters: &counters,
            };
            let r = job.run(&mut frames, &mut acquirer, &tx);
            ingest_done.store(true, Ordering::Release);
            r
        });
        s.spawn(|| {
            let (mut events, mut bytes) = (0u64, 0u64);
            loop {
                let n = rx.pop_batch(256, |ev| {
                    bytes += ev.payload().len() as u64;
                    drop(ev);
                });
                events += n as u64;
                if n == 0 {
                    delivered.events.store(events, Ordering::Relaxed);
                    delivered.payload_bytes.store(bytes, Ordering::Relaxed);
                    if ingest_done.load(Ordering::Acquire) && rx.is_empty() {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });

        let start = Instant::now();
        let mut last = (start, 0u64);
        while !stop.load(Ordering::Relaxed) && !ingest_done.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(100));
            if duration > 0 && start.elapsed() >= Duration::from_secs(duration) {
                break;
            }
            let now = Instant::now();
            if now.duration_since(last.0) >= Duration::from_secs(1) {
                let ev = counters.events.load(Ordering::Relaxed);
                let rate = (ev - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                info!(
                    events = ev,
                    rate = format!("{rate:.0}/s"),
                    queue = tx.len(),
                    "ingest"
                );
                last = (now, ev);
            }
        }
        info!("stopping: ingest closes, queue drains");
        ingest_stop.store(true, Ordering::Relaxed);
        match ingest.join() {
            Ok(r) => r.context("UDP ingest")?,
            Err(_) => warn!("ingest thread panicked"),
        }
        Ok(())
    })?;

    let mut rejected = serde_json::Map::new();
    for r in RejectReason::ALL {
        rejected.insert(r.as_str().to_owned(), counters.rejected(r).into());
    }
    let report = serde_json::json!({
        "received_datagrams": counters.datagrams.load(Ordering::Relaxed),
        "received_bytes": counters.bytes.load(Ordering::Relaxed),
        "accepted_events": counters.events.load(Ordering::Relaxed),
        "delivered_events": delivered.events.load(Ordering::Relaxed),
        "delivered_payload_bytes": delivered.payload_bytes.load(Ordering::Relaxed),
        "rejected": rejected,
    });
    println!("{report}");
    Ok(())
}
