//! The device layer in process: the tests lay descriptor chains in guest
//! memory as a driver would, a `VringRwLock` points at them, and they call
//! `handle_event` and `stop_vring` as vhost-user-backend's threads would,
//! with a temporary image file behind the volume. No socket, no VMM, no
//! external tool: each placement runs the very same chains.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use super::{AioMode, BlkBackend, BlkDevice, CryptoMode, DeviceOptions, GuestMemory, Vring};
use crate::crypto::{IvRule, SectorCipher, XtsKey};
use crate::volume::{open_image, ImageOptions, IoMode};

const QSIZE: u16 = 256;
/// The split ring, laid out as a driver would (virtio 1.x 2.7).
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const MEM_END: usize = 16 << 20;
const HEADERS: u64 = 0x10_0000;
const STATUSES: u64 = 0x18_0000;
const DATA: u64 = 0x20_0000;
/// Room for each request's data buffer.
const SLOT: u64 = 64 << 10;
const IMAGE_BYTES: u64 = 8 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Where crypto and I/O run: the rows of README's placement table.
#[derive(Debug, Clone, Copy)]
struct Placement {
    io: IoMode,
    aio: AioMode,
    crypto: CryptoMode,
}

const PLACEMENTS: [Placement; 5] = [
    Placement {
        io: IoMode::Mmap,
        aio: AioMode::IoUring,
        crypto: CryptoMode::Inline,
    },
    Placement {
        io: IoMode::Pread,
        aio: AioMode::Sync,
        crypto: CryptoMode::Inline,
    },
    Placement {
        io: IoMode::Pread,
        aio: AioMode::IoUring,
        crypto: CryptoMode::Inline,
    },
    Placement {
        io: IoMode::Mmap,
        aio: AioMode::IoUring,
        crypto: CryptoMode::Workers,
    },
    Placement {
        io: IoMode::Pread,
        aio: AioMode::IoUring,
        crypto: CryptoMode::Workers,
    },
];

fn cipher() -> SectorCipher {
    let key = XtsKey::from_bytes(&[0x5a; 64]).unwrap();
    SectorCipher::new(
        Some(&key),
        IvRule {
            sector_size: 512,
            large_sectors: false,
            skip: 0,
        },
    )
}

/// One device, one queue, guest memory and the vring the tests drive.
struct Rig {
    _dir: tempfile::TempDir,
    image: std::path::PathBuf,
    mem: GuestMemoryAtomic<GuestMemory>,
    backend: Arc<BlkBackend>,
    vring: Vring,
    /// Descriptors used so far (each request takes three).
    next_desc: u16,
}

