//! cryptblk: a vhost-user-blk device that stores only dm-crypt compatible
//! AES-XTS ciphertext. Layers, each knowing only the one below:
//! `crypto` → `volume` → `virtio` (request parsing) → `device` (vhost-user).

pub mod bench;
pub mod capabilities;
pub mod config;
pub mod control;
pub mod crypto;
pub mod daemon;
pub mod demo;
pub mod device;
pub mod keyring;
pub mod luks;
pub mod notify;
pub mod sandbox;
pub mod secrets;
mod sigbus;
pub mod socket;
pub mod store;
pub mod virtio;
pub mod volume;
