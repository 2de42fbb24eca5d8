//! EventStreamCore: a Linux kernel-bypass event-ingest appliance.
//!
//! Frames arrive on AF_XDP sockets (or, where XDP cannot attach, a kernel UDP socket and a TCP
//! listener), are parsed zero-copy into pooled [`event::Event`]s that point into their receive
//! frame, and travel over lock-free rings to the dispatcher and workers. See
//! `shared/design/ARCHITECTURE.md` for the whole picture.
//!
//! Modules, from the wire inwards:
//! - [`protocol`]: wire protocol v1, parser (datagram and stream) and encoder.
//! - [`mem`], [`numa`], [`topology`]: page-aligned, hugepage-backed, NUMA-placed memory; the
//!   host's nodes (hwloc) and the thread placement plan.
//! - [`frames`]: receive frames with a live-event count, returned to their owner when released.
//! - [`event`]: the event, a view into its frame.
//! - [`pool`]: the fixed-capacity `EventPool`.
//! - [`ring`]: SPSC ring and Vyukov MPSC queue; [`idle`]: waiting on full and empty rings.
//! - [`ingest`]: kernel UDP ingest (`recvmmsg`).
//! - [`route`], [`control`], [`dedup`], [`engine`]: topic routing, pipeline state, duplicate
//!   suppression, and the dispatcher, workers and sinks.
//! - [`latency`]: the sender's payload stamp and per-worker HDR histograms.
//! - [`storage`]: the file sink's segment log and the DLQ.
//! - [`blast`]: the load generator (UDP `sendmmsg`, TCP, live frames).
//! - [`privs`]: dropping capabilities once setup is done.
//! - [`admin`]: `/metrics`, `/healthz`, `/state` over HTTP.
//! - [`config`]: the YAML configuration.
//! - [`lab`]: the netns + veth lab.
//! - [`packet`]: Ethernet/IP/UDP framing for the AF_XDP path.
//! - [`xdp`]: loading, attaching, pinning and counting the XDP program.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod admin;
pub mod blast;
pub mod config;
pub mod control;
pub mod dedup;
pub mod engine;
pub mod event;
pub mod frames;
pub mod idle;
pub mod ingest;
pub mod lab;
pub mod latency;
pub mod mem;
pub mod numa;
pub mod packet;
pub mod pool;
pub mod privs;
pub mod protocol;
pub mod ring;
pub mod route;
pub mod storage;
pub mod topology;
pub mod xdp;
