//! A once-a-second progress line on stderr, for people watching a TTY.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A per-queue completion counter on its own cache line, so queues do not
/// slow each other down by counting.
#[repr(align(64))]
#[derive(Default)]
pub(crate) struct Counter(pub AtomicU64);

/// Prints until `done` is set, then clears the line.
/// `bs` turns I/Os into MiB/s.
pub(crate) fn show(counters: &[Counter], done: &AtomicBool, started: Instant, bs: u64) {
    let mut last = 0u64;
    let mut last_at = started;
    let mut stderr = std::io::stderr();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        if now.duration_since(last_at) < Duration::from_secs(1) {
            continue;
        }
        let total: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
        let rate = (total - last) as f64 / now.duration_since(last_at).as_secs_f64();
        let _ = write!(
            stderr,
            "\r[{:6.1}s] {total} I/Os, {rate:.0} IOPS, {:.1} MiB/s   ",
            now.duration_since(started).as_secs_f64(),
            rate * bs as f64 / (1 << 20) as f64
        );
        let _ = stderr.flush();
        last = total;
        last_at = now;
    }
    let _ = write!(stderr, "\r\x1b[K");
    let _ = stderr.flush();
}
