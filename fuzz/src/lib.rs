//! Shared by the fuzz targets: turn arbitrary bytes into guest memory with a
//! split virtqueue in it, pop every chain, parse it, and check that what
//! `cryptblk::virtio::parse` accepted is really safe to execute.

use cryptblk::virtio::{parse, Limits, Parsed, Request, Segment};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Two guest memory regions with a gap between them, so a buffer can
/// straddle a region's end or fall into the hole.
pub const REGION_A: (u64, usize) = (0, 0x3000);
pub const REGION_B: (u64, usize) = (0x10000, 0x2000);
/// Ring layout inside region A (queue size at most 64).
pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x400;
pub const USED: u64 = 0x600;

/// Guest memory and a ready queue built from fuzz input. The first two
/// bytes choose the queue size and the limits; the rest fills memory.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub config: [u8; 2],
}

impl Guest {
    pub fn new(data: &[u8]) -> Option<Guest> {
        let (config, rest) = data.split_first_chunk::<2>()?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(REGION_A.0), REGION_A.1),
            (GuestAddress(REGION_B.0), REGION_B.1),
        ])
        .ok()?;
        use vm_memory::Bytes;
        let (a, b) = rest.split_at(rest.len().min(REGION_A.1));
        mem.write_slice(a, GuestAddress(REGION_A.0)).ok()?;
        let b = &b[..b.len().min(REGION_B.1)];
        mem.write_slice(b, GuestAddress(REGION_B.0)).ok()?;
        let qsize = 1u16 << (config[0] % 7); // 1..=64
        let mut queue = Queue::new(64).ok()?;
        queue.set_size(qsize);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            return None;
        }
        Some(Guest {
            mem,
            queue,
            config: *config,
        })
    }

    /// Limits chosen by the second config byte.
    pub fn limits(&self) -> Limits {
        let c = self.config[1];
        Limits {
            capacity: [0, 512, 64 << 10, u64::MAX - 511][usize::from(c & 3)],
            block_size: if c & 4 != 0 { 4096 } else { 512 },
            max_data_bytes: if c & 8 != 0 { 4096 } else { 1 << 20 },
            max_segments: if c & 16 != 0 { 2 } else { 62 },
            readonly: c & 32 != 0,
            discard: c & 64 != 0,
            max_discard_sectors: 1 << 22,
            max_write_zeroes_sectors: if c & 128 != 0 { 8 } else { 1 << 16 },
        }
    }

    /// Pops every available chain (at most one ring's worth), parses it,
    /// checks the result, hands it to `then`, and returns it to the used
    /// ring with the length `then` reports.
    pub fn run(
        &mut self,
        limits: &Limits,
        mut then: impl FnMut(&GuestMemoryMmap, Parsed, &[Segment]) -> u32,
    ) {
        let mut segments = Vec::new();
        for _ in 0..self.queue.size() {
            let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = parse(&self.mem, head, chain, limits, &mut segments);
            check(&self.mem, &parsed, &segments, limits);
            let used = then(&self.mem, parsed, &segments);
            let _ = self.queue.add_used(&self.mem, head, used);
        }
        // Also walk the queue the way a guest could leave it: an iterator
        // over whatever is left must not panic either.
        if let Ok(mut it) = self.queue.iter(&self.mem) {
            let _ = it.next();
        }
    }
}

/// What `parse` promises about an accepted request.
pub fn check(mem: &GuestMemoryMmap, p: &Parsed, segments: &[Segment], l: &Limits) {
    if let Some(s) = p.status {
        assert!(mem.get_slice(s, 1).is_ok(), "status byte outside memory");
    }
    let Ok(req) = p.request else { return };
    assert!(p.status.is_some(), "accepted a request with no status byte");
    assert!(segments.len() <= l.max_segments, "too many segments");
    let block = u64::from(l.block_size);
    let in_disk = |pos: u64, len: u64| {
        assert_eq!(pos % block, 0, "unaligned position accepted");
        assert_eq!(len % block, 0, "unaligned length accepted");
        assert!(
            pos.checked_add(len).is_some_and(|e| e <= l.capacity),
            "range beyond the disk"
        );
    };
    let total = || -> u64 {
        segments
            .iter()
            .map(|s| {
                assert!(
                    mem.get_slice(s.addr, s.len as usize).is_ok(),
                    "segment outside one region"
                );
                u64::from(s.len)
            })
            .sum()
    };
    match req {
        Request::Read { pos, len } | Request::Write { pos, len } => {
            in_disk(pos, len);
            assert_eq!(total(), len, "segments do not add up to the length");
            assert!(len <= l.max_data_bytes, "request larger than the limit");
            if matches!(req, Request::Write { .. }) {
                assert!(!l.readonly, "write accepted on a read-only disk");
            }
        }
        Request::GetId { len } => {
            assert!(len <= 20);
            assert!(u64::from(len) <= total());
        }
        Request::Discard { pos, len } | Request::WriteZeroes { pos, len } => {
            in_disk(pos, len);
            assert!(
                !l.readonly,
                "discard/write-zeroes accepted on a read-only disk"
            );
            if matches!(req, Request::Discard { .. }) {
                assert!(l.discard, "discard accepted but not offered");
            }
        }
        Request::Flush => {}
    }
}
