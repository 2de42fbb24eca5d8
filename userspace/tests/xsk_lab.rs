//! The AF_XDP path end to end in a netns + veth lab (see `eventstream::tools::lab`): UDP frames sent
//! from the sender namespace arrive through the XDP program and the AF_XDP socket with exact
//! bytes and in sequence; ping and a TCP connection to the receiver still work through the
//! kernel; detaching and tearing down leave nothing behind.
//!
//! Needs root, iproute2, ping and the XDP object; skips with a message where they are missing,
//! except under CI, where it fails instead.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use eventstream::ingest::{Enqueue, IngestCounters, XskIngest};
use eventstream::mem::RegionOptions;
use eventstream::mem::frames::FrameArena;
use eventstream::mem::pool::{EventPool, Pooled};
use eventstream::ring::mpsc;
use eventstream::tools::lab::{self, Lab, LabError, RX_ADDR, RX_IF};
use eventstream::wire::event::Event;
use eventstream::wire::protocol::{Limits, encode};
use eventstream::xdp::socket::{BindMode, XskOptions, XskSocket};
use eventstream::xdp::{ObjectSource, XdpError, XdpProgram, if_index};
use eventstream_common::{AttachMode, Verdict, XdpConfig};

const PORT: u16 = 8082;
const DATAGRAMS: u32 = 300;
const PER_DATAGRAM: u32 = 4;

fn datagram(d: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for k in 0..PER_DATAGRAM {
        let n = d * PER_DATAGRAM + k;
        let mut payload = n.to_be_bytes().to_vec();
        payload.extend(std::iter::repeat_n((n % 251) as u8, (n % 40) as usize));
        encode(
            (n % 8) as u8,
            &format!("lab.events.{}", n % 3),
            &payload,
            &mut v,
        )
        .unwrap();
    }
    v
}

/// What the receiver saw.
#[derive(Debug, Default)]
struct Received {
    events: Vec<(u64, u8, String, Vec<u8>)>,
    mode: Option<(AttachMode, BindMode)>,
    redirected: u64,
    passed: u64,
    kernel_drops: u64,
    xdp_left_attached: bool,
}

