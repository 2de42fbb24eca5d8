//! The housekeeping thread: everything that is not the data plane, on one mostly sleeping
//! thread (the daemon's main thread), so data-plane threads never outnumber cores because of
//! it.
//!
//! A current-thread tokio runtime drives three things at once:
//! - the admin HTTP server ([`crate::ops::admin::serve`]: `/metrics`, `/healthz`, `/state`,
//!   `/reload`), one task per connection;
//! - the TCP listener's accepting side ([`Acceptor`]), woken by the kernel when the listener is
//!   readable (epoll), never by polling, and every TCP connection it accepts ([`Connections`]):
//!   futures woken when their socket is readable, at their deadlines, or by the stop;
//! - the kernel UDP socket beside AF_XDP ([`SideUdp`]), for the traffic the XDP program passes
//!   to the kernel: woken when the socket is readable, served in bounded turns through a
//!   hand-off that never waits (its events go to the first data-plane thread's side queue), and
//!   retried on the tick when that queue was full;
//! - the tick, every `period` (10 ms): the daemon's chores (reload on SIGHUP, the per-second
//!   log) and the stop: ingest closed, queues drained, threads joined, each a step that never
//!   blocks (a thread is joined once it has finished), so `/metrics` keeps answering while the
//!   sinks drain. The control plane is not here: inline, the first data-plane thread ticks it
//!   ([`crate::engine::inline::InlineControl`]); pipelined, the dispatcher.
//!
//! Where no runtime can be had, the tick still runs, from a plain sleep loop (no admin server;
//! TCP connections are accepted once per tick and refused, counted), so the daemon can always
//! be stopped.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::{error, warn};

use crate::engine::control::Command;
use crate::ingest::{AcceptPass, Acceptor, Connections, Handoff, SideTurn, SideUdp};
use crate::ops::admin::{AdminCounters, MetricsView, Policy};
use crate::ring::mpsc;

/// What the tick says about the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// Every other thread is joined: the housekeeping thread is done.
    Done,
}

/// The admin server's part.
pub struct Admin<'v> {
    /// The bound listener.
    pub listener: std::net::TcpListener,
    /// What `/metrics` and `/healthz` read.
    pub view: &'v MetricsView<'v>,
    /// Operator commands, to the control plane.
    pub commands: &'v mpsc::Producer<Command>,
    /// Limits, token and allowed hosts.
    pub policy: &'v Policy,
    /// The admin server's own counters.
    pub counters: &'v AdminCounters,
}

impl core::fmt::Debug for Admin<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Admin")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// A descriptor registered with the runtime, borrowed from its owner (the TCP listener) for
/// no longer than the owner lives.
struct Fd<'l>(BorrowedFd<'l>);

impl AsRawFd for Fd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Waits until `fd` is readable; never, when there is none.
async fn readable<'f, 'l>(
    fd: Option<&'f AsyncFd<Fd<'l>>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'f, Fd<'l>>> {
    match fd {
        Some(fd) => fd.readable().await,
        None => std::future::pending().await,
    }
}

/// Receive passes per turn of the beside-XDP socket before the thread serves the others.
const SIDE_PASSES: usize = 16;

/// The kernel UDP socket beside AF_XDP, and the flag set once it has finished (ingest stopped
/// and everything it received is on the queue): the stop's ingest step waits for it.
pub struct Side<'r, 'j, 's, 'f, 'a, H> {
    /// The socket's receive loop.
    pub udp: &'r mut SideUdp<'j, 's, 'f, 'a, H>,
    /// Set when it has finished.
    pub done: &'r AtomicBool,
}

