//! FILL is topped up in batches (once a batch's worth has been received), not on every pass;
//! this checks the case that rule alone would deadlock: every frame is held by the pipeline,
//! so FILL runs dry and nothing more can arrive, and then the pipeline lets the frames go.
//! The idle loop must lend them to FILL again, though no descriptor comes in to prompt it.
//!
//! A thread plays the kernel over rings in plain memory: it posts one datagram per FILL entry
//! until FILL is empty, then only watches FILL.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::fake_xsk::FakeXsk;
use eventstream::ingest::{Enqueue, IngestCounters, XskIngest};
use eventstream::mem::RegionOptions;
use eventstream::mem::frames::FrameArena;
use eventstream::mem::pool::{EventPool, Pooled};
use eventstream::ring::mpsc;
use eventstream::wire::event::Event;
use eventstream::wire::protocol::encode;
use eventstream::xdp::ring::fake_pair;

const FRAME: u32 = 2048;
/// As many frames as FILL holds: once they are all in the pipeline, FILL is empty.
const FRAMES: u32 = 64;
const RING: u32 = 64;

fn within(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn frames_released_while_fill_is_dry_are_lent_again() {
    let spec = common::udp_v4();
    let mut payload = Vec::new();
    encode(1, "fill.dry", b"held", &mut payload).unwrap();
    let packet = spec.frame(&payload);

    let arena = FrameArena::new(FRAME, FRAMES, RegionOptions::default()).unwrap();
    let umem = arena.region().as_ptr() as usize;
    let umem_len = u64::from(FRAME) * u64::from(FRAMES);
    let (fill_user, mut fill_kernel, _) = fake_pair::<u64>(RING);
    let (mut rx_kernel, rx_user, _) = fake_pair::<libc::xdp_desc>(RING);
    let mut sock = FakeXsk {
        fill: fill_user,
        rx: rx_user,
        frame_size: FRAME,
        umem_len,
        on_poll: || std::thread::sleep(Duration::from_micros(200)),
    };
    let pool: EventPool<Event<'_>> = EventPool::new(256);
    let (tx, mut held) = mpsc::channel::<Pooled<'_, Event<'_>>>(256);
    let stop = AtomicBool::new(false);
    let counters = IngestCounters::default();

    std::thread::scope(|s| {
        // However the test ends, the loop stops (a failing check must not hang the scope).
        struct StopOnDrop<'s>(&'s AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _stop = StopOnDrop(&stop);
        let (stop, counters, tx) = (&stop, &counters, &tx);
        let mut owner = arena.owner().unwrap();
        let mut acq = pool.acquirer().unwrap();
        let ingest = s.spawn(move || {
            let job = XskIngest {
                batch: 64,
                limits: eventstream::wire::protocol::Limits::default(),
                stop,
                idle_poll: Duration::from_millis(1),
                busy_spin: Duration::from_micros(50),
                bare: false,
                counters,
                seq_base: 0,
                paused: &AtomicBool::new(false),
            };
            job.run(
                &mut sock,
                &mut owner,
                Enqueue {
                    pool: &mut acq,
                    queue: tx,
                },
            )
        });

        // The kernel: a datagram into every frame FILL lends, until FILL is dry.
        let mut posted = 0u32;
        within(
            "every frame lent and filled",
            Duration::from_secs(30),
            || {
                let n = fill_kernel.available(RING).min(rx_kernel.free(RING));
                for i in 0..n {
                    let addr = fill_kernel.read(i);
                    // SAFETY: `addr` came off FILL, so the frame is the kernel's (ours here) until
                    // its RX descriptor is posted; the write stays inside the frame and the UMEM.
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            packet.as_ptr(),
                            (umem + addr as usize) as *mut u8,
                            packet.len(),
                        )
                    };
                    rx_kernel.write(
                        i,
                        libc::xdp_desc {
                            addr,
                            len: packet.len() as u32,
                            options: 0,
                        },
                    );
                }
                fill_kernel.release(n);
                rx_kernel.submit(n);
                posted += n;
                posted == FRAMES
            },
        );
        // Every frame now holds an event on the queue; FILL is empty and stays so while they
        // are held.
        within("every event queued", Duration::from_secs(30), || {
            held.len() == FRAMES as usize
        });
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            fill_kernel.available(RING),
            0,
            "no frame to lend while all are held"
        );

        // The pipeline lets them go; nothing more arrives.
        while held.pop().is_some() {}
        within(
            "the released frames lent to FILL again",
            Duration::from_secs(30),
            || fill_kernel.available(RING) == FRAMES,
        );
        stop.store(true, Ordering::Release);
        ingest.join().unwrap().unwrap();
    });
    assert_eq!(counters.events.load(Ordering::Relaxed), u64::from(FRAMES));
}
