//! Many requests in flight per queue (io_uring): a raw frontend posts
//! hundreds of requests at once and then disconnects, races the daemon on
//! its own read buffers, uses buffers at odd addresses and lengths, mixes a
//! FLUSH into the writes, and sends SIGTERM with writes in flight; and the
//! daemon falls back to synchronous I/O where the kernel refuses io_uring.

mod support;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::hostile::*;
use support::{pattern, write_key, Client, Daemon, PatternDisk};

const PAYLOAD: u64 = 8 << 20;
const SECTORS: u64 = PAYLOAD / 512;
const QSIZE: u16 = 256;

type Setup = PatternDisk;

/// A daemon on a fresh 8 MiB image (written in full, so O_DIRECT reads
/// really go to the disk), logging to a file the test reads afterwards.
fn serve(cipher: &str, extra: &[&str]) -> Setup {
    serve_sized(PAYLOAD, cipher, extra)
}

fn serve_sized(bytes: u64, cipher: &str, extra: &[&str]) -> Setup {
    let mut args = vec!["--queue-size", "256"];
    args.extend_from_slice(extra);
    PatternDisk::serve(bytes, cipher, &args)
}

fn assert_no_panic(s: &Setup) {
    let log = s.log_text();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

/// Data buffer of batch request `i`, `len` bytes each, from DATA on.
fn buf(i: u16, len: u32) -> u64 {
    let at = DATA + u64::from(i) * u64::from(len);
    assert!(at + u64::from(len) <= BATCH, "test bug: buffers overflow");
    at
}

/// Posts `n` requests of `len` bytes at distinct sectors and waits for all.
fn batch(g: &mut RawGuest, kind: u32, n: u16, len: u32) {
    for i in 0..n {
        let sector = u64::from(i) * u64::from(len / 512);
        g.post(i, kind, sector, &[(buf(i, len), len)], kind == T_IN);
    }
    let used = g.used_entries(n as usize, Duration::from_secs(30));
    assert_eq!(used.len(), n as usize, "completions of a batch of {n}");
    for i in 0..n {
        assert_eq!(g.batch_status(i), S_OK, "request {i}");
    }
}

/// The guest's buffers hold `len` bytes of `byte` per request.
fn fill(g: &RawGuest, n: u16, len: u32, byte: u8) {
    for i in 0..n {
        g.mem.write(buf(i, len), &vec![byte; len as usize]);
    }
}

/// Every mode that runs requests asynchronously, and the synchronous path.
const MODES: [&[&str]; 4] = [
    &["--direct"],
    &["--io", "pread"],
    &[
        "--direct",
        "--crypto",
        "workers",
        "--split-threshold",
        "64K",
    ],
    &["--direct", "--aio", "sync"],
];

#[test]
fn hundreds_of_reads_in_flight_then_a_disconnect_50_times_and_the_next_client_is_served() {
    for mode in [&["--direct"][..], &["--io", "pread"]] {
        let mut s = serve("aes-xts-plain64", mode);
        let mut cut_short = 0;
        for _ in 0..50 {
            let mut g = RawGuest::connect(&s.daemon.socket, QSIZE);
            for i in 0..200u16 {
                let sector = (u64::from(i) * 16) % SECTORS;
                g.post(i, T_IN, sector, &[(buf(i, 8192), 8192)], true);
            }
            if g.used_index() < 200 {
                cut_short += 1;
            }
            drop(g);
        }
        // Not vacuous: requests really were in flight at some disconnects.
        assert!(
            cut_short > 0,
            "{mode:?}: every batch completed before the disconnect"
        );
        assert!(s.daemon.alive(), "{mode:?}: the daemon died");
        let mut c = Client::connect(&s.daemon.socket, 1);
        let data = pattern(99, 4096, 65536);
        assert_eq!(c.write(0, 4096, &data), 0);
        assert_eq!(c.read(0, 4096, data.len()).unwrap(), data);
        drop(c);
        assert_no_panic(&s);
        assert!(s.daemon.alive());
        let status = std::mem::replace(&mut s.daemon, dead()).terminate();
        assert_eq!(status.code(), Some(0), "{mode:?}: exit after SIGTERM");
    }
}

/// A placeholder after the real daemon was moved out for `terminate`.
fn dead() -> Daemon {
    let child = std::process::Command::new("true").spawn().unwrap();
    Daemon::adopt(child, PathBuf::new())
}

/// A guest that overwrites its read buffers with a marker while the reads
/// are in flight must only ever end up with plaintext or its own marker:
/// never ciphertext (which it could then swap for its own and have the
/// daemon decrypt: a decryption oracle under the volume key).
#[test]
fn a_guest_racing_its_read_buffers_never_gets_ciphertext_or_decrypted_garbage() {
    const PLAIN: u8 = 0x11;
    const MARK: u8 = 0xee;
    const N: u16 = 64;
    const LEN: u32 = 16384;
    for mode in MODES {
        let s = serve("aes-xts-plain64", mode);
        let mut g = RawGuest::connect(&s.daemon.socket, QSIZE);
        fill(&g, N, LEN, PLAIN);
        batch(&mut g, T_OUT, N, LEN);
        let span = (buf(N - 1, LEN) + u64::from(LEN) - DATA) as usize;
        let base = g.mem.va(DATA) as usize;
        let mut saw_plain = false;
        for _ in 0..20 {
            fill(&g, N, LEN, MARK);
            let stop = Arc::new(AtomicBool::new(false));
            let racer = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for off in (0..span).step_by(512) {
                            // SAFETY: inside the test's own guest memory
                            // mapping, which outlives this thread (joined
                            // below); volatile, as the daemon shares it.
                            unsafe { std::ptr::write_volatile((base + off) as *mut u8, MARK) };
                        }
                    }
                })
            };
            for i in 0..N {
                let sector = u64::from(i) * u64::from(LEN / 512);
                g.post(i, T_IN, sector, &[(buf(i, LEN), LEN)], true);
            }
            let used = g.used_entries(N as usize, Duration::from_secs(30));
            stop.store(true, Ordering::Relaxed);
            racer.join().unwrap();
            assert_eq!(used.len(), N as usize, "{mode:?}");
            let got = g.mem.read(DATA, span);
            let bad = got.iter().filter(|&&b| b != PLAIN && b != MARK).count();
            assert_eq!(
                bad, 0,
                "{mode:?}: {bad} bytes are neither plaintext nor the marker"
            );
            saw_plain |= got.contains(&PLAIN);
        }
        assert!(saw_plain, "{mode:?}: no read ever delivered plaintext");
        assert_no_panic(&s);
    }
}

