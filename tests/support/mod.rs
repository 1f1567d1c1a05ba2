//! The test kit every suite under tests/ uses: start the real daemon (or
//! qemu-storage-daemon) and wait for its socket, drive it with libblkio's
//! virtio-blk-vhost-user client, data patterns, keys. Submodules: `hostile`
//! (a raw vhost-user frontend), `bench` (targets for `cryptblk bench`),
//! `luks` (cryptsetup and qemu-img as oracles), `strace`, `writer`.
#![allow(dead_code)]

use std::io::Write;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use cryptblk::bench::listening::{wait_for_listener, Startup};

pub const BIN: &str = env!("CARGO_BIN_EXE_cryptblk");

pub mod bench;
pub mod ceph;
pub mod hostile;
pub mod luks;
pub mod nbd;
pub mod strace;
pub mod writer;

pub struct Daemon {
    /// The process started: cryptblk itself, or the wrapper it runs under
    /// (`start_wrapped`).
    pub child: Child,
    /// cryptblk's own pid (the wrapper's child when wrapped).
    pub pid: u32,
    pub socket: PathBuf,
    /// What it is, for messages: "cryptblk", "qemu-storage-daemon".
    name: &'static str,
}

impl Daemon {
    /// Starts `cryptblk serve --socket <dir>/s.sock ARGS` and waits for the socket.
    pub fn start(dir: &Path, args: &[&str]) -> Daemon {
        Self::start_with_stderr(dir, args, Stdio::inherit())
    }

    /// Like `start`, with the daemon's log going to `stderr`.
    pub fn start_with_stderr(dir: &Path, args: &[&str], stderr: Stdio) -> Daemon {
        Self::start_command(dir, args, stderr, |_| {})
    }

    /// Like `start_with_stderr`, with a last say on the command (for
    /// example a `pre_exec` that confines the child).
    pub fn start_command(
        dir: &Path,
        args: &[&str],
        stderr: Stdio,
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        Self::start_inner(dir, &[], args, stderr, adjust)
    }

    /// Like `start_with_stderr`, run as `WRAPPER... cryptblk serve ...`
    /// (for example under strace). `pid` is cryptblk's, `child` the
    /// wrapper's, which must exit when cryptblk does.
    pub fn start_wrapped(
        dir: &Path,
        wrapper: &[std::ffi::OsString],
        args: &[&str],
        stderr: Stdio,
    ) -> Daemon {
        assert!(!wrapper.is_empty());
        Self::start_inner(dir, wrapper, args, stderr, |_| {})
    }

