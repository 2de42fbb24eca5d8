//! Where the appliance's threads run on AF_XDP (in a netns + veth lab): each receive queue's
//! thread on its own core, and every other thread (the housekeeping thread, the sinks' I/O
//! threads: file writers and their syncers) off the receive queues' cores, so a writer woken
//! by a batch never preempts the thread that made it.
//!
//! Needs root, iproute2 and two CPUs; skips with a message where they are missing, except
//! under CI, where it fails instead (for the CPUs: it passes with a note, as a one-core machine
//! has no placement to check).

mod common;

use eventstream::tools::lab::RX_IF;

#[test]
fn sink_threads_keep_off_the_receive_queues_cores() {
    if eventstream::mem::numa::online_cpus().len() < 2 {
        eprintln!("note: one CPU, so no placement to check");
        return;
    }
    let Some(lab) = common::lab_or_skip("espl", 1, "the placement lab test") else {
        return;
    };
    let sinks = std::env::temp_dir().join(format!("es-place-sinks-{}", std::process::id()));
    let config = format!(
        "xdp:\n  ring_size: 2048\n  frames: 4096\ningest:\n  udp:\n    bind: \"0.0.0.0:8082\"\n  tcp:\n    bind: null\nadmin:\n  bind: \"127.0.0.1:0\"\nsinks:\n  kind: file\n  dir: \"{0}/sink\"\n  dlq_dir: \"{0}/dlq\"\n",
        sinks.display()
    );
    let (child, mut out, _admin, dir) =
        common::daemon::start_in_lab(&config, "place", &lab.rx_ns, RX_IF);
    common::daemon::read_until(&mut out, "ready");
    let seen = common::threads(child.id());
    common::daemon::stop(child, out);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&sinks);
    drop(lab);

    let receive: Vec<u32> = seen
        .iter()
        .filter(|(name, _)| name.starts_with("ingest-q"))
        .flat_map(|(_, cpus)| cpus.iter().copied())
        .collect();
    assert_eq!(receive.len(), 1, "one queue, pinned to one core: {seen:?}");
    let writers: Vec<_> = seen
        .iter()
        .filter(|(name, _)| name == "log-writer")
        .collect();
    assert!(
        writers.len() >= 4,
        "a writer per worker class and one for the DLQ: {seen:?}"
    );
    for (name, cpus) in &seen {
        if name.starts_with("ingest-q") {
            continue;
        }
        assert!(
            !cpus.is_empty() && !cpus.contains(&receive[0]),
            "{name} may run on the receive queue's core {}: {seen:?}",
            receive[0]
        );
    }
}