/// Buffers at odd guest addresses, split at odd lengths, read and write
/// correctly with O_DIRECT (whose alignment rules never reach the guest).
#[test]
fn unaligned_guest_buffers_read_and_write_correctly() {
    for mode in MODES {
        let s = serve("aes-xts-plain64", mode);
        let mut g = RawGuest::connect(&s.daemon.socket, QSIZE);
        let data = pattern(5, 0, 8192);
        let out = [
            (DATA + 1, 1000u32),
            (DATA + 5003, 3096),
            (DATA + 20007, 4096),
        ];
        let mut at = 0;
        for &(addr, len) in &out {
            g.mem.write(addr, &data[at..at + len as usize]);
            at += len as usize;
        }
        g.post(0, T_OUT, 24, &out, false);
        assert_eq!(g.used_entries(1, Duration::from_secs(10)).len(), 1);
        assert_eq!(g.batch_status(0), S_OK, "{mode:?}: write");

        let back = [
            (DATA + 40001, 4095u32),
            (DATA + 50013, 1),
            (DATA + 60011, 4096),
        ];
        g.post(1, T_IN, 24, &back, true);
        assert_eq!(g.used_entries(1, Duration::from_secs(10)).len(), 1);
        assert_eq!(g.batch_status(1), S_OK, "{mode:?}: read");
        let got: Vec<u8> = back
            .iter()
            .flat_map(|&(addr, len)| g.mem.read(addr, len as usize))
            .collect();
        assert_eq!(got, data, "{mode:?}: read back");
        assert_no_panic(&s);
    }
}

