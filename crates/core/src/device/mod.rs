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

/// Guest memory as the device sees it: mapped regions that carry the dirty
/// log the frontend hands over for live migration (SET_LOG_BASE). Every
/// write into it through vm-memory marks the pages it touched; the data the
/// cipher writes goes through `virtio::GuestBufs`, which marks them too.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>;
/// A vring over that memory.
pub type Vring = vhost_user_backend::VringRwLock<vm_memory::GuestMemoryAtomic<GuestMemory>>;
pub use blk::{BlkDevice, ResizeError, Workspace};
pub use options::{AioMode, CryptoMode, DeviceOptions};
/// Executes one parsed chain: public for the fuzz targets in fuzz/.
pub use queue::complete;

#[cfg(test)]
mod tests;