impl<'a, H: Handoff<'a>> Side<'_, '_, '_, '_, 'a, H> {
    /// One turn; a hand-off error (none for the non-waiting hand-off) is logged and retried.
    fn turn(&mut self) -> SideTurn {
        let t = match self.udp.serve(SIDE_PASSES) {
            Ok(t) => t,
            Err(e) => {
                error!(reason = %e, "the beside-XDP UDP socket's hand-off failed; retrying");
                SideTurn::Blocked
            }
        };
        if t == SideTurn::Done {
            self.done.store(true, Ordering::Release);
        }
        t
    }
}

impl<H> core::fmt::Debug for Side<'_, '_, '_, '_, '_, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Side").field("udp", &self.udp).finish()
    }
}

/// The housekeeping thread's runtime. The daemon builds it before it says it is ready, so a
/// descriptor limit reached after that (`EMFILE`) cannot leave the TCP listener without one;
/// `None`, logged, where none can be had: [`run`] then runs the plain loop.
pub fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            error!(reason = %e, "no runtime for the housekeeping thread: admin server off, TCP accepted and the beside-XDP socket read once per tick");
            None
        }
    }
}

/// Runs the housekeeping thread on `rt` (from [`runtime`]) until `tick` says [`Flow::Done`]:
/// the admin server (if any), TCP accepts and connections (if a listener), the beside-XDP
/// socket (if any), and `tick` every `period`.
pub fn run<'a, H: Handoff<'a>>(
    rt: Option<tokio::runtime::Runtime>,
    period: Duration,
    admin: Option<Admin<'_>>,
    mut accept: Option<&mut Acceptor<'_, '_, '_>>,
    mut side: Option<Side<'_, '_, '_, '_, 'a, H>>,
    mut tick: impl FnMut() -> Flow,
) {
    let Some(rt) = rt else {
        return run_plain(period, accept, side, tick);
    };
    rt.block_on(async {
        let admin = async {
            if let Some(a) = admin
                && let Err(e) =
                    crate::ops::admin::serve(a.listener, a.view, a.commands, a.policy, a.counters)
                        .await
            {
                error!(reason = %e, "the admin server failed; the appliance runs on without it");
            }
            std::future::pending::<()>().await;
        };
        let house = async {
            let fd = match accept.as_deref() {
                // SAFETY: `Fd` borrows the listener's descriptor, so it stays open and names the
                // same socket for as long as the `AsyncFd` (dropped at the end of this block)
                // lives, and `as_raw_fd` always returns it.
                Some(a) => match unsafe {
                    AsyncFd::register_with_interest(Fd(a.fd()), Interest::READABLE)
                } {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        warn!(reason = %e, "the TCP listener cannot be watched; accepting once per tick");
                        None
                    }
                },
                None => None,
            };
            let side_fd = match side.as_ref() {
                // SAFETY: as for the listener: `Fd` borrows the socket's descriptor, which the
                // daemon keeps open past this block, where the `AsyncFd` is dropped.
                Some(sd) => match unsafe {
                    AsyncFd::register_with_interest(Fd(sd.udp.fd()), Interest::READABLE)
                } {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        warn!(reason = %e, "the beside-XDP UDP socket cannot be watched; reading it once per tick");
                        None
                    }
                },
                None => None,
            };
            // The last turn could not finish (queue full, paused, out of frames): the tick
            // retries it rather than the readiness of a socket still holding datagrams.
            let mut side_blocked = false;
            let mut conns = Connections::new();
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if let Some(a) = accept.as_deref() {
                    a.pass_on_stop();
                }
                let may_accept = fd.is_some() && accept.as_deref().is_some_and(Acceptor::may_accept);
                let side_read = side_fd.is_some()
                    && !side_blocked
                    && side.as_ref().is_some_and(|sd| !sd.udp.is_done());
                tokio::select! {
                    _ = interval.tick() => {
                        if fd.is_none() && let Some(a) = accept.as_deref_mut() && a.may_accept() {
                            a.accept_ready(Some(&mut conns));
                        }
                        // Every tick: a blocked turn is retried, and a stop is seen even when
                        // no datagram arrives.
                        if let Some(sd) = side.as_mut() && !sd.udp.is_done() {
                            side_blocked = sd.turn() == SideTurn::Blocked;
                        }
                        if tick() == Flow::Done {
                            return;
                        }
                    }
                    ready = readable(side_fd.as_ref()), if side_read => match ready {
                        Ok(mut guard) => {
                            if let Some(sd) = side.as_mut() {
                                match sd.turn() {
                                    SideTurn::Drained => guard.clear_ready(),
                                    SideTurn::Blocked => side_blocked = true,
                                    // Datagrams keep coming: the admin server gets its turn
                                    // before the next one.
                                    SideTurn::Busy => tokio::task::yield_now().await,
                                    SideTurn::Done => {}
                                }
                            }
                        }
                        Err(e) => warn!(reason = %e, "waiting on the beside-XDP UDP socket failed"),
                    },
                    ready = readable(fd.as_ref()), if may_accept => match ready {
                        Ok(mut guard) => {
                            if let Some(a) = accept.as_deref_mut()
                                && a.accept_ready(Some(&mut conns)) == AcceptPass::Drained
                            {
                                guard.clear_ready();
                            }
                        }
                        Err(e) => warn!(reason = %e, "waiting on the TCP listener failed"),
                    },
                    // A connection ended (the others were served on the way).
                    Some(()) = conns.next(), if !conns.is_empty() => {}
                }
            }
        };
        tokio::select! {
            () = house => {}
            () = admin => {}
        }
    });
}

