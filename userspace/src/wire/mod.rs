//! What arrives on the wire: protocol v1 frames ([`protocol`]), the Ethernet/IP/UDP framing
//! around them on the AF_XDP path ([`packet`]), and the parsed [`event::Event`], a view into the
//! receive frame it came in.

pub mod event;
pub mod packet;
pub mod protocol;
