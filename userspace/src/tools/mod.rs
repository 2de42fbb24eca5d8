//! Tools that ship in the binary: the load generator ([`blast`]), the netns + veth lab
//! ([`lab`]), the systems the networked sinks write to, started on loopback ([`servers`]), and
//! the sink bench against their bare clients ([`sinkbench`]).

pub mod blast;
pub mod lab;
pub mod servers;
pub mod sinkbench;
pub mod xsk_crate;