    fn start_inner(
        dir: &Path,
        wrapper: &[std::ffi::OsString],
        args: &[&str],
        stderr: Stdio,
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        let socket = dir.join("s.sock");
        // CRYPTBLK_TEST_WRAPPER="valgrind --error-exitcode=99 ..." runs every
        // daemon a test starts under that program (a manual run, never CI):
        // a memory checker that runs the daemon in its own process. Its own
        // system calls would break the seccomp filter: --sandbox none.
        let from_env: Vec<std::ffi::OsString> = std::env::var("CRYPTBLK_TEST_WRAPPER")
            .map(|w| w.split_whitespace().map(Into::into).collect())
            .unwrap_or_default();
        let in_process_wrapper = wrapper.is_empty() && !from_env.is_empty();
        let wrapper = if in_process_wrapper {
            &from_env[..]
        } else {
            wrapper
        };
        let mut command = match wrapper.split_first() {
            None => Command::new(BIN),
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
        };
        command.arg("serve").arg("--socket").arg(&socket).args(args);
        if in_process_wrapper {
            command.args(["--sandbox", "none"]);
        }
        command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr);
        adjust(&mut command);
        let mut d = Daemon::spawn_unwaited(command, socket, "cryptblk");
        d.wait_for_socket();
        if !wrapper.is_empty() && !in_process_wrapper {
            // Listening, so the wrapper's child has exec'ed cryptblk.
            d.pid = child_running(d.child.id(), BIN)
                .unwrap_or_else(|| panic!("no cryptblk process under {:?}", wrapper[0]));
        }
        d
    }

    /// Any vhost-user daemon (cryptblk, qemu-storage-daemon) started from
    /// `command`, listening on `socket` once this returns; `name` is for
    /// messages. Stopped with SIGKILL on drop if still running.
    pub fn spawn(command: Command, socket: PathBuf, name: &'static str) -> Daemon {
        let mut d = Self::spawn_unwaited(command, socket, name);
        d.wait_for_socket();
        d
    }

    /// `spawn` without waiting: `listening` says whether it got there.
    pub fn spawn_unwaited(mut command: Command, socket: PathBuf, name: &'static str) -> Daemon {
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start {name} ({e}): run integration/install-deps.sh")
        });
        let pid = child.id();
        Daemon {
            child,
            pid,
            socket,
            name,
        }
    }

    /// A daemon the caller started itself (no wrapper).
    pub fn adopt(child: Child, socket: PathBuf) -> Daemon {
        let pid = child.id();
        Daemon {
            child,
            pid,
            socket,
            name: "cryptblk",
        }
    }

    /// Waits until the daemon listens (Ok) or exits first (its status).
    pub fn listening(&mut self) -> Result<(), std::process::ExitStatus> {
        match wait_for_listener(&self.socket, &mut self.child, Duration::from_secs(20)) {
            Ok(Startup::Listening) => Ok(()),
            Ok(Startup::Exited(status)) => Err(status),
            other => panic!(
                "{} did not listen on {} within 20 s: {other:?}",
                self.name,
                self.socket.display()
            ),
        }
    }

    fn wait_for_socket(&mut self) {
        if let Err(status) = self.listening() {
            let mut err = String::new();
            if let Some(mut stderr) = self.child.stderr.take() {
                use std::io::Read;
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("{} exited with {status} before listening: {err}", self.name);
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s; waits.
    pub fn stop(mut self) {
        if self.alive() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Sends `sig` to cryptblk (not to a wrapper).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child (or the wrapper's), which is not
        // reaped before `child` is.
        unsafe { libc::kill(self.pid as i32, sig) };
    }

    /// Sends SIGTERM and returns the exit status (panics after 30 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not exit in time", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.alive() {
            if self.pid != self.child.id() {
                self.signal(libc::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The pid of a child of `parent` running `program` (from /proc: this
/// kernel may lack /proc/PID/task/TID/children).
pub fn child_running(parent: u32, program: &str) -> Option<u32> {
    let program = std::fs::canonicalize(program).ok()?;
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let after = &stat[stat.rfind(')')? + 2..];
        let ppid: u32 = after.split(' ').nth(1)?.parse().ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        (ppid == parent && exe == program).then_some(pid)
    })
}

/// A synchronous libblkio client: one request at a time per call.
pub struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, queues: i32) -> Client {
        Self::connect_with(socket, queues, false)
    }

    pub fn connect_with(socket: &Path, queues: i32, read_only: bool) -> Client {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        blkio.set_bool("read-only", read_only).unwrap();
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", queues).unwrap();
        let outcome = blkio.start().expect("start");
        let region = blkio.alloc_mem_region(4 << 20).unwrap();
        blkio.map_mem_region(&region).unwrap();
        Client {
            blkio,
            queues: outcome.queues,
            region,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    pub fn blkio_read_only(&self) -> bool {
        self.blkio.get_bool("read-only").unwrap()
    }

    fn buf(&self) -> *mut u8 {
        self.region.addr as *mut u8
    }

    fn wait(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = Duration::from_secs(20);
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert_eq!(n, 1, "no completion within 20 s");
        // SAFETY: do_io initialised n completions.
        unsafe { c[0].assume_init_ref() }.ret
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        assert!(data.len() <= self.region.len);
        // SAFETY: the region is ours, mapped, and at least data.len() long.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf(), data.len()) };
        let buf = self.buf();
        self.queues[q].write(offset, buf, data.len(), 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let buf = self.buf();
        self.queues[q].read(offset, buf, len, 0, ReqFlags::empty());
        let ret = self.wait(q);
        if ret != 0 {
            return Err(ret);
        }
        let mut out = vec![0u8; len];
        // SAFETY: the request filled len bytes of our region.
        unsafe { std::ptr::copy_nonoverlapping(self.buf(), out.as_mut_ptr(), len) };
        Ok(out)
    }

    /// Starts a read of `len` bytes into the memory region at `at`,
    /// without waiting: `finish_read` waits for it. Other requests meanwhile
    /// must use other parts of the region (the others use its start).
    pub fn start_read(&mut self, q: usize, offset: u64, len: usize, at: usize) {
        assert!(at + len <= self.region.len);
        // SAFETY: within our mapped region (checked above).
        let buf = unsafe { self.buf().add(at) };
        self.queues[q].read(offset, buf, len, 0, ReqFlags::empty());
        // Submitted now, not at the next wait.
        let mut none: [MaybeUninit<Completion>; 0] = [];
        self.queues[q]
            .do_io(&mut none, 0, None, None)
            .expect("do_io");
    }

    /// Waits (up to 20 s) for the read `start_read` started on queue `q`.
    pub fn finish_read(&mut self, q: usize, len: usize, at: usize) -> Result<Vec<u8>, i32> {
        let ret = self.wait(q);
        if ret != 0 {
            return Err(ret);
        }
        let mut out = vec![0u8; len];
        // SAFETY: the request filled len bytes of our region at `at`.
        unsafe { std::ptr::copy_nonoverlapping(self.buf().add(at), out.as_mut_ptr(), len) };
        Ok(out)
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].write_zeroes(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }
}

/// Polls `done` every 10 ms until it holds; panics with `what` once `limit`
/// has passed.
/// A daemon's log file as text (empty if it does not exist yet).
pub fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// The test oracle for plain dm-crypt aes-xts-plain64 with `key`.
pub fn plain_cipher(key: &[u8], sector_size: usize, skip: u64) -> cryptblk::crypto::SectorCipher {
    use cryptblk::crypto::{IvRule, SectorCipher, XtsKey};
    let k = XtsKey::from_bytes(key).unwrap();
    SectorCipher::new(
        Some(&k),
        IvRule {
            sector_size,
            large_sectors: false,
            skip,
        },
    )
}

/// A daemon on an image of its own, with the directory that holds both
/// (removed when dropped) and the file its log goes to.
pub struct PatternDisk {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub log: PathBuf,
    pub daemon: Daemon,
}

impl PatternDisk {
    /// `cryptblk serve` on a new image of `bytes` bytes of pattern 7
    /// (written in full, so O_DIRECT reads really go to the disk) with a
    /// new 64-byte key, `--cipher CIPHER` on one queue and `extra`
    /// options, logging to a file the test reads afterwards.
    pub fn serve(bytes: u64, cipher: &str, extra: &[&str]) -> PatternDisk {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, pattern(7, 0, bytes as usize)).unwrap();
        let (key, _) = write_key(dir.path(), 64);
        let log = dir.path().join("daemon.log");
        let mut args = vec![
            "--image",
            image.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--cipher",
            cipher,
            "--queues",
            "1",
        ];
        args.extend_from_slice(extra);
        let stderr = std::fs::File::create(&log).unwrap();
        let daemon = Daemon::start_with_stderr(dir.path(), &args, stderr.into());
        PatternDisk {
            dir,
            image,
            log,
            daemon,
        }
    }

    /// What the daemon has logged so far.
    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }
}

/// Serves the image `image` names (`--image` and any option that reaches
/// it) encrypted with a new key of `dir`, payload 8 sectors in and IVs +
/// 16, on `queues` queues with `extra` options; runs `exercise_16m_disk`
/// and stops the daemon. Returns dm-crypt's view of the stored image
/// (payload after 8 sectors, IV = sector + 16) and what was written, for
/// `check_16m_export`.
pub fn serve_16m_round_trip(
    dir: &Path,
    image: &[&str],
    queues: usize,
    extra: &[&str],
) -> (cryptblk::crypto::SectorCipher, Vec<(u64, Vec<u8>)>) {
    let (key_path, key) = write_key(dir, 64);
    let q = queues.to_string();
    let mut args = image.to_vec();
    args.extend([
        "--key-file",
        key_path.to_str().unwrap(),
        "--queues",
        &q,
        "--offset",
        "8",
        "--skip",
        "16",
    ]);
    args.extend_from_slice(extra);
    let d = Daemon::start(dir, &args);
    let written = exercise_16m_disk(&d.socket, queues);
    assert!(d.terminate().success());
    (plain_cipher(&key, 512, 16), written)
}

/// The round trip the network-store tests run on a 16 MiB image served
/// with `--offset 8` on `queues` queues: writes at 0 (4 KiB), 64 KiB (3 MiB,
/// cut into pieces in flight at once) and 8 MiB (512 B), each read back on
/// another queue; WRITE_ZEROES of 64 KiB at 12 MiB reads back as zeros;
/// flushes on the first and last queue. Returns what was written.
pub fn exercise_16m_disk(socket: &Path, queues: usize) -> Vec<(u64, Vec<u8>)> {
    const MIB: usize = 1 << 20;
    let mut c = Client::connect(socket, queues as i32);
    assert_eq!(c.capacity(), (16 * MIB - 4096) as u64);
    let mut written = Vec::new();
    for (i, (offset, len)) in [(0u64, 4096), (65536, 3 * MIB), (8 * MIB as u64, 512)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, offset, len);
        assert_eq!(c.write(i % queues, offset, &data), 0, "write at {offset}");
        written.push((offset, data));
    }
    assert_eq!(c.flush(0), 0);
    for (i, (offset, data)) in written.iter().enumerate() {
        let back = c.read((i + 1) % queues, *offset, data.len()).unwrap();
        assert!(back == *data, "read back at {offset}");
    }
    // WRITE_ZEROES stores the ciphertext of zeros: it reads back as zeros.
    assert_eq!(c.write_zeroes(queues - 1, 12 * MIB as u64, 65536), 0);
    assert_eq!(c.read(0, 12 * MIB as u64, 65536).unwrap(), vec![0; 65536]);
    assert_eq!(c.flush(queues - 1), 0);
    written
}

/// The exported image `raw` of `exercise_16m_disk` (payload 4096 bytes in,
/// enciphered by `cipher`): every write is there as the oracle's
/// ciphertext, no 512-byte block of plaintext is anywhere, and the zeroed
/// range holds the ciphertext of zeros.
pub fn check_16m_export(
    raw: &[u8],
    cipher: &cryptblk::crypto::SectorCipher,
    written: &[(u64, Vec<u8>)],
) {
    const MIB: usize = 1 << 20;
    assert_eq!(raw.len(), 16 * MIB);
    let payload = &raw[4096..];
    for (offset, data) in written {
        let mut expect = data.clone();
        cipher.encrypt(offset / 512, &mut expect);
        let at = *offset as usize;
        assert!(
            payload[at..at + data.len()] == expect[..],
            "ciphertext at {offset}"
        );
        assert!(no_plaintext_in(raw, data), "plaintext found in the store");
    }
    let mut zeros = vec![0u8; 65536];
    cipher.encrypt(12 * MIB as u64 / 512, &mut zeros);
    assert!(payload[12 * MIB..12 * MIB + 65536] == zeros[..]);
}

/// Whether no 512-byte block of `data` stands anywhere in `raw` (an image
/// read raw): what the guest wrote is stored as ciphertext only.
pub fn no_plaintext_in(raw: &[u8], data: &[u8]) -> bool {
    let stored: std::collections::HashSet<&[u8]> = raw.chunks(512).collect();
    data.chunks(512).all(|block| !stored.contains(block))
}

pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A pattern unique to (seed, byte offset) in every 512-byte unit.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut unit = offset / 512;
    while out.len() < len {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ unit;
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        unit += 1;
    }
    out.truncate(len);
    out
}

pub fn write_key(dir: &Path, bytes: usize) -> (PathBuf, Vec<u8>) {
    let key: Vec<u8> = (0..bytes)
        .map(|i| (i as u8).wrapping_mul(101).wrapping_add(7))
        .collect();
    let path = dir.join("key.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    f.write_all(&key).unwrap();
    (path, key)
}

use std::os::unix::fs::OpenOptionsExt;
