//! `cargo xtask bench`: the ingest lab bench of PERF.md, in one invocation.
//!
//! In the netns + veth lab, with the XDP program attached to the receiver and pinned:
//! - **Throughput** for 64 B and 512 B payloads at 1 and 16 events per datagram, on three
//!   paths: (a) `xdp_drop`, live frames through the object's drop program (the lab's ceiling);
//!   (b) `xsk`, live frames through the appliance's program into its AF_XDP socket; (c)
//!   `recvmmsg`, the same frames passed up the kernel stack to the same binary in `--no-xdp`
//!   mode. The generator is `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES` in the
//!   receiving namespace (see `eventstream::tools::blast`). Each run first offers as much as the
//!   generator can, then, if anything was lost, steps the offered rate down from what was
//!   delivered until a step loses nothing: that rate is the run's *sustainable* figure. Loss
//!   counts everything not delivered to a worker sink: dropped by the kernel or the AF_XDP
//!   rings, shed to the DLQ, or still unread.
//! - **Latency** sender → worker, p50/p99/p99.9, at fixed offered loads from the `sendmmsg`
//!   blaster in the sending namespace (stamped payloads, `engine.latency_from: payload`; one
//!   datagram per call, each stamped as it is sent), on the `xsk` and `recvmmsg` paths, each
//!   run with a fresh appliance.
//!
//! Every figure is the median of `--runs` (at least 3) with min and max. The throughput paths
//! take turns run by run (run 1 of each path, then run 2 of each...), so each run's ratios
//! compare paths measured minutes apart at most; the JSON keeps them (`ratios_per_run`). Writes
//! `target/bench/bench.json` (or `--json FILE`) and `target/bench/bench.md`; `--update-readme`
//! puts the Markdown between the README's bench markers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use eventstream::tools::blast::{BlastArgs, Tally};
use eventstream::tools::lab::{RX_ADDR, RX_IF, TX_IF, in_netns};
use eventstream_common::DEFAULT_UDP_PORT;
use serde_json::{Value, json};

use crate::appliance::{Appliance, Measure, PinnedLab, build_all, require_root};

/// The appliance's `XDP_STATISTICS` counters now, by reason.
fn xsk_drops(app: &Appliance) -> Result<std::collections::BTreeMap<String, f64>> {
    Ok(app
        .metrics()?
        .into_iter()
        .filter(|(k, _)| k.starts_with("eventstream_xsk_kernel_drops_total"))
        .collect())
}
use crate::microbench::{machine, median, replace_between};

/// `cargo xtask bench` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Shorter steps and fewer latency loads (a smoke run; still >= 3 runs per figure).
    #[arg(long)]
    quick: bool,
    /// Runs per figure (at least 3).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where to write the JSON summary (default target/bench/bench.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Replace the table between the README's bench markers.
    #[arg(long)]
    update_readme: bool,
    /// Lab name (namespaces `<name>-tx`, `<name>-rx`).
    #[arg(long, default_value = "esbench")]
    lab: String,
    /// Instead of the lab: each networked sink beside its bare client library on the same
    /// server (NATS R1 and R3, Kafka, PostgreSQL, on loopback); JSON to target/bench/sinks.json.
    #[arg(long)]
    sinks: bool,
    /// Events per run with --sinks.
    #[arg(long, default_value_t = 200_000)]
    sink_events: u64,
    /// With --sinks, only this target (nats_r1, nats_r3, kafka, postgres); repeatable.
    #[arg(long)]
    sink_target: Vec<String>,
}

const PAYLOADS: [usize; 2] = [64, 512];
/// Where the generator runs; the appliance's data-plane thread is pinned to CPU 0.
const GENERATOR_CPU: u32 = 1;
const APPLIANCE_CPU: u32 = 0;
const PER_DATAGRAM: [u16; 2] = [1, 16];

#[derive(Parser)]
struct BlastCli {
    #[command(flatten)]
    args: BlastArgs,
}

/// Runs the blaster with `flags` on a thread in namespace `ns`.
fn blast(ns: &str, flags: &[String]) -> Result<Tally> {
    let mut argv = vec!["blast".to_owned(), "--quiet".to_owned()];
    argv.extend_from_slice(flags);
    let args = BlastCli::try_parse_from(&argv)
        .with_context(|| format!("blaster flags {argv:?}"))?
        .args;
    let stop = Arc::new(AtomicBool::new(false));
    Ok(in_netns(ns, move || {
        // The generator on one CPU, the appliance's data plane on the other (PERF.md).
        let _ = eventstream::mem::numa::pin_current_thread(GENERATOR_CPU);
        eventstream::tools::blast::run(&args, stop)
    })??
    .0)
}

