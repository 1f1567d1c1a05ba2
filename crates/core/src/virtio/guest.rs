//! Turning validated data descriptors into host slices of guest memory.
//!
//! This is the one place that builds Rust slices over guest memory. The guest
//! shares that memory and may change it while we work on it; like every
//! rust-vmm device we accept that (the guest can only corrupt its own I/O),
//! because the cipher and the syscalls need plain slices to run at speed.

use std::io::{IoSlice, IoSliceMut};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, VolatileMemory};

use super::Segment;

/// Reusable slice vectors, one pair per queue thread, so the data path does
/// not allocate per request.
#[derive(Default)]
pub struct GuestBufs {
    readable: Vec<IoSlice<'static>>,
    writable: Vec<IoSliceMut<'static>>,
}

/// A descriptor no longer maps into guest memory (the memory table changed).
#[derive(Debug)]
pub struct Unmapped;

impl GuestBufs {
    pub fn with_writable<M: GuestMemoryBackend, R>(
        &mut self,
        mem: &M,
        segments: &[Segment],
        f: impl FnOnce(&mut [IoSliceMut<'_>]) -> R,
    ) -> Result<R, Unmapped> {
        let mut v = relabel(std::mem::take(&mut self.writable));
        for s in segments {
            v.push(IoSliceMut::new(guest_slice(mem, s)?));
        }
        let r = f(&mut v);
        self.writable = relabel(v);
        mark_dirty(mem, segments);
        Ok(r)
    }

    pub fn with_readable<M: GuestMemoryBackend, R>(
        &mut self,
        mem: &M,
        segments: &[Segment],
        f: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<R, Unmapped> {
        let mut v = relabel(std::mem::take(&mut self.readable));
        for s in segments {
            v.push(IoSlice::new(guest_slice(mem, s)?));
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
/// the used ring) mark themselves; this covers the cipher's and the
/// syscalls' writes through the slices above.
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

// Guest memory is shared and mutable behind `&M` by design (see above).
#[allow(clippy::mut_from_ref)]
fn guest_slice<'m, M: GuestMemoryBackend>(
    mem: &'m M,
    s: &Segment,
) -> Result<&'m mut [u8], Unmapped> {
    let len = s.len as usize;
    let vs = mem.get_slice(s.addr, len).map_err(|_| Unmapped)?;
    let vs = vs.get_slice(0, len).map_err(|_| Unmapped)?;
    let ptr = vs.ptr_guard_mut().as_ptr();
    // SAFETY: get_slice checked that [ptr, ptr+len) lies inside one mapped
    // region of `mem`, which stays mapped while `mem` is borrowed. Aliasing
    // with the guest (and between two descriptors a guest points at the
    // same bytes) is discussed in the module comment: each slice is only
    // handed to syscalls and the cipher, never read back by Rust code.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}
