//! Image locking as QEMU does it, so that two writers never share an image.
//!
//! Two daemons (or a daemon and a VM, or `qemu-img`) writing one image at
//! once corrupt it silently. QEMU's file driver announces what it does with
//! an image through open-file-description (OFD) locks on single bytes: a
//! shared lock on byte 100 + p for each permission p it holds, and on byte
//! 200 + p for each permission it does not let others hold. Before it
//! locks, it checks the opposite bytes for other holders. cryptblk takes the
//! same bytes the same way, so QEMU, qemu-img and qemu-storage-daemon see a
//! serving cryptblk as one more QEMU user of the image (qemu-img refuses
//! with "Failed to get shared "write" lock"), and cryptblk sees them.
//!
//! A writable daemon holds consistent-read and write and shares neither
//! write nor resize; a read-only daemon holds consistent-read and shares
//! neither either (as a read-only QEMU disk does): any number of read-only
//! daemons may serve one image, a writer only alone. The locks belong to the
//! image's open file description, so they go when the daemon exits, however
//! it exits. Byte 0 is libvirt's; it is left alone.
//!
//! Live migration is the one time two daemons must have one image open:
//! the destination's daemon starts (`--incoming`) while the source's still
//! serves. QEMU solves the same problem for its own disks by "inactivating"
//! them: an incoming QEMU opens its images without locks, the source drops
//! its locks once it has stopped the VM and flushed, and the destination
//! takes them when it starts the VM. cryptblk follows the frontend's device
//! state the same way (`Handover`): a daemon started with `--incoming`
//! holds no lock until the first request arrives; a daemon whose frontend
//! turned on dirty-page logging (VHOST_F_LOG_ALL: a migration is running)
//! syncs the image and drops its locks when the frontend stops a queue
//! (GET_VRING_BASE, after that queue's requests are done), and takes them
//! again if a request arrives after all (the migration failed and the
//! source VM goes on). Outside a migration nothing changes: a second
//! writer is refused at start.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::VolumeError;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's BLK_PERM_* bit numbers.
const CONSISTENT_READ: u32 = 0;
const WRITE: u32 = 1;
const WRITE_UNCHANGED: u32 = 2;
const RESIZE: u32 = 3;
const ALL: [u32; 4] = [CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE];

