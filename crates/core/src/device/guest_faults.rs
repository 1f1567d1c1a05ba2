//! Guest memory a VMM truncates under the daemon: an error of that VMM's
//! connection, never of the process.
//!
//! Each region of a new memory table is sealed against shrinking where the
//! kernel allows it (memfds made with MFD_ALLOW_SEALING; QEMU's
//! memory-backend-memfd seals them itself). Others (hugetlbfs files,
//! /dev/shm files, memfds made without MFD_ALLOW_SEALING) are served with a
//! warning: a VMM that truncates one makes the daemon's next copy into or
//! out of it raise SIGBUS. Those are registered with [`crate::sigbus`],
//! whose handler counts the fault and puts an anonymous page in place, so
//! the copy finishes (on garbage). After a fault no request of the
//! connection completes with success (a read may have returned zeros to
//! nobody, a write may have stored the encrypted zeros of the replaced
//! page: the guest memory it came from no longer exists), the queues take
//! no new request, and the connection is closed; the daemon accepts the
//! next one. A region that can be neither sealed nor registered (the
//! handler's table is full) closes the connection at once.
//!
//! A registered region stays mapped while registered: this keeps its
//! `MmapRegion` and gives the registration back only once nothing else
//! holds the region (no memory table, no request in flight), so a
//! registered range is never reused by another mapping.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::GuestMemory;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::ShutdownHandle;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::seals::seal_against_shrinking;
use crate::sigbus::{self, Slot};

/// One connection's guest memory regions and their faults.
pub struct GuestFaults {
    /// The sigbus slots of the regions registered now (a mask).
    slots: AtomicU64,
    /// Faults of slots already given back.
    retired: AtomicU64,
    held: Mutex<Vec<Held>>,
    /// A region could be neither sealed nor registered.
    unguarded: AtomicBool,
    /// The connection, to end it at the first fault.
    connection: Mutex<Option<ShutdownHandle>>,
    reported: AtomicBool,
}

/// A region of the connection's memory, sealed or registered (`slot`).
/// Fields drop in order: the registration goes before the mapping can.
struct Held {
    slot: Option<Slot>,
    region: Arc<MmapRegion<BitmapMmapRegion>>,
}

/// For requests executed outside any connection (the fuzz targets).
pub static UNWATCHED: GuestFaults = GuestFaults::new();

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GuestFaults {
    pub const fn new() -> Self {
        GuestFaults {
            slots: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            held: Mutex::new(Vec::new()),
            unguarded: AtomicBool::new(false),
            connection: Mutex::new(None),
            reported: AtomicBool::new(false),
        }
    }

    /// A new memory table (SET_MEM_TABLE, ADD/REM_MEM_REG): seals or
    /// registers its new regions and gives back those nothing uses any more.
    pub fn update(&self, mem: &GuestMemory) {
        let mut held = lock(&self.held);
        for region in mem.iter() {
            let map = region.get_mmap();
            if held.iter().any(|h| Arc::ptr_eq(&h.region, &map)) {
                continue;
            }
            let at = region.start_addr().0;
            let slot = match region.file_offset().map(|f| f.file()) {
                Some(file) => self.guard(at, file, &map),
                None => None,
            };
            held.push(Held { slot, region: map });
        }
        held.retain_mut(|h| Arc::strong_count(&h.region) > 1 || !self.give_back(h));
    }

    /// Seals `file` against shrinking, or registers its mapping `map` if it
    /// cannot be sealed.
    fn guard(&self, at: u64, file: &File, map: &MmapRegion<BitmapMmapRegion>) -> Option<Slot> {
        let Err(e) = seal_against_shrinking(file) else {
            return None;
        };
        log::warn!(
            "guest memory at {at:#x} cannot be sealed against shrinking ({e}): a VMM that \
             truncates it fails its own requests and loses its connection; share guest memory \
             as a sealable memfd (QEMU memory-backend-memfd) to rule that out"
        );
        match Slot::register_pages(map.as_ptr() as usize, map.size(), page_size(file)) {
            Ok(slot) => {
                self.slots.fetch_or(slot.bit(), Ordering::SeqCst);
                Some(slot)
            }
            Err(e) => {
                self.unguarded.store(true, Ordering::SeqCst);
                self.fail(format_args!(
                    "guest memory at {at:#x} can be neither sealed nor guarded against \
                     truncation ({e}); closing the VMM's connection"
                ));
                None
            }
        }
    }

    /// Unregisters `h` (its faults kept in `retired` first, so that
    /// `faults` never misses them). Returns true.
    fn give_back(&self, h: &mut Held) -> bool {
        if let Some(slot) = h.slot.take() {
            self.retired.fetch_add(slot.faults(), Ordering::SeqCst);
            self.slots.fetch_and(!slot.bit(), Ordering::SeqCst);
        }
        true
    }

    /// SIGBUS faults in this connection's guest memory so far.
    fn faults(&self) -> u64 {
        // `retired` last: a slot given back meanwhile had its faults added
        // before its bit was cleared.
        sigbus::faults_in(self.slots.load(Ordering::SeqCst)) + self.retired.load(Ordering::SeqCst)
    }

    /// True once the VMM truncated guest memory under a copy (or shared
    /// memory that could not be guarded). The first call that sees a fault
    /// logs it and closes the connection.
    pub fn broken(&self) -> bool {
        if self.unguarded.load(Ordering::SeqCst) {
            return true;
        }
        if self.faults() == 0 {
            return false;
        }
        self.fail(format_args!(
            "the VMM truncated guest memory it shares with cryptblk (an access to it raised \
             SIGBUS): the frontend misbehaved; failing its requests and closing its connection"
        ));
        true
    }

    /// Logs `why` and closes the connection, the first time only.
    fn fail(&self, why: std::fmt::Arguments<'_>) {
        if !self.reported.swap(true, Ordering::SeqCst) {
            log::error!("{why}");
            self.disconnect();
        }
    }

    /// The connection to close at the first fault (the daemon hands it
    /// over once the connection runs).
    pub fn attach(&self, connection: Option<ShutdownHandle>) {
        *lock(&self.connection) = connection;
        if self.reported.load(Ordering::SeqCst) {
            self.disconnect();
        }
    }

    fn disconnect(&self) {
        if let Some(c) = lock(&self.connection).as_ref() {
            c.shutdown();
        }
    }
}

