//! Walking a request's buffers sector by sector.
//!
//! A guest may split its data over descriptors at any byte, so a sector can
//! straddle two buffers. Runs of whole sectors inside one buffer go to the
//! cipher in one call; the rare straddling sector goes through a small stack
//! buffer. The buffers are guest memory, reached only as `SharedMut` /
//! `SharedRef` (see crypto's `shared` module): never as Rust slices.

use crate::crypto::{SharedMut, SharedRef};

const MAX_SECTOR: usize = 4096;

/// A cursor over device-writable buffers.
pub struct Scatter<'a, 'b> {
    bufs: &'a [SharedMut<'b>],
    index: usize,
    offset: usize,
}

impl<'a, 'b> Scatter<'a, 'b> {
    pub fn new(bufs: &'a [SharedMut<'b>]) -> Self {
        Scatter {
            bufs,
            index: 0,
            offset: 0,
        }
    }

    /// The rest of the current buffer (empty at the end).
    fn current(&mut self) -> SharedMut<'b> {
        while self.index < self.bufs.len() && self.offset == self.bufs[self.index].len() {
            self.index += 1;
            self.offset = 0;
        }
        match self.bufs.get(self.index) {
            Some(buf) => buf.tail(self.offset),
            None => SharedMut::from_mut(&mut []),
        }
    }

    /// Copies `src` into the buffers at the cursor and advances it.
    fn write(&mut self, mut src: &[u8]) {
        while !src.is_empty() {
            let dst = self.current();
            if dst.is_empty() {
                return;
            }
            let n = dst.len().min(src.len());
            dst.write(&src[..n]);
            self.offset += n;
            src = &src[n..];
        }
    }

    /// Fills the buffers at the cursor from `src` (whole sectors) by calling
    /// `f(sector_index, src_run, dst)` for runs of whole sectors, where
    /// `sector_index` counts sectors from the start of `src`.
    pub fn fill_sectors(
        &mut self,
        src: &[u8],
        sector_size: usize,
        mut f: impl FnMut(u64, &[u8], SharedMut<'_>),
    ) {
        let mut done = 0;
        while done < src.len() {
            let index = (done / sector_size) as u64;
            let cur = self.current();
            let whole = cur.len().min(src.len() - done) / sector_size * sector_size;
            if whole > 0 {
                f(index, &src[done..done + whole], cur.head(whole));
                self.offset += whole;
                done += whole;
            } else {
                let mut tmp = [0u8; MAX_SECTOR];
                let sector = &mut tmp[..sector_size];
                f(
                    index,
                    &src[done..done + sector_size],
                    SharedMut::from_mut(sector),
                );
                self.write(sector);
                done += sector_size;
            }
        }
    }
}

/// A cursor over device-readable buffers that fills an output chunk.
pub struct Gather<'a, 'b> {
    bufs: &'a [SharedRef<'b>],
    index: usize,
    offset: usize,
    sector_size: usize,
    sectors_done: u64,
}

impl<'a, 'b> Gather<'a, 'b> {
    pub fn new(bufs: &'a [SharedRef<'b>], sector_size: usize) -> Self {
        Gather {
            bufs,
            index: 0,
            offset: 0,
            sector_size,
            sectors_done: 0,
        }
    }

    fn current(&mut self) -> SharedRef<'b> {
        while self.index < self.bufs.len() && self.offset == self.bufs[self.index].len() {
            self.index += 1;
            self.offset = 0;
        }
        match self.bufs.get(self.index) {
            Some(buf) => buf.tail(self.offset),
            None => SharedRef::from_ref(&[]),
        }
    }

    fn take(&mut self, dst: &mut [u8]) {
        let mut done = 0;
        while done < dst.len() {
            let src = self.current();
            if src.is_empty() {
                return;
            }
            let n = src.len().min(dst.len() - done);
            src.read(&mut dst[done..done + n]);
            self.offset += n;
            done += n;
        }
    }

    /// Fills `chunk` (whole sectors) by calling `f(sector_index, src, dst)`
    /// for runs of whole sectors, `sector_index` counting from the start of
    /// all buffers across calls.
    pub fn encrypt_into(
        &mut self,
        chunk: &mut [u8],
        mut f: impl FnMut(u64, SharedRef<'_>, &mut [u8]),
    ) {
        let mut done = 0;
        while done < chunk.len() {
            let src = self.current();
            let sector = self.sector_size;
            let whole = src.len().min(chunk.len() - done) / sector * sector;
            let index = self.sectors_done;
            if whole > 0 {
                f(index, src.head(whole), &mut chunk[done..done + whole]);
                self.offset += whole;
                done += whole;
                self.sectors_done += (whole / sector) as u64;
            } else {
                let mut tmp = [0u8; MAX_SECTOR];
                self.take(&mut tmp[..sector]);
                f(
                    index,
                    SharedRef::from_ref(&tmp[..sector]),
                    &mut chunk[done..done + sector],
                );
                done += sector;
                self.sectors_done += 1;
            }
        }
    }
}
