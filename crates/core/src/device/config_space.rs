//! virtio-blk features and config space (virtio 1.2, 5.2.4).

use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserVirtioFeatures, VHOST_USER_CONFIG_OFFSET,
};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::options::DeviceOptions;
use crate::virtio::Limits;

/// VHOST_F_LOG_ALL (vhost's own feature bit): the backend logs every write
/// into guest memory in the dirty log the frontend gives it.
pub const VHOST_F_LOG_ALL: u32 = 26;

/// Largest single data descriptor the guest may use (config `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// DISCARD and WRITE_ZEROES carry one range each; the sector limits keep a
/// single request's work bounded (write-zeroes encrypts every byte).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 16;

pub fn virtio_features(opts: &DeviceOptions) -> u64 {
    let bits = [
        (VIRTIO_F_VERSION_1, true),
        (VHOST_F_LOG_ALL, opts.dirty_logging),
        (VIRTIO_RING_F_EVENT_IDX, true),
        (VIRTIO_RING_F_INDIRECT_DESC, true),
        (VIRTIO_BLK_F_SEG_MAX, true),
        (VIRTIO_BLK_F_SIZE_MAX, true),
        (VIRTIO_BLK_F_BLK_SIZE, true),
        (VIRTIO_BLK_F_TOPOLOGY, true),
        (VIRTIO_BLK_F_FLUSH, true),
        (VIRTIO_BLK_F_MQ, true),
        (VIRTIO_BLK_F_WRITE_ZEROES, !opts.readonly),
        (VIRTIO_BLK_F_RO, opts.readonly),
        (VIRTIO_BLK_F_DISCARD, opts.allow_discards && !opts.readonly),
    ];
    bits.iter().filter(|(_, on)| *on).fold(
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        |acc, (bit, _)| acc | 1u64 << bit,
    )
}

pub fn protocol_features(opts: &DeviceOptions) -> VhostUserProtocolFeatures {
    let base = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        // The channel `resize` announces a new capacity through.
        | VhostUserProtocolFeatures::BACKEND_REQ
        // Snapshot/restore and migration hand-over (device/state.rs).
        | VhostUserProtocolFeatures::DEVICE_STATE;
    let optional = [
        (
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            opts.inflight_tracking,
        ),
        // The dirty log of a live migration (SET_LOG_BASE): see
        // virtio::GuestBufs and device::GuestMemory.
        (VhostUserProtocolFeatures::LOG_SHMFD, opts.dirty_logging),
    ];
    optional
        .into_iter()
        .filter(|(_, on)| *on)
        .fold(base, |acc, (f, _)| acc | f)
}

/// Guest-visible limits that request parsing enforces.
pub fn limits(opts: &DeviceOptions, capacity: u64, block_size: usize) -> Limits {
    let seg_max = seg_max(opts);
    Limits {
        capacity,
        block_size: block_size as u32,
        max_data_bytes: u64::from(seg_max) * u64::from(SIZE_MAX),
        max_segments: seg_max as usize,
        readonly: opts.readonly,
        discard: opts.allow_discards && !opts.readonly,
        max_discard_sectors: MAX_DISCARD_SECTORS,
        max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
    }
}

/// crosvm and others may set a queue size up to 32768; a guest must never
/// see more segments than fit in a chain with header and status.
fn seg_max(opts: &DeviceOptions) -> u32 {
    u32::from(opts.queue_size).saturating_sub(2).max(1)
}

/// The config space bytes (struct virtio_blk_config up to unused1).
pub fn config_space(opts: &DeviceOptions, capacity: u64, block_size: usize) -> Vec<u8> {
    let mut c = Vec::with_capacity(60);
    let physical = block_size.max(4096);
    c.extend_from_slice(&(capacity / 512).to_le_bytes()); // capacity
    c.extend_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
    c.extend_from_slice(&seg_max(opts).to_le_bytes()); // seg_max
    c.extend_from_slice(&[0, 0, 0, 0]); // geometry (not offered)
    c.extend_from_slice(&(block_size as u32).to_le_bytes()); // blk_size
    c.push((physical / block_size).trailing_zeros() as u8); // physical_block_exp
    c.push(0); // alignment_offset
    c.extend_from_slice(&((physical / block_size) as u16).to_le_bytes()); // min_io_size
    c.extend_from_slice(&0u32.to_le_bytes()); // opt_io_size
    c.push(0); // writeback (CONFIG_WCE not offered)
    c.push(0); // unused0
    c.extend_from_slice(&(opts.queues as u16).to_le_bytes()); // num_queues
    c.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c.extend_from_slice(&1u32.to_le_bytes()); // max_discard_seg
    c.extend_from_slice(&((block_size / 512) as u32).to_le_bytes()); // discard_sector_alignment
    c.extend_from_slice(&MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    c.extend_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
    c.push(0); // write_zeroes_may_unmap
    c.extend_from_slice(&[0, 0, 0]); // unused1
    c
}

/// The `size` bytes at `offset`, zero-filled past our struct: vhost-user
/// requires a reply of exactly the requested size.
///
/// QEMU counts GET_CONFIG offsets from the start of the device's config
/// space; cloud-hypervisor (and other frontends on rust-vmm's vhost crate)
/// count from `VHOST_USER_CONFIG_OFFSET` (0x100), as that crate's backends
/// expect, and asks for offset 0x100. The virtio-blk config space is far
/// smaller than 0x100 bytes, so the two conventions never meet: an offset
/// from 0x100 on is taken as rust-vmm's. Without this a cloud-hypervisor
/// guest saw a disk of capacity 0.
pub fn config_window(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let offset = offset
        .checked_sub(VHOST_USER_CONFIG_OFFSET)
        .unwrap_or(offset);
    let mut out = vec![0u8; size.min(256) as usize];
    let start = (offset as usize).min(space.len());
    let end = (start + out.len()).min(space.len());
    out[..end - start].copy_from_slice(&space[start..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::super::options::{AioMode, CryptoMode};
    use super::*;

    fn opts() -> DeviceOptions {
        DeviceOptions {
            queues: 4,
            queue_size: 256,
            readonly: false,
            allow_discards: false,
            serial: "x".into(),
            crypto: CryptoMode::Inline,
            workers: 1,
            split_threshold: 128 << 10,
            aio: AioMode::IoUring,
            inflight_tracking: true,
            dirty_logging: true,
        }
    }

    #[test]
    fn config_space_layout_matches_the_spec_offsets() {
        let c = config_space(&opts(), 1 << 30, 4096);
        assert_eq!(c.len(), 60);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_ne!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 0);
        assert_ne!(u32::from_le_bytes(c[48..52].try_into().unwrap()), 0);
        assert_eq!(config_window(&c, 20, 4), c[20..24].to_vec());
        assert_eq!(config_window(&c, 56, 16).len(), 16);
        // cloud-hypervisor's convention: the same bytes from 0x100 on.
        assert_eq!(config_window(&c, 0x100, 60), config_window(&c, 0, 60));
        assert_eq!(config_window(&c, 0x100 + 20, 4), c[20..24].to_vec());
    }

    #[test]
    fn features_follow_options() {
        let f = virtio_features(&opts());
        assert_ne!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let ro = DeviceOptions {
            readonly: true,
            allow_discards: true,
            ..opts()
        };
        let f = virtio_features(&ro);
        assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
    }

    #[test]
    fn huge_queues_keep_seg_max_below_queue_size() {
        let o = DeviceOptions {
            queue_size: 32768,
            ..opts()
        };
        assert_eq!(limits(&o, 1 << 20, 512).max_segments, 32766);
    }
}