impl Default for GuestFaults {
    fn default() -> Self {
        Self::new()
    }
}

/// The page size of a mapping of `file`: a hugetlbfs file reports its huge
/// page size as its block size, tmpfs and memfds the system page size; 0
/// (the system page size) if unknown. A larger block size elsewhere (NFS)
/// only makes the handler replace more of a region that already faulted.
fn page_size(file: &File) -> usize {
    match file.metadata().map(|m| m.blksize()) {
        Ok(block) if block.is_power_of_two() && block > 4096 => block as usize,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{FileOffset, GuestAddress};

    /// Guest memory in a file that cannot be sealed (not a memfd).
    fn unsealable_memory() -> Arc<GuestMemory> {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let range = (
            GuestAddress(0x10_0000),
            1 << 20,
            Some(FileOffset::new(file, 0)),
        );
        Arc::new(GuestMemory::from_ranges_with_files([range]).unwrap())
    }

    fn slot_count(g: &GuestFaults) -> u32 {
        g.slots.load(Ordering::SeqCst).count_ones()
    }

    /// A region stays registered while a request still holds a replaced
    /// memory table, and a fault counted in it still breaks the connection
    /// after its registration is given back.
    #[test]
    fn a_region_stays_registered_while_used_and_its_faults_outlive_it() {
        let g = GuestFaults::new();
        let table = unsealable_memory();
        g.update(&table);
        assert_eq!(slot_count(&g), 1);
        assert!(!g.broken());
        // The same table again (ADD_MEM_REG keeps the other regions).
        g.update(&table);
        assert_eq!(slot_count(&g), 1);

        let request = table.clone();
        drop(table);
        let empty = GuestMemory::new();
        g.update(&empty);
        assert_eq!(slot_count(&g), 1, "given back while a request uses it");

        lock(&g.held)[0].slot.as_ref().unwrap().count_fault();
        assert!(g.broken());
        drop(request);
        g.update(&empty);
        assert_eq!(slot_count(&g), 0, "kept after its last user went");
        assert!(lock(&g.held).is_empty());
        assert!(g.broken(), "the fault was forgotten with its slot");
    }

    /// Sealable memory (a memfd made as QEMU makes it) is sealed, not
    /// registered; the unsealable control above takes a slot.
    #[test]
    fn memory_that_can_be_sealed_is_sealed_and_takes_no_slot() {
        let file = File::from(super::super::inflight::memfd("guest").unwrap());
        file.set_len(1 << 20).unwrap();
        let keep = file.try_clone().unwrap();
        let range = (
            GuestAddress(0x10_0000),
            1 << 20,
            Some(FileOffset::new(file, 0)),
        );
        let table = GuestMemory::from_ranges_with_files([range]).unwrap();
        let g = GuestFaults::new();
        g.update(&table);
        assert_eq!(slot_count(&g), 0);
        let err = keep.set_len(4096).expect_err("shrinking sealed memory");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert!(!g.broken());
    }
}
