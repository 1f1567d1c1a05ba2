//! One queue's engine: keeps `iodepth` requests in flight from an
//! `OpSource`, times them and checks reads. Everything it needs per
//! request (slots, buffers, descriptors, completions) is allocated once.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, ReqFlags};

use super::device::QueueMemory;
use super::error::{blkio_message, BenchError};
use super::pattern;
use super::stats::PhaseStats;
use super::workload::{Op, OpSource};

#[derive(Clone, Copy)]
struct Slot {
    op: Op,
    started: Instant,
}

pub(crate) struct Pipeline {
    index: usize,
    queue: Blkioq,
    memory: QueueMemory,
    bs: usize,
    seed: u64,
    /// Fill each write with the pattern of its offset (else the buffers
    /// keep what they were filled with once).
    pattern_writes: bool,
    slots: Vec<Slot>,
    free: Vec<usize>,
    segments: usize,
    iovecs: Vec<libc::iovec>,
    completions: Vec<MaybeUninit<Completion>>,
    stall_timeout: Duration,
}

// SAFETY: the iovecs only point into `memory`, which is `Send` (a part of the
// shared region that this pipeline alone uses); moving the pipeline to its
// worker thread moves that sole use along.
unsafe impl Send for Pipeline {}

pub(crate) struct PipelineConfig {
    pub index: usize,
    pub bs: usize,
    pub seed: u64,
    pub pattern_writes: bool,
    pub segment_len: usize,
    pub stall_timeout: Duration,
}

impl Pipeline {
    pub fn new(queue: Blkioq, memory: QueueMemory, config: PipelineConfig) -> Self {
        let depth = memory.slots;
        let segments = config.bs.div_ceil(config.segment_len);
        let idle = Slot {
            op: Op {
                offset: 0,
                write: false,
                check: false,
            },
            started: Instant::now(),
        };
        let mut pipeline = Self {
            index: config.index,
            queue,
            bs: config.bs,
            seed: config.seed,
            pattern_writes: config.pattern_writes,
            slots: vec![idle; depth],
            free: (0..depth).rev().collect(),
            segments,
            iovecs: Vec::with_capacity(depth * segments),
            completions: (0..depth).map(|_| MaybeUninit::uninit()).collect(),
            stall_timeout: config.stall_timeout,
            memory,
        };
        pipeline.build_iovecs(config.segment_len);
        pipeline.prefill();
        pipeline
    }

    /// Descriptors for every slot, cut at the device's segment length.
    fn build_iovecs(&mut self, segment_len: usize) {
        for slot in 0..self.memory.slots {
            let base = self.buffer_ptr(slot);
            for seg in 0..self.segments {
                let start = seg * segment_len;
                self.iovecs.push(libc::iovec {
                    // SAFETY: start < bs <= slot_len, inside this slot's buffer.
                    iov_base: unsafe { base.add(start) }.cast(),
                    iov_len: segment_len.min(self.bs - start),
                });
            }
        }
    }

    /// Gives the write buffers non-trivial content once, so a plain
    /// benchmark never writes zeroes a backend might treat specially.
    fn prefill(&mut self) {
        let (seed, bs) = (self.seed, self.bs);
        for slot in 0..self.memory.slots {
            pattern::fill(self.buffer(slot), seed, (slot * bs) as u64);
        }
    }