impl Rig {
    fn new(p: Placement) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        let volume = open_image(ImageOptions {
            incoming: false,
            path: image.clone(),
            create_size: Some(IMAGE_BYTES),
            payload_offset: 0,
            payload_size: None,
            readonly: false,
            direct: false,
            io: p.io,
            cipher: cipher(),
            nbd: Default::default(),
            export: None,
            rbd: Default::default(),
        })
        .unwrap();
        let dev = BlkDevice::new(
            volume,
            DeviceOptions {
                queues: 1,
                queue_size: QSIZE,
                readonly: false,
                allow_discards: false,
                serial: "device-tests".into(),
                crypto: p.crypto,
                workers: 2,
                // Small, so that the 64K requests are split across workers.
                split_threshold: 16 << 10,
                aio: p.aio,
                inflight_tracking: false,
                dirty_logging: true,
            },
        );
        let guest = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_END)]).unwrap();
        let mem = GuestMemoryAtomic::new(guest);
        let backend = BlkBackend::new(dev, mem.clone()).unwrap();
        let vring = Vring::new(mem.clone(), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring
            .set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Rig {
            _dir: dir,
            image,
            mem,
            backend,
            vring,
            next_desc: 0,
        }
    }

    /// Makes requests available (header, optional data, status) without
    /// kicking: `(type, sector, data bytes)`. Request n of the rig uses
    /// descriptors 3n.., header, status and data slot n.
    fn offer(&mut self, requests: &[(u32, u64, u32)]) {
        let mem = self.mem.memory();
        for &(kind, sector, len) in requests {
            let slot = self.slot_of_next();
            let header = HEADERS + slot * 16;
            mem.write_obj(kind.to_le(), GuestAddress(header)).unwrap();
            mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
            mem.write_obj(sector.to_le(), GuestAddress(header + 8))
                .unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUSES + slot))
                .unwrap();
            let data_flags = if kind == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
            let mut parts = vec![(header, 16, 0)];
            if len > 0 {
                parts.push((DATA + slot * SLOT, len, data_flags));
            }
            parts.push((STATUSES + slot, 1, F_WRITE));
            let first = self.next_desc;
            let last = parts.len() - 1;
            for (k, &(addr, l, flags)) in parts.iter().enumerate() {
                let (flags, next) = if k < last {
                    (flags | F_NEXT, first + k as u16 + 1)
                } else {
                    (flags, 0)
                };
                let at = GuestAddress(DESC_TABLE + 16 * u64::from(first + k as u16));
                mem.write_obj(addr.to_le(), at).unwrap();
                mem.write_obj(l.to_le(), at.unchecked_add(8)).unwrap();
                mem.write_obj(flags.to_le(), at.unchecked_add(12)).unwrap();
                mem.write_obj(next.to_le(), at.unchecked_add(14)).unwrap();
            }
            // The head goes in the avail ring, then the index moves on.
            let idx: u16 = mem.read_obj(GuestAddress(AVAIL_RING + 2)).unwrap();
            let entry = AVAIL_RING + 4 + 2 * u64::from(idx % QSIZE);
            mem.write_obj(first.to_le(), GuestAddress(entry)).unwrap();
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            mem.write_obj(idx.wrapping_add(1).to_le(), GuestAddress(AVAIL_RING + 2))
                .unwrap();
            self.next_desc += 3;
        }
    }

    fn slot_of_next(&self) -> u64 {
        u64::from(self.next_desc / 3)
    }

    fn kick(&self) {
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    /// What vhost-user-backend does when the queue's completion eventfd
    /// fires; harmless when nothing completed.
    fn completion_event(&self) {
        let token = self.backend.num_queues() as u16 + 1;
        self.backend
            .handle_event(token, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.vring.queue_used_idx().unwrap()
    }

    /// Drives completions until `n` requests have been used.
    fn wait_used(&self, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.used_idx() < n {
            assert!(Instant::now() < deadline, "{} of {n} used", self.used_idx());
            std::thread::sleep(Duration::from_millis(1));
            self.completion_event();
        }
    }

    fn status(&self, slot: u64) -> u8 {
        self.mem
            .memory()
            .read_obj(GuestAddress(STATUSES + slot))
            .unwrap()
    }

    fn write_data(&self, slot: u64, bytes: &[u8]) {
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(DATA + slot * SLOT))
            .unwrap();
    }

    fn read_data(&self, slot: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut out, GuestAddress(DATA + slot * SLOT))
            .unwrap();
        out
    }
}

/// Distinct bytes for each (request, offset), never all zeros.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((seed * 131 + i * 7 + (i >> 9)) % 251) as u8 + 1)
        .collect()
}

/// Mixed sizes from one sector to 64K, at sectors that do not overlap.
fn workload() -> Vec<(u64, u32)> {
    let sizes = [512u32, 4096, 65536, 1024, 16384, 8192, 32768, 2048];
    let mut sector = 3;
    (0..32)
        .map(|i| {
            let len = sizes[i % sizes.len()];
            let at = sector;
            sector += u64::from(len / 512) + 5;
            (at, len)
        })
        .collect()
}

