//! Per-queue counters, filled by one worker without locks or allocation,
//! merged at the end.

use hdrhistogram::Histogram;

use super::pattern::Found;

/// Latencies are recorded in nanoseconds up to one minute (larger values
/// are clamped), with three significant digits.
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// How many mismatches (the lowest offsets) are kept; all are counted.
pub const KEPT_MISMATCHES: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// VIRTIO_BLK_S_IOERR
    IoErr,
    /// VIRTIO_BLK_S_UNSUPP
    Unsupp,
    /// A status byte outside the spec.
    BadStatus,
    /// Refused by the client library before reaching the device.
    Client,
}

impl ErrorKind {
    pub const ALL: [Self; 4] = [Self::IoErr, Self::Unsupp, Self::BadStatus, Self::Client];

    pub fn name(self) -> &'static str {
        match self {
            Self::IoErr => "IOERR",
            Self::Unsupp => "UNSUPP",
            Self::BadStatus => "bad_status",
            Self::Client => "client",
        }
    }

    /// libblkio maps the virtio status to a negative errno.
    pub fn from_ret(ret: i32) -> Self {
        match -ret {
            libc::EIO => Self::IoErr,
            libc::ENOTSUP => Self::Unsupp,
            libc::EPROTO => Self::BadStatus,
            _ => Self::Client,
        }
    }
}

pub(crate) struct DirStats {
    pub ios: u64,
    pub bytes: u64,
    pub latency_ns: Histogram<u64>,
}

impl DirStats {
    pub fn new() -> Self {
        Self {
            ios: 0,
            bytes: 0,
            latency_ns: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    pub fn merge(&mut self, other: &Self) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency_ns.add(&other.latency_ns);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MismatchAt {
    pub offset: u64,
    pub found: Found,
}

pub(crate) struct PhaseStats {
    pub read: DirStats,
    pub write: DirStats,
    pub errors: [u64; 4],
    /// Mismatching 512-byte units and the first few of them.
    pub mismatches: u64,
    pub first_mismatches: Vec<MismatchAt>,
    /// Bytes compared with the pattern.
    pub checked_bytes: u64,
}

impl PhaseStats {
    pub fn new() -> Self {
        Self {
            read: DirStats::new(),
            write: DirStats::new(),
            errors: [0; 4],
            mismatches: 0,
            first_mismatches: Vec::with_capacity(KEPT_MISMATCHES),
            checked_bytes: 0,
        }
    }

    pub fn record(&mut self, write: bool, bytes: u64, latency_ns: u64) {
        let dir = if write {
            &mut self.write
        } else {
            &mut self.read
        };
        dir.ios += 1;
        dir.bytes += bytes;
        dir.latency_ns.saturating_record(latency_ns.max(1));
    }

    pub fn error(&mut self, ret: i32) {
        let kind = ErrorKind::from_ret(ret);
        let index = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(3);
        self.errors[index] += 1;
    }

    pub fn mismatch(&mut self, offset: u64, found: Found) {
        self.mismatches += 1;
        let entry = MismatchAt { offset, found };
        if self.first_mismatches.len() < KEPT_MISMATCHES {
            self.first_mismatches.push(entry);
            return;
        }
        // Keep the lowest offsets: completions arrive in any order.
        let highest = self
            .first_mismatches
            .iter_mut()
            .max_by_key(|m| m.offset)
            .filter(|m| m.offset > offset);
        if let Some(slot) = highest {
            *slot = entry;
        }
    }

    pub fn merge(&mut self, other: &Self) {
        self.read.merge(&other.read);
        self.write.merge(&other.write);
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
        self.mismatches += other.mismatches;
        self.first_mismatches
            .extend_from_slice(&other.first_mismatches);
        self.first_mismatches.sort_by_key(|m| m.offset);
        self.first_mismatches.truncate(KEPT_MISMATCHES);
        self.checked_bytes += other.checked_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_lowest_mismatches_and_counts_all() {
        let mut stats = PhaseStats::new();
        for offset in (0..40u64).rev() {
            stats.mismatch(offset * 512, Found::Zeroes);
        }
        let mut other = PhaseStats::new();
        other.mismatch(0x10_0000, Found::Garbage);
        stats.merge(&other);
        assert_eq!(stats.mismatches, 41);
        let kept: Vec<u64> = stats.first_mismatches.iter().map(|m| m.offset).collect();
        assert_eq!(kept, (0..16u64).map(|o| o * 512).collect::<Vec<_>>());
    }

    #[test]
    fn errors_by_status() {
        let mut stats = PhaseStats::new();
        stats.error(-libc::EIO);
        stats.error(-libc::EIO);
        stats.error(-libc::ENOTSUP);
        stats.error(-libc::EINVAL);
        assert_eq!(stats.errors, [2, 1, 0, 1]);
    }
}