    fn buffer_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.memory.slots);
        // SAFETY: slot < slots, so the offset stays inside this queue's memory.
        unsafe { self.memory.base.add(slot * self.memory.slot_len) }
    }

    /// The buffer of a slot that has no request in flight.
    fn buffer(&mut self, slot: usize) -> &mut [u8] {
        // SAFETY: the memory is ours and mapped (see QueueMemory); callers
        // only touch slots the device is not using.
        unsafe { std::slice::from_raw_parts_mut(self.buffer_ptr(slot), self.bs) }
    }

    /// Runs `source` dry: issues until it has nothing more, then drains.
    pub fn run(
        &mut self,
        source: &mut dyn OpSource,
        stats: &mut PhaseStats,
        progress: &AtomicU64,
    ) -> Result<(), BenchError> {
        let mut in_flight = 0usize;
        let mut now = Instant::now();
        loop {
            in_flight += self.issue(source, now);
            if in_flight == 0 {
                return Ok(());
            }
            let reaped = self.reap(1, in_flight)?;
            now = Instant::now();
            for i in 0..reaped {
                // SAFETY: do_io initialised the first `reaped` entries.
                let completion = unsafe { self.completions[i].assume_init_read() };
                self.complete(&completion, now, source, stats);
            }
            in_flight -= reaped;
            progress.fetch_add(reaped as u64, Ordering::Relaxed);
        }
    }

    /// Waits for at least `min` completions (submitting what is queued).
    fn reap(&mut self, min: usize, in_flight: usize) -> Result<usize, BenchError> {
        let mut timeout = self.stall_timeout;
        self.queue
            .do_io(&mut self.completions, min, Some(&mut timeout), None)
            .map_err(|e| {
                if e.errno() == blkio::Errno::TIME {
                    BenchError::Stalled {
                        queue: self.index,
                        secs: self.stall_timeout.as_secs_f64(),
                        in_flight,
                    }
                } else {
                    BenchError::Io {
                        queue: self.index,
                        message: blkio_message(&e),
                    }
                }
            })
    }

    /// Fills free slots from `source`; returns how many were issued.
    fn issue(&mut self, source: &mut dyn OpSource, now: Instant) -> usize {
        let mut issued = 0;
        while let Some(slot) = self.free.pop() {
            let Some(op) = source.next(now) else {
                self.free.push(slot);
                break;
            };
            self.submit(slot, op, now);
            issued += 1;
        }
        issued
    }

    fn submit(&mut self, slot: usize, op: Op, now: Instant) {
        if op.write && self.pattern_writes {
            let seed = self.seed;
            pattern::fill(self.buffer(slot), seed, op.offset);
        }
        self.slots[slot] = Slot { op, started: now };
        let iov = self.iovecs[slot * self.segments..].as_ptr();
        let count = self.segments as u32;
        if op.write {
            self.queue
                .writev(op.offset, iov, count, slot, ReqFlags::empty());
        } else {
            self.queue
                .readv(op.offset, iov, count, slot, ReqFlags::empty());
        }
    }

    fn complete(
        &mut self,
        completion: &Completion,
        now: Instant,
        source: &mut dyn OpSource,
        stats: &mut PhaseStats,
    ) {
        let slot_index = completion.user_data;
        let slot = self.slots[slot_index];
        self.free.push(slot_index);
        if completion.ret != 0 {
            stats.error(completion.ret);
            return;
        }
        let latency = now.saturating_duration_since(slot.started).as_nanos() as u64;
        stats.record(slot.op.write, self.bs as u64, latency);
        if slot.op.check {
            let seed = self.seed;
            let buffer = self.buffer(slot_index);
            pattern::check(buffer, seed, slot.op.offset, |offset, found| {
                stats.mismatch(offset, found)
            });
            stats.checked_bytes += self.bs as u64;
        }
        source.done(&slot.op);
    }
}

impl Pipeline {
    /// Asks the device to make completed writes durable (fio's end_fsync),
    /// so a later `--verify-only` survives a daemon restart.
    pub fn flush(&mut self, stats: &mut PhaseStats) -> Result<(), BenchError> {
        self.queue.flush(usize::MAX, ReqFlags::empty());
        let reaped = self.reap(1, 1)?;
        if reaped == 1 {
            // SAFETY: do_io initialised the first `reaped` entries.
            let completion = unsafe { self.completions[0].assume_init_read() };
            if completion.ret != 0 {
                stats.error(completion.ret);
            }
        }
        Ok(())
    }
}
