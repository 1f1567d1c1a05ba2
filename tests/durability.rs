//! The durability contract (README "Durability"), observed from outside the
//! daemon. Every check has a negative control: a write without FLUSH must
//! leave the image unsynced, so a FLUSH answered without a sync fails.
//!
//! Three observers, because no single one sees every I/O path:
//!
//! - **System calls** (`strace -f -y`, every thread, descriptors shown with
//!   their paths): FLUSH is an msync(MS_SYNC) of the image's mapping with
//!   `--io mmap`, an fdatasync of the image's descriptor with `--aio sync`;
//!   a VMM disconnect and SIGTERM fdatasync the image on every path. With
//!   io_uring (the default for `--io pread` and `--direct`) a FLUSH is an
//!   IORING_OP_FSYNC, which is no system call of its own (it runs inside
//!   io_uring_enter or in the kernel's io-wq workers): strace cannot see
//!   it, so the two observers below cover those paths.
//! - **The page cache** (cachestat(2): dirty and writeback pages of the
//!   image file): after a write, pages are dirty; once a FLUSH has
//!   completed, none is dirty or under writeback. Covers `--io mmap` and
//!   buffered `--io pread`, through io_uring and `--aio sync`.
//! - **The device** (`/sys/block/loopN/stat`, flush requests completed):
//!   with the image on a loop device of its own, nothing but the daemon
//!   sends it flushes; a FLUSH must have sent one by the time it completes.
//!   Covers `--direct` (O_DIRECT, where the page cache shows nothing),
//!   through io_uring and `--aio sync`, and buffered I/O on a block device.
//!
//! strace prints a call when it returns, while the thread is still stopped,
//! and the block layer counts a flush when it completes, so all three
//! observe the sync before the daemon can write the FLUSH's status: the
//! checks right after `Client::flush` returns are ordering checks, not
//! "eventually" ones.

mod support;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use support::strace::{mappings_of, parse, syncs, Strace};
use support::*;

/// The sync system calls strace watches.
const SYNC_CALLS: &[&str] = &["fsync", "fdatasync", "msync", "sync_file_range", "syncfs"];

/// A directory on a disk filesystem: on tmpfs, fdatasync writes nothing
/// back and dirty pages stay dirty. `CARGO_TARGET_TMPDIR` lies under the
/// target directory.
fn disk_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let path = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statfs(path.as_ptr(), &mut fs) }, 0);
    assert_ne!(
        fs.f_type,
        libc::TMPFS_MAGIC,
        "{} is on tmpfs: the durability tests need a disk filesystem",
        dir.path().display()
    );
    dir
}

/// The daemon's arguments: IMAGE, a 64-byte key, one queue, MODE.
fn args<'a>(image: &'a str, key: &'a str, size: Option<&'a str>, mode: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--image", image, "--key-file", key, "--queues", "1"];
    if let Some(size) = size {
        a.extend(["--size", size]);
    }
    a.extend_from_slice(mode);
    a
}

const LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- strace

/// Under strace: a write alone never syncs the image; FLUSH does (where it
/// is a system call), a VMM disconnect does, SIGTERM does.
fn syscalls(mode: &[&str], flush_is_a_syscall: bool) {
    let dir = disk_dir();
    let (key, _) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    let (img_s, key_s) = (img.to_str().unwrap(), key.to_str().unwrap());
    let trace = Strace::new(&dir.path().join("strace.log"));
    let d = Daemon::start_wrapped(
        dir.path(),
        &trace.wrapper(SYNC_CALLS),
        &args(img_s, key_s, Some("4M"), mode),
        Stdio::inherit(),
    );
    let mapped = mappings_of(d.pid, &img);
    if mode.contains(&"mmap") {
        assert!(!mapped.is_empty(), "--io mmap did not map the image");
    }
    let count = || {
        trace
            .calls()
            .iter()
            .filter(|c| syncs(c, &img, &mapped))
            .count()
    };
    // Creating the image syncs it once: count from here.
    let start = count();

    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.write(0, 0, &pattern(1, 0, 65536)), 0);
    assert_eq!(count(), start, "a write without FLUSH synced the image");
    assert_eq!(c.flush(0), 0);
    let flushed = count();
    if flush_is_a_syscall {
        assert!(
            flushed > start,
            "FLUSH completed, but the daemon made no sync call on the image:\n{}",
            std::fs::read_to_string(&trace.log).unwrap()
        );
    }

    assert_eq!(c.write(0, 65536, &pattern(2, 65536, 65536)), 0);
    assert_eq!(count(), flushed, "a write without FLUSH synced the image");
    drop(c);
    wait_until(LIMIT, "no sync of the image after the VMM left", || {
        count() > flushed
    });

    let left = count();
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.write(0, 131072, &pattern(3, 131072, 65536)), 0);
    assert_eq!(count(), left, "a write without FLUSH synced the image");
    let status = d.terminate();
    assert!(status.success(), "{status}");
    assert!(count() > left, "SIGTERM exited without syncing the image");
    drop(c);
}

