//! Inflight I/O tracking (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`,
//! split rings): how a daemon that is killed and restarted under a running
//! guest answers the requests it had accepted but not completed.
//!
//! The frontend asks for a shared memory region once (GET_INFLIGHT_FD), keeps
//! it across backend restarts and hands it to every new backend process
//! (SET_INFLIGHT_FD). In it, the backend marks each chain head it pops and
//! clears the mark once the chain is in the used ring. A restarted daemon
//! runs every marked request again, oldest first, before it takes new ones.
//! Running a request twice (it completed, but the process died before the
//! mark was cleared) is harmless for a block device: reads, writes of the
//! same data, flushes, write-zeroes and discards are all idempotent.
//!
//! Layout of one queue's part of the region, as the vhost-user spec
//! ("Inflight I/O tracking") and libvhost-user define it, little endian:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc_num times: { u8 inflight; u8 padding[5]; u16 next; u64 counter }
//! ```
//!
//! Completing a chain follows the spec's order, so that a crash between any
//! two steps is recognised: `last_batch_head = head`; the used ring entry and
//! used index; `inflight = 0`; `used_idx = ring's used index`. A region whose
//! `used_idx` lags the ring's died between the second and third step: the
//! mark on `last_batch_head` is stale.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;

use super::seals::{add_seals, seal_against_shrinking};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

const HEADER: usize = 16;
const DESC: usize = 16;
const VERSION: u16 = 1;
// Header fields and descriptor-state fields, as byte offsets.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
const COUNTER_AT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error(
        "the frontend asked to track {asked} queues of {size} entries, but this device has \
         {queues} queues of at most {max} entries; check the VMM's num-queues and queue-size"
    )]
    Shape {
        asked: u16,
        size: u16,
        queues: usize,
        max: u16,
    },
    #[error(
        "the frontend's inflight region holds {have} bytes from offset {offset}, but {need} are \
         needed for {queues} queues of {size} entries; was it made by another backend? \
         Restart the VMM to get a fresh one"
    )]
    TooSmall {
        have: u64,
        offset: u64,
        need: u64,
        queues: u16,
        size: u16,
    },
    #[error(
        "the frontend's inflight region is not sealed against shrinking and cannot be \
         sealed now ({0}): a frontend could truncate it under the daemon and kill it with \
         SIGBUS. Let the VMM use the region GET_INFLIGHT_FD gave it"
    )]
    Unsealed(io::Error),
    #[error("cannot create or map the inflight region: {0}")]
    Io(#[from] io::Error),
}

/// Bytes of one queue's part of the region, rounded up to a cache line.
fn queue_stride(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(64)
}

/// The whole region, mapped, split into one tracker per queue.
pub struct InflightRegion {
    queues: Vec<Arc<InflightQueue>>,
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a fresh, zeroed region in a new memfd, and the
    /// description the frontend stores with it.
    pub fn create(
        asked: &VhostUserInflight,
        queues: usize,
        max_queue_size: u16,
    ) -> Result<(VhostUserInflight, File), InflightError> {
        check_shape(asked, queues, max_queue_size)?;
        let size = usize::from(asked.num_queues) * queue_stride(asked.queue_size);
        let file = File::from(memfd("cryptblk-inflight")?);
        file.set_len(size as u64)?;
        // Sealed at its size: nobody, the frontend included, can truncate
        // it under a daemon that has it mapped (bug found in review: the
        // next access would kill the daemon with SIGBUS).
        add_seals(
            &file,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )?;
        // Zeroed: version 0 reads as "nothing to recover"; `open` (on
        // SET_INFLIGHT_FD) writes each queue's desc_num.
        let info = VhostUserInflight::new(size as u64, 0, asked.num_queues, asked.queue_size);
        Ok((info, file))
    }

