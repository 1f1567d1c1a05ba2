//! Where the next request goes: the job's offsets and read/write mix, and
//! the read-back of what was written. Each queue owns one part of the
//! region, so queues never race on the same block.

use std::time::Instant;

use super::rng::{mix, SplitMix64};
use super::spec::RwMode;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Op {
    pub offset: u64,
    pub write: bool,
    /// Compare what is read with the pattern.
    pub check: bool,
}

/// A stream of requests for one queue.
pub(crate) trait OpSource {
    fn next(&mut self, now: Instant) -> Option<Op>;
    /// Told about every request that completed without error.
    fn done(&mut self, _op: &Op) {}
}

/// One queue's part of the region: `blocks` blocks of `bs` bytes from `start`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Part {
    pub start: u64,
    pub blocks: u64,
    pub bs: u64,
}

impl Part {
    /// Splits `[start, end)` into `count` parts of whole blocks.
    pub fn split(start: u64, end: u64, bs: u64, count: u64, index: u64) -> Self {
        let total = (end - start) / bs;
        let first = total * index / count;
        let last = total * (index + 1) / count;
        Self {
            start: start + first * bs,
            blocks: last - first,
            bs,
        }
    }

    fn offset(&self, block: u64) -> u64 {
        self.start + block * self.bs
    }
}

/// Which blocks of a part hold the pattern (written in this run).
pub(crate) struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    pub fn new(bits: u64) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    fn set(&mut self, bit: u64) {
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }

    fn get(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }
}

pub(crate) struct WorkloadLimits {
    /// Bytes this queue may issue.
    pub budget: Option<u64>,
    pub deadline: Option<Instant>,
}

/// The job itself: sequential or random offsets, reads and writes mixed.
pub(crate) struct Workload {
    part: Part,
    mode: RwMode,
    rwmixread: u8,
    rng: SplitMix64,
    cursor: u64,
    issued: u64,
    limits: WorkloadLimits,
    /// With verify: blocks known to hold the pattern.
    written: Option<Bitmap>,
    /// Check every read (the region was written with the pattern earlier).
    check_all_reads: bool,
}

impl Workload {
    pub fn new(part: Part, mode: RwMode, rwmixread: u8, seed: u64, limits: WorkloadLimits) -> Self {
        Self {
            part,
            mode,
            rwmixread,
            rng: SplitMix64::new(mix(seed)),
            cursor: 0,
            issued: 0,
            limits,
            written: None,
            check_all_reads: false,
        }
    }

    /// Writes are tracked so they can be checked later.
    pub fn track_writes(mut self) -> Self {
        self.written = Some(Bitmap::new(self.part.blocks));
        self
    }

    pub fn check_all_reads(mut self) -> Self {
        self.check_all_reads = true;
        self
    }

    /// The read-back of everything written so far.
    pub fn into_readback(self) -> Option<Readback> {
        Some(Readback {
            part: self.part,
            written: self.written?,
            next: 0,
        })
    }

    fn exhausted(&self, now: Instant) -> bool {
        self.part.blocks == 0
            || self
                .limits
                .budget
                .is_some_and(|b| self.issued + self.part.bs > b)
            || self.limits.deadline.is_some_and(|d| now >= d)
    }

    fn next_block(&mut self) -> u64 {
        if self.mode.is_random() {
            return self.rng.below(self.part.blocks);
        }
        let block = self.cursor;
        self.cursor = (self.cursor + 1) % self.part.blocks;
        block
    }

    fn next_is_write(&mut self) -> bool {
        match self.mode {
            RwMode::Read | RwMode::RandRead => false,
            RwMode::Write | RwMode::RandWrite => true,
            RwMode::RandRw => self.rng.below(100) >= u64::from(self.rwmixread),
        }
    }
}

impl OpSource for Workload {
    fn next(&mut self, now: Instant) -> Option<Op> {
        if self.exhausted(now) {
            return None;
        }
        let block = self.next_block();
        let write = self.next_is_write();
        let known = self.written.as_ref().is_some_and(|w| w.get(block));
        self.issued += self.part.bs;
        Some(Op {
            offset: self.part.offset(block),
            write,
            check: !write && (self.check_all_reads || known),
        })
    }

    fn done(&mut self, op: &Op) {
        if let (true, Some(written)) = (op.write, self.written.as_mut()) {
            written.set((op.offset - self.part.start) / self.part.bs);
        }
    }
}

/// Reads back, in order, every block a workload wrote.
pub(crate) struct Readback {
    part: Part,
    written: Bitmap,
    next: u64,
}

impl OpSource for Readback {
    fn next(&mut self, _now: Instant) -> Option<Op> {
        while self.next < self.part.blocks {
            let block = self.next;
            self.next += 1;
            if self.written.get(block) {
                return Some(Op {
                    offset: self.part.offset(block),
                    write: false,
                    check: true,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(budget: u64) -> WorkloadLimits {
        WorkloadLimits {
            budget: Some(budget),
            deadline: None,
        }
    }

    #[test]
    fn parts_cover_the_region_without_overlap() {
        let parts: Vec<Part> = (0..3)
            .map(|i| Part::split(1024, 1024 + 10 * 512, 512, 3, i))
            .collect();
        assert_eq!(parts.iter().map(|p| p.blocks).sum::<u64>(), 10);
        assert_eq!(parts[0].start, 1024);
        for pair in parts.windows(2) {
            assert_eq!(pair[0].start + pair[0].blocks * 512, pair[1].start);
        }
    }

    #[test]
    fn sequential_wraps_and_stops_at_budget() {
        let part = Part::split(0, 4 * 4096, 4096, 1, 0);
        let mut w = Workload::new(part, RwMode::Write, 0, 1, limits(6 * 4096));
        let now = Instant::now();
        let offsets: Vec<u64> = std::iter::from_fn(|| w.next(now))
            .map(|o| o.offset)
            .collect();
        assert_eq!(offsets, [0, 4096, 8192, 12288, 0, 4096]);
    }

    #[test]
    fn random_stays_inside_and_mixes() {
        let part = Part::split(8192, 8192 + 100 * 512, 512, 1, 0);
        let mut w = Workload::new(part, RwMode::RandRw, 30, 5, limits(1000 * 512));
        let now = Instant::now();
        let ops: Vec<Op> = std::iter::from_fn(|| w.next(now)).collect();
        assert_eq!(ops.len(), 1000);
        assert!(ops
            .iter()
            .all(|o| (8192..8192 + 100 * 512).contains(&o.offset)));
        let reads = ops.iter().filter(|o| !o.write).count();
        assert!((200..400).contains(&reads), "{reads} reads of 1000 at 30%");
    }

    #[test]
    fn readback_returns_completed_writes_only() {
        let part = Part::split(0, 8 * 512, 512, 1, 0);
        let mut w = Workload::new(part, RwMode::Write, 0, 1, limits(3 * 512)).track_writes();
        let now = Instant::now();
        let ops: Vec<Op> = std::iter::from_fn(|| w.next(now)).collect();
        w.done(&ops[0]);
        w.done(&ops[2]);
        let mut back = w.into_readback().unwrap();
        let offsets: Vec<u64> = std::iter::from_fn(|| back.next(now))
            .map(|o| o.offset)
            .collect();
        assert_eq!(offsets, [0, 1024]);
    }
}
