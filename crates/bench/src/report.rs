//! The result of a job: serialisable for scripts, printable for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::pattern::Found;
use super::size::format_size;
use super::spec::JobSpec;
use super::stats::{DirStats, ErrorKind, PhaseStats};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobSummary {
    pub socket: String,
    pub rw: String,
    pub rwmixread: u8,
    pub bs: u64,
    pub iodepth: u32,
    pub queues: u32,
    pub offset: u64,
    pub len: u64,
    pub size: Option<u64>,
    pub runtime_secs: Option<f64>,
    pub seed: u64,
    pub verify: bool,
    pub verify_only: bool,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DirReport {
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mib_per_sec: f64,
    pub latency_us: Latency,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Mismatch {
    /// Device byte offset of the mismatching 512-byte unit.
    pub offset: u64,
    pub found: Found,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub checked_bytes: u64,
    /// Mismatching 512-byte units.
    pub mismatches: u64,
    /// The lowest-offset ones among those kept.
    pub first_mismatches: Vec<Mismatch>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonCpu {
    pub pid: u32,
    pub cpu_secs: f64,
    pub us_per_io: f64,
    /// CPU time over wall time, in percent of one core.
    pub percent_of_one_core: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub job: JobSummary,
    /// Wall time of the measured phase (read-back for verify excluded).
    pub elapsed_secs: f64,
    pub read: DirReport,
    pub write: DirReport,
    pub total: DirReport,
    /// Failed requests by virtio status, over all phases.
    pub errors: BTreeMap<String, u64>,
    pub verify: Option<VerifyReport>,
    pub daemon_cpu: Option<DaemonCpu>,
}

impl Report {
    pub fn mismatches(&self) -> u64 {
        self.verify.as_ref().map_or(0, |v| v.mismatches)
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// No failed request and no mismatch.
    pub fn is_clean(&self) -> bool {
        self.mismatches() == 0 && self.error_count() == 0
    }

    /// Human-readable table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let j = &self.job;
        let _ = writeln!(
            out,
            "{} bs={} iodepth={} queues={} region={}+{} seed={}  ({:.2} s, {})",
            if j.verify_only { "verify-only" } else { &j.rw },
            format_size(j.bs),
            j.iodepth,
            j.queues,
            j.offset,
            format_size(j.len),
            j.seed,
            self.elapsed_secs,
            j.socket
        );
        let _ = writeln!(
            out,
            "{:<6} {:>11} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "", "IOPS", "MiB/s", "I/Os", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"
        );
        for (name, dir) in [
            ("read", &self.read),
            ("write", &self.write),
            ("total", &self.total),
        ] {
            if dir.ios == 0 && name != "total" {
                continue;
            }
            let l = &dir.latency_us;
            let _ = writeln!(
                out,
                "{name:<6} {:>11.0} {:>10.1} {:>10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                dir.iops, dir.mib_per_sec, dir.ios, l.p50, l.p90, l.p99, l.p99_9, l.max
            );
        }
        self.write_errors(&mut out);
        self.write_verify(&mut out);
        if let Some(cpu) = &self.daemon_cpu {
            let _ = writeln!(
                out,
                "daemon pid {}: {:.2} s CPU, {:.2} us/IO, {:.0}% of one core",
                cpu.pid, cpu.cpu_secs, cpu.us_per_io, cpu.percent_of_one_core
            );
        }
        out
    }

    fn write_errors(&self, out: &mut String) {
        if self.errors.is_empty() {
            let _ = writeln!(out, "errors: none");
            return;
        }
        let parts: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "errors: {}", parts.join(" "));
    }

    fn write_verify(&self, out: &mut String) {
        let Some(v) = &self.verify else { return };
        let _ = writeln!(
            out,
            "verify: {} checked, {} mismatching 512-byte units",
            format_size(v.checked_bytes),
            v.mismatches
        );
        for m in &v.first_mismatches {
            let _ = writeln!(out, "  at {:#x}: {:?}", m.offset, m.found);
        }
        if v.mismatches > v.first_mismatches.len() as u64 {
            let _ = writeln!(out, "  ...");
        }
    }
}

pub(crate) fn summarize_job(spec: &JobSpec, region: (u64, u64)) -> JobSummary {
    JobSummary {
        socket: spec.socket.display().to_string(),
        rw: spec.rw.name().to_string(),
        rwmixread: spec.rwmixread,
        bs: spec.bs,
        iodepth: spec.iodepth,
        queues: spec.queues,
        offset: region.0,
        len: region.1 - region.0,
        size: spec.size,
        runtime_secs: spec.runtime.map(|r| r.as_secs_f64()),
        seed: spec.seed,
        verify: spec.verify,
        verify_only: spec.verify_only,
    }
}

fn latency(hist: &Histogram<u64>) -> Latency {
    if hist.is_empty() {
        return Latency::default();
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Latency {
        mean: hist.mean() / 1000.0,
        p50: us(hist.value_at_quantile(0.50)),
        p90: us(hist.value_at_quantile(0.90)),
        p99: us(hist.value_at_quantile(0.99)),
        p99_9: us(hist.value_at_quantile(0.999)),
        max: us(hist.max()),
    }
}

fn dir_report(dir: &DirStats, elapsed: Duration) -> DirReport {
    let secs = elapsed.as_secs_f64().max(1e-9);
    DirReport {
        ios: dir.ios,
        bytes: dir.bytes,
        iops: dir.ios as f64 / secs,
        mib_per_sec: dir.bytes as f64 / secs / (1 << 20) as f64,
        latency_us: latency(&dir.latency_ns),
    }
}

pub(crate) struct Measured {
    pub main: PhaseStats,
    pub readback: Option<PhaseStats>,
    pub elapsed: Duration,
    pub daemon_cpu: Option<(u32, Duration)>,
}

pub(crate) fn build(summary: JobSummary, m: Measured, verifying: bool) -> Report {
    let mut total = DirStats::new();
    total.merge(&m.main.read);
    total.merge(&m.main.write);
    let mut all = PhaseStats::new();
    all.merge(&m.main);
    if let Some(back) = &m.readback {
        all.merge(back);
    }
    let errors = ErrorKind::ALL
        .iter()
        .zip(all.errors)
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.name().to_string(), n))
        .collect();
    let verify = verifying.then(|| VerifyReport {
        checked_bytes: all.checked_bytes,
        mismatches: all.mismatches,
        first_mismatches: all
            .first_mismatches
            .iter()
            .map(|x| Mismatch {
                offset: x.offset,
                found: x.found,
            })
            .collect(),
    });
    let ios = total.ios;
    Report {
        job: summary,
        elapsed_secs: m.elapsed.as_secs_f64(),
        read: dir_report(&m.main.read, m.elapsed),
        write: dir_report(&m.main.write, m.elapsed),
        total: dir_report(&total, m.elapsed),
        errors,
        verify,
        daemon_cpu: m.daemon_cpu.map(|(pid, cpu)| DaemonCpu {
            pid,
            cpu_secs: cpu.as_secs_f64(),
            us_per_io: cpu.as_secs_f64() * 1e6 / ios.max(1) as f64,
            percent_of_one_core: 100.0 * cpu.as_secs_f64() / m.elapsed.as_secs_f64().max(1e-9),
        }),
    }
}
