//! An inline data-plane thread that sleeps on a quiet socket is woken by the side queue's
//! doorbell when the housekeeping thread queues events for it (TCP connections, the socket
//! beside AF_XDP), instead of taking them only when its sleep times out.
//!
//! The sleep's timeout here is 10 minutes and the test gives the event 60 s to arrive, so it
//! arrives by the bell or not at all (before the bell, inline TCP events waited for the
//! timeout: 1 ms asked, and with the socket's jiffy-counted receive timeout, 8 ms).

mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use eventstream::engine::{DlqStep, EngineCounters, Inline};
use eventstream::ingest::{Handoff, IngestCounters, RunInline, TryEnqueue, UdpIngest};
use eventstream::mem::RegionOptions;
use eventstream::mem::frames::FrameArena;
use eventstream::mem::pool::{EventPool, Pooled};
use eventstream::ring::doorbell::Doorbell;
use eventstream::ring::mpsc;
use eventstream::sink::MemorySink;
use eventstream::wire::event::{Event, Source, Stamp};
use eventstream::wire::protocol::{Limits, encode};

fn delivered(c: &EngineCounters) -> u64 {
    c.delivered.iter().map(|d| d.load(Ordering::Relaxed)).sum()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sets the stop, then sends the receive loop's socket a datagram (not a protocol frame: it is
/// counted rejected, or drained after the stop) so its sleep ends now.
struct StopOnDrop<'s>(&'s AtomicBool, std::net::SocketAddr);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Ok(s) = UdpSocket::bind("127.0.0.1:0") {
            let _ = s.send_to(b"stop", self.1);
        }
    }
}

#[test]
fn side_work_wakes_a_sleeping_receive_loop() {
    // Frames and pool first: everything below borrows them.
    let udp_arena = FrameArena::new(2048, 8, RegionOptions::default()).unwrap();
    let side_arena = FrameArena::new(2048, 4, RegionOptions::default()).unwrap();
    let pool = EventPool::<Event<'_>>::new(64);
    let counters = EngineCounters::default();
    let depth = AtomicU32::new(0);
    let rules = common::realtime_rules("side.*");
    let steps = common::realtime_steps();
    let mut engine = Inline::new(
        &rules,
        steps,
        DlqStep::new(Box::new(MemorySink::new(1024, 1 << 16))),
        &counters,
        &depth,
    );

    // The data-plane thread's own input: a UDP socket nobody sends to.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (stop, paused) = (AtomicBool::new(false), AtomicBool::new(false));
    let ingest_counters = IngestCounters::default();
    let job = UdpIngest {
        socket: &socket,
        batch: 8,
        limits: Limits::default(),
        stop: &stop,
        counters: &ingest_counters,
        seq_base: 0,
        idle_poll: Duration::from_secs(600),
        paused: &paused,
    };

    // The side queue and its producer (the housekeeping thread's part).
    let bell = Doorbell::new().unwrap();
    let (tx, rx) = mpsc::channel::<Pooled<'_, Event<'_>>>(64);

    std::thread::scope(|s| {
        let (job, engine, bell_ref) = (&job, &mut engine, &bell);
        let mut frames = udp_arena.owner().unwrap();
        let receive = s.spawn(move || {
            job.run(
                &mut frames,
                RunInline {
                    engine,
                    side: Some(rx),
                    ring_depth: (0, 1),
                    control: None,
                    bell: Some(bell_ref),
                },
            )
        });
        // However the test ends, the loop is stopped and woken by a datagram on its own
        // socket (a failing test must not wait out the 10-minute sleep).
        let _stop = StopOnDrop(&stop, socket.local_addr().unwrap());
        // Let the loop go to sleep (nothing arrives on its socket).
        std::thread::sleep(Duration::from_millis(200));

        // One event queued the way a TCP connection queues it: a filled frame's events, then
        // the end of the batch, which rings the bell.
        let mut owner = side_arena.owner().unwrap();
        let mut frame = owner.take().unwrap();
        let mut dgram = Vec::new();
        encode(1, "side.t", b"woken", &mut dgram).unwrap();
        frame.bytes_mut()[..dgram.len()].copy_from_slice(&dgram);
        let mut shared = frame.share(0..dgram.len());
        let (mut seq, stamp) = (
            0,
            Stamp {
                source: Source::Tcp,
                ingest_ns: 1,
            },
        );
        let mut acq = pool.acquirer().unwrap();
        let mut handoff = TryEnqueue::new(&mut acq, &tx, 4).ringing(Some(&bell));
        handoff.begin();
        for ev in shared.events(Limits::default(), stamp, &mut seq) {
            assert!(handoff.event(ev.unwrap()).unwrap().is_none());
        }
        handoff.end(false).unwrap();
        drop(shared);

        wait_for("the event delivered", Duration::from_secs(60), || {
            delivered(&counters) == 1
        });
        assert!(bell.rings() >= 1, "the bell woke the loop");

        drop(_stop);
        receive.join().unwrap().unwrap();
    });
    assert_eq!(delivered(&counters), 1);
}
