//! Guest-triggered errors are logged at debug level, plus at most one
//! warning per interval: a hostile guest cannot flood the host's log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct RateLimited {
    interval_secs: u64,
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimited {
    pub const fn new(interval_secs: u64) -> Self {
        RateLimited {
            interval_secs,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Logs `msg` at debug level, and at warn level if the interval passed.
    pub fn warn(&self, msg: std::fmt::Arguments<'_>) {
        log::debug!("{msg}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last.load(Ordering::Relaxed);
        if now >= last + self.interval_secs
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let more = self.suppressed.swap(0, Ordering::Relaxed);
            log::warn!("{msg} ({more} similar messages suppressed; RUST_LOG=debug shows all)");
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
