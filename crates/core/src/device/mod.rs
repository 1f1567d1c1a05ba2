//! The vhost-user-blk device: features and config space, per-queue request
//! processing, and the `VhostUserBackend` glue.

mod aio;
mod backend;
mod blk;
mod completion;
mod config_space;
mod guest_faults;
mod inflight;
mod options;
mod pool;
mod queue;
mod ratelimit;
mod seals;
mod state;
pub mod stats;

pub use backend::BlkBackend;
pub use blk::{BlkDevice, ResizeError, Workspace};
pub use options::{AioMode, CryptoMode, DeviceOptions};
/// Executes one parsed chain: public for the fuzz targets in fuzz/.
pub use queue::complete;

#[cfg(test)]
mod tests;
