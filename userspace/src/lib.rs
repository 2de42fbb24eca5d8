//! EventStreamCore: a Linux kernel-bypass event-ingest appliance.
//!
//! Frames arrive on AF_XDP sockets (or, where XDP cannot attach, kernel UDP sockets and a TCP
//! listener), are parsed zero-copy into events that point into their receive frame, and run to
//! completion on the thread that owns the receive queue (or, pipelined, over lock-free rings to
//! per-class workers). See `shared/design/ARCHITECTURE.md` for the whole picture.
//!
//! Folders by stage and role, from the wire inwards:
//! - [`wire`]: protocol v1 (parser, stream decoder, encoder), Ethernet/IP/UDP framing, and the
//!   [`wire::event::Event`] view into a receive frame.
//! - [`mem`]: page-aligned, hugepage-backed, NUMA-placed regions; the host topology (hwloc) and
//!   thread placement; receive frames with live-event counts; the fixed-capacity `EventPool`.
//! - [`ring`]: the SPSC ring and the Vyukov MPSC queue.
//! - [`xdp`]: the AF_XDP socket and its rings behind one syscall module; loading, attaching,
//!   pinning and counting the XDP program.
//! - [`ingest`]: receive loops (AF_XDP, `recvmmsg`, the TCP listener).
//! - [`engine`]: the stage contract, routing, the control plane, dedup, the worker classes and
//!   latency.
//! - [`sink`]: where delivered events go: memory, the file segment log, the DLQ.
//! - [`ops`]: configuration, admin HTTP and metrics, privileges.
//! - [`daemon`]: the assembly: privileged setup, then the unprivileged run.
//! - [`tools`]: the load generator and the netns lab.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod daemon;
pub mod engine;
pub mod ingest;
pub mod mem;
pub mod ops;
pub mod ring;
pub mod sink;
pub mod tools;
pub mod wire;
pub mod xdp;
