//! Faults an operator meets: a VMM killed mid-write, a full or shrunken
//! image, SIGTERM or a crash of the daemon under load, O_DIRECT. The rule
//! checked everywhere: what the daemon acknowledged is there afterwards, and
//! the daemon keeps serving.
//!
//! Acknowledged writes are known exactly: a child process (this test binary,
//! re-run as `writer_process`, see `support::writer`) writes blocks in order
//! at queue depth 1 and prints each write after its completion, before
//! submitting the next; whatever the parent has read from its stdout was
//! acknowledged.

mod support;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::writer::{self, Fill, Job, Writer};
use support::*;

const BLOCK: usize = 4096;
/// The writer cycles over this many blocks (1 MiB).
const BLOCKS: u64 = 256;

/// Not a test on its own: the VMM stand-in the other tests kill
/// (`support::writer`).
#[test]
#[ignore = "the child process of the writer tests, run by them"]
fn writer_process() {
    writer::child_main()
}

fn job(seed: u64) -> Job {
    Job {
        fill: Fill::Pattern,
        seed,
        block: BLOCK,
        blocks: BLOCKS,
    }
}

/// The blocks that writes `acked` went to.
fn blocks(acked: &[u64]) -> Vec<u64> {
    acked.iter().map(|i| i % BLOCKS).collect()
}

fn verify_blocks(socket: &Path, seed: u64, blocks: &[u64]) {
    let mut c = Client::connect(socket, 1);
    let mut unique = blocks.to_vec();
    unique.sort_unstable();
    unique.dedup();
    for &b in &unique {
        let off = b * BLOCK as u64;
        let got = c.read(0, off, BLOCK).expect("read back");
        assert!(
            got == pattern(seed, off, BLOCK),
            "acknowledged block {b} (seed {seed}) does not read back"
        );
    }
}

fn plain_args<'a>(img: &'a str, key: &'a str) -> Vec<&'a str> {
    vec![
        "--image",
        img,
        "--size",
        "4M",
        "--key-file",
        key,
        "--queues",
        "1",
    ]
}

#[test]
fn vmm_killed_mid_write_50_times_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    let (img_s, key_s) = (img.to_str().unwrap(), key.to_str().unwrap());
    let mut d = Daemon::start(dir.path(), &plain_args(img_s, key_s));
    let start = Instant::now();
    for round in 0..50u64 {
        let seed = 1000 + round;
        let mut w = Writer::spawn(&d.socket, job(seed));
        // Kill at a different point each round: after 1 to ~100 acks, and
        // then a few hundred microseconds into the next write.
        w.wait_acks(1 + (round as usize * 37) % 100);
        std::thread::sleep(Duration::from_micros(round * 13 % 400));
        let acked = blocks(&w.kill());
        assert!(d.alive(), "daemon died in round {round}");
        verify_blocks(&d.socket, seed, &acked);
    }
    eprintln!("50 killed writers in {:?}", start.elapsed());
    assert!(d.terminate().success());
}

#[test]
fn sigterm_under_write_load_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    let (img_s, key_s) = (img.to_str().unwrap(), key.to_str().unwrap());
    for round in 0..5u64 {
        let seed = 2000 + round;
        let mut d = Daemon::start(dir.path(), &plain_args(img_s, key_s));
        let mut w = Writer::spawn(&d.socket, job(seed));
        w.wait_acks(20 + round as usize * 30);
        d.signal(libc::SIGTERM);
        let status = d.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "SIGTERM under load: {status}");
        assert!(!d.socket.exists(), "socket left behind");
        let acked = blocks(&w.kill());
        let d = Daemon::start(dir.path(), &plain_args(img_s, key_s));
        verify_blocks(&d.socket, seed, &acked);
        assert!(d.terminate().success());
    }
}

#[test]
fn a_crashed_daemon_keeps_acknowledged_writes_in_the_image() {
    // Without --direct a completed write is in the host page cache: it
    // survives a SIGKILL of the daemon (not a host power loss).
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    let (img_s, key_s) = (img.to_str().unwrap(), key.to_str().unwrap());
    let d = Daemon::start(dir.path(), &plain_args(img_s, key_s));
    let mut w = Writer::spawn(&d.socket, job(3000));
    w.wait_acks(50);
    d.signal(libc::SIGKILL);
    let acked = blocks(&w.kill());
    drop(d);
    std::fs::remove_file(dir.path().join("s.sock")).unwrap();
    let d = Daemon::start(dir.path(), &plain_args(img_s, key_s));
    verify_blocks(&d.socket, 3000, &acked);
    assert!(d.terminate().success());
}