fn name(perm: u32) -> &'static str {
    match perm {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

/// Takes the image's locks for a reader or a writer, or says who holds the
/// image in a way that excludes us.
pub fn lock_image(file: &File, path: &str, readonly: bool) -> Result<(), VolumeError> {
    try_lock(file, path, readonly, holder)
}

/// `lock_image` once serving: no holder's name, /proc being out of the
/// sandbox's reach.
pub fn lock_image_quietly(file: &File, path: &str, readonly: bool) -> Result<(), VolumeError> {
    try_lock(file, path, readonly, |_| None)
}

/// `lock_image`, naming a conflicting holder with `who` (which may not
/// look in /proc once the sandbox is on).
fn try_lock(
    file: &File,
    path: &str,
    readonly: bool,
    who: fn(&File) -> Option<String>,
) -> Result<(), VolumeError> {
    let held: &[u32] = if readonly {
        &[CONSISTENT_READ]
    } else {
        &[CONSISTENT_READ, WRITE]
    };
    let shared = [CONSISTENT_READ, WRITE_UNCHANGED];
    let unshared: Vec<u32> = ALL.into_iter().filter(|p| !shared.contains(p)).collect();
    let io = |source| VolumeError::Lock {
        path: path.to_string(),
        source,
    };
    // Others who refuse to share what we hold, and others who hold what we
    // refuse to share.
    let checks = held
        .iter()
        .map(|&p| (SHARED_BASE + i64::from(p), p, "does not share"))
        .chain(
            unshared
                .iter()
                .map(|&p| (PERM_BASE + i64::from(p), p, "holds")),
        );
    for (byte, perm, how) in checks {
        if locked_by_others(file, byte).map_err(io)? {
            return Err(VolumeError::InUse {
                path: path.to_string(),
                conflict: format!("another process {how} the {} permission", name(perm)),
                holder: who(file),
            });
        }
    }
    let bytes = held
        .iter()
        .map(|&p| PERM_BASE + i64::from(p))
        .chain(unshared.iter().map(|&p| SHARED_BASE + i64::from(p)));
    for byte in bytes {
        set_shared_lock(file, byte).map_err(io)?;
    }
    Ok(())
}

/// Drops every lock this open file description holds on the image's lock
/// bytes (the migration hand-over).
pub fn unlock_image(file: &File) -> std::io::Result<()> {
    let mut l = flock(libc::F_UNLCK, PERM_BASE);
    l.l_len = SHARED_BASE + ALL.len() as i64 - PERM_BASE;
    // SAFETY: F_OFD_SETLK reads the flock we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this daemon holds the image's locks now, and the switch between
/// holding and not holding them (see the module comment).
pub struct Handover {
    path: String,
    readonly: bool,
    active: AtomicBool,
    switching: Mutex<()>,
    /// How long `take` waits for the other holder to let go.
    wait: Duration,
}

/// How long the first request after a migration waits for the source to
/// let go of the image before it fails.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(10);

impl Handover {
    /// `active`: the locks are held already (taken at open).
    pub fn new(path: String, readonly: bool, active: bool) -> Handover {
        Handover {
            path,
            readonly,
            active: AtomicBool::new(active),
            switching: Mutex::new(()),
            wait: TAKE_OVER_WAIT,
        }
    }

    /// The image's name and whether it is opened read-only.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Drops the locks with `unlock` (the image file's lock bytes, an RBD
    /// image's exclusive lock); the caller has synced what this daemon wrote.
    pub fn release(&self, unlock: impl FnOnce() -> std::io::Result<()>) -> Result<(), VolumeError> {
        let _one = self.switching.lock().unwrap_or_else(|p| p.into_inner());
        if !self.active.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        unlock().map_err(|source| VolumeError::Lock {
            path: self.path.clone(),
            source,
        })?;
        log::info!(
            "image {} handed over (the frontend stopped the device during a migration): \
             locks released until the next request",
            self.path
        );
        Ok(())
    }

    /// Takes the locks with `try_lock`, waiting a while for a migration
    /// source to release them; fails as `try_lock` does if they stay held.
    pub fn take(
        &self,
        mut try_lock: impl FnMut() -> Result<(), VolumeError>,
    ) -> Result<(), VolumeError> {
        let _one = self.switching.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_active() {
            return Ok(());
        }
        let deadline = Instant::now() + self.wait;
        loop {
            match try_lock() {
                Ok(()) => break,
                Err(e) if e.is_conflict() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        }
        self.active.store(true, Ordering::Release);
        log::info!("image {} taken over: locks held", self.path);
        Ok(())
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: all zeroes is a valid flock (l_pid must be 0 for OFD locks).
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = byte;
    l.l_len = 1;
    l
}

/// Whether an exclusive lock on `byte` would conflict with another open
/// file description's lock (ours never conflict with themselves).
fn locked_by_others(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut l = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and fills the flock we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut l) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

fn set_shared_lock(file: &File, byte: i64) -> std::io::Result<()> {
    let l = flock(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads the flock we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// "pid N (comm)" of another process with a lock on the image. An OFD lock
/// has no owner (F_OFD_GETLK and /proc/locks say pid -1), but each process's
/// /proc/PID/fdinfo lists the locks on its descriptors. Best effort, on the
/// error path only: None when /proc does not tell.
fn holder(file: &File) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    // fdinfo names the file as MAJOR:MINOR:INODE in hexadecimal device
    // numbers and decimal inode ("fe:00:10018958").
    let needle = format!(":{} ", meta.ino());
    let me = std::process::id().to_string();
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc_dir.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path()).is_ok_and(|info| {
                info.lines()
                    .any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains(&needle))
            })
        });
        if holds {
            let comm = std::fs::read_to_string(proc_dir.path().join("comm")).unwrap_or_default();
            return Some(format!("held by pid {pid} ({})", comm.trim()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn one_writer_or_many_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let shown = path.display().to_string();

        let writer = open(&path);
        lock_image(&writer, &shown, false).unwrap();
        // A second writer and a reader are refused while it lives...
        for readonly in [false, true] {
            let err = lock_image(&open(&path), &shown, readonly).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("in use"), "{text}");
        }
        // ...and welcome once it is gone (its description closed).
        drop(writer);
        let r1 = open(&path);
        lock_image(&r1, &shown, true).unwrap();
        let r2 = open(&path);
        lock_image(&r2, &shown, true).expect("two readers");
        let err = lock_image(&open(&path), &shown, false).unwrap_err();
        assert!(err.to_string().contains("write"), "{err}");
    }

    #[test]
    fn a_hand_over_lets_exactly_one_writer_hold_the_image_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let shown = path.display().to_string();
        let (source_file, dest_file) = (open(&path), open(&path));
        lock_image(&source_file, &shown, false).unwrap();
        let source = Handover::new(shown.clone(), false, true);
        // The destination starts without locks (--incoming) and cannot
        // take them while the source holds them.
        let dest = Handover::new(shown.clone(), false, false);
        // The source's failed take below waits this long, not 10 s.
        let source = Handover {
            wait: Duration::from_millis(200),
            ..source
        };
        assert!(lock_image(&dest_file, &shown, false).is_err());
        source.release(|| unlock_image(&source_file)).unwrap();
        assert!(!source.is_active());
        dest.take(|| lock_image_quietly(&dest_file, &shown, false))
            .expect("the destination takes the image");
        assert!(dest.is_active());
        // The source cannot take it back now (its wait ends in a refusal).
        let err = source
            .take(|| lock_image_quietly(&source_file, &shown, false))
            .unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        assert!(lock_image(&open(&path), &shown, true).is_err());
    }
}
