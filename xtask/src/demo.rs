//! `cargo xtask demo`: the whole appliance on this machine, end to end, in a few seconds.
//!
//! Builds the XDP object and the daemon, brings the netns + veth lab up, attaches and pins the
//! XDP program on the receiver, starts the appliance there on AF_XDP (its per-second ingest
//! log is the live receive rate), blasts stamped events from the sending namespace (the live
//! send rate), drains the appliance, prints the reconciliation, and tears everything down.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Result, bail};
use eventstream::tools::lab::{RX_ADDR, RX_IF, in_netns};
use eventstream_common::DEFAULT_UDP_PORT;
use serde_json::Value;

use crate::appliance::{Appliance, PinnedLab, build_all, require_root};

/// `cargo xtask demo` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of blasting.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Offered events per second (0: as fast as the sender goes). The default is a load the
    /// demo's three fsync'ed file logs sustain on a small VM's disk with sender -> worker p99
    /// under 1 ms; `--rate 0` shows where the disk, not the receive path, becomes the limit.
    #[arg(long, default_value_t = 250_000)]
    rate: u64,
    /// Events per datagram.
    #[arg(long, default_value_t = 8)]
    events_per_datagram: u16,
}

const CONFIG: &str = "\
# Written by cargo xtask demo: AF_XDP ingest, three worker classes, file sinks.
# Deep AF_XDP rings (64 MiB of UMEM) ride out the file sinks' page-cache stalls.
xdp: { ring_size: 8192, frames: 32768 }
ingest:
  udp: { bind: \"0.0.0.0:8082\" }
  tcp: { bind: \"0.0.0.0:8081\" }
admin: { bind: \"127.0.0.1:0\" }
engine:
  latency_from: payload
routes:
  - { topic: \"orders.>\", class: transactional, key: payload_id }
  - { topic: \"metrics.>\", class: batch }
sinks:
  kind: file
  dir: target/demo/sink
  dlq_dir: target/demo/dlq
  fsync: interval
";

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

pub fn main(root: &Path, args: &Args) -> Result<()> {
    require_root("demo")?;
    if !(0.1..=60.0).contains(&args.seconds) {
        bail!("--seconds {}: expected 0.1..=60", args.seconds);
    }
    let (object, bin) = build_all(root)?;
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("demo.yaml");
    std::fs::write(&config, CONFIG)?;

    let lab = PinnedLab::up("esdemo", &object)?;
    println!(
        "demo: lab up ({} 198.18.0.1 <-> {} {RX_ADDR}), XDP program attached to {RX_IF} in {} mode",
        lab.lab.tx_ns,
        lab.lab.rx_ns,
        lab.mode.label()
    );
    let app = Appliance::start(&bin, &config, &lab.lab.rx_ns, &["--iface", RX_IF], None)?;
    println!(
        "demo: appliance up on AF_XDP; blasting for {} s",
        args.seconds
    );
    let blast = eventstream::tools::blast::BlastArgs {
        to: (RX_ADDR, DEFAULT_UDP_PORT).into(),
        tcp: false,
        rate: args.rate,
        events_per_datagram: args.events_per_datagram,
        payload_bytes: 64,
        topics: ["orders.eu", "orders.us", "metrics.cpu", "logs.app"]
            .map(String::from)
            .to_vec(),
        priority: 5,
        duration: Some(args.seconds),
        count: None,
        seq_start: 0,
        // One datagram per `sendmmsg`, each stamped as it is handed to the kernel (as the
        // bench's latency runs): a batch carries one stamp, and through the veth its last
        // datagram would carry the sending of the ones before it, and any preemption of the
        // sender between them.
        batch: 1,
        netns: None,
        live_frames: false,
        iface: None,
        queue: 0,
        xdp_drop: false,
        object: Some(object.clone()),
        xdp_tx: false,
        dst_mac: None,
        from: eventstream::tools::lab::TX_ADDR,
        quiet: false,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, _) = in_netns(&lab.lab.tx_ns, move || {
        eventstream::tools::blast::run(&blast, stop)
    })??;
    app.settle(Duration::from_secs(5))?;
    let r = app.stop()?;
    drop(lab);
    println!("demo: lab torn down\n");
    print_reconciliation(&sent, &r, u64::from(args.events_per_datagram));
    println!(
        "\nThe events are in {0}/sink (`eventstream log cat {0}/sink`).",
        dir.display()
    );
    Ok(())
}

fn print_reconciliation(sent: &eventstream::tools::blast::Tally, r: &Value, per: u64) {
    let x = &r["xsk"];
    println!(
        "sent            {} events in {} datagrams ({:.0} events/s)",
        sent.events,
        sent.packets,
        sent.events as f64 / sent.elapsed.as_secs_f64().max(1e-9)
    );
    println!("received        {}", r["received_events"]);
    println!(
        "delivered       {} (by worker class {})",
        r["delivered_events"], r["delivered"]
    );
    println!("dlq by reason   {}", r["dlq"]);
    println!("duplicates      {}", r["duplicates"]);
    println!("rejected        {}", r["rejected"]);
    println!(
        "XDP_STATISTICS  rx_dropped {}, rx_ring_full {}, rx_fill_ring_empty_descs {}, rx_invalid_descs {}",
        x["rx_dropped"], x["rx_ring_full"], x["rx_fill_ring_empty_descs"], x["rx_invalid_descs"]
    );
    println!("XDP verdicts    {}", x["verdicts"]);
    println!("attach          {} / {}", x["attach"], x["bind"]);
    println!("latency         {}", r["latency"]);
    // What the kernel counted as dropped on the way into the socket, in events.
    let ring_lost = (n(&x["rx_dropped"]) + n(&x["rx_ring_full"])) * per;
    // AF_XDP, plus what the program passed to the kernel socket beside it (fragments).
    let received = n(&r["received_events"]["xsk"]) + n(&r["received_events"]["udp"]);
    let rejected: u64 = r["rejected"]
        .as_object()
        .map(|m| m.values().map(n).sum())
        .unwrap_or(0);
    let accounted = n(&r["delivered_events"])
        + n(&r["dlq"]["dropping"])
        + n(&r["dlq"]["emergency"])
        + n(&r["dlq"]["no_route"])
        + n(&r["duplicates"]);
    println!(
        "\nsent {} = received {} + lost in AF_XDP rings {} (+ {} unaccounted)",
        sent.events,
        received,
        ring_lost,
        sent.events as i64 - (received + ring_lost) as i64
    );
    println!(
        "received {} = delivered + DLQ + duplicates {} (+ {} rejected frames)  {}",
        received,
        accounted,
        rejected,
        if accounted == n(&r["accepted_events"]) {
            "OK"
        } else {
            "MISMATCH"
        }
    );
}
