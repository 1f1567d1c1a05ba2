//! The `cryptblk` program's library: the daemon's crate (`cryptblk-core`:
//! crypto, store, volume, virtio, device, LUKS) re-exported whole, plus the
//! two commands that are not the daemon, `bench` (the load generator, its
//! own crate so that the daemon's library never links libblkio) and `demo`.

pub use cryptblk_bench as bench;
pub use cryptblk_core::*;

pub mod demo;
