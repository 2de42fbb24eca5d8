//! The housekeeping thread: everything that is not the data plane, on one mostly sleeping
//! thread (the daemon's main thread), so data-plane threads never outnumber cores because of
//! it.
//!
//! A current-thread tokio runtime drives three things at once:
//! - the admin HTTP server ([`crate::ops::admin::serve`]: `/metrics`, `/healthz`, `/state`,
//!   `/reload`), one task per connection;
//! - the TCP listener's accepting side ([`Acceptor`]), woken by the kernel when the listener is
//!   readable (epoll), never by polling;
//! - the tick, every `period` (10 ms): the daemon's chores (reload on SIGHUP, the per-second
//!   log) and the stop: ingest closed, queues drained, threads joined, each a step that never
//!   blocks (a thread is joined once it has finished), so `/metrics` keeps answering while the
//!   sinks drain. The control plane is not here: inline, the first data-plane thread ticks it
//!   ([`crate::engine::inline::InlineControl`]); pipelined, the dispatcher.
//!
//! Where no runtime can be had, the tick still runs, from a plain sleep loop (no admin server;
//! TCP accepts once per tick), so the daemon can always be stopped.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::{error, warn};

use crate::engine::control::Command;
use crate::ingest::{AcceptPass, Acceptor};
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

/// Runs the housekeeping thread until `tick` says [`Flow::Done`]: the admin server (if any),
/// TCP accepts (if a listener), and `tick` every `period`.
pub fn run(
    period: Duration,
    admin: Option<Admin<'_>>,
    mut accept: Option<&mut Acceptor<'_, '_, '_, '_>>,
    mut tick: impl FnMut() -> Flow,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(reason = %e, "no runtime for the housekeeping thread: admin server off, TCP accepted once per tick");
            return run_plain(period, accept, tick);
        }
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
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let may_accept = fd.is_some() && accept.as_deref().is_some_and(Acceptor::may_accept);
                tokio::select! {
                    _ = interval.tick() => {
                        if fd.is_none() && let Some(a) = accept.as_deref_mut() && a.may_accept() {
                            a.accept_ready();
                        }
                        if tick() == Flow::Done {
                            return;
                        }
                    }
                    ready = readable(fd.as_ref()), if may_accept => match ready {
                        Ok(mut guard) => {
                            if let Some(a) = accept.as_deref_mut()
                                && a.accept_ready() == AcceptPass::Drained
                            {
                                guard.clear_ready();
                            }
                        }
                        Err(e) => warn!(reason = %e, "waiting on the TCP listener failed"),
                    },
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
fn run_plain(
    period: Duration,
    mut accept: Option<&mut Acceptor<'_, '_, '_, '_>>,
    mut tick: impl FnMut() -> Flow,
) {
    loop {
        std::thread::sleep(period);
        if let Some(a) = accept.as_deref_mut()
            && a.may_accept()
        {
            a.accept_ready();
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
            Duration::from_millis(1),
            Some(Admin {
                listener,
                view: &view,
                commands: &commands,
                policy: &policy,
                counters: &counters,
            }),
            None,
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