/// A tmpfs of `size` bytes mounted for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed (the fault tests run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn enospc_gives_ioerr_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = write_key(dir.path(), 64);
    let fs = Tmpfs::mount(dir.path().join("small"), "2M");
    // An 8 MiB sparse image on a 2 MiB filesystem.
    let img = fs.0.join("disk.img");
    let d = Daemon::start(
        dir.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--size",
            "8M",
            "--key-file",
            key.to_str().unwrap(),
            "--queues",
            "1",
        ],
    );
    let mut c = Client::connect(&d.socket, 1);
    let chunk = 64 << 10;
    let mut written = Vec::new();
    let mut failed = 0;
    for i in 0..(8 << 20) / chunk as u64 {
        let off = i * chunk as u64;
        match c.write(0, off, &pattern(7, off, chunk)) {
            0 => {
                assert_eq!(failed, 0, "a write succeeded after the disk filled up");
                written.push(off)
            }
            ret => {
                assert_eq!(ret, -libc::EIO, "write at {off}: {ret}");
                failed += 1;
            }
        }
    }
    assert!(
        written.len() >= 8 && failed >= 64,
        "{} writes succeeded, {failed} failed",
        written.len()
    );
    // Still serving: what fitted reads back, FLUSH works, a new connection too.
    for off in &written {
        assert_eq!(c.read(0, *off, chunk).unwrap(), pattern(7, *off, chunk));
    }
    assert_eq!(c.flush(0), 0);
    drop(c);
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.read(0, 0, chunk).unwrap(), pattern(7, 0, chunk));
    drop(c);
    assert!(d.terminate().success());
}

#[test]
fn an_image_truncated_under_the_daemon_gives_ioerr_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    let (img_s, key_s) = (img.to_str().unwrap(), key.to_str().unwrap());
    let mut d = Daemon::start(dir.path(), &plain_args(img_s, key_s));
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.write(0, 0, &pattern(9, 0, 8192)), 0);
    assert_eq!(c.write(0, 3 << 20, &pattern(9, 3 << 20, 8192)), 0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    assert_eq!(c.read(0, 3 << 20, 8192), Err(-libc::EIO));
    // A read straddling the new end fails whole, too.
    assert_eq!(c.read(0, (1 << 20) - 4096, 8192), Err(-libc::EIO));
    assert_eq!(c.read(0, 0, 8192).unwrap(), pattern(9, 0, 8192));
    assert!(d.alive());
    drop(c);
    assert!(d.terminate().success());
}

/// The open flags of the daemon's descriptor for `path` (from fdinfo).
fn open_flags(pid: u32, path: &Path) -> u32 {
    let path = std::fs::canonicalize(path).unwrap();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap();
        if std::fs::read_link(fd.path()).ok().as_deref() == Some(path.as_path()) {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_str().unwrap()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .expect("flags line");
            return u32::from_str_radix(flags.trim(), 8).unwrap();
        }
    }
    panic!("the daemon has no descriptor for {}", path.display());
}

#[test]
fn direct_really_opens_the_image_with_o_direct_for_512_and_4096_sectors() {
    for (sector, direct) in [("512", true), ("4096", true), ("512", false)] {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = write_key(dir.path(), 64);
        let img = dir.path().join("disk.img");
        let mut args = plain_args(img.to_str().unwrap(), key.to_str().unwrap());
        args.extend(["--sector-size", sector]);
        if direct {
            args.push("--direct");
        }
        let d = Daemon::start(dir.path(), &args);
        let flags = open_flags(d.child.id(), &img);
        assert_eq!(
            flags & libc::O_DIRECT as u32 != 0,
            direct,
            "sector {sector}: flags {flags:o}"
        );
        let mut c = Client::connect(&d.socket, 1);
        let data = pattern(11, 8192, 3 * 4096);
        assert_eq!(c.write(0, 8192, &data), 0);
        assert_eq!(c.flush(0), 0);
        assert_eq!(c.read(0, 8192, data.len()).unwrap(), data);
        drop(c);
        assert!(d.terminate().success());
        let mode = std::fs::metadata(&img).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "a created image is private");
    }
}

#[test]
fn sigterm_exits_even_when_the_socket_file_was_deleted() {
    // Nobody can connect any more (a cleanup job, a tmpfiles run): shutdown
    // must not depend on reaching our own socket.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut d = Daemon::start(
        dir.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--size",
            "1M",
            "--cipher",
            "none",
        ],
    );
    std::fs::remove_file(&d.socket).unwrap();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(20)).success());
}
