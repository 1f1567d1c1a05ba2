//! Review bug 4, guest memory half (issue #12): a VMM that truncates guest
//! memory the daemon could not seal (here a memfd made without
//! MFD_ALLOW_SEALING, like a /dev/shm or hugetlbfs file) must not end the
//! daemon with SIGBUS. The request whose copy hit the truncated memory gets
//! no success, that VMM's connection is closed with one error in the log,
//! and the next VMM is served. Before the fix the daemon died of SIGBUS at
//! the first such copy.
//!
//! Every path that copies into or out of guest memory: the page-cache
//! mapping inline (`--io mmap`, the default) and in the worker pool, and
//! io_uring (`--io pread`, `--direct`), where a read is decrypted from a
//! pool buffer into guest memory when the disk completes it.
//!
//! The control that the truncation happened and hit memory the daemon was
//! using: the file's size after it, a child of the test reading the same
//! guest address dies of SIGBUS (and did not before), and the daemon's
//! error line, which only its SIGBUS handler's count in a guest memory
//! region can trigger.

mod support;
use std::time::Duration;

use support::hostile::*;
use support::{pattern, wait_until, Client, PatternDisk};

const PAYLOAD: u64 = 8 << 20;
const QSIZE: u16 = 16;
/// The guest memory file keeps its first 64 KiB (rings, header, status);
/// DATA, where the requests' buffers are, lies just past it.
const KEEP: u64 = DATA - GPA_BASE;
const LEN: u32 = 64 << 10;
/// What the daemon logs when the VMM truncated guest memory under a copy.
const REPORT: &str = "the VMM truncated guest memory it shares with cryptblk";

type Setup = PatternDisk;

fn serve(extra: &[&str]) -> Setup {
    PatternDisk::serve(PAYLOAD, "aes-xts-plain64", extra)
}

/// One connection: a request of `kind` with its data at DATA is served,
/// then the VMM truncates guest memory below DATA and posts the same
/// request again: it must not succeed, and the daemon must close the
/// connection and stay up.
fn truncate_under(s: &mut Setup, kind: u32, what: &str) {
    let mut g = RawGuest::connect(&s.daemon.socket, QSIZE);
    let data_flags = if kind == T_IN { F_WRITE } else { 0 };
    g.mem.header(kind, 8);
    let before = g.submit(&chain3(DATA, LEN, data_flags));
    assert!(
        matches!(before, Outcome::Used { status: S_OK, .. }),
        "{what}: before the truncation: {before:?}"
    );
    assert!(
        !g.mem.read_faults(DATA),
        "{what}: the probe faults on memory that is still there"
    );

    g.truncate_memory(KEEP)
        .expect("truncate unsealable guest memory");
    assert_eq!(g.memory_file_len(), KEEP, "{what}: not truncated");
    assert!(
        g.mem.read_faults(DATA),
        "{what}: the request's buffer is still backed after the truncation"
    );
    g.mem.header(kind, 16);
    let after = g.submit(&chain3(DATA, LEN, data_flags));
    assert!(
        matches!(
            after,
            Outcome::Used {
                status: S_IOERR,
                ..
            } | Outcome::Closed
        ),
        "{what}: a copy into truncated guest memory must not succeed: {after:?}"
    );
    wait_until(
        Duration::from_secs(10),
        "the daemon closes the VMM's connection",
        || !g.connected(),
    );
    assert!(
        s.daemon.alive(),
        "{what}: the daemon died:\n{}",
        s.log_text()
    );
}

fn truncated_guest_memory_ends_the_connection_not_the_daemon(mode: &[&str]) {
    let mut s = serve(mode);
    truncate_under(&mut s, T_IN, "read into guest memory");
    let log = s.log_text();
    // The daemon could not seal this memory: otherwise the truncation
    // would have failed with EPERM.
    assert!(log.contains("cannot be sealed against shrinking"), "{log}");
    assert_eq!(log.matches(REPORT).count(), 1, "{log}");

    truncate_under(&mut s, T_OUT, "write from guest memory");
    let log = s.log_text();
    assert_eq!(
        log.matches(REPORT).count(),
        2,
        "one report per connection:\n{log}"
    );

    // The next VMM is served: what it writes reads back.
    let mut c = Client::connect(&s.daemon.socket, 1);
    let data = pattern(99, 0, 256 << 10);
    assert_eq!(c.write(0, 1 << 20, &data), 0);
    assert_eq!(c.read(0, 1 << 20, data.len()).unwrap(), data);
    drop(c);
    let log = s.log_text();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    let log_file = s.log.clone();
    let status = s.daemon.terminate();
    assert!(
        status.success(),
        "{status}:\n{}",
        std::fs::read_to_string(log_file).unwrap_or_default()
    );
}

#[test]
fn truncated_guest_memory_mmap_inline() {
    truncated_guest_memory_ends_the_connection_not_the_daemon(&["--io", "mmap"]);
}

#[test]
fn truncated_guest_memory_mmap_workers() {
    truncated_guest_memory_ends_the_connection_not_the_daemon(&[
        "--io",
        "mmap",
        "--crypto",
        "workers",
        "--split-threshold",
        "4K",
    ]);
}

#[test]
fn truncated_guest_memory_io_uring_pread() {
    truncated_guest_memory_ends_the_connection_not_the_daemon(&["--io", "pread"]);
}

#[test]
fn truncated_guest_memory_io_uring_direct() {
    truncated_guest_memory_ends_the_connection_not_the_daemon(&["--direct"]);
}
