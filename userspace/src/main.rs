//! The `eventstream` daemon.
//!
//! `eventstream run --config FILE [--iface IF] [--queues N] [--no-xdp]` starts the pipeline:
//! with an interface, one AF_XDP socket and pinned ingest thread per RX queue (UMEM on the NIC's
//! NUMA node, the XDP program reused from `cargo xtask load` or loaded and owned here); without
//! one, or where XDP cannot be had (no privileges, no interface, no AF_XDP), the kernel UDP
//! socket with `recvmmsg`, announced in one log line that says why. Events go through the
//! dispatcher (control plane, routing, DLQ) to realtime, transactional and batch workers.
//! On stdout it prints one `listening <what> <addr>` line per bound socket, then `ready` once
//! every thread runs. SIGINT or SIGTERM (or `--duration`) stops ingest, drains the queue, and
//! prints the reconciliation as one JSON line on stdout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use eventstream::mem::topology::{self, PlanInput, Topology};
use eventstream::ops::config::Config;
use serde_json::json;

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
    /// Send protocol-v1 events at an appliance (UDP sendmmsg, TCP, or live frames).
    Blast(Box<eventstream::tools::blast::BlastArgs>),
    /// Show the NUMA topology (from hwloc), the NIC's node, and where `run` would put its threads.
    Topology {
        /// The configuration whose placement to show.
        #[arg(long, default_value = "config/eventstream.yaml")]
        config: PathBuf,
        /// The interface (default: xdp.iface).
        #[arg(long)]
        iface: Option<String>,
        /// RX queues (default: xdp.queues).
        #[arg(long)]
        queues: Option<u32>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the appliance.
    Run {
        /// Configuration file (YAML).
        #[arg(long, default_value = "config/eventstream.yaml")]
        config: PathBuf,
        /// Serve this interface's RX queues with AF_XDP (overrides `xdp.iface`).
        #[arg(long)]
        iface: Option<String>,
        /// Number of RX queues to serve (overrides `xdp.queues`).
        #[arg(long)]
        queues: Option<u32>,
        /// Use the kernel UDP socket even where XDP could attach.
        #[arg(long)]
        no_xdp: bool,
        /// Override `ingest.udp.bind`.
        #[arg(long)]
        udp_bind: Option<std::net::SocketAddr>,
        /// Stop by itself after this many seconds (0: run until SIGINT/SIGTERM).
        #[arg(long, default_value_t = 0)]
        duration: u64,
        /// Run in this network namespace (keeps the host's /sys/fs/bpf, unlike `ip netns exec`).
        #[arg(long)]
        netns: Option<String>,
        /// Bench probe of the AF_XDP path's limits: `bare` returns every RX descriptor straight
        /// to FILL, `parse` parses and releases; neither runs the engine.
        #[arg(long, hide = true, value_enum)]
        probe: Option<eventstream::daemon::Probe>,
    },
    /// List every XDP program pinned under /sys/fs/bpf/eventstream, across network namespaces:
    /// interface, namespace, whether its link is still attached (stale pins flagged), attach
    /// mode, program and tag, and its verdict counters.
    Status,
    /// A live terminal view of a running appliance, from its /metrics: rates per source and
    /// worker, queue fill, pipeline state, sinks, drops by reason, XDP verdicts, latency.
    Top {
        /// The appliance's admin address (`admin.bind`).
        #[arg(long, default_value = "127.0.0.1:8090")]
        admin: std::net::SocketAddr,
        /// Milliseconds between scrapes.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// The sink bench (`cargo xtask bench --sinks` runs it in this release binary): each
    /// networked sink beside its bare client on loopback servers it starts; JSON on stdout.
    #[command(hide = true)]
    BenchSinks {
        /// Events per run.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        /// Runs per figure.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Only these targets (nats_r1, nats_r3, kafka, postgres).
        #[arg(long)]
        target: Vec<String>,
    },
    /// Validate a configuration file and print it with defaults filled in.
    CheckConfig {
        /// Configuration file (YAML).
        file: PathBuf,
    },
    /// Read the file sink's logs.
    Log {
        #[command(subcommand)]
        cmd: LogCmd,
    },
    /// Read the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
}

#[derive(Subcommand)]
enum LogCmd {
    /// Print every record as a JSON line (a log directory, or `sinks.dir` with one per worker).
    Cat {
        /// The directory.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum DlqCmd {
    /// Print every dead-lettered event with its reason as a JSON line.
    List {
        /// The directory (`sinks.dlq_dir`).
        dir: PathBuf,
    },
}

/// Prints every record below `dir` (itself a log, or a directory of logs) as JSON lines.
fn print_logs(dir: &std::path::Path) -> Result<()> {
    let mut dirs = vec![dir.to_owned()];
    let mut subs: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subs.sort();
    dirs.extend(subs);
    let mut n = 0u64;
    let mut damage = Vec::new();
    for d in dirs {
        let log = d
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("")
            .to_owned();
        // One segment in memory at a time; every good record is printed as it is read.
        damage.extend(
            eventstream::sink::file::scan_log(&d, |s| {
                n += 1;
                println!(
                    "{}",
                    json!({
                        "log": log,
                        "id": s.id, "seq": s.record.seq, "source": s.source.map(|x| x.as_str()),
                        "priority": s.record.priority, "topic": s.record.topic,
                        "payload": String::from_utf8_lossy(&s.record.payload),
                        "payload_len": s.record.payload.len(),
                        "reason": s.record.reason, "ingest_ns": s.ingest_ns,
                        "received_unix_ns": s.received_unix_ns,
                        "sender": s.peer.socket_addr().map(|a| a.to_string()),
                    })
                );
            })
            .with_context(|| format!("reading log {}", d.display()))?,
        );
    }
    eprintln!("{n} records");
    if !damage.is_empty() {
        for d in &damage {
            eprintln!(
                "damaged: {} at byte {}: {} bytes skipped ({}{})",
                d.segment.display(),
                d.offset,
                d.bytes,
                d.reason,
                if d.at_end {
                    ", to the end of the segment"
                } else {
                    ""
                }
            );
        }
        return Err(anyhow::anyhow!(
            "{} damaged stretch(es) in the log; every good record was printed",
            damage.len()
        ));
    }
    Ok(())
}

/// Runs the command; an error is printed as its chain of causes, one line, and exits 1 (never a
/// backtrace, whatever `RUST_BACKTRACE` says: these are answers for operators).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Blast(args) => eventstream::tools::blast::main(&args),
        Cmd::Topology {
            config,
            iface,
            queues,
            json,
        } => show_topology(&config, iface, queues, json),
        Cmd::Top { admin, interval_ms } => {
            eventstream::ops::top::run(admin, Duration::from_millis(interval_ms.max(100)))
                .with_context(|| format!("eventstream top: {admin}/metrics"))?;
            Ok(())
        }
        Cmd::BenchSinks {
            events,
            runs,
            target,
        } => {
            let plan = eventstream::tools::sinkbench::Plan {
                events,
                runs: runs.max(1),
                payload: 64,
                scratch: std::env::temp_dir().join(format!("es-sinkbench-{}", std::process::id())),
                base_port: 23_000,
                only: target,
            };
            let doc = eventstream::tools::sinkbench::run(&plan)?;
            println!("{doc}");
            Ok(())
        }
        Cmd::Status => {
            print!("{}", eventstream::xdp::status_text());
            Ok(())
        }
        Cmd::CheckConfig { file } => {
            let config = Config::load(&file)?;
            println!("{config:#?}");
            println!("{}: ok", file.display());
            Ok(())
        }
        Cmd::Log {
            cmd: LogCmd::Cat { dir },
        }
        | Cmd::Dlq {
            cmd: DlqCmd::List { dir },
        } => print_logs(&dir),
        Cmd::Run {
            config,
            iface,
            queues,
            no_xdp,
            udp_bind,
            duration,
            netns,
            probe,
        } => {
            let mut cfg = Config::load(&config)?;
            if let Some(ns) = &netns {
                eventstream::tools::lab::enter_netns(ns)?;
            }
            if let Some(addr) = udp_bind {
                cfg.ingest.udp.bind = addr;
            }
            if let Some(i) = iface {
                cfg.xdp.iface = i;
            }
            if let Some(q) = queues {
                cfg.xdp.queues = q;
            }
            cfg.validate()?;
            let opts = eventstream::daemon::Options {
                config_path: Some(&config),
                no_xdp,
                duration,
                probe,
            };
            let umem = eventstream::daemon::Umem::map(&cfg, &opts)?;
            let setup = eventstream::daemon::setup(&cfg, &umem, opts)?;
            let report = eventstream::daemon::run(setup);
            if let Some(json) = &report.json {
                println!("{json}");
            }
            report.outcome
        }
    }
}

