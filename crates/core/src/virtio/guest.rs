//! Turning validated data descriptors into the daemon's view of guest
//! memory, and telling a migrating VMM which pages the daemon wrote.
//!
//! The guest shares this memory and may change it while the daemon works on
//! it, so no Rust slice is ever built over it: each descriptor becomes a
//! `SharedMut` (device-writable) or `SharedRef` (device-readable), a pointer
//! and a length that the cipher's raw-pointer kernel and raw copies use
//! (crypto's `shared` module). A guest racing its own I/O only spoils that
//! I/O. This is the one module that turns guest addresses into pointers.

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, VolatileMemory};

use super::Segment;
use crate::crypto::{SharedMut, SharedRef};

/// Reusable descriptor vectors, one pair per queue thread, so the data path
/// does not allocate per request.
#[derive(Default)]
pub struct GuestBufs {
    readable: Vec<SharedRef<'static>>,
    writable: Vec<SharedMut<'static>>,
}

/// A descriptor no longer maps into guest memory (the memory table changed).
#[derive(Debug)]
pub struct Unmapped;

impl GuestBufs {
    /// Runs `f` over the device-writable buffers of `segments`, then marks
    /// their pages dirty for a migrating VMM.
    pub fn with_writable<M: GuestMemoryBackend, R>(
        &mut self,
        mem: &M,
        segments: &[Segment],
        f: impl FnOnce(&[SharedMut<'_>]) -> R,
    ) -> Result<R, Unmapped> {
        let mut v = relabel(std::mem::take(&mut self.writable));
        for s in segments {
            let (ptr, len) = guest_range(mem, s)?;
            // SAFETY: guest_range checked that the range lies inside one
            // mapped region of `mem`, which stays mapped while `mem` is
            // borrowed (for the whole of `f`); nothing here makes a Rust
            // reference to it.
            v.push(unsafe { SharedMut::from_raw(ptr, len) });
        }
        let r = f(&v);
        self.writable = relabel(v);
        mark_dirty(mem, segments);
        Ok(r)
    }

    /// Runs `f` over the device-readable buffers of `segments`.
    pub fn with_readable<M: GuestMemoryBackend, R>(
        &mut self,
        mem: &M,
        segments: &[Segment],
        f: impl FnOnce(&[SharedRef<'_>]) -> R,
    ) -> Result<R, Unmapped> {
        let mut v = relabel(std::mem::take(&mut self.readable));
        for s in segments {
            let (ptr, len) = guest_range(mem, s)?;
            // SAFETY: as in with_writable; the daemon only reads these.
            v.push(unsafe { SharedRef::from_raw(ptr, len) });
        }
        let r = f(&v);
        self.readable = relabel(v);
        Ok(r)
    }
}

/// Tells a migrating frontend that the daemon wrote these bytes (the dirty
/// log of SET_LOG_BASE; a no-op while no log is set). Marked after the
/// writes, never before: the frontend may collect and clear the log at any
/// moment, and a page marked before it changed could be copied stale with
/// its bit already cleared. Writes through vm-memory (status bytes, GET_ID,
/// the used ring) mark themselves; this covers the cipher's and the copies'
/// writes through the pointers above.
fn mark_dirty<M: GuestMemoryBackend>(mem: &M, segments: &[Segment]) {
    for s in segments {
        if let Ok(vs) = mem.get_slice(s.addr, s.len as usize) {
            vs.bitmap().mark_dirty(0, vs.len());
        }
    }
}

/// Empties a vector and gives it back with another lifetime. The in-place
/// `collect` keeps the allocation, so the capacity is reused.
fn relabel<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter().map(|_| unreachable!()).collect()
}

/// Where a descriptor's bytes are in this process, checked to lie inside
/// one mapped region of `mem`.
fn guest_range<M: GuestMemoryBackend>(mem: &M, s: &Segment) -> Result<(*mut u8, usize), Unmapped> {
    let len = s.len as usize;
    let vs = mem.get_slice(s.addr, len).map_err(|_| Unmapped)?;
    let vs = vs.get_slice(0, len).map_err(|_| Unmapped)?;
    Ok((vs.ptr_guard_mut().as_ptr(), len))
}