#[test]
fn syscalls_mmap() {
    syscalls(&["--io", "mmap"], true)
}

#[test]
fn syscalls_pread_aio_sync() {
    syscalls(&["--io", "pread", "--aio", "sync"], true)
}

#[test]
fn syscalls_direct_aio_sync() {
    syscalls(&["--direct", "--aio", "sync"], true)
}

/// io_uring: FLUSH is invisible here (see the module comment), disconnect
/// and SIGTERM are not.
#[test]
fn syscalls_pread_io_uring_disconnect_and_sigterm() {
    syscalls(&["--io", "pread"], false)
}

#[test]
fn syscalls_direct_io_uring_disconnect_and_sigterm() {
    syscalls(&["--direct"], false)
}

#[test]
fn strace_log_parser_joins_interrupted_calls() {
    let log = "12 fdatasync(3</a b>) = 0\n\
               13 msync(0x7f0000000000, 4096, MS_SYNC <unfinished ...>\n\
               12 clone3({flags=CLONE_VM, ...}, 88) = 14\n\
               13 <... msync resumed>) = 0\n\
               12 fdatasync(3</a b>) = -1 EIO (Input/output error)\n\
               14 +++ exited with 0 +++\n";
    let calls = parse(log);
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(calls[0].args, "3</a b>");
    assert_eq!(calls[2].name, "msync");
    assert_eq!(calls[2].args, "0x7f0000000000, 4096, MS_SYNC");
    assert!(syncs(
        &calls[2],
        Path::new("/"),
        &[(0x7f00_0000_0000, 0x7f00_0001_0000)]
    ));
    assert!(!syncs(&calls[2], Path::new("/"), &[(0, 4096)]));
    assert!(!calls[3].ok(), "a failed sync is no sync");
}

// ---------------------------------------------------------------- page cache

/// cachestat(2) (Linux 6.5): 451 on every architecture.
const SYS_CACHESTAT: libc::c_long = 451;

/// (dirty, writeback) pages of the whole file.
fn dirty_pages(file: &Path) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    let range = [0u64; 2]; // offset 0, length 0: to the end
    let mut stat = [0u64; 5]; // cache, dirty, writeback, evicted, recently evicted
                              // SAFETY: cachestat with a valid fd, a 16-byte range and a 40-byte result.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            range.as_ptr(),
            stat.as_mut_ptr(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "cachestat: {} (needs Linux 6.5)",
        std::io::Error::last_os_error()
    );
    (stat[1], stat[2])
}

/// A FLUSH leaves no page of the image dirty or under writeback by the
/// time it completes; so do a disconnect and SIGTERM.
fn page_cache(mode: &[&str]) {
    let dir = disk_dir();
    let (key, _) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    let (img_s, key_s) = (img.to_str().unwrap(), key.to_str().unwrap());
    let d = Daemon::start(dir.path(), &args(img_s, key_s, Some("8M"), mode));
    let clean = || dirty_pages(&img) == (0, 0);

    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.write(0, 0, &pattern(1, 0, 256 << 10)), 0);
    // Without this the check below could not fail.
    let (dirty, _) = dirty_pages(&img);
    assert!(
        dirty > 0,
        "the write left no dirty page in the image's page cache"
    );
    assert_eq!(c.flush(0), 0);
    assert!(
        clean(),
        "FLUSH completed with pages of the image still dirty or under writeback: {:?}",
        dirty_pages(&img)
    );

    assert_eq!(c.write(0, 1 << 20, &pattern(2, 1 << 20, 256 << 10)), 0);
    assert!(!clean(), "the write left no dirty page");
    drop(c);
    wait_until(LIMIT, "the image stayed dirty after the VMM left", clean);

    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.write(0, 2 << 20, &pattern(3, 2 << 20, 256 << 10)), 0);
    assert!(!clean(), "the write left no dirty page");
    assert!(d.terminate().success());
    assert!(
        clean(),
        "SIGTERM exited with the image dirty: {:?}",
        dirty_pages(&img)
    );
    drop(c);
}