/// Writes the workload, FLUSHes, reads it back into other buffers; returns
/// the image file's bytes.
fn write_flush_read(p: Placement) -> Vec<u8> {
    let mut rig = Rig::new(p);
    let work = workload();
    let base = rig.slot_of_next();
    for (i, &(_, len)) in work.iter().enumerate() {
        rig.write_data(base + i as u64, &pattern(i as u64, len as usize));
    }
    let writes: Vec<_> = work
        .iter()
        .map(|&(sector, len)| (VIRTIO_BLK_T_OUT, sector, len))
        .collect();
    rig.offer(&writes);
    rig.offer(&[(VIRTIO_BLK_T_FLUSH, 0, 0)]);
    rig.kick();
    let n = work.len() as u16 + 1;
    rig.wait_used(n);
    for slot in base..base + u64::from(n) {
        assert_eq!(rig.status(slot), 0, "{p:?}: request {slot}");
    }

    let reads: Vec<_> = work
        .iter()
        .map(|&(sector, len)| (VIRTIO_BLK_T_IN, sector, len))
        .collect();
    let base = rig.slot_of_next();
    rig.offer(&reads);
    rig.kick();
    rig.wait_used(n + work.len() as u16);
    for (i, &(_, len)) in work.iter().enumerate() {
        let slot = base + i as u64;
        assert_eq!(rig.status(slot), 0, "{p:?}: read {i}");
        assert!(
            rig.read_data(slot, len as usize) == pattern(i as u64, len as usize),
            "{p:?}: read {i} ({len} bytes) differs from what was written"
        );
    }
    std::fs::read(&rig.image).unwrap()
}

#[test]
fn every_placement_serves_the_same_chains_and_stores_the_same_ciphertext() {
    let work = workload();
    let reference = write_flush_read(PLACEMENTS[0]);
    // The image holds exactly the ciphertext of what was written.
    let c = cipher();
    for (i, &(sector, len)) in work.iter().enumerate() {
        let mut expect = pattern(i as u64, len as usize);
        c.encrypt(sector, &mut expect);
        let at = (sector * 512) as usize;
        assert!(
            reference[at..at + len as usize] == expect[..],
            "request {i}: the image does not hold its ciphertext"
        );
    }
    for p in &PLACEMENTS[1..] {
        assert!(
            write_flush_read(*p) == reference,
            "{p:?} stored other bytes than {:?}",
            PLACEMENTS[0]
        );
    }
}

#[test]
fn stop_vring_returns_only_once_every_submitted_request_is_used() {
    for p in PLACEMENTS {
        let mut rig = Rig::new(p);
        let reads: Vec<_> = workload()
            .iter()
            .map(|&(sector, len)| (VIRTIO_BLK_T_IN, sector, len))
            .collect();
        rig.offer(&reads);
        rig.kick();
        // GET_VRING_BASE: the reported base must not include a request
        // still at the disk or with a worker.
        rig.backend.stop_vring(0).unwrap();
        assert_eq!(rig.used_idx(), reads.len() as u16, "{p:?}");
    }
}

/// The driver-visible avail_event field, after the used ring's entries.
fn avail_event(rig: &Rig) -> u16 {
    let at = USED_RING + 4 + 8 * u64::from(QSIZE);
    rig.mem.memory().read_obj(GuestAddress(at)).unwrap()
}

#[test]
fn with_event_idx_the_queue_asks_for_the_next_kick_after_draining() {
    for p in PLACEMENTS {
        for event_idx in [true, false] {
            let mut rig = Rig::new(p);
            rig.backend.set_event_idx(event_idx);
            rig.vring.set_queue_event_idx(event_idx);
            rig.offer(&[(VIRTIO_BLK_T_IN, 0, 4096), (VIRTIO_BLK_T_IN, 8, 4096)]);
            rig.kick();
            rig.wait_used(2);
            // avail_event tells the driver when to kick again: at the next
            // request, so none is left unseen. Without EVENT_IDX (the
            // control) nobody writes it.
            let expect = if event_idx { 2 } else { 0 };
            assert_eq!(avail_event(&rig), expect, "{p:?} event_idx {event_idx}");
            rig.offer(&[(VIRTIO_BLK_T_IN, 16, 512)]);
            rig.kick();
            rig.wait_used(3);
            assert_eq!(rig.status(2), 0, "{p:?}");
        }
    }
}