/// `eventstream topology`: what `run` would discover and how it would place its threads.
fn show_topology(
    config: &std::path::Path,
    iface: Option<String>,
    queues: Option<u32>,
    as_json: bool,
) -> Result<()> {
    let cfg = if config.exists() {
        Config::load(config)?
    } else {
        Config::default()
    };
    let iface = iface.unwrap_or_else(|| cfg.xdp.iface.clone());
    let iface = (!iface.is_empty()).then_some(iface);
    let topo = Topology::discover(iface.as_deref());
    let e = &cfg.engine;
    let plan = topology::plan(
        &topo,
        &PlanInput {
            queues: if iface.is_some() {
                queues.unwrap_or(cfg.xdp.queues)
            } else {
                0
            },
            dispatcher_cpu: e.dispatcher_cpu,
            worker_cpus: &e.worker_cpus,
            workers: e.realtime_workers + e.transactional_workers + e.batch_workers,
            auto: e.auto_placement,
        },
    );
    if as_json {
        println!("{}", json!({ "topology": topo, "plan": plan }));
        return Ok(());
    }
    print!("{topo}");
    if iface.is_none() {
        println!(
            "no interface (xdp.iface or --iface): kernel UDP ingest, threads left to the scheduler"
        );
    }
    for (q, cpu) in plan.ingest.iter().enumerate() {
        println!("ingest queue {q}: cpu {cpu}");
    }
    let show = |c: Option<u32>| c.map_or("scheduler".to_owned(), |c| format!("cpu {c}"));
    println!("dispatcher: {}", show(plan.dispatcher));
    for (k, c) in plan.workers.iter().enumerate() {
        println!("worker {k}: {}", show(*c));
    }
    for why in &plan.why {
        println!("  ({why})");
    }
    Ok(())
}