fn receiver(
    ready: &AtomicBool,
    done: &AtomicBool,
    failed: &AtomicBool,
) -> Result<Received, String> {
    let mut prog = XdpProgram::load(ObjectSource::Embedded).map_err(|e| e.to_string())?;
    // The ladder the daemon uses: native driver mode first, generic when the driver refuses.
    let (link, attach) = match prog.attach(RX_IF, AttachMode::Driver) {
        Ok(l) => (l, AttachMode::Driver),
        Err(e) => {
            eprintln!("driver-mode attach refused ({e}); using skb mode");
            (
                prog.attach(RX_IF, AttachMode::Skb)
                    .map_err(|e| e.to_string())?,
                AttachMode::Skb,
            )
        }
    };
    prog.configure(XdpConfig {
        udp_port: PORT,
        allow_vlan: 1,
        attach_mode: attach as u8,
        ..XdpConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let arena = FrameArena::new(
        2048,
        1024,
        RegionOptions {
            hugepages: true,
            lock: true,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let mut owner = arena.owner().expect("one owner");
    let ifindex = if_index(RX_IF).map_err(|e| e.to_string())?;
    let mut sock = XskSocket::new(&arena, &mut owner, ifindex, 0, XskOptions::default())
        .map_err(|e| e.to_string())?;
    prog.register_socket(0, sock.as_raw_fd())
        .map_err(|e| e.to_string())?;
    let mode = (attach, sock.mode());

    // The kernel's TCP stack keeps serving: one echo connection.
    let listener =
        TcpListener::bind(SocketAddr::from((RX_ADDR, 8081))).map_err(|e| e.to_string())?;

    let pool: EventPool<Event<'_>> = EventPool::new(4096);
    let (tx, mut rx) = mpsc::channel::<Pooled<'_, Event<'_>>>(4096);
    let stop = AtomicBool::new(false);
    let counters = IngestCounters::default();
    let mut got = Received {
        mode: Some(mode),
        ..Received::default()
    };
    let want = (DATAGRAMS * PER_DATAGRAM) as usize;
    std::thread::scope(|s| {
        s.spawn(|| {
            // Bounded: gives up at the deadline so a failed sender cannot hang the test.
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut buf = [0u8; 5];
                        if c.read_exact(&mut buf).is_ok() {
                            let _ = c.write_all(&buf);
                        }
                        return;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let ingest = s.spawn(|| {
            let mut acq = pool.acquirer().unwrap();
            let job = XskIngest {
                batch: 64,
                limits: Limits::default(),
                stop: &stop,
                idle_poll: Duration::from_millis(20),
                busy_spin: Duration::from_micros(20),
                bare: false,
                counters: &counters,
                seq_base: 0,
                paused: &AtomicBool::new(false),
            };
            job.run(
                &mut sock,
                &mut owner,
                Enqueue {
                    pool: &mut acq,
                    queue: &tx,
                },
            )
        });
        ready.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(20);
        while (got.events.len() < want || !done.load(Ordering::Acquire))
            && !failed.load(Ordering::Acquire)
            && Instant::now() < deadline
        {
            let n = rx.pop_batch(256, |ev| {
                got.events.push((
                    ev.seq,
                    ev.priority(),
                    ev.topic().to_owned(),
                    ev.payload().to_vec(),
                ));
            });
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        stop.store(true, Ordering::Release);
        ingest.join().unwrap().unwrap();
    });
    let stats = prog.stats().map_err(|e| e.to_string())?;
    got.redirected = stats.get(Verdict::Redirect);
    got.passed = stats.get(Verdict::Pass);
    got.kernel_drops = counters.xsk_rx_dropped.load(Ordering::Relaxed)
        + counters.xsk_rx_ring_full.load(Ordering::Relaxed);
    assert_eq!(counters.invalid_descs.load(Ordering::Relaxed), 0);
    assert_eq!(counters.bad_packets.load(Ordering::Relaxed), 0);
    drop(sock);
    drop(link); // the bpf_link goes: the kernel detaches the program
    drop(prog);
    let show = Command::new("ip")
        .args(["-d", "link", "show", "dev", RX_IF])
        .output()
        .map_err(|e| e.to_string())?;
    got.xdp_left_attached = String::from_utf8_lossy(&show.stdout).contains("prog/xdp");
    Ok(got)
}

fn sender(ready: &AtomicBool, done: &AtomicBool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.load(Ordering::Acquire) {
        if Instant::now() > deadline {
            return Err("receiver never became ready".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    let to = SocketAddr::from((RX_ADDR, PORT));
    for d in 0..DATAGRAMS {
        sock.send_to(&datagram(d), to).map_err(|e| e.to_string())?;
        if d % 32 == 31 {
            std::thread::sleep(Duration::from_millis(1)); // bounded, paced: never a flood
        }
    }
    let ping = Command::new("ping")
        .args(["-c", "1", "-W", "2", &RX_ADDR.to_string()])
        .output()
        .map_err(|e| format!("ping: {e}"))?;
    if !ping.status.success() {
        return Err(format!(
            "ping failed: {}",
            String::from_utf8_lossy(&ping.stdout)
        ));
    }
    let mut tcp =
        TcpStream::connect_timeout(&SocketAddr::from((RX_ADDR, 8081)), Duration::from_secs(3))
            .map_err(|e| format!("tcp: {e}"))?;
    tcp.write_all(b"hello").map_err(|e| e.to_string())?;
    let mut echo = [0u8; 5];
    tcp.read_exact(&mut echo).map_err(|e| e.to_string())?;
    if &echo != b"hello" {
        return Err("tcp echo mismatch".into());
    }
    done.store(true, Ordering::Release);
    Ok(())
}

#[test]
fn udp_through_af_xdp_and_kernel_traffic_still_flows() {
    let name = format!("es{}", std::process::id());
    let lab = match Lab::up(&name) {
        Ok(l) => l,
        Err(e @ (LabError::NotPermitted(_) | LabError::NoIp)) => {
            return common::skip(&e.to_string());
        }
        Err(e) => panic!("{e}"),
    };
    if let Err(e @ XdpError::NotPermitted { .. }) = XdpProgram::load(ObjectSource::Embedded) {
        return common::skip(&e.to_string());
    }
    let ready = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let (got, sent) = std::thread::scope(|s| {
        let rx = s.spawn(|| {
            let r = lab::in_netns(&lab.rx_ns, || receiver(&ready, &done, &failed));
            ready.store(true, Ordering::Release); // release the sender even if setup failed
            r
        });
        let tx = s.spawn(|| {
            let r = lab::in_netns(&lab.tx_ns, || sender(&ready, &done));
            if !matches!(r, Ok(Ok(()))) {
                failed.store(true, Ordering::Release);
            }
            r
        });
        (rx.join().unwrap(), tx.join().unwrap())
    });
    let got = got.unwrap().unwrap_or_else(|e| panic!("receiver: {e}"));
    sent.unwrap().unwrap_or_else(|e| panic!("sender: {e}"));
    eprintln!(
        "lab: attach {:?}, bind {:?}",
        got.mode.unwrap().0,
        got.mode.unwrap().1
    );

    let want: Vec<_> = (0..DATAGRAMS)
        .flat_map(|d| {
            let bytes = datagram(d);
            eventstream::wire::protocol::Datagram::new(&bytes, Limits::default())
                .map(|f| {
                    f.map(|f| (f.priority, f.topic.to_owned(), f.payload.to_vec()))
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(got.kernel_drops, 0, "the kernel dropped frames");
    assert_eq!(
        got.events.len(),
        want.len(),
        "every event arrived through AF_XDP"
    );
    for (i, ((seq, prio, topic, payload), (wp, wt, wpl))) in
        got.events.iter().zip(&want).enumerate()
    {
        assert_eq!(*seq, i as u64, "sequence is gap-free and in order");
        assert_eq!(
            (prio, topic, payload),
            (wp, wt, wpl),
            "event {i} has the exact bytes sent"
        );
    }
    assert_eq!(
        got.redirected,
        u64::from(DATAGRAMS),
        "every event datagram was redirected"
    );
    assert!(
        got.passed >= 2,
        "ping and TCP went to the kernel ({} passed)",
        got.passed
    );
    assert!(
        !got.xdp_left_attached,
        "dropping the link detached the program"
    );
    drop(lab);
    assert!(
        !Lab::exists(&format!("{name}-rx")) && !Lab::exists(&format!("{name}-tx")),
        "the lab left namespaces behind"
    );
}