/// Leaves in `region` (queue 0) what a daemon killed with `heads` popped and
/// not completed leaves: the region's version, its used index, and each
/// head's in-flight mark with the stamp that orders the replay.
fn mark_left_in_flight(region: &std::fs::File, used_idx: u16, heads: &[(u16, u64)]) {
    use std::os::unix::fs::FileExt;
    region.write_all_at(&1u16.to_le_bytes(), 8).unwrap();
    region.write_all_at(&used_idx.to_le_bytes(), 14).unwrap();
    for &(head, stamp) in heads {
        let at = 16 + 16 * u64::from(head);
        region.write_all_at(&stamp.to_le_bytes(), at + 8).unwrap();
        region.write_all_at(&[1], at).unwrap();
    }
}

/// The heads in the used ring, in the order they were used.
fn used_heads(rig: &Rig, n: u16) -> Vec<u32> {
    let mem = rig.mem.memory();
    (0..u64::from(n))
        .map(|i| mem.read_obj(GuestAddress(USED_RING + 4 + 8 * i)).unwrap())
        .collect()
}

/// A daemon restarted under a running guest (INFLIGHT_SHMFD): its first
/// event runs the requests its predecessor popped and never completed,
/// oldest stamp first, and pops new requests only after them, so none runs
/// twice. In process, on every placement: three writes sit in the avail
/// ring, all popped (marked) by the "previous daemon", none completed.
#[test]
fn a_restarted_queue_replays_what_was_left_in_flight_oldest_first() {
    use vhost::vhost_user::message::VhostUserInflight;
    for p in PLACEMENTS {
        let mut rig = Rig::new(p);
        let asked = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QSIZE,
        };
        let (info, region) = rig.backend.get_inflight_fd(&asked).unwrap();
        let writes = [(VIRTIO_BLK_T_OUT, 64, 4096), (VIRTIO_BLK_T_OUT, 128, 8192)];
        let writes = [writes[0], writes[1], (VIRTIO_BLK_T_OUT, 256, 512)];
        for (slot, &(_, _, len)) in writes.iter().enumerate() {
            rig.write_data(slot as u64, &pattern(40 + slot as u64, len as usize));
        }
        rig.offer(&writes);
        // Heads 0, 3 and 6, stamped so that the replay order is 3, 6, 0.
        mark_left_in_flight(&region, 0, &[(0, 9), (3, 4), (6, 5)]);
        rig.backend
            .set_inflight_fd(&info, region.try_clone().unwrap())
            .unwrap();

        rig.kick();
        rig.wait_used(3);
        for slot in 0..3 {
            assert_eq!(rig.status(slot), 0, "{p:?}: replayed write {slot}");
        }
        // Completed in the order replayed where one thread does everything
        // one request at a time; the other placements may finish in any
        // order, but each head exactly once.
        let mut used = used_heads(&rig, 3);
        let in_order =
            p.crypto == CryptoMode::Inline && (p.io == IoMode::Mmap || p.aio == AioMode::Sync);
        if in_order {
            assert_eq!(used, [3, 6, 0], "{p:?}: replay order");
        }
        used.sort_unstable();
        assert_eq!(used, [0, 3, 6], "{p:?}: each replayed once");

        // The ring goes on after them: the reads are the only new requests,
        // and they see what the replayed writes stored.
        let reads: Vec<_> = writes
            .iter()
            .map(|&(_, sector, len)| (VIRTIO_BLK_T_IN, sector, len))
            .collect();
        let base = rig.slot_of_next();
        rig.offer(&reads);
        rig.kick();
        rig.wait_used(6);
        std::thread::sleep(Duration::from_millis(20));
        rig.completion_event();
        assert_eq!(rig.used_idx(), 6, "{p:?}: a request ran twice");
        for (i, &(_, _, len)) in writes.iter().enumerate() {
            let slot = base + i as u64;
            assert_eq!(rig.status(slot), 0, "{p:?}: read {i}");
            assert!(
                rig.read_data(slot, len as usize) == pattern(40 + i as u64, len as usize),
                "{p:?}: read {i} does not see the replayed write"
            );
        }
    }
}
