//! No plaintext after crashes, and no lost acknowledged write: the daemon is
//! SIGKILLed while a VMM stand-in (`support::writer`, a child process)
//! writes 1 MiB requests of a recognisable plaintext marker at queue depth
//! 1, on every I/O path and crypto placement. After each kill the image
//! file, as the crash left it, must not hold the marker anywhere (at any
//! byte offset); then a restarted daemon must read back every write that
//! was acknowledged before the kill. A control run with `--cipher none`
//! must find the marker, which shows the scan finds what it looks for.
//!
//! What could leave plaintext behind: any path that stores the guest's
//! bytes in the image (the shared mapping, a pwrite, an io_uring buffer, a
//! worker's part) and encrypts them there afterwards, or a part of a split
//! request written before it was encrypted. A SIGKILL in that window leaves
//! the plaintext on disk; with 1 MiB writes in a debug build the window
//! would be most of each request's time.

mod support;
use std::path::Path;
use std::time::{Duration, Instant};

use support::writer::{self, find_marker, Fill, Job, Writer, MARKER_TAG};
use support::*;

/// Not a test on its own: the VMM stand-in (`support::writer`).
#[test]
#[ignore = "the child process of the crash tests, run by them"]
fn writer_process() {
    writer::child_main()
}

const SLOT: usize = 1 << 20;
const SLOTS: u64 = 4;

fn job(round: u64) -> Job {
    Job {
        fill: Fill::Marker,
        seed: round + 1,
        block: SLOT,
        blocks: SLOTS,
    }
}

/// SIGKILLs the daemon `kills` times during marker writes; returns whether
/// any image scan found the marker (asserting it never does when
/// `encrypted`).
fn kill_during_writes(mode: &[&str], encrypted: bool, kills: u64) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    // Allocated and cached up front: the kills then land in the daemon's
    // own work rather than in block allocation for a sparse image.
    std::fs::write(&img, vec![0u8; SLOTS as usize * SLOT]).unwrap();
    let (img_s, key_s) = (img.to_str().unwrap(), key.to_str().unwrap());
    let mut args = vec!["--image", img_s, "--size", "4M", "--queues", "1"];
    if encrypted {
        args.extend(["--key-file", key_s]);
    } else {
        args.extend(["--cipher", "none"]);
    }
    args.extend_from_slice(mode);
    let mut found = false;
    let mut busy = 0;
    for round in 0..kills {
        let mut d = Daemon::start(dir.path(), &args);
        let mut w = Writer::spawn(&d.socket, job(round));
        // Kill during the write after the 1st, 2nd or 3rd acknowledged
        // one, at a different point of it each round, while one of the
        // daemon's threads is at work on it if that can be caught.
        w.wait_acks(1 + (round % 3) as usize);
        std::thread::sleep(Duration::from_micros(round * 300));
        if wait_for_busy_thread(d.pid, Duration::from_secs(2)) {
            busy += 1;
        }
        d.signal(libc::SIGKILL);
        let status = d.wait_exit(Duration::from_secs(20));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "round {round}: the daemon ended before the kill: {status}"
        );
        drop(d);
        let acked = w.kill();

        let image = std::fs::read(&img).unwrap();
        if let Some(at) = find_marker(&image) {
            assert!(
                !encrypted,
                "{mode:?} round {round}: plaintext marker {:?} at byte {at} of the image after SIGKILL",
                String::from_utf8_lossy(MARKER_TAG)
            );
            found = true;
        }

        let d = Daemon::start(dir.path(), &args);
        verify_acknowledged(&d.socket, job(round), &acked, mode, round);
        assert!(d.terminate().success());
    }
    eprintln!("{mode:?}: {kills} kills, {busy} while a daemon thread was running");
    found
}

/// Polls until a thread of `pid` other than its main thread (which only
/// accepts connections) is running, for at most `limit`; false if none was
/// seen running.
fn wait_for_busy_thread(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        for task in tasks.flatten() {
            let tid = task.file_name();
            if tid.to_str() == Some(&pid.to_string()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            // tid (comm) STATE ...
            if stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3)) == Some("R") {
                return true;
            }
        }
    }
    false
}

/// Every slot's last acknowledged write reads back, except the slot of the
/// write that was in flight at the kill (acknowledged number + 1), which
/// may hold part of either.
fn verify_acknowledged(socket: &Path, job: Job, acked: &[u64], mode: &[&str], round: u64) {
    assert!(!acked.is_empty());
    let in_flight = acked.len() as u64 % job.blocks;
    let mut c = Client::connect(socket, 1);
    let mut checked = 0;
    for slot in (0..job.blocks).filter(|&s| s != in_flight) {
        let Some(&last) = acked.iter().rev().find(|&&i| i % job.blocks == slot) else {
            continue;
        };
        let got = c.read(0, job.offset(last), job.block).expect("read back");
        assert!(
            got == job.data(last),
            "{mode:?} round {round}: acknowledged write {last} (slot {slot}) does not read back"
        );
        checked += 1;
    }
    // The first acknowledged write's slot is never the one in flight
    // (1 to 3 acks, 4 slots).
    assert!(checked >= 1, "no acknowledged write was checked");
}

const KILLS: u64 = 16;

/// The worker placement, with a split threshold that 1 MiB writes cross.
const WORKERS: [&str; 6] = [
    "--crypto",
    "workers",
    "--workers",
    "2",
    "--split-threshold",
    "64K",
];

#[test]
fn mmap_inline() {
    kill_during_writes(&["--io", "mmap", "--crypto", "inline"], true, KILLS);
}

#[test]
fn mmap_workers() {
    kill_during_writes(&[&["--io", "mmap"][..], &WORKERS].concat(), true, KILLS);
}

#[test]
fn pread_inline() {
    kill_during_writes(&["--io", "pread", "--crypto", "inline"], true, KILLS);
}

#[test]
fn pread_workers() {
    kill_during_writes(&[&["--io", "pread"][..], &WORKERS].concat(), true, KILLS);
}

#[test]
fn direct_inline() {
    kill_during_writes(&["--direct", "--crypto", "inline"], true, KILLS);
}

#[test]
fn direct_workers() {
    kill_during_writes(&[&["--direct"][..], &WORKERS].concat(), true, KILLS);
}

/// The control: the same kills with `--cipher none` must leave the marker
/// in the image, or the scan above proves nothing.
#[test]
fn control_plaintext_is_found() {
    for io in ["mmap", "pread"] {
        assert!(
            kill_during_writes(&["--io", io], false, 2),
            "--io {io}: the scan did not find the plaintext marker"
        );
    }
}

#[test]
fn the_marker_scan_finds_the_tag_at_any_offset() {
    for at in [0usize, 1, 7, 4087, 4096 - 8] {
        let mut bytes = vec![0u8; 4096];
        bytes[at..at + 8].copy_from_slice(MARKER_TAG);
        assert_eq!(find_marker(&bytes), Some(at));
    }
    assert_eq!(find_marker(&[0u8; 4096]), None);
    assert_eq!(find_marker(&MARKER_TAG[..7]), None);
}
