//! Tools that ship in the binary: the load generator ([`blast`]) and the netns + veth lab
//! ([`lab`]).

pub mod blast;
pub mod lab;
pub mod xsk_crate;