/// QD64 writes with a FLUSH among them, completed out of order, all land:
/// a plaintext image (--cipher none) shows every write at its place.
#[test]
fn writes_with_a_flush_among_them_all_land() {
    const N: u16 = 100;
    const LEN: u32 = 8192;
    for mode in MODES {
        let s = serve("none", mode);
        let mut g = RawGuest::connect(&s.daemon.socket, QSIZE);
        let mut expected = Vec::new();
        for i in 0..N {
            let data = pattern(u64::from(i) + 1000, 0, LEN as usize);
            g.mem.write(buf(i, LEN), &data);
            expected.push(data);
        }
        for i in 0..N {
            if i == N / 2 {
                g.post(N, T_FLUSH, 0, &[], false);
            }
            let sector = u64::from(i) * 37 % (SECTORS - 16);
            g.post(i, T_OUT, sector, &[(buf(i, LEN), LEN)], false);
        }
        let used = g.used_entries(N as usize + 1, Duration::from_secs(30));
        assert_eq!(used.len(), N as usize + 1, "{mode:?}");
        let image = std::fs::read(&s.image).unwrap();
        // Later writes to an overlapping place win only if they completed
        // later; use distinct places: 37 is prime to the spacing used here.
        for i in 0..=N {
            assert_eq!(g.batch_status(i), S_OK, "{mode:?}: request {i}");
        }
        for i in 0..N {
            let at = (u64::from(i) * 37 % (SECTORS - 16) * 512) as usize;
            let overlapped = (0..N).any(|j| {
                let other = (u64::from(j) * 37 % (SECTORS - 16) * 512) as usize;
                j != i && other.abs_diff(at) < LEN as usize
            });
            if !overlapped {
                assert_eq!(
                    &image[at..at + LEN as usize],
                    &expected[i as usize][..],
                    "{mode:?}: write {i}"
                );
            }
        }
        assert_no_panic(&s);
    }
}

/// A request larger than the whole buffer pool (16 MiB per queue): a
/// 32 MiB WRITE_ZEROES waits for buffers piece by piece while reads go on
/// beside it, and every byte of it reads back as zeros.
#[test]
fn a_request_larger_than_the_buffer_pool_waits_for_buffers() {
    const ZEROES: u64 = 32 << 20;
    for mode in [&["--direct"][..], &["--io", "pread"]] {
        let s = serve_sized(48 << 20, "none", mode);
        let mut g = RawGuest::connect(&s.daemon.socket, QSIZE);
        let mut range = [0u8; 16];
        range[..8].copy_from_slice(&(4096u64 / 512).to_le_bytes());
        range[8..12].copy_from_slice(&((ZEROES / 512) as u32).to_le_bytes());
        g.mem.write(RANGE, &range);
        g.post(0, T_WRITE_ZEROES, 0, &[(RANGE, 16)], false);
        for i in 1..33u16 {
            let sector = (40 << 20) / 512 + u64::from(i) * 16;
            g.post(i, T_IN, sector, &[(buf(i, 8192), 8192)], true);
        }
        let used = g.used_entries(33, Duration::from_secs(60));
        assert_eq!(used.len(), 33, "{mode:?}");
        for i in 0..33u16 {
            assert_eq!(g.batch_status(i), S_OK, "{mode:?}: request {i}");
        }
        let image = std::fs::read(&s.image).unwrap();
        let zeroed = &image[4096..4096 + ZEROES as usize];
        assert!(
            zeroed.iter().all(|&b| b == 0),
            "{mode:?}: a byte of the range is not zero"
        );
        assert_ne!(image[4095], 0, "{mode:?}: zeroed before the range");
        assert_no_panic(&s);
    }
}

/// Review bug 4, guest memory half: a VMM that shrinks the guest memory
/// file under the daemon's mapping raises SIGBUS in the daemon. The daemon
/// seals sealable guest memory against shrinking on SET_MEM_TABLE, and
/// warns about memory it cannot seal (the control), where a truncation
/// costs the VMM its connection (tests/guest_truncation.rs).
#[test]
fn guest_memory_is_sealed_against_shrinking_where_it_can_be() {
    let s = serve("aes-xts-plain64", &[]);
    let g = RawGuest::handshake_sealable(&s.daemon.socket).expect("handshake");
    let err = g
        .truncate_memory(4096)
        .expect_err("shrinking sealed guest memory");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    drop(g);
    assert!(
        !s.log_text().contains("cannot be sealed"),
        "{}",
        s.log_text()
    );
    // Memory that cannot be sealed is served, with a warning.
    let g = RawGuest::handshake(&s.daemon.socket).expect("handshake");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !s.log_text().contains("cannot be sealed") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        s.log_text().contains("cannot be sealed against shrinking"),
        "{}",
        s.log_text()
    );
    assert!(g.connected());
    assert_no_panic(&s);
}

