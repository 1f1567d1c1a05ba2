//! `cryptblk bench`: an fio-like load generator for any vhost-user-blk
//! socket, built on libblkio's `virtio-blk-vhost-user` driver.
//!
//! One thread per virtqueue keeps `iodepth` requests in flight over its own
//! part of the region; buffers live in one shared-memory region mapped into
//! the daemon. With `verify`, every 512-byte unit written carries a pattern
//! derived from (seed, offset), and is read back and compared.
//!
//! ```no_run
//! use cryptblk_bench::{run, JobSpec, RwMode};
//! let spec = JobSpec { rw: RwMode::RandWrite, size: Some(4 << 20), verify: true,
//!                      ..JobSpec::new("/tmp/vhost.sock") };
//! let report = run(&spec)?;
//! assert_eq!(report.mismatches(), 0);
//! # Ok::<(), cryptblk_bench::BenchError>(())
//! ```

pub mod cli;
mod cpu;
mod device;
mod error;
pub mod listening;
pub mod pattern;
mod progress;
mod report;
mod rng;
pub mod size;
mod spec;
mod stats;
mod worker;
mod workload;

pub use cli::BenchArgs;
pub use error::BenchError;
pub use report::{DaemonCpu, DirReport, JobSummary, Latency, Mismatch, Report, VerifyReport};
pub use spec::{JobSpec, RwMode};

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Barrier;
use std::time::Instant;

use blkio::Blkioq;

use device::Device;
use progress::Counter;
use stats::PhaseStats;
use worker::{Pipeline, PipelineConfig};
use workload::{Part, Workload, WorkloadLimits};

/// Runs one job against `spec.socket` and reports what it measured.
pub fn run(spec: &JobSpec) -> Result<Report, BenchError> {
    spec.validate()?;
    let (device, queues) = Device::open(spec)?;
    let region = spec.region(device.capacity)?;
    let pipelines = build_pipelines(spec, &device, queues);
    let counters: Vec<Counter> = (0..spec.queues).map(|_| Counter::default()).collect();
    let barrier = Barrier::new(pipelines.len() + 1);
    let done = AtomicBool::new(false);
    let cpu_before = spec.pid.map(cpu::cpu_time).transpose()?;
    let started = Instant::now();
    let plan = Plan::new(spec, region, started);

    let (outcomes, elapsed, cpu_after) = std::thread::scope(|s| {
        let handles: Vec<_> = pipelines
            .into_iter()
            .zip(&counters)
            .enumerate()
            .map(|(i, (pipeline, counter))| {
                let (plan, barrier) = (&plan, &barrier);
                s.spawn(move || run_queue(plan, i, pipeline, barrier, &counter.0))
            })
            .collect();
        if spec.progress {
            s.spawn(|| progress::show(&counters, &done, started, spec.bs));
        }
        barrier.wait();
        let elapsed = started.elapsed();
        let cpu_after = spec.pid.map(cpu::cpu_time);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let outcomes: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().map_err(|_| BenchError::WorkerPanic(i))?)
            .collect();
        (outcomes, elapsed, cpu_after)
    });
    drop(device);

    let mut main = PhaseStats::new();
    let mut readback: Option<PhaseStats> = None;
    for outcome in outcomes {
        let (queue_main, queue_back) = outcome?;
        main.merge(&queue_main);
        if let Some(back) = queue_back {
            readback.get_or_insert_with(PhaseStats::new).merge(&back);
        }
    }
    let daemon_cpu = match (spec.pid, cpu_before, cpu_after) {
        (Some(pid), Some(before), Some(after)) => Some((pid, after?.saturating_sub(before))),
        _ => None,
    };
    let measured = report::Measured {
        main,
        readback,
        elapsed,
        daemon_cpu,
    };
    let summary = report::summarize_job(spec, region);
    Ok(report::build(
        summary,
        measured,
        spec.verify || spec.verify_only,
    ))
}

fn build_pipelines(spec: &JobSpec, device: &Device, queues: Vec<Blkioq>) -> Vec<Pipeline> {
    let depth = spec.iodepth as usize;
    queues
        .into_iter()
        .enumerate()
        .map(|(i, queue)| {
            let config = PipelineConfig {
                index: i,
                bs: spec.bs as usize,
                seed: spec.seed,
                pattern_writes: spec.verify,
                segment_len: device.segment_len,
                stall_timeout: spec.stall_timeout,
            };
            Pipeline::new(queue, device.queue_memory(i, depth), config)
        })
        .collect()
}

/// What every queue needs to build its own workload.
struct Plan {
    spec: JobSpec,
    region: (u64, u64),
    /// Total bytes to issue over all queues, if bounded.
    size: Option<u64>,
    deadline: Option<Instant>,
}

impl Plan {
    fn new(spec: &JobSpec, region: (u64, u64), started: Instant) -> Self {
        let one_pass = region.1 - region.0;
        let size = match (spec.verify_only, spec.size, spec.runtime) {
            (true, _, _) => None,
            (false, None, None) => Some(one_pass),
            (false, size, _) => size,
        };
        Self {
            spec: spec.clone(),
            region,
            size,
            deadline: spec
                .runtime
                .filter(|_| !spec.verify_only)
                .map(|r| started + r),
        }
    }

    fn workload(&self, index: usize) -> Workload {
        let spec = &self.spec;
        let (count, i) = (u64::from(spec.queues), index as u64);
        let part = Part::split(self.region.0, self.region.1, spec.bs, count, i);
        let seed = spec.seed ^ i.wrapping_mul(0x0100_0000_01b3);
        if spec.verify_only {
            let limits = WorkloadLimits {
                budget: Some(part.blocks * spec.bs),
                deadline: None,
            };
            return Workload::new(part, RwMode::Read, 100, seed, limits).check_all_reads();
        }
        let budget = self.size.map(|size| {
            let blocks = size / spec.bs;
            (blocks * (i + 1) / count - blocks * i / count) * spec.bs
        });
        let limits = WorkloadLimits {
            budget,
            deadline: self.deadline,
        };
        let workload = Workload::new(part, spec.rw, spec.rwmixread, seed, limits);
        match (spec.verify, spec.rw.writes()) {
            (true, true) => workload.track_writes(),
            (true, false) => workload.check_all_reads(),
            (false, _) => workload,
        }
    }
}

type QueueOutcome = Result<(PhaseStats, Option<PhaseStats>), BenchError>;

/// One queue's thread: the measured phase, then (not measured) a flush
/// after writes and the read-back of verified writes.
fn run_queue(
    plan: &Plan,
    index: usize,
    mut pipeline: Pipeline,
    barrier: &Barrier,
    counter: &AtomicU64,
) -> QueueOutcome {
    let mut workload = plan.workload(index);
    let mut main = PhaseStats::new();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        pipeline.run(&mut workload, &mut main, counter)
    }));
    // Arrive even after a failure, or the other threads would wait forever.
    barrier.wait();
    match outcome {
        Ok(result) => result?,
        Err(panic) => resume_unwind(panic),
    }
    if plan.spec.writes() {
        pipeline.flush(&mut main)?;
    }
    let readback = match workload.into_readback() {
        Some(mut source) => {
            let mut stats = PhaseStats::new();
            pipeline.run(&mut source, &mut stats, counter)?;
            Some(stats)
        }
        None => None,
    };
    Ok((main, readback))
}
