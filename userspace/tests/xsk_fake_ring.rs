//! The AF_XDP ingest loop against rings in plain memory, with a thread playing the kernel: it
//! takes frames off FILL, writes Ethernet/IPv4/UDP datagrams of 16 events into the UMEM, and
//! posts RX descriptors, some of them bogus. Proves, under a counting global allocator, that the
//! loop (refill, descriptor checks, zero-copy parse into pooled events, release back to FILL)
//! allocates nothing per event in steady state, delivers every event in order, and refuses bad
//! descriptors without losing frames. One test in this file, so nothing else allocates while it
//! counts.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::fake_xsk::FakeXsk;
use eventstream::ingest::{Enqueue, IngestCounters, XskIngest};
use eventstream::mem::RegionOptions;
use eventstream::mem::frames::FrameArena;
use eventstream::mem::pool::{EventPool, Pooled};
use eventstream::ring::mpsc;
use eventstream::wire::event::Event;
use eventstream::wire::protocol::{Limits, encode};
use eventstream::xdp::ring::fake_pair;

#[global_allocator]
static GLOBAL: common::counting::Counting = common::counting::Counting;

const FRAME: u32 = 2048;
const FRAMES: u32 = 512;
const RING: u32 = 256;
const PER_DATAGRAM: u64 = 16;
const DATAGRAMS: u64 = if cfg!(miri) { 64 } else { 1 << 16 };
const WARMUP: u64 = DATAGRAMS / 16;
/// Every this many datagrams the fake kernel also posts a descriptor outside the UMEM.
const BOGUS_EVERY: u64 = 1000;

fn wait(spins: &mut u32) {
    *spins += 1;
    if *spins > 64 {
        *spins = 0;
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

#[test]
fn xsk_ingest_allocates_nothing_and_refuses_bad_descriptors() {
    let spec = common::udp_v4();
    let mut payload = Vec::new();
    for i in 0..PER_DATAGRAM {
        encode((i % 8) as u8, "fake.kernel", &i.to_be_bytes(), &mut payload).unwrap();
    }
    let packet = spec.frame(&payload);
    assert!(packet.len() <= FRAME as usize);

    let arena = FrameArena::new(FRAME, FRAMES, RegionOptions::default()).unwrap();
    let umem = arena.region().as_ptr() as usize; // for the fake kernel's writes
    let umem_len = u64::from(FRAME) * u64::from(FRAMES);
    let (fill_user, mut fill_kernel, _) = fake_pair::<u64>(RING);
    let (mut rx_kernel, rx_user, _) = fake_pair::<libc::xdp_desc>(RING);
    let mut sock = FakeXsk {
        fill: fill_user,
        rx: rx_user,
        frame_size: FRAME,
        umem_len,
        on_poll: std::thread::yield_now,
    };

    let pool: EventPool<Event<'_>> = EventPool::new(4096);
    let (tx, mut rx) = mpsc::channel::<Pooled<'_, Event<'_>>>(4096);
    let stop = AtomicBool::new(false);
    let counters = IngestCounters::default();
    let delivered = AtomicU64::new(0);
    let total = DATAGRAMS * PER_DATAGRAM;

    std::thread::scope(|s| {
        // The fake kernel: FILL -> write a datagram into the frame -> RX.
        s.spawn(|| {
            let mut sent = 0u64;
            let mut spins = 0;
            while sent < DATAGRAMS {
                if sent == WARMUP {
                    common::counting::start();
                }
                let n = fill_kernel.available(32);
                let room = rx_kernel.free(n + 1);
                let n = n.min(room.saturating_sub(1)).min((DATAGRAMS - sent) as u32);
                if n == 0 {
                    wait(&mut spins);
                    continue;
                }
                let (mut real, mut posted) = (0, 0);
                for i in 0..n {
                    let addr = fill_kernel.read(i);
                    assert!(addr + u64::from(FRAME) <= umem_len && addr % u64::from(FRAME) == 0);
                    // SAFETY: `addr` came off FILL, so the frame is lent to the kernel (us) and
                    // nothing else touches it until its RX descriptor is posted; the write stays
                    // inside the frame and the UMEM.
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            packet.as_ptr(),
                            (umem + addr as usize) as *mut u8,
                            packet.len(),
                        )
                    };
                    rx_kernel.write(
                        posted,
                        libc::xdp_desc {
                            addr,
                            len: packet.len() as u32,
                            options: 0,
                        },
                    );
                    (real, posted, sent) = (real + 1, posted + 1, sent + 1);
                    if sent.is_multiple_of(BOGUS_EVERY) {
                        // Outside the UMEM: must be refused without touching memory.
                        rx_kernel.write(
                            posted,
                            libc::xdp_desc {
                                addr: umem_len + 4096,
                                len: 60,
                                options: 0,
                            },
                        );
                        posted += 1;
                        break;
                    }
                }
                fill_kernel.release(real);
                rx_kernel.submit(posted);
            }
        });
        // The dispatcher stand-in: check order and content, release.
        s.spawn(|| {
            let mut next = 0u64;
            let mut spins = 0;
            while next < total {
                let n = rx.pop_batch(256, |ev| {
                    assert_eq!(ev.seq, next, "in order, none lost");
                    let i = next % PER_DATAGRAM;
                    assert_eq!(ev.payload(), i.to_be_bytes());
                    assert_eq!((ev.topic(), ev.priority()), ("fake.kernel", (i % 8) as u8));
                    next += 1;
                });
                if n == 0 {
                    wait(&mut spins);
                }
            }
            delivered.store(next, Ordering::Release);
            stop.store(true, Ordering::Release);
        });
        let mut owner = arena.owner().unwrap();
        let mut acq = pool.acquirer().unwrap();
        let job = XskIngest {
            batch: 64,
            limits: Limits::default(),
            stop: &stop,
            idle_poll: Duration::from_millis(1),
            busy_spin: Duration::from_micros(20),
            bare: false,
            counters: &counters,
            seq_base: 0,
            paused: &AtomicBool::new(false),
        };
        let handoff = Enqueue {
            pool: &mut acq,
            queue: &tx,
        };
        job.run(&mut sock, &mut owner, handoff).unwrap();
        drop(acq);
    });
    let allocs = common::counting::stop();

    assert_eq!(delivered.load(Ordering::Acquire), total);
    assert_eq!(counters.events.load(Ordering::Relaxed), total);
    assert_eq!(counters.datagrams.load(Ordering::Relaxed), DATAGRAMS);
    assert_eq!(
        counters.invalid_descs.load(Ordering::Relaxed),
        DATAGRAMS / BOGUS_EVERY,
        "bogus descriptors refused and counted"
    );
    assert_eq!(counters.bad_packets.load(Ordering::Relaxed), 0);
    assert_eq!(
        pool.free_slots(),
        pool.capacity(),
        "every pool slot came back"
    );
    assert_eq!(
        allocs, 0,
        "{allocs} allocations while moving {total} events through AF_XDP ingest after warm-up"
    );
}