fn flags(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Live-frames flags for one case.
fn live(object: &Path, payload: usize, per: u16, secs: f64, rate: u64, drop: bool) -> Vec<String> {
    let mut f = flags(&["--live-frames", "--iface", RX_IF]);
    f.extend(flags(&["--to", &format!("{RX_ADDR}:{DEFAULT_UDP_PORT}")]));
    f.extend([
        "--payload-bytes".into(),
        payload.to_string(),
        "--events-per-datagram".into(),
        per.to_string(),
        "--duration".into(),
        secs.to_string(),
        "--rate".into(),
        rate.to_string(),
    ]);
    if drop {
        f.extend([
            "--xdp-drop".into(),
            "--object".into(),
            object.display().to_string(),
        ]);
    }
    f
}

/// One offered-load step against a running appliance.
#[derive(Debug, Clone, Copy)]
struct Step {
    sent: u64,
    delivered: u64,
    secs: f64,
}

impl Step {
    fn offered(&self) -> f64 {
        self.sent as f64 / self.secs
    }
    fn delivered_rate(&self) -> f64 {
        self.delivered as f64 / self.secs
    }
    fn loss(&self) -> f64 {
        1.0 - self.delivered as f64 / self.sent.max(1) as f64
    }
}

/// One step: the generators (one per RX queue, each `(namespace, blaster flags)`) run at once;
/// what they sent against what the appliance delivered meanwhile.
fn step(app: &Appliance, gens: &[(String, Vec<String>)]) -> Result<Step> {
    let before = app.settle(Duration::from_secs(3))?;
    let tallies: Vec<Result<Tally>> = std::thread::scope(|s| {
        let running: Vec<_> = gens
            .iter()
            .map(|(ns, f)| s.spawn(move || blast(ns, f)))
            .collect();
        running
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let (mut sent, mut secs) = (0, 0.0f64);
    for t in tallies {
        let t = t?;
        sent += t.events;
        secs = secs.max(t.elapsed.as_secs_f64());
    }
    let after = app.settle(Duration::from_secs(5))?;
    Ok(Step {
        sent,
        delivered: after.0 - before.0,
        secs: secs.max(1e-9),
    })
}

/// Where a case's load comes from.
#[derive(Debug, Clone, Copy)]
enum Generator<'a> {
    /// `BPF_PROG_TEST_RUN` live frames on the receiver, in its namespace. The kernel's live-frames
    /// mode gives every frame RX queue 0 (its `xdp_rxq_info` is its own, queue index 0,
    /// whatever `rx_queue_index` the run asks for; seen here: `--queue 1` frames all reached
    /// queue 0's socket), so it can only feed one queue.
    Live { rx: &'a str },
    /// One AF_XDP TX socket per queue on the sender's veth end: veth hands a frame sent on TX
    /// queue q to the peer's RX queue q.
    XdpTx { tx: &'a str, queues: u32 },
}

impl Generator<'_> {
    /// Flags of each generator at `rate` events/s in all (0: each as fast as it can).
    fn flags(
        self,
        object: &Path,
        (payload, per): (usize, u16),
        secs: f64,
        rate: u64,
    ) -> Vec<(String, Vec<String>)> {
        match self {
            Self::Live { rx } => {
                vec![(rx.to_owned(), live(object, payload, per, secs, rate, false))]
            }
            Self::XdpTx { tx, queues } => (0..queues)
                .map(|q| {
                    let f = flags(&[
                        "--xdp-tx",
                        "--iface",
                        TX_IF,
                        "--queue",
                        &q.to_string(),
                        "--to",
                        &format!("{RX_ADDR}:{DEFAULT_UDP_PORT}"),
                        "--payload-bytes",
                        &payload.to_string(),
                        "--events-per-datagram",
                        &per.to_string(),
                        "--duration",
                        &secs.to_string(),
                        "--rate",
                        &(rate / u64::from(queues)).to_string(),
                    ]);
                    (tx.to_owned(), f)
                })
                .collect(),
        }
    }
}

/// One throughput run on a running appliance: full offered load, then down to no loss.
fn search(
    app: &Appliance,
    generator: Generator<'_>,
    object: &Path,
    (payload, per): (usize, u16),
    secs: f64,
) -> Result<Value> {
    let load = |rate: u64| generator.flags(object, (payload, per), secs, rate);
    let max = step(app, &load(0))?;
    let mut sustainable = (max.loss() <= 0.0).then_some(max);
    let mut tries = vec![max];
    // Down from what was delivered until a step loses nothing...
    let mut lossy = max.offered();
    let mut rate = max.delivered_rate() * 0.9;
    while sustainable.is_none() && tries.len() < 5 && rate >= 1000.0 {
        let s = step(app, &load(rate as u64))?;
        tries.push(s);
        if s.loss() <= 0.0 {
            sustainable = Some(s);
        } else {
            lossy = s.offered();
        }
        rate *= 0.7;
    }
    // ...then two bisection steps up towards the lowest lossy rate seen.
    if let Some(good) = sustainable.filter(|g| g.loss() <= 0.0 && max.loss() > 0.0) {
        let (mut lo, mut hi) = (good.offered(), lossy.min(good.offered() * 2.0));
        for _ in 0..2 {
            let mid = (lo + hi) / 2.0;
            let s = step(app, &load(mid as u64))?;
            tries.push(s);
            if s.loss() <= 0.0 {
                lo = s.offered();
                sustainable = Some(s);
            } else {
                hi = mid;
            }
        }
    }
    Ok(json!({
        "sustainable_events_per_sec": sustainable.map_or(0.0, |s| s.offered()),
        "max_offered_events_per_sec": max.offered(),
        "delivered_at_max_events_per_sec": max.delivered_rate(),
        "loss_at_max": max.loss(),
        "steps": tries.iter().map(|s| json!({"offered": s.offered(), "delivered": s.delivered_rate(), "loss": s.loss()})).collect::<Vec<_>>(),
    }))
}

/// Why a case cannot run in the lab, if it cannot: a datagram above the veth's 1 500-byte MTU
/// would be IP-fragmented, and the XDP program passes fragments to the kernel by design.
fn unfit(payload: usize, per: u16) -> Option<String> {
    let frame = 14
        + 20
        + 8
        + usize::from(per) * (eventstream::wire::protocol::HEADER_LEN + "blast".len() + payload);
    (frame > 1514).then(|| {
        format!(
            "a {frame}-byte frame is above the lab's 1500-byte MTU: the datagram would be \
             IP-fragmented, and fragments take the kernel path by design"
        )
    })
}

fn skipped(path: &str, payload: usize, per: u16, why: String) -> Value {
    json!({
        "kind": "throughput", "path": path, "payload_bytes": payload, "events_per_datagram": per,
        "events_per_sec": null, "packets_per_sec": null, "loss": null, "mode": null,
        "latency_p50_us": null, "latency_p99_us": null, "latency_p999_us": null,
        "skipped": why,
    })
}

/// median, min, max of one field over runs.
fn stats(runs: &[Value], key: &str) -> (f64, f64, f64) {
    let mut v: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(&mut v), min, max)
}

fn throughput_case(
    path: &str,
    payload: usize,
    per: u16,
    mode: &str,
    runs: Vec<Value>,
    rate_key: &str,
) -> Value {
    let (eps, min, max) = stats(&runs, rate_key);
    let (loss, _, _) = stats(&runs, "loss_at_max");
    let (offered, _, _) = stats(&runs, "max_offered_events_per_sec");
    let (at_max, _, _) = stats(&runs, "delivered_at_max_events_per_sec");
    json!({
        "kind": "throughput", "path": path, "payload_bytes": payload, "events_per_datagram": per,
        "events_per_sec": eps, "events_per_sec_min": min, "events_per_sec_max": max,
        "packets_per_sec": eps / f64::from(per),
        "max_offered_events_per_sec": offered, "delivered_at_max_events_per_sec": at_max,
        "loss": loss, "mode": mode,
        "latency_p50_us": null, "latency_p99_us": null, "latency_p999_us": null,
        "runs": runs,
    })
}

/// Steers the sending namespace's socket traffic to transmit queue 0 of its veth end (XPS:
/// every CPU on `tx-0`, none on the others), so it arrives on receive queue 0.
fn steer_to_queue0(tx_ns: &str) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let all = (0..cpus).fold(0u128, |m, c| m | (1u128 << c));
    let script = format!(
        "set -e; for q in /sys/class/net/{TX_IF}/queues/tx-*; do echo 0 > $q/xps_cpus; done; \
         echo {all:x} > /sys/class/net/{TX_IF}/queues/tx-0/xps_cpus"
    );
    let st = std::process::Command::new("ip")
        .args(["netns", "exec", tx_ns, "sh", "-c", &script])
        .status()
        .context("running ip netns exec")?;
    if !st.success() {
        bail!("steering {TX_IF}'s traffic to queue 0 (XPS) in {tx_ns} failed: {st}");
    }
    Ok(())
}

/// Settings by `--quick`.
struct Plan {
    runs: usize,
    secs: f64,
    loads: Vec<u64>,
    lat_secs: f64,
}

fn xsk_mode(report: &Value) -> String {
    let x = &report["xsk"];
    format!(
        "{}/{}",
        x["attach"].as_str().unwrap_or("?"),
        x["bind"][0].as_str().unwrap_or("?")
    )
}

pub fn main(root: &Path, args: &Args) -> Result<()> {
    require_root("bench")?;
    if args.runs < 3 {
        bail!(
            "--runs {}: PERF.md asks for medians of at least 3",
            args.runs
        );
    }
    if args.sinks {
        return sinks(root, args);
    }
    let plan = if args.quick {
        Plan {
            runs: args.runs,
            secs: 0.5,
            loads: vec![10_000, 50_000],
            lat_secs: 1.0,
        }
    } else {
        Plan {
            runs: args.runs,
            secs: 2.0,
            loads: vec![10_000, 50_000, 100_000],
            lat_secs: 3.0,
        }
    };
    let (object, bin) = build_all(root)?;
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let config = out_dir.join("bench.yaml");
    // Both paths get deep buffers, as an operator tuning for bursts would give them: 128 MiB of
    // UMEM (65 536 frames, 16 384-slot rings, the most `xdp.ring_size` takes) for AF_XDP, a
    // 64 MiB socket buffer and 32 768 receive frames for recvmmsg. On this VM the sustainable
    // rate is set by how long the data-plane thread can be descheduled without a ring
    // overflowing: 16 384 slots hold 8 ms at 2 M datagrams/s, where 8 192 held 4 ms (the
    // socket buffer holds some 80 000 datagrams).
    // Shedding is off (no priority is below 0): the bench finds what the data path sustains,
    // and past that a full receive ring would otherwise turn the control plane to EMERGENCY and
    // every event to the DLQ, which relieves a CPU-bound queue of nothing.
    // The daemon runs the very object pinned below (not only the same program built into it),
    // so the cases never depend on it recognising the pin.
    std::fs::write(
        &config,
        format!(
            "# Written by cargo xtask bench.\n\
         xdp: {{ ring_size: 16384, frames: 65536, object: {:?} }}\n\
         ingest:\n  udp: {{ bind: \"0.0.0.0:8082\", frames: 32768, socket_buffer: 67108864, cpu: 0 }}\n  tcp: {{ bind: null }}\n\
         admin: {{ bind: \"127.0.0.1:0\" }}\nengine:\n  latency_from: payload\n  worker_cpus: [0]\n  dispatcher_cpu: 0\n\
         control: {{ dropping_min_priority: 0, emergency_min_priority: 0 }}\n",
            object.display().to_string()
        ),
    )?;
    let log = out_dir.join("appliance.log");
    // Two RX queues: the one-queue cases use queue 0; `xsk_2q` serves both.
    let lab = PinnedLab::up_with_queues(&args.lab, &object, 2)?;
    let (rx, tx) = (lab.lab.rx_ns.clone(), lab.lab.tx_ns.clone());
    eprintln!(
        "bench: lab {} up, XDP attached in {} mode",
        args.lab,
        lab.mode.label()
    );
    let mut cases = Vec::new();

    // (a) the XDP_DROP ceiling: no appliance, the generator alone.
    for &payload in &PAYLOADS {
        for &per in &PER_DATAGRAM {
            if let Some(why) = unfit(payload, per) {
                cases.push(skipped("xdp_drop", payload, per, why));
                continue;
            }
            let mut runs = Vec::new();
            for _ in 0..plan.runs {
                let t = blast(&rx, &live(&object, payload, per, plan.secs, 0, true))?;
                let eps = t.events as f64 / t.elapsed.as_secs_f64().max(1e-9);
                runs.push(json!({
                    "sustainable_events_per_sec": eps, "max_offered_events_per_sec": eps,
                    "delivered_at_max_events_per_sec": eps, "loss_at_max": 0.0,
                }));
            }
            eprintln!(
                "bench: xdp_drop {payload} B x{per}: {:.0} events/s",
                stats(&runs, "sustainable_events_per_sec").0
            );
            cases.push(throughput_case(
                "xdp_drop",
                payload,
                per,
                "test_run",
                runs,
                "sustainable_events_per_sec",
            ));
        }
    }
    // (b) AF_XDP and (c) recvmmsg. The paths take turns, run by run (PERF.md: ours and its
    // peer back to back, the whole group repeated): run 1 of every path, then run 2 of every
    // path, and so on, so a stretch of a busy machine lands on every path alike rather than on
    // whichever ran then. One appliance per path and run, for all sizes.
    let paths: [(&str, &[&str]); 6] = [
        ("xsk_bare", &["--iface", RX_IF, "--probe", "bare"]),
        (
            "xsk_bare_crate",
            &["--iface", RX_IF, "--probe", "bare-crate"],
        ),
        ("xsk_parse", &["--iface", RX_IF, "--probe", "parse"]),
        ("xsk", &["--iface", RX_IF]),
        // Two queues, a socket and a data-plane thread each, a generator per queue: on two
        // cores they share the CPUs with the generators (reported, no target).
        ("xsk_2q", &["--iface", RX_IF, "--queues", "2"]),
        ("recvmmsg", &["--no-xdp"]),
    ];
    let sizes: Vec<(usize, u16)> = PAYLOADS
        .iter()
        .flat_map(|&payload| PER_DATAGRAM.iter().map(move |&per| (payload, per)))
        .collect();
    // Per path and size: the runs, and the XDP_STATISTICS deltas summed over them.
    let mut runs_of: Vec<Vec<Vec<Value>>> = vec![vec![Vec::new(); sizes.len()]; paths.len()];
    let mut drops_of: Vec<Vec<serde_json::Map<String, Value>>> =
        vec![vec![serde_json::Map::new(); sizes.len()]; paths.len()];
    let mut reports: Vec<Vec<Value>> = vec![Vec::new(); paths.len()];
    for run in 0..plan.runs {
        for (pi, &(path, extra)) in paths.iter().enumerate() {
            let queues = if path == "xsk_2q" { 2 } else { 1 };
            let app = Appliance::start(&bin, &config, &rx, extra, Some(&log))?;
            for (si, &(payload, per)) in sizes.iter().enumerate() {
                if unfit(payload, per).is_some() || (queues > 1 && payload != 64) {
                    continue;
                }
                app.measure(match path {
                    "xsk_bare" | "xsk_bare_crate" => Measure::Datagrams(per),
                    "xsk_parse" => Measure::Received,
                    _ => Measure::Delivered,
                });
                let before = xsk_drops(&app)?;
                let generator = if queues > 1 {
                    Generator::XdpTx { tx: &tx, queues }
                } else {
                    Generator::Live { rx: &rx }
                };
                let r = search(&app, generator, &object, (payload, per), plan.secs)?;
                eprintln!(
                    "bench: run {} {path} {payload} B x{per}: sustainable {:.0} events/s",
                    run + 1,
                    r["sustainable_events_per_sec"].as_f64().unwrap_or(0.0)
                );
                runs_of[pi][si].push(r);
                let after = xsk_drops(&app)?;
                let total = &mut drops_of[pi][si];
                for (k, v) in &after {
                    let d = v - before.get(k).copied().unwrap_or(0.0);
                    let sum = total.get(k).and_then(Value::as_f64).unwrap_or(0.0) + d;
                    total.insert(k.clone(), json!(sum));
                }
            }
            reports[pi].push(app.stop()?);
        }
    }
    let mut xsk_label = String::from("?");
    for (pi, &(path, _)) in paths.iter().enumerate() {
        let queues = if path == "xsk_2q" { 2 } else { 1 };
        let report = reports[pi].last().cloned().unwrap_or(Value::Null);
        let mode = if path == "xsk_2q" {
            // Per queue, over every step of every run: the split the generators made.
            let mut per_queue: Vec<u64> = Vec::new();
            for r in &reports[pi] {
                let queues = r["xsk"]["queues"].as_array().cloned().unwrap_or_default();
                for (q, v) in queues.iter().enumerate() {
                    if per_queue.len() <= q {
                        per_queue.push(0);
                    }
                    per_queue[q] += v["events"].as_u64().unwrap_or(0);
                }
            }
            let per_queue: Vec<String> = per_queue.iter().map(u64::to_string).collect();
            format!(
                "{}, {}, 2 queues (events per queue {}), AF_XDP TX generators (live frames reach queue 0 only); shares the CPUs with them",
                xsk_mode(&report),
                report["engine_mode"].as_str().unwrap_or("?"),
                per_queue.join(" + ")
            )
        } else if path.starts_with("xsk") {
            xsk_label = xsk_mode(&report);
            format!(
                "{xsk_label}, {}",
                report["engine_mode"].as_str().unwrap_or("?")
            )
        } else {
            format!("kernel stack ({} XDP_PASS)", lab.mode.label())
        };
        for (si, &(payload, per)) in sizes.iter().enumerate() {
            if let Some(why) = unfit(payload, per) {
                cases.push(skipped(path, payload, per, why));
                continue;
            }
            if queues > 1 && payload != 64 {
                continue;
            }
            let mut runs = std::mem::take(&mut runs_of[pi][si]);
            if let Some(r) = runs.first_mut() {
                r["xdp_statistics_delta"] = Value::Object(std::mem::take(&mut drops_of[pi][si]));
            }
            eprintln!(
                "bench: {path} {payload} B x{per}: sustainable {:.0} events/s, at max offered {:.0} delivered ({:.1} % lost)",
                stats(&runs, "sustainable_events_per_sec").0,
                stats(&runs, "delivered_at_max_events_per_sec").0,
                100.0 * stats(&runs, "loss_at_max").0
            );
            cases.push(throughput_case(
                path,
                payload,
                per,
                &mode,
                runs,
                "sustainable_events_per_sec",
            ));
        }
    }
    // Latency at fixed offered loads, from the sending namespace through the veth. The lab has
    // two queues (for `xsk_2q`), and veth hands a packet to the receive queue numbered like the
    // sender's transmit queue, which the socket layer picks by flow hash: one run's flow could
    // land on queue 1, where no AF_XDP socket is bound and the program passes it to the kernel
    // path. XPS steers every CPU to transmit queue 0, so the AF_XDP rows measure queue 0's
    // socket; each run's kernel-path events are recorded and must be none.
    steer_to_queue0(&tx)?;
    for path in ["xsk", "recvmmsg"] {
        let extra: &[&str] = if path == "xsk" {
            &["--iface", RX_IF]
        } else {
            &["--no-xdp"]
        };
        for &load in &plan.loads {
            let mut runs = Vec::new();
            let mut mode = String::new();
            for _ in 0..plan.runs {
                let app = Appliance::start(&bin, &config, &rx, extra, Some(&log))?;
                let t = blast(
                    &tx,
                    &flags(&[
                        "--to",
                        &format!("{RX_ADDR}:{DEFAULT_UDP_PORT}"),
                        "--rate",
                        &load.to_string(),
                        "--duration",
                        &plan.lat_secs.to_string(),
                        "--payload-bytes",
                        "64",
                        // One datagram per `sendmmsg`, stamped as it is handed to the kernel:
                        // a batch carries one stamp taken before the call, and through the veth
                        // the kernel delivers its datagrams one after another on the sender's
                        // CPU, so the last of 64 carries the sending of the 63 before it.
                        "--batch",
                        "1",
                    ]),
                )?;
                let (delivered, _) = app.settle(Duration::from_secs(5))?;
                let r = app.stop()?;
                mode = if path == "xsk" {
                    xsk_mode(&r)
                } else {
                    "kernel stack".into()
                };
                let secs = t.elapsed.as_secs_f64().max(1e-9);
                let l = &r["latency"];
                let kernel_path = r["received_events"]["udp"].as_u64().unwrap_or(0);
                if path == "xsk" && kernel_path != 0 {
                    bail!(
                        "latency xsk at {load}/s: {kernel_path} events took the kernel path \
                         (queue 1?), so the row would not measure AF_XDP"
                    );
                }
                runs.push(json!({
                    "offered": t.events as f64 / secs,
                    "delivered": delivered as f64 / secs,
                    "loss": 1.0 - delivered as f64 / t.events.max(1) as f64,
                    "p50_us": l["p50_us"], "p99_us": l["p99_us"], "p999_us": l["p999_us"],
                    "received_events": r["received_events"],
                }));
            }
            let (p50, p50_min, p50_max) = stats(&runs, "p50_us");
            let (p99, p99_min, p99_max) = stats(&runs, "p99_us");
            let (p999, p999_min, p999_max) = stats(&runs, "p999_us");
            let (eps, _, _) = stats(&runs, "delivered");
            let (loss, _, _) = stats(&runs, "loss");
            eprintln!(
                "bench: latency {path} at {load}/s: p50 {p50:.1} us, p99 {p99:.1} us, p99.9 {p999:.1} us"
            );
            cases.push(json!({
                "kind": "latency", "path": path, "payload_bytes": 64, "events_per_datagram": 1,
                "offered_events_per_sec": load, "events_per_sec": eps, "packets_per_sec": eps,
                "loss": loss, "mode": mode,
                "latency_p50_us": p50, "latency_p99_us": p99, "latency_p999_us": p999,
                "latency_p50_us_min": p50_min, "latency_p50_us_max": p50_max,
                "latency_p99_us_min": p99_min, "latency_p99_us_max": p99_max,
                "latency_p999_us_min": p999_min, "latency_p999_us_max": p999_max,
                "runs": runs,
            }));
        }
    }
    // RSS with the shipped configuration (kernel UDP path, as it runs unprivileged), idle after
    // start: PERF.md's comparison with the original's 100-130 MB.
    let mut rss_kib = Vec::new();
    for _ in 0..plan.runs {
        let app = Appliance::start(
            &bin,
            &root.join("config/eventstream.yaml"),
            &rx,
            &["--no-xdp"],
            Some(&log),
        )?;
        std::thread::sleep(Duration::from_millis(500));
        rss_kib.push(app.rss_kib()? as f64);
        app.stop()?;
    }
    let rss = {
        let min = rss_kib.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rss_kib.iter().copied().fold(0.0, f64::max);
        json!({ "config": "config/eventstream.yaml", "median_kib": median(&mut rss_kib), "min_kib": min, "max_kib": max })
    };
    eprintln!(
        "bench: RSS with the default configuration: {} KiB",
        rss["median_kib"]
    );
    drop(lab);

    let case64 = |path: (&str, u16)| {
        cases.iter().find(|c| {
            c["kind"] == "throughput"
                && c["path"] == path.0
                && c["payload_bytes"] == 64
                && c["events_per_datagram"] == path.1
        })
    };
    let eps = |path: (&str, u16)| {
        case64(path)
            .and_then(|c| c["events_per_sec"].as_f64())
            .filter(|v| *v > 0.0)
    };
    // Each run's own ratio (the paths took turns within a run), beside the ratio of medians.
    let per_run = |a: (&str, u16), b: (&str, u16)| -> Value {
        let runs = |p| {
            case64(p)
                .and_then(|c| c["runs"].as_array())
                .map(|r| {
                    r.iter()
                        .map(|r| r["sustainable_events_per_sec"].as_f64())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        json!(
            runs(a)
                .into_iter()
                .zip(runs(b))
                .map(|(x, y)| x.zip(y.filter(|y| *y > 0.0)).map(|(x, y)| x / y))
                .collect::<Vec<_>>()
        )
    };
    let ratio = |a: &str, b: &str| eps((a, 1)).zip(eps((b, 1))).map(|(a, b)| a / b);
    let ratio16 = |a: &str, b: &str| eps((a, 16)).zip(eps((b, 16))).map(|(a, b)| a / b);
    let doc = json!({
        "machine": machine(),
        "quick": args.quick,
        "runs": plan.runs,
        "step_secs": plan.secs,
        "latency_secs": plan.lat_secs,
        "xdp_attach": xsk_label,
        "rss": rss,
        "cases": cases,
        "generator_cpu": GENERATOR_CPU,
        "appliance_cpu": APPLIANCE_CPU,
        "ratios": {
            "xsk_over_xsk_bare": ratio("xsk", "xsk_bare"),
            "xsk_bare_over_xsk_bare_crate": ratio("xsk_bare", "xsk_bare_crate"),
            "xsk_over_xsk_parse": ratio("xsk", "xsk_parse"),
            "xsk_over_recvmmsg": ratio("xsk", "recvmmsg"),
            "xsk_over_recvmmsg_16": ratio16("xsk", "recvmmsg"),
            "xsk_over_xdp_drop": ratio("xsk", "xdp_drop"),
        },
        "ratios_per_run": {
            "xsk_over_xsk_bare": per_run(("xsk", 1), ("xsk_bare", 1)),
            "xsk_bare_over_xsk_bare_crate": per_run(("xsk_bare", 1), ("xsk_bare_crate", 1)),
            "xsk_bare_over_xsk_bare_crate_16": per_run(("xsk_bare", 16), ("xsk_bare_crate", 16)),
            "xsk_over_recvmmsg": per_run(("xsk", 1), ("recvmmsg", 1)),
            "xsk_over_recvmmsg_16": per_run(("xsk", 16), ("recvmmsg", 16)),
        },
    });
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| out_dir.join("bench.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)?;
    let table = markdown(&doc);
    std::fs::write(out_dir.join("bench.md"), &table)?;
    print!("{table}");
    eprintln!(
        "bench: wrote {} and {}",
        json_path.display(),
        out_dir.join("bench.md").display()
    );
    if args.update_readme {
        replace_between(&root.join("README.md"), START, END, &table)?;
        eprintln!("bench: README performance table updated");
    }
    Ok(())
}

/// `--sinks`: the networked sinks against their bare clients (see `eventstream::tools::sinkbench`).
fn sinks(root: &Path, args: &Args) -> Result<()> {
    crate::appliance::install_missing(&[
        ("nats-server", &["nats-server", "--version"]),
        (
            "postgresql",
            &["sh", "-c", "ls /usr/lib/postgresql/*/bin/initdb"],
        ),
    ])?;
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    // In the release daemon, not in this (debug) process: the sinks and the bare clients are
    // measured as they ship.
    let (_, bin) = build_all(root)?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["bench-sinks", "--events", &args.sink_events.to_string()])
        .args(["--runs", &args.runs.to_string()]);
    for t in &args.sink_target {
        cmd.args(["--target", t]);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("{} bench-sinks failed: {}", bin.display(), out.status);
    }
    let mut doc: Value = serde_json::from_slice(&out.stdout).context("the sink bench's JSON")?;
    doc["machine"] = machine();
    doc["runs"] = json!(args.runs);
    let path = args
        .json
        .clone()
        .unwrap_or_else(|| out_dir.join("sinks.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")?;
    let m = &doc["machine"];
    println!(
        "Sink bench, measured {} on {} ({} cores); `cargo xtask bench --sinks`, {} events of 64 B per run, medians of {} runs (min–max).\n",
        m["date"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        args.sink_events,
        args.runs
    );
    println!(
        "| target | sink events/s | bare client, same messages | sink / bare | bare client, id alone | sink / id alone |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let range = |v: &Value| {
        format!(
            "{:.0} ({:.0}–{:.0})",
            f(&v["median"]),
            f(&v["min"]),
            f(&v["max"])
        )
    };
    for c in doc["cases"].as_array().into_iter().flatten() {
        let target = c["target"].as_str().unwrap_or("?");
        if let Some(why) = c["skipped"].as_str() {
            println!("| {target} | not run: {why} | | | | |");
            continue;
        }
        let lean = &c["bare_id_only_events_per_sec"];
        let (lean, lean_ratio) = if lean.is_null() {
            ("(the same)".to_owned(), String::new())
        } else {
            (
                range(lean),
                format!("{:.2}", f(&c["sink_over_bare_id_only"])),
            )
        };
        println!(
            "| {target} | {} | {} | **{:.2}** | {lean} | {lean_ratio} |",
            range(&c["sink_events_per_sec"]),
            range(&c["bare_events_per_sec"]),
            f(&c["sink_over_bare"]),
        );
    }
    eprintln!("bench --sinks: wrote {}", path.display());
    Ok(())
}

const START: &str = "<!-- bench:start -->";
const END: &str = "<!-- bench:end -->";

fn markdown(doc: &Value) -> String {
    let m = &doc["machine"];
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Lab bench, measured {} on {} ({} cores), kernel {}; `cargo xtask bench{}`, medians of {} runs \
         (min–max). Sustainable = the highest offered rate a run delivered without losing one event.\n",
        m["date"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?"),
        if doc["quick"] == true { " --quick" } else { "" },
        doc["runs"],
    );
    let _ = writeln!(
        s,
        "| path | payload | events/datagram | sustainable events/s | packets/s | at max offered: offered → delivered (loss) | mode |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---|---|");
    let cases = doc["cases"].as_array().cloned().unwrap_or_default();
    for c in cases.iter().filter(|c| c["kind"] == "throughput") {
        if let Some(why) = c["skipped"].as_str() {
            let _ = writeln!(
                s,
                "| {} | {} B | {} | not run: {why} | | | |",
                c["path"].as_str().unwrap_or("?"),
                c["payload_bytes"],
                c["events_per_datagram"],
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} B | {} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.0} → {:.0} ({:.1} %) | {} |",
            c["path"].as_str().unwrap_or("?"),
            c["payload_bytes"],
            c["events_per_datagram"],
            f(&c["events_per_sec"]),
            f(&c["events_per_sec_min"]),
            f(&c["events_per_sec_max"]),
            f(&c["packets_per_sec"]),
            f(&c["max_offered_events_per_sec"]),
            f(&c["delivered_at_max_events_per_sec"]),
            100.0 * f(&c["loss"]),
            c["mode"].as_str().unwrap_or("?"),
        );
    }
    let r = &doc["ratios"];
    let ratio = |v: &Value| v.as_f64().map_or("n/a".to_owned(), |x| format!("{x:.2}"));
    let _ = writeln!(
        s,
        "\nRatios (64 B, sustainable events/s, 1 event/datagram unless said): xsk_bare (ours) / xsk_bare_crate (xdpilone) = **{}**, xsk / xsk_bare = **{}**, \
         xsk / xsk_parse = **{}**, xsk / recvmmsg = **{}** (16 per datagram: **{}**), xsk / xdp_drop = **{}**.\n",
        ratio(&r["xsk_bare_over_xsk_bare_crate"]),
        ratio(&r["xsk_over_xsk_bare"]),
        ratio(&r["xsk_over_xsk_parse"]),
        ratio(&r["xsk_over_recvmmsg"]),
        ratio(&r["xsk_over_recvmmsg_16"]),
        ratio(&r["xsk_over_xdp_drop"]),
    );
    let rr = &doc["ratios_per_run"];
    let list = |v: &Value| {
        v.as_array().map_or("n/a".to_owned(), |a| {
            a.iter().map(ratio).collect::<Vec<_>>().join(", ")
        })
    };
    if rr.is_object() {
        let _ = writeln!(
            s,
            "Each run's ratio (the paths take turns, run by run): xsk_bare / xsk_bare_crate {} (16 per datagram: {}); \
             xsk / xsk_bare {}; xsk / recvmmsg {} (16 per datagram: {}).\n",
            list(&rr["xsk_bare_over_xsk_bare_crate"]),
            list(&rr["xsk_bare_over_xsk_bare_crate_16"]),
            list(&rr["xsk_over_xsk_bare"]),
            list(&rr["xsk_over_recvmmsg"]),
            list(&rr["xsk_over_recvmmsg_16"]),
        );
    }
    let _ = writeln!(
        s,
        "| path | offered events/s | sender → worker p50 | p99 | p99.9 | loss |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for c in cases.iter().filter(|c| c["kind"] == "latency") {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} µs ({:.0}–{:.0}) | {:.0} µs ({:.0}–{:.0}) | {:.0} µs ({:.0}–{:.0}) | {:.2} % |",
            c["path"].as_str().unwrap_or("?"),
            c["offered_events_per_sec"],
            f(&c["latency_p50_us"]),
            f(&c["latency_p50_us_min"]),
            f(&c["latency_p50_us_max"]),
            f(&c["latency_p99_us"]),
            f(&c["latency_p99_us_min"]),
            f(&c["latency_p99_us_max"]),
            f(&c["latency_p999_us"]),
            f(&c["latency_p999_us_min"]),
            f(&c["latency_p999_us_max"]),
            100.0 * f(&c["loss"]),
        );
    }
    let r = &doc["rss"];
    let _ = writeln!(
        s,
        "\nRSS with `config/eventstream.yaml` (kernel UDP path), idle after start: {:.1} MiB median ({:.1}–{:.1}); the original engine: 100-130 MB.",
        f(&r["median_kib"]) / 1024.0,
        f(&r["min_kib"]) / 1024.0,
        f(&r["max_kib"]) / 1024.0,
    );
    s
}
