//! A reusable, page-aligned scratch buffer (O_DIRECT needs aligned memory).

use std::alloc::{alloc_zeroed, dealloc, Layout};

const ALIGN: usize = 4096;

/// Owned, page-aligned bytes of fixed capacity. One per vring or worker
/// thread, allocated once: the data path never allocates per request.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let len = len.max(ALIGN).next_multiple_of(ALIGN);
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    pub fn capacity(&self) -> usize {
        self.len
    }

    /// The first `len` bytes (at most the capacity).
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        self.range_mut(0, len)
    }

    /// `len` bytes from byte `at`, within the capacity.
    pub fn range_mut(&mut self, at: usize, len: usize) -> &mut [u8] {
        assert!(at <= self.len && len <= self.len - at);
        // SAFETY: the range lies inside the allocation, which holds self.len
        // initialised bytes, and &mut self makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at), len) }
    }

    /// The start of the allocation, for the kernel (io_uring fills and
    /// drains it while no Rust slice over it exists).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // Scratch may hold plaintext-derived data only as ciphertext, but a
        // direct read decrypts here: wipe before returning it to the heap.
        zeroize::Zeroize::zeroize(self.slice_mut(self.len));
        let layout = Layout::from_size_align(self.len, ALIGN).expect("valid layout");
        // SAFETY: allocated in new() with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}
