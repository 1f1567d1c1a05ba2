//! Where ciphertext lives: byte ranges of the image file or block device,
//! read, written, synced and discarded. Nothing here knows about encryption
//! or virtio; the volume layer puts ciphertext in and takes it out.
//!
//! `uring` submits those operations asynchronously through io_uring, from
//! buffers of a pool allocated once per queue: many operations per queue
//! are at the disk at once and complete in any order.
//!
//! `nbd` does the same on an NBD export, through libnbd (`libnbd`, the one
//! module that knows its C API; loaded at run time).

mod aligned;
mod buffers;
pub mod libnbd;
mod nbd;
mod uring;

pub use aligned::AlignedBuf;
pub use buffers::{BufId, Buffers};
pub use nbd::NbdStore;
pub use uring::{Op, UringStore};
