//! A shared mapping of the image's payload (`--io mmap`): the cipher reads
//! ciphertext from the host page cache and writes plaintext into guest
//! memory (and the reverse) in one pass, where pread/pwrite would copy and
//! then encrypt in a second pass.
//!
//! Only regular files are mapped, once, whole payload (64-bit address space:
//! a 20 GiB image takes 20 GiB of address space, no memory). Block devices
//! and `--direct` keep pread/pwrite. A SIGBUS on the mapping (disk error,
//! full filesystem under a sparse image, image truncated by someone else) is
//! turned into an I/O error by [`crate::sigbus`].

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use crate::sigbus::Slot;

pub struct Mapping {
    /// What mmap returned (page aligned) and its length.
    base: *mut u8,
    map_len: usize,
    /// Bytes from `base` to the first payload byte.
    lead: usize,
    /// Payload bytes.
    len: usize,
    writable: bool,
    slot: Option<Slot>,
}

// SAFETY: the mapping is plain shared memory owned by this value; every
// access goes through slices whose use is argued at the call sites.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: shared access is to plain memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` from byte `offset`, MAP_SHARED, writable
    /// unless `readonly`.
    pub fn new(file: &File, offset: u64, len: u64, readonly: bool) -> io::Result<Mapping> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let aligned = offset / page * page;
        let lead = (offset - aligned) as usize;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let map_len = len + lead;
        let prot = if readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED) over an
        // fd we own; the result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                aligned as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut m = Mapping {
            base: base.cast(),
            map_len,
            lead,
            len,
            writable: !readonly,
            slot: None,
        };
        m.slot = Some(Slot::register(base as usize, map_len)?);
        Ok(m)
    }

    /// SIGBUS faults absorbed in this mapping so far. A copy during which
    /// this changed read or wrote garbage and must be redone otherwise.
    pub fn faults(&self) -> u64 {
        self.slot.as_ref().map_or(0, Slot::faults)
    }

    /// Counts a fault as the SIGBUS handler would (tests only).
    #[cfg(test)]
    pub fn count_fault(&self) {
        if let Some(slot) = &self.slot {
            slot.count_fault();
        }
    }

    /// The payload bytes `[pos, pos + len)`, for the cipher to read.
    pub fn bytes(&self, pos: u64, len: usize) -> io::Result<&[u8]> {
        let p = self.range(pos, len)?;
        // SAFETY: range() checked the bytes lie inside the live mapping. Like
        // guest memory (src/virtio/guest.rs) the bytes are shared: another
        // queue or process may write them meanwhile; the slice only feeds
        // the cipher, whose output is then garbage the guest asked for.
        Ok(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// The payload bytes `[pos, pos + len)`, for the cipher to fill with
    /// ciphertext. Err on a read-only mapping (a store would be SIGSEGV).
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self, pos: u64, len: usize) -> io::Result<&mut [u8]> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        let p = self.range(pos, len)?;
        // SAFETY: as in bytes(); the mapping is writable. Two queues writing
        // overlapping ranges at once race exactly as two pwrites would: the
        // slices only receive the cipher's stores, never read back by Rust.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }

    /// FLUSH: msync(MS_SYNC) is what POSIX promises writes through a shared
    /// mapping to. On Linux it runs the filesystem's fdatasync over the
    /// mapped range (mm/msync.c: vfs_fsync_range(.., datasync = 1)), and
    /// fdatasync on the fd would have done too (the mapping is the page
    /// cache; a store marks its page dirty at the write fault), but only
    /// msync is portable.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: base/map_len are exactly what mmap returned.
        let rc = unsafe { libc::msync(self.base.cast(), self.map_len, libc::MS_SYNC) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn range(&self, pos: u64, len: usize) -> io::Result<*mut u8> {
        let end = pos.checked_add(len as u64);
        if !matches!(end, Some(e) if e <= self.len as u64) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: lead + pos + len <= map_len, checked just above.
        Ok(unsafe { self.base.add(self.lead + pos as usize) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unregister first: once unmapped, the addresses may be reused.
        self.slot = None;
        // SAFETY: base/map_len are exactly what mmap returned, and no slice
        // of it outlives &self.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}
