//! The lock-free rings of the data path.
//!
//! - [`spsc`]: bounded single-producer single-consumer ring (dispatcher → worker).
//! - [`mpsc`]: Dmitry Vyukov's bounded multi-producer single-consumer queue (ingest →
//!   dispatcher, and frames returning to their owner).
//! - [`doorbell`]: wakes a consumer sleeping in `poll` when work is queued for it, and costs
//!   nothing while it is awake.
//!
//! Both hand an item back when full (`push -> Result<(), T>`): a full ring is backpressure.

pub mod doorbell;
pub mod mpsc;
pub mod spsc;