/// The tick from a sleep loop, for when no runtime can be built.
fn run_plain<'a, H: Handoff<'a>>(
    period: Duration,
    mut accept: Option<&mut Acceptor<'_, '_, '_>>,
    mut side: Option<Side<'_, '_, '_, '_, 'a, H>>,
    mut tick: impl FnMut() -> Flow,
) {
    loop {
        std::thread::sleep(period);
        if let Some(a) = accept.as_deref_mut()
            && a.may_accept()
        {
            a.accept_ready(None);
        }
        if let Some(sd) = side.as_mut() {
            while sd.turn() == SideTurn::Busy {}
        }
        if tick() == Flow::Done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::time::Instant;

    use super::*;
    use crate::ops::admin::Fresh;
    use crate::wire::event::Source;

    fn get_metrics(addr: std::net::SocketAddr) -> u16 {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(c, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        resp.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// While the tick is still waiting on a drain (here: 400 ms of ticks that say "not yet"),
    /// the admin server on the same thread answers.
    #[test]
    fn metrics_answer_while_the_tick_waits_for_a_drain() {
        let fresh = Fresh::default();
        let view = fresh.view(Source::Udp, Vec::new(), Box::new(|| None));
        let (commands, _rx) = mpsc::channel::<Command>(4);
        let counters = AdminCounters::default();
        let (listener, bound) = crate::ops::admin::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let policy = Policy {
            max_connections: 4,
            timeout: Duration::from_secs(1),
            token: None,
            allowed_hosts: Policy::hosts_for(bound, &[]),
        };
        let client = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            (get_metrics(bound), Instant::now())
        });
        let start = Instant::now();
        let mut ticks = 0u32;
        run(
            runtime(),
            Duration::from_millis(1),
            Some(Admin {
                listener,
                view: &view,
                commands: &commands,
                policy: &policy,
                counters: &counters,
            }),
            None,
            None::<Side<'_, '_, '_, '_, '_, crate::ingest::Discard>>,
            || {
                ticks += 1;
                if start.elapsed() < Duration::from_millis(400) {
                    Flow::Continue
                } else {
                    Flow::Done
                }
            },
        );
        let done = Instant::now();
        let (status, answered) = client.join().unwrap();
        assert_eq!(status, 200);
        assert!(answered < done, "answered before the drain ended");
        assert!(
            ticks > 50,
            "the tick kept running beside the server: {ticks}"
        );
    }
}
