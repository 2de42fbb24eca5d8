//! Memory the data path owns: page-aligned, hugepage-backed, locked and NUMA-placed regions
//! ([`region`], [`numa`]), the host's nodes and the thread placement plan ([`topology`]),
//! receive frames with a live-event count ([`frames`]), and the fixed-capacity [`pool`].

pub mod frames;
pub mod numa;
pub mod pool;
pub mod region;
pub mod topology;

pub use region::{Region, RegionOptions};