    /// SET_INFLIGHT_FD: map the region the frontend kept (fresh from
    /// `create`, or left by an earlier daemon process), if it fits this
    /// device and cannot shrink under the mapping.
    pub fn open(
        info: &VhostUserInflight,
        file: File,
        queues: usize,
        max_queue_size: u16,
    ) -> Result<Self, InflightError> {
        check_shape(info, queues, max_queue_size)?;
        require_shrink_seal(&file)?;
        let stride = queue_stride(info.queue_size);
        let need = (usize::from(info.num_queues) * stride) as u64;
        let have = file.metadata()?.len().saturating_sub(info.mmap_offset);
        // Mapping past the end of the file would turn every access into SIGBUS.
        if info.num_queues == 0 || info.queue_size == 0 || need > info.mmap_size || need > have {
            return Err(InflightError::TooSmall {
                have: have.min(info.mmap_size),
                offset: info.mmap_offset,
                need,
                queues: info.num_queues,
                size: info.queue_size,
            });
        }
        let map = Arc::new(
            MmapRegion::<()>::from_file(FileOffset::new(file, info.mmap_offset), need as usize)
                .map_err(|e| io::Error::other(e.to_string()))?,
        );
        let queues = (0..usize::from(info.num_queues))
            .map(|i| {
                let q = InflightQueue {
                    map: map.clone(),
                    base: i * stride,
                    desc_num: info.queue_size,
                    counter: AtomicU64::new(0),
                    recovered: AtomicBool::new(false),
                };
                q.u16_at(DESC_NUM_AT)
                    .store(info.queue_size.to_le(), Ordering::Release);
                Arc::new(q)
            })
            .collect();
        Ok(InflightRegion { queues })
    }

    /// The tracker of queue `index`, if the frontend asked to track it.
    pub fn queue(&self, index: usize) -> Option<Arc<InflightQueue>> {
        self.queues.get(index).cloned()
    }
}

/// Refuses regions for more queues or larger queues than the device has:
/// the region's size is charged to the daemon.
fn check_shape(
    asked: &VhostUserInflight,
    queues: usize,
    max_queue_size: u16,
) -> Result<(), InflightError> {
    if asked.num_queues == 0
        || usize::from(asked.num_queues) > queues
        || asked.queue_size == 0
        || asked.queue_size > max_queue_size
    {
        return Err(InflightError::Shape {
            asked: asked.num_queues,
            size: asked.queue_size,
            queues,
            max: max_queue_size,
        });
    }
    Ok(())
}

/// The regions `create` hands out are sealed; one that is not is sealed
/// here, or refused if it cannot be.
fn require_shrink_seal(file: &File) -> Result<(), InflightError> {
    seal_against_shrinking(file).map_err(InflightError::Unsealed)
}

pub(super) fn memfd(name: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid C string; the returned fd is checked and
    // owned from here on.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// What a restarted queue must do before it pops anything new.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Heads left in flight, oldest first.
    pub heads: Vec<u16>,
    /// The avail index after the last chain the previous process popped.
    pub next_avail: u16,
}

/// One queue's part of the region. The queue's vring thread marks heads
/// (`begin`); whichever thread completes a chain clears its mark
/// (`before_used` and `after_used`, under the vring lock).
pub struct InflightQueue {
    map: Arc<MmapRegion<()>>,
    base: usize,
    desc_num: u16,
    /// The next counter to stamp on a popped head (it orders resubmission).
    counter: AtomicU64,
    recovered: AtomicBool,
}

impl InflightQueue {
    // In-bounds by construction: `open` mapped `desc_num` entries for every
    // queue, and every caller below checks its head against `desc_num`.
    fn u16_at(&self, at: usize) -> &AtomicU16 {
        self.map
            .get_atomic_ref(self.base + at)
            .expect("inflight header lies inside the mapped region")
    }

    fn flag(&self, head: u16) -> &AtomicU8 {
        self.map
            .get_atomic_ref(self.base + HEADER + DESC * usize::from(head))
            .expect("head checked against desc_num")
    }

    fn counter_of(&self, head: u16) -> &AtomicU64 {
        self.map
            .get_atomic_ref(self.base + HEADER + DESC * usize::from(head) + COUNTER_AT)
            .expect("head checked against desc_num")
    }

    fn load16(&self, at: usize) -> u16 {
        u16::from_le(self.u16_at(at).load(Ordering::Acquire))
    }

    fn store16(&self, at: usize, v: u16) {
        self.u16_at(at).store(v.to_le(), Ordering::Release);
    }

    /// True exactly once per mapping: the first event on the queue after
    /// SET_INFLIGHT_FD must `recover` before popping anything.
    pub fn claim_recovery(&self) -> bool {
        !self.recovered.swap(true, Ordering::AcqRel)
    }