#[test]
fn page_cache_mmap() {
    page_cache(&["--io", "mmap"])
}

#[test]
fn page_cache_mmap_workers() {
    page_cache(&[
        "--io",
        "mmap",
        "--crypto",
        "workers",
        "--split-threshold",
        "64K",
    ])
}

#[test]
fn page_cache_pread_io_uring() {
    page_cache(&["--io", "pread"])
}

#[test]
fn page_cache_pread_aio_sync() {
    page_cache(&["--io", "pread", "--aio", "sync"])
}

// ---------------------------------------------------------------- device

/// A loop device over a file of its own, detached on drop.
struct Loop {
    dev: PathBuf,
    stat: PathBuf,
}

/// `losetup --find` picks a free device and then claims it: two at once
/// may pick the same one.
static LOSETUP: Mutex<()> = Mutex::new(());

impl Loop {
    fn attach(file: &Path) -> Loop {
        let _one_at_a_time = LOSETUP.lock().unwrap_or_else(|p| p.into_inner());
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup --find --show failed (the durability tests run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let name = dev.file_name().unwrap().to_str().unwrap();
        let stat = PathBuf::from(format!("/sys/block/{name}/stat"));
        Loop { dev, stat }
    }

    /// Flush requests the device has completed (Documentation/block/stat.rst:
    /// field 16, "flush I/Os").
    fn flushes(&self) -> u64 {
        let stat = std::fs::read_to_string(&self.stat).unwrap();
        let fields: Vec<&str> = stat.split_whitespace().collect();
        assert!(fields.len() >= 17, "{}: {stat}", self.stat.display());
        fields[15].parse().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// With the image a loop device: a FLUSH has sent the device a flush
/// request by the time it completes; so have a disconnect and SIGTERM.
fn device(mode: &[&str]) {
    let dir = disk_dir();
    let (key, _) = write_key(dir.path(), 64);
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let lo = Loop::attach(&backing);
    let (dev_s, key_s) = (lo.dev.to_str().unwrap(), key.to_str().unwrap());
    let d = Daemon::start(dir.path(), &args(dev_s, key_s, None, mode));

    let mut c = Client::connect(&d.socket, 1);
    let start = lo.flushes();
    assert_eq!(c.write(0, 0, &pattern(1, 0, 65536)), 0);
    assert_eq!(
        lo.flushes(),
        start,
        "a write without FLUSH flushed the device"
    );
    assert_eq!(c.flush(0), 0);
    let flushed = lo.flushes();
    assert!(
        flushed > start,
        "FLUSH completed without a flush of the device"
    );

    assert_eq!(c.write(0, 65536, &pattern(2, 65536, 65536)), 0);
    assert_eq!(
        lo.flushes(),
        flushed,
        "a write without FLUSH flushed the device"
    );
    drop(c);
    wait_until(LIMIT, "no device flush after the VMM left", || {
        lo.flushes() > flushed
    });

    let left = lo.flushes();
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.write(0, 131072, &pattern(3, 131072, 65536)), 0);
    assert_eq!(
        lo.flushes(),
        left,
        "a write without FLUSH flushed the device"
    );
    assert!(d.terminate().success());
    assert!(
        lo.flushes() > left,
        "SIGTERM exited without flushing the device"
    );
    drop(c);
}

#[test]
fn device_direct_io_uring() {
    device(&["--direct"])
}

#[test]
fn device_direct_aio_sync() {
    device(&["--direct", "--aio", "sync"])
}

/// A block device is served through pread/pwrite (io_uring), buffered.
#[test]
fn device_buffered_io_uring() {
    device(&[])
}
