//! Memory for secrets: page-aligned, mlock'ed (never swapped), excluded
//! from core dumps, wiped and unlocked on drop; plus the process-wide
//! "not dumpable" switch and unbuffered secret reads.
//!
//! Each [`Locked`] value owns whole pages: munlock is not reference counted,
//! so two secrets sharing a page would unlock each other on drop.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::io::{self, Read};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Once;

use zeroize::{Zeroize, Zeroizing};

/// A `T` on pages of its own that are mlock'ed while it lives. On drop `T`'s
/// own destructor runs, then every byte of the pages is zeroized.
///
/// What this does not cover: a value passed to [`Locked::new`] was built on
/// the stack first, and that stack copy is not wiped. Callers that can fill
/// the locked memory in place (see [`Locked::zeroed_bytes`]) should.
pub struct Locked<T> {
    ptr: NonNull<T>,
    layout: Layout,
    locked: bool,
}

// SAFETY: Locked<T> owns its T exclusively, like Box<T>.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out &T, like Box<T>.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    pub fn new(value: T) -> Self {
        let page = page_size();
        let size = std::mem::size_of::<T>().max(1).next_multiple_of(page);
        let align = std::mem::align_of::<T>().max(page);
        let layout = Layout::from_size_align(size, align).expect("page-sized layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            handle_alloc_error(layout)
        };
        let locked = lock_pages(raw, size);
        // SAFETY: ptr is valid for writes of T (size and alignment above).
        unsafe { ptr.as_ptr().write(value) };
        Locked {
            ptr,
            layout,
            locked,
        }
    }

    /// Whether mlock succeeded for this value's pages.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl<const N: usize> Locked<[u8; N]> {
    /// Zeroed bytes, to be filled in place (no stack copy of the secret).
    pub fn zeroed_bytes() -> Self {
        Locked::new([0u8; N])
    }
}

impl<T> Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: ptr holds an initialised T for our whole lifetime.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref, and &mut self makes the access exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        let raw = self.ptr.as_ptr().cast::<u8>();
        // SAFETY: the T is initialised and dropped exactly once, here; then
        // the allocation is plain bytes we own until dealloc.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            std::slice::from_raw_parts_mut(raw, self.layout.size()).zeroize();
            if self.locked {
                libc::munlock(raw.cast(), self.layout.size());
            }
            dealloc(raw, self.layout);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// mlock + MADV_DONTDUMP; a failure is a warning (once), never fatal: the
/// secret is still wiped on drop, it may just reach swap.
fn lock_pages(raw: *mut u8, size: usize) -> bool {
    // SAFETY: raw..raw+size is one page-aligned allocation we own.
    let rc = unsafe { libc::mlock(raw.cast(), size) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        static WARN: Once = Once::new();
        WARN.call_once(|| {
            log::warn!(
                "cannot mlock key memory ({err}); keys may reach swap. Raise the memlock \
                 limit (ulimit -l, LimitMEMLOCK= in systemd) or grant CAP_IPC_LOCK"
            )
        });
    }
    // SAFETY: advice only, on pages we own; failure is harmless.
    unsafe { libc::madvise(raw.cast(), size, libc::MADV_DONTDUMP) };
    rc == 0
}

/// PR_SET_DUMPABLE 0: no core dumps, and other users' processes (and
/// non-root ptrace) cannot read our memory or /proc/PID/mem.
pub fn forbid_core_dumps() {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        log::warn!(
            "cannot mark the process non-dumpable: {}; a core dump could hold the key",
            io::Error::last_os_error()
        );
    }
}

/// Reads at most `limit` bytes from `r` into zeroizing memory. Grows by
/// copying into a fresh zeroizing buffer, so no reallocation leaves an
/// unwiped copy of a partial secret on the heap.
pub fn read_secret(mut r: impl Read, limit: u64) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(limit.min(4096) as usize));
    loop {
        if buf.len() as u64 >= limit {
            return Ok(buf);
        }
        if buf.len() == buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(buf.capacity() * 2));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        let want = (buf.capacity() - buf.len()).min((limit - buf.len() as u64) as usize);
        let start = buf.len();
        buf.resize(start + want, 0);
        match r.read(&mut buf[start..]) {
            Ok(0) => {
                buf.truncate(start);
                return Ok(buf);
            }
            Ok(n) => buf.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(start),
            Err(e) => return Err(e),
        }
    }
}

/// Standard input without std's buffer: `io::stdin()` keeps what it read in
/// a static buffer that is never wiped, which would leave a key behind.
pub struct RawStdin;

impl Read for RawStdin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_values_are_page_aligned_locked_and_usable() {
        let mut k = Locked::<[u8; 64]>::zeroed_bytes();
        k.copy_from_slice(&[7u8; 64]);
        assert_eq!(k[63], 7);
        assert_eq!(k.ptr.as_ptr() as usize % page_size(), 0);
        // Root or a memlock limit of at least a page (the default is 8 MiB).
        assert!(k.is_locked(), "mlock failed: check ulimit -l");
        let two = Locked::new(String::from("s"));
        assert_eq!(&*two, "s");
    }

    #[test]
    fn secrets_are_read_whole_up_to_the_limit() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        assert_eq!(&read_secret(&data[..], 1 << 20).unwrap()[..], &data[..]);
        assert_eq!(&read_secret(&data[..], 65).unwrap()[..], &data[..65]);
        assert!(read_secret(&[][..], 10).unwrap().is_empty());
    }
}