/// SIGTERM with writes in flight: exit 0, and every write the guest saw
/// completed is in the image.
#[test]
fn sigterm_with_writes_in_flight_exits_0_and_keeps_every_completed_write() {
    const N: u16 = 200;
    const LEN: u32 = 8192;
    let mut in_flight_at_sigterm = 0;
    for mode in [&["--direct"][..], &["--io", "pread"]] {
        let mut s = serve("none", mode);
        let mut g = RawGuest::connect(&s.daemon.socket, QSIZE);
        for i in 0..N {
            g.mem
                .write(buf(i, LEN), &pattern(u64::from(i) + 5, 0, LEN as usize));
        }
        for i in 0..N {
            g.post(i, T_OUT, u64::from(i) * 16, &[(buf(i, LEN), LEN)], false);
        }
        // SIGTERM once the daemon is busy with the batch.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while g.used_index() == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        in_flight_at_sigterm += usize::from(N - g.used_index().min(N));
        s.daemon.signal(libc::SIGTERM);
        let status = s.daemon.wait_exit(Duration::from_secs(30));
        assert_eq!(
            status.code(),
            Some(0),
            "{mode:?}: {status:?} {}",
            s.log_text()
        );
        let used = g.used_entries(N as usize, Duration::from_millis(100));
        let image = std::fs::read(&s.image).unwrap();
        for &(head, _) in &used {
            let i = head as u16;
            assert_eq!(
                g.batch_status(i),
                S_OK,
                "{mode:?}: write {i}: {}",
                s.log_text()
            );
            let at = i as usize * 16 * 512;
            assert_eq!(
                &image[at..at + LEN as usize],
                &pattern(u64::from(i) + 5, 0, LEN as usize)[..],
                "{mode:?}: completed write {i} is not in the image"
            );
        }
        assert!(!used.is_empty(), "{mode:?}: nothing completed");
        assert_no_panic(&s);
    }
    assert!(
        in_flight_at_sigterm > 0,
        "SIGTERM never met a write in flight"
    );
}

/// Where the kernel refuses io_uring (a container's seccomp profile, the
/// io_uring_disabled sysctl), the daemon warns once and serves
/// synchronously; where it allows it, no warning.
#[test]
fn without_io_uring_the_daemon_warns_and_serves_synchronously() {
    for refuse in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let (key, _) = write_key(dir.path(), 64);
        let log = dir.path().join("daemon.log");
        let args = [
            "--image",
            image.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--direct",
            "--queues",
            "2",
        ];
        let stderr: Stdio = std::fs::File::create(&log).unwrap().into();
        let filter = refuse_io_uring_setup();
        let mut daemon = Daemon::start_command(dir.path(), &args, stderr, |cmd| {
            if refuse {
                // SAFETY: only async-signal-safe calls between fork and
                // exec: prctl and seccomp with a prebuilt program.
                unsafe {
                    cmd.pre_exec(move || {
                        seccompiler::apply_filter(&filter).map_err(std::io::Error::other)
                    })
                };
            }
        });
        let mut c = Client::connect(&daemon.socket, 2);
        for q in 0..2 {
            let data = pattern(q as u64, 0, 32768);
            assert_eq!(c.write(q, 65536 * q as u64, &data), 0);
            assert_eq!(c.read(q, 65536 * q as u64, data.len()).unwrap(), data);
        }
        drop(c);
        assert!(daemon.alive());
        let status = daemon.terminate();
        assert_eq!(status.signal(), None);
        let text = std::fs::read_to_string(&log).unwrap();
        let warnings = text.matches("io_uring is not available").count();
        assert_eq!(warnings, usize::from(refuse), "refused: {refuse}\n{text}");
    }
}

/// A seccomp program that makes io_uring_setup fail with ENOSYS, as an old
/// kernel or a container runtime's default profile does.
fn refuse_io_uring_setup() -> seccompiler::BpfProgram {
    let rules = [(libc::SYS_io_uring_setup, vec![])].into_iter().collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap();
    filter.try_into().unwrap()
}
