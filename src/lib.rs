//! cryptblk: a vhost-user-blk device that stores only dm-crypt compatible
//! AES-XTS ciphertext. Layers, each knowing only the one below:
//! `crypto` → `volume` → `virtio` (request parsing) → `device` (vhost-user).

pub mod crypto;
pub mod luks;
