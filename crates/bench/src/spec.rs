//! What to run: a job description independent of the CLI, and its
//! checks against the device geometry.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::BenchError;
use super::pattern::UNIT;

pub const MIN_BS: u64 = 512;
pub const MAX_BS: u64 = 4 << 20;
/// libvhost-user (QEMU's backends) refuses rings larger than this.
pub const MAX_IODEPTH: u32 = 1024;
pub const MAX_QUEUES: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RwMode {
    Read,
    Write,
    RandRead,
    RandWrite,
    RandRw,
}

impl RwMode {
    pub fn is_random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite | Self::RandRw)
    }

    pub fn writes(self) -> bool {
        matches!(self, Self::Write | Self::RandWrite | Self::RandRw)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
            Self::RandRw => "randrw",
        }
    }
}

/// One load-generator job. `JobSpec::new` gives fio-like defaults.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub socket: PathBuf,
    pub rw: RwMode,
    /// Percentage of reads in `randrw`.
    pub rwmixread: u8,
    /// Request size in bytes: a multiple of 512 from 512 B to 4 MiB.
    pub bs: u64,
    /// Requests kept in flight on each queue.
    pub iodepth: u32,
    /// Virtqueues, one thread each.
    pub queues: u32,
    /// Stop after this long...
    pub runtime: Option<Duration>,
    /// ...or after this many bytes in total (whichever first). With
    /// neither, one pass over the region.
    pub size: Option<u64>,
    /// The region: start byte and length (default: to the end of the device).
    pub offset: u64,
    pub len: Option<u64>,
    /// Seeds the offsets, the read/write mix and the verify pattern.
    pub seed: u64,
    /// Writes carry the pattern and are read back and compared afterwards;
    /// reads of blocks known to hold the pattern are checked as they come.
    pub verify: bool,
    /// Only read the region once and compare it with the pattern of `seed`.
    pub verify_only: bool,
    /// The target daemon, whose CPU time per I/O is reported.
    pub pid: Option<u32>,
    /// Print a progress line on stderr once a second.
    pub progress: bool,
    /// Give up when the backend does not answer the connection, or no
    /// request completes, for this long: a daemon that died leaves its
    /// requests pending forever, and one busy with another frontend never
    /// answers.
    pub stall_timeout: Duration,
}

impl JobSpec {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            rw: RwMode::RandRead,
            rwmixread: 50,
            bs: 4096,
            iodepth: 1,
            queues: 1,
            runtime: None,
            size: None,
            offset: 0,
            len: None,
            seed: 1,
            verify: false,
            verify_only: false,
            pid: None,
            progress: false,
            stall_timeout: Duration::from_secs(30),
        }
    }

    /// Whether the job issues writes (verify-only never does).
    pub fn writes(&self) -> bool {
        !self.verify_only && self.rw.writes()
    }

    /// Checks what can be checked without the device.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::InvalidSpec(m));
        if !(MIN_BS..=MAX_BS).contains(&self.bs) || !self.bs.is_multiple_of(UNIT as u64) {
            return bad(format!(
                "--bs {} must be a multiple of 512 between 512 and 4m",
                self.bs
            ));
        }
        if !(1..=MAX_IODEPTH).contains(&self.iodepth) {
            return bad(format!("--iodepth must be 1..={MAX_IODEPTH}"));
        }
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return bad(format!("--queues must be 1..={MAX_QUEUES}"));
        }
        if self.rwmixread > 100 {
            return bad("--rwmixread is a percentage (0..=100)".into());
        }
        if !self.offset.is_multiple_of(UNIT as u64)
            || self.len.is_some_and(|l| l % UNIT as u64 != 0)
        {
            return bad("--offset and --len must be multiples of 512".into());
        }
        if self.runtime.is_some_and(|r| r.is_zero()) || self.size == Some(0) {
            return bad("--runtime and --size must be positive".into());
        }
        if self.stall_timeout.is_zero() {
            return bad("the stall timeout must be positive".into());
        }
        if self.verify && self.verify_only {
            return bad("use either --verify or --verify-only".into());
        }
        Ok(())
    }

    /// The byte region `[start, end)` on a device of `capacity` bytes.
    pub fn region(&self, capacity: u64) -> Result<(u64, u64), BenchError> {
        let len = match self.len {
            Some(len) => len,
            None => capacity.saturating_sub(self.offset),
        };
        let end = self.offset.checked_add(len).filter(|&e| e <= capacity);
        match end {
            Some(end) if len >= self.bs => Ok((self.offset, end)),
            _ => Err(BenchError::InvalidSpec(format!(
                "the region (offset {}, len {len}) must hold at least one {}-byte block \
                 inside the device's {capacity} bytes",
                self.offset, self.bs
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(JobSpec::new("/tmp/s").validate().is_ok());
    }

    #[test]
    fn rejects_bad_sizes_and_conflicts() {
        let base = JobSpec::new("/tmp/s");
        for bs in [0, 256, 1000, 8 << 20] {
            let spec = JobSpec { bs, ..base.clone() };
            assert!(spec.validate().is_err(), "bs {bs}");
        }
        let spec = JobSpec {
            verify: true,
            verify_only: true,
            ..base.clone()
        };
        assert!(spec.validate().is_err());
        let spec = JobSpec {
            offset: 100,
            ..base
        };
        assert!(spec.validate().is_err());
    }

    #[test]
    fn region_fits_the_device() {
        let spec = JobSpec {
            offset: 4096,
            ..JobSpec::new("/s")
        };
        assert_eq!(spec.region(1 << 20).unwrap(), (4096, 1 << 20));
        let spec = JobSpec {
            len: Some(1 << 20),
            ..spec
        };
        assert!(spec.region(1 << 20).is_err());
        assert!(JobSpec::new("/s").region(2048).is_err());
    }
}
