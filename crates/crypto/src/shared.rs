//! Memory that another party may change at any moment: a guest's buffers,
//! which the guest's vCPUs can write while the daemon works on them.
//!
//! Rust assumes that nothing changes memory behind a `&[u8]` and that
//! nothing else sees memory behind a `&mut [u8]`; shared guest memory keeps
//! neither promise, so building such slices over it is unsound whatever the
//! code then does with them. These two types carry a pointer and a length
//! instead and are only ever read or written through raw-pointer copies and
//! the cipher's raw-pointer kernel: the compiler holds no reference to the
//! bytes and assumes nothing about them. (What a guest that races its own
//! I/O gets is garbage in its own buffers, never another guest's data or
//! plaintext in the image.)
//!
//! Constructing one from a raw pointer is `unsafe` (the caller vouches that
//! the bytes stay mapped for the lifetime); from a Rust slice it is safe,
//! for tests and for the daemon's own buffers.

use std::marker::PhantomData;
use std::ptr;

/// Bytes the holder may write (a device-writable descriptor's buffer).
#[derive(Clone, Copy, Debug)]
pub struct SharedMut<'a> {
    ptr: *mut u8,
    len: usize,
    _life: PhantomData<&'a ()>,
}

/// Bytes the holder may only read (a device-readable descriptor's buffer).
#[derive(Clone, Copy, Debug)]
pub struct SharedRef<'a> {
    ptr: *const u8,
    len: usize,
    _life: PhantomData<&'a ()>,
}

// SAFETY: both are a pointer and a length with no thread affinity; the
// memory they name is shared by design (see the module comment).
unsafe impl Send for SharedMut<'_> {}
// SAFETY: as above.
unsafe impl Send for SharedRef<'_> {}

/// What both kinds share: the length, the pointer, and sub-ranges.
macro_rules! ranges {
    ($t:ident, $ptr:ty) => {
        impl $t<'_> {
            pub fn len(&self) -> usize {
                self.len
            }

            pub fn is_empty(&self) -> bool {
                self.len == 0
            }

            pub fn as_ptr(&self) -> $ptr {
                self.ptr
            }

            /// The bytes from `at` on.
            pub fn tail(self, at: usize) -> Self {
                assert!(at <= self.len, "tail {at} of {} bytes", self.len);
                // SAFETY: a sub-range of what `self` vouches for.
                unsafe { Self::from_raw(self.ptr.add(at), self.len - at) }
            }

            /// The first `len` bytes.
            pub fn head(self, len: usize) -> Self {
                assert!(len <= self.len, "head {len} of {} bytes", self.len);
                // SAFETY: a sub-range of what `self` vouches for.
                unsafe { Self::from_raw(self.ptr, len) }
            }
        }
    };
}

ranges!(SharedMut, *mut u8);
ranges!(SharedRef, *const u8);

impl<'a> SharedMut<'a> {
    /// # Safety
    /// `ptr` is valid for reads and writes of `len` bytes for `'a`, and no
    /// Rust reference to those bytes exists while this value is used.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Self {
        SharedMut {
            ptr,
            len,
            _life: PhantomData,
        }
    }

    pub fn from_mut(bytes: &'a mut [u8]) -> Self {
        // SAFETY: the borrow keeps the bytes valid and unaliased for 'a.
        unsafe { Self::from_raw(bytes.as_mut_ptr(), bytes.len()) }
    }

    /// Copies `src` to the start of these bytes.
    pub fn write(&self, src: &[u8]) {
        assert!(
            src.len() <= self.len,
            "{} bytes into {}",
            src.len(),
            self.len
        );
        // SAFETY: `self` is valid for writes of len >= src.len() bytes; `src`
        // is a Rust slice, so it is not these bytes (no reference to them
        // exists).
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, src.len()) }
    }
}

impl<'a> SharedRef<'a> {
    /// # Safety
    /// `ptr` is valid for reads of `len` bytes for `'a`, and no mutable
    /// Rust reference to those bytes exists while this value is used.
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> Self {
        SharedRef {
            ptr,
            len,
            _life: PhantomData,
        }
    }

    pub fn from_ref(bytes: &'a [u8]) -> Self {
        // SAFETY: the borrow keeps the bytes valid and unchanged for 'a.
        unsafe { Self::from_raw(bytes.as_ptr(), bytes.len()) }
    }

    /// Copies the first `dst.len()` bytes into `dst`.
    pub fn read(&self, dst: &mut [u8]) {
        assert!(
            dst.len() <= self.len,
            "{} bytes from {}",
            dst.len(),
            self.len
        );
        // SAFETY: `self` is valid for reads of len >= dst.len() bytes; `dst`
        // is a unique Rust borrow, so it is not these bytes.
        unsafe { ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr(), dst.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_tails_and_copies_stay_inside() {
        let mut buf = [0u8; 8];
        let shared = SharedMut::from_mut(&mut buf);
        shared.tail(2).head(3).write(&[1, 2, 3]);
        assert_eq!(buf, [0, 0, 1, 2, 3, 0, 0, 0]);
        let r = SharedRef::from_ref(&buf);
        let mut out = [0u8; 2];
        r.tail(3).read(&mut out);
        assert_eq!(out, [2, 3]);
    }

    #[test]
    #[should_panic(expected = "bytes into")]
    fn a_write_past_the_end_panics() {
        let mut buf = [0u8; 2];
        SharedMut::from_mut(&mut buf).write(&[1, 2, 3]);
    }
}
