//! A fixed pool of aligned I/O buffers, carved from one allocation.
//!
//! O_DIRECT needs aligned memory, and the kernel must never read or write
//! guest memory (a guest vCPU racing the daemon would see ciphertext, or
//! swap in its own): every byte that goes to or comes from the image passes
//! through one of these buffers. Allocated once per queue, so the data path
//! never allocates, and the pool's size bounds the daemon's memory.

use super::AlignedBuf;

/// Index of one buffer of a [`Buffers`] pool.
pub type BufId = u16;

pub struct Buffers {
    arena: AlignedBuf,
    buf_size: usize,
    free: Vec<BufId>,
    count: usize,
}

impl Buffers {
    /// `count` buffers of `buf_size` bytes (rounded up to whole pages).
    pub fn new(count: usize, buf_size: usize) -> Self {
        let count = count.clamp(1, BufId::MAX as usize);
        let buf_size = buf_size.next_multiple_of(4096);
        Buffers {
            arena: AlignedBuf::new(count * buf_size),
            buf_size,
            // Popped from the end: buffer 0 is used first.
            free: (0..count as BufId).rev().collect(),
            count,
        }
    }

    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    pub fn take(&mut self) -> Option<BufId> {
        self.free.pop()
    }

    pub fn put(&mut self, id: BufId) {
        debug_assert!(!self.free.contains(&id), "buffer {id} returned twice");
        self.free.push(id);
    }

    /// Whether every buffer is back in the pool.
    pub fn all_free(&self) -> bool {
        self.free.len() == self.count
    }

    /// The first `len` bytes of buffer `id`. The caller owns the buffer
    /// (took it and has not handed it to the kernel).
    pub fn bytes_mut(&mut self, id: BufId, len: usize) -> &mut [u8] {
        assert!(len <= self.buf_size);
        self.arena.range_mut(id as usize * self.buf_size, len)
    }

    /// Where buffer `id` starts, for an operation the kernel runs.
    pub fn ptr(&mut self, id: BufId) -> *mut u8 {
        assert!((id as usize) < self.count);
        // SAFETY: id < count, so the offset stays inside the arena.
        unsafe { self.arena.as_mut_ptr().add(id as usize * self.buf_size) }
    }

    /// The whole arena, to register it with the kernel once.
    pub fn arena(&mut self) -> (*mut u8, usize) {
        (self.arena.as_mut_ptr(), self.arena.capacity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_disjoint_aligned_and_bounded() {
        let mut b = Buffers::new(3, 5000);
        assert_eq!(b.buf_size(), 8192);
        let ids: Vec<_> = std::iter::from_fn(|| b.take()).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert!(b.take().is_none(), "a fourth buffer from a pool of three");
        let ptrs: Vec<usize> = ids.iter().map(|&i| b.ptr(i) as usize).collect();
        assert!(ptrs.iter().all(|p| p % 4096 == 0));
        assert_eq!(ptrs[1] - ptrs[0], 8192);
        b.bytes_mut(1, 8192).fill(7);
        assert!(b.bytes_mut(0, 8192).iter().all(|&x| x == 0));
        assert!(b.bytes_mut(2, 8192).iter().all(|&x| x == 0));
        b.put(1);
        assert!(!b.all_free());
        assert_eq!(b.take(), Some(1));
        for id in ids {
            b.put(id);
        }
        assert!(b.all_free());
    }
}