    /// The chain at `head` was just popped.
    pub fn begin(&self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let stamp = self.counter.fetch_add(1, Ordering::Relaxed);
        self.counter_of(head)
            .store(stamp.to_le(), Ordering::Release);
        self.flag(head).store(1, Ordering::Release);
    }

    /// The chain at `head` is about to go into the used ring.
    pub fn before_used(&self, head: u16) {
        if head < self.desc_num {
            self.store16(LAST_BATCH_HEAD_AT, head);
        }
    }

    /// The chain at `head` is in the used ring, whose index is now `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.flag(head).store(0, Ordering::Release);
        }
        self.store16(USED_IDX_AT, used_idx);
    }

    /// Reads what the previous process left for a vring of `vring_size`
    /// entries whose used index is `ring_used`, and readies the region for
    /// this process. A region nobody used yet has nothing to recover.
    pub fn recover(&self, ring_used: u16, vring_size: u16) -> Recovery {
        if self.load16(VERSION_AT) != VERSION {
            self.store16(VERSION_AT, VERSION);
            self.store16(USED_IDX_AT, ring_used);
            return Recovery {
                heads: Vec::new(),
                next_avail: ring_used,
            };
        }
        if self.load16(USED_IDX_AT) != ring_used {
            let stale = self.load16(LAST_BATCH_HEAD_AT);
            if stale < self.desc_num {
                self.flag(stale).store(0, Ordering::Release);
            }
            self.store16(USED_IDX_AT, ring_used);
        }
        let mut marked: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.flag(h).load(Ordering::Acquire) != 0)
            .map(|h| (u64::from_le(self.counter_of(h).load(Ordering::Acquire)), h))
            .collect();
        marked.sort_unstable();
        let next_counter = marked.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.counter.store(next_counter, Ordering::Relaxed);
        // Heads beyond the vring cannot be real requests: forget them.
        let (heads, bogus): (Vec<u16>, Vec<u16>) = marked
            .into_iter()
            .map(|(_, h)| h)
            .partition(|&h| h < vring_size);
        for h in bogus {
            log::warn!("inflight region marks head {h}, beyond the vring's {vring_size}; ignored");
            self.flag(h).store(0, Ordering::Release);
        }
        Recovery {
            next_avail: ring_used.wrapping_add(heads.len() as u16),
            heads,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUES: u16 = 2;
    const SIZE: u16 = 8;

    fn ask() -> VhostUserInflight {
        VhostUserInflight::new(0, 0, QUEUES, SIZE)
    }

    /// A region as the frontend keeps it: the file, reopened by a new
    /// "process" each time.
    fn fresh() -> (VhostUserInflight, File) {
        InflightRegion::create(&ask(), 4, 256).unwrap()
    }

    fn reopen(info: &VhostUserInflight, file: &File) -> InflightRegion {
        InflightRegion::open(info, file.try_clone().unwrap(), 4, 256).unwrap()
    }

    #[test]
    fn create_sizes_the_region_for_the_frontends_queues() {
        let (info, file) = fresh();
        assert_eq!(info.num_queues, QUEUES);
        assert_eq!(info.queue_size, SIZE);
        assert_eq!(info.mmap_offset, 0);
        assert_eq!(info.mmap_size, 2 * 192);
        assert_eq!(file.metadata().unwrap().len(), info.mmap_size);
    }

    #[test]
    fn shapes_the_device_cannot_have_are_refused() {
        for (q, s) in [(0, 8), (5, 8), (2, 0), (2, 512)] {
            let err = InflightRegion::create(&VhostUserInflight::new(0, 0, q, s), 4, 256);
            assert!(matches!(err, Err(InflightError::Shape { .. })), "{q}x{s}");
        }
    }

    #[test]
    fn a_region_smaller_than_its_description_is_refused() {
        let (mut info, file) = fresh();
        info.queue_size = 64;
        assert!(matches!(
            InflightRegion::open(&info, file.try_clone().unwrap(), 4, 256),
            Err(InflightError::TooSmall { .. })
        ));
        let (info, _) = fresh();
        let small = File::from(memfd("small").unwrap());
        small.set_len(100).unwrap();
        assert!(matches!(
            InflightRegion::open(&info, small, 4, 256),
            Err(InflightError::TooSmall { .. })
        ));
    }

    /// Review bug: a frontend that truncated the region after
    /// SET_INFLIGHT_FD killed the daemon with SIGBUS at its next access.
    #[test]
    fn the_region_cannot_shrink_under_the_daemon() {
        let (info, file) = fresh();
        let region = reopen(&info, &file);
        let err = file.set_len(16).expect_err("truncating the region");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // The mapping is still whole: this would fault on a shrunk file.
        region.queue(1).unwrap().begin(3);
        // A region made by someone else is sealed on open, then holds too.
        let other = File::from(memfd("frontend-made").unwrap());
        other.set_len(info.mmap_size).unwrap();
        let _kept = InflightRegion::open(&info, other.try_clone().unwrap(), 4, 256).unwrap();
        assert!(other.set_len(16).is_err(), "a sealed-on-open region shrank");
    }

    #[test]
    fn a_region_that_cannot_be_sealed_is_refused() {
        let (info, _) = fresh();
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(info.mmap_size).unwrap();
        assert!(matches!(
            InflightRegion::open(&info, plain, 4, 256),
            Err(InflightError::Unsealed(_))
        ));
    }

    /// Review bug: SET_INFLIGHT_FD for far more queues or larger queues
    /// than the device has was accepted (up to ~256 MiB charged to us).
    #[test]
    fn open_refuses_shapes_beyond_the_device() {
        let (info, file) = fresh();
        for (queues, max) in [(1, 256), (4, 4)] {
            assert!(matches!(
                InflightRegion::open(&info, file.try_clone().unwrap(), queues, max),
                Err(InflightError::Shape { .. })
            ));
        }
    }

    #[test]
    fn a_fresh_region_has_nothing_to_recover() {
        let (info, file) = fresh();
        let q = reopen(&info, &file).queue(0).unwrap();
        assert_eq!(
            q.recover(7, SIZE),
            Recovery {
                heads: vec![],
                next_avail: 7
            }
        );
    }

    #[test]
    fn heads_left_in_flight_come_back_oldest_first() {
        let (info, file) = fresh();
        let first = reopen(&info, &file);
        let q = first.queue(1).unwrap();
        q.recover(0, SIZE);
        for head in [5, 2, 7, 0] {
            q.begin(head);
        }
        // 2 completes: used index 0 -> 1.
        q.before_used(2);
        q.after_used(2, 1);
        drop(first);

        let second = reopen(&info, &file);
        let q = second.queue(1).unwrap();
        assert_eq!(
            q.recover(1, SIZE),
            Recovery {
                heads: vec![5, 7, 0],
                next_avail: 4
            }
        );
        // New pops are stamped after the recovered ones.
        q.begin(3);
        q.before_used(5);
        q.after_used(5, 2);
        drop(second);
        let q = reopen(&info, &file).queue(1).unwrap();
        assert_eq!(q.recover(2, SIZE).heads, vec![7, 0, 3]);
        // Queue 0 was never touched.
        assert!(reopen(&info, &file)
            .queue(0)
            .unwrap()
            .recover(0, SIZE)
            .heads
            .is_empty());
    }

    #[test]
    fn a_crash_after_the_used_ring_moved_clears_the_stale_mark() {
        let (info, file) = fresh();
        let q = reopen(&info, &file).queue(0).unwrap();
        q.recover(10, SIZE);
        q.begin(4);
        q.begin(6);
        // Dies after the used ring took head 4 (10 -> 11) but before its
        // mark was cleared.
        q.before_used(4);
        let q = reopen(&info, &file).queue(0).unwrap();
        assert_eq!(
            q.recover(11, SIZE),
            Recovery {
                heads: vec![6],
                next_avail: 12
            }
        );
    }

    #[test]
    fn marks_beyond_a_smaller_vring_are_dropped() {
        let (info, file) = fresh();
        let q = reopen(&info, &file).queue(0).unwrap();
        q.recover(0, SIZE);
        q.begin(1);
        q.begin(6);
        let q = reopen(&info, &file).queue(0).unwrap();
        assert_eq!(q.recover(0, 4).heads, vec![1]);
        assert_eq!(q.recover(0, SIZE).heads, vec![1]);
    }
}
