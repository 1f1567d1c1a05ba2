//! Walking a request's buffers sector by sector.
//!
//! A guest may split its data over descriptors at any byte, so a sector can
//! straddle two buffers. Runs of whole sectors inside one buffer go to the
//! cipher in one call; the rare straddling sector goes through a small stack
//! buffer.

use std::io::{IoSlice, IoSliceMut};

const MAX_SECTOR: usize = 4096;

/// A cursor over mutable buffers.
pub struct Segments<'a, 'b> {
    bufs: &'a mut [IoSliceMut<'b>],
    index: usize,
    offset: usize,
}

impl<'a, 'b> Segments<'a, 'b> {
    pub fn new(bufs: &'a mut [IoSliceMut<'b>]) -> Self {
        Segments {
            bufs,
            index: 0,
            offset: 0,
        }
    }

    fn skip_empty(&mut self) {
        while self.index < self.bufs.len() && self.offset == self.bufs[self.index].len() {
            self.index += 1;
            self.offset = 0;
        }
    }

    /// The rest of the current buffer.
    fn current(&mut self) -> &mut [u8] {
        self.skip_empty();
        match self.bufs.get_mut(self.index) {
            Some(buf) => &mut buf[self.offset..],
            None => &mut [],
        }
    }

    /// Copies `src` into the buffers at the cursor and advances it.
    pub fn copy_from(&mut self, mut src: &[u8]) {
        while !src.is_empty() {
            let dst = self.current();
            if dst.is_empty() {
                return;
            }
            let n = dst.len().min(src.len());
            dst[..n].copy_from_slice(&src[..n]);
            self.offset += n;
            src = &src[n..];
        }
    }

    /// Copies from the buffers at the cursor into `dst` without advancing.
    fn peek_into(&self, dst: &mut [u8]) {
        let (mut index, mut offset, mut done) = (self.index, self.offset, 0);
        while done < dst.len() && index < self.bufs.len() {
            let src = &self.bufs[index][offset..];
            let n = src.len().min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&src[..n]);
            done += n;
            index += 1;
            offset = 0;
        }
    }
}

/// Calls `f(sector_index, run)` over the first `total` bytes of `segs`, in
/// place, where `run` is one or more whole sectors and `sector_index` counts
/// sectors from the start of the buffers.
pub fn for_each_sector_run(
    segs: &mut Segments<'_, '_>,
    total: usize,
    sector_size: usize,
    mut f: impl FnMut(u64, &mut [u8]),
) {
    let mut done = 0;
    while done < total {
        let index = (done / sector_size) as u64;
        let want = total - done;
        let cur = segs.current();
        let whole = cur.len().min(want) / sector_size * sector_size;
        if whole > 0 {
            f(index, &mut cur[..whole]);
            segs.offset += whole;
            done += whole;
        } else {
            let mut tmp = [0u8; MAX_SECTOR];
            let sector = &mut tmp[..sector_size];
            segs.peek_into(sector);
            f(index, sector);
            segs.copy_from(sector);
            done += sector_size;
        }
    }
}

/// A cursor over read-only buffers that fills an output chunk.
pub struct Gather<'a, 'b> {
    bufs: &'a [IoSlice<'b>],
    index: usize,
    offset: usize,
    sector_size: usize,
    sectors_done: u64,
}

impl<'a, 'b> Gather<'a, 'b> {
    pub fn new(bufs: &'a [IoSlice<'b>], sector_size: usize) -> Self {
        Gather {
            bufs,
            index: 0,
            offset: 0,
            sector_size,
            sectors_done: 0,
        }
    }

    fn current(&mut self) -> &'a [u8] {
        while self.index < self.bufs.len() && self.offset == self.bufs[self.index].len() {
            self.index += 1;
            self.offset = 0;
        }
        match self.bufs.get(self.index) {
            Some(buf) => &buf[self.offset..],
            None => &[],
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
            dst[done..done + n].copy_from_slice(&src[..n]);
            self.offset += n;
            done += n;
        }
    }

    /// Fills `chunk` (whole sectors) by calling `f(sector_index, src, dst)`
    /// for runs of whole sectors, `sector_index` counting from the start of
    /// all buffers across calls.
    pub fn encrypt_into(&mut self, chunk: &mut [u8], mut f: impl FnMut(u64, &[u8], &mut [u8])) {
        let mut done = 0;
        while done < chunk.len() {
            let src = self.current();
            let sector = self.sector_size;
            let whole = src.len().min(chunk.len() - done) / sector * sector;
            let index = self.sectors_done;
            if whole > 0 {
                f(index, &src[..whole], &mut chunk[done..done + whole]);
                self.offset += whole;
                done += whole;
                self.sectors_done += (whole / sector) as u64;
            } else {
                let mut tmp = [0u8; MAX_SECTOR];
                self.take(&mut tmp[..sector]);
                f(index, &tmp[..sector], &mut chunk[done..done + sector]);
                done += sector;
                self.sectors_done += 1;
            }
        }
    }
}
