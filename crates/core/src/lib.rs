//! cryptblk: a vhost-user-blk device that stores only dm-crypt compatible
//! AES-XTS ciphertext. Layers, each knowing only the one below:
//! `crypto` → `volume` → `virtio` (request parsing) → `device` (vhost-user).

pub mod capabilities;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod keyring;
pub mod notify;
pub mod sandbox;
mod sigbus;
pub mod socket;
pub mod store;
pub mod virtio;
pub mod volume;

// The layers below, in crates of their own so that Cargo enforces the
// direction: crypto knows nothing of LUKS, LUKS nothing of virtio.
pub use cryptblk_crypto as crypto;
pub use cryptblk_crypto::secrets;
pub use cryptblk_luks as luks;
