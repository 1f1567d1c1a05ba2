//! Creating the listening socket with its final owner and mode.
//!
//! connect(2) on a unix socket needs write permission on the socket file,
//! and is refused (ECONNREFUSED) until listen(2). So the file's group and
//! mode are set between bind and listen: nobody can connect while they are
//! being changed. The file itself is born 0600 at most (see
//! [`narrow_before_bind`]) so that it is never wider than asked, not even
//! between bind and chmod.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use super::{directory_of, shown, SocketAccess, SocketError, DEFAULT_MODE};

/// Pending connections the kernel queues before accept (std's value).
const BACKLOG: libc::c_int = 128;

/// Binds and listens on `path`, with `access`'s group and mode in place
/// before the first connection can arrive.
pub fn listen(path: &Path, access: &SocketAccess) -> Result<UnixListener, SocketError> {
    check_directory(path)?;
    remove_stale(path)?;
    let fd = unix_socket().map_err(|e| listen_error(path, e))?;
    narrow_before_bind(&fd).map_err(|e| listen_error(path, e))?;
    bind(&fd, path)?;
    let ready = set_owner_and_mode(path, access).and_then(|()| {
        // SAFETY: listen(2) on a socket we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) }).map_err(|e| listen_error(path, e))
    });
    if let Err(e) = ready {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    log_who_may_connect(path, access);
    Ok(UnixListener::from(fd))
}

/// Refuses a directory where any user may create and delete files: there
/// anyone could unlink the socket and bind their own in its place, and the
/// VMM would hand them the guest's memory and disk traffic. The sticky bit
/// (as on /tmp) limits deleting to the file's owner, which closes that.
fn check_directory(path: &Path) -> Result<(), SocketError> {
    let dir = directory_of(path);
    let mode = fs::metadata(&dir)
        .map_err(|e| listen_error(path, e))?
        .permissions()
        .mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(SocketError::OpenDirectory {
            dir: shown(&dir),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// A socket left by an earlier run is replaced; anything else at the path
/// (an image given as --socket by mistake, a symlink) is not touched.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(listen_error(path, e)),
        Ok(m) if m.file_type().is_socket() => {
            fs::remove_file(path).map_err(|e| listen_error(path, e))
        }
        Ok(_) => Err(SocketError::NotASocket { path: shown(path) }),
    }
}

fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is ours on success.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    cvt(fd)?;
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Linux creates the socket file with the socket inode's mode minus the
/// umask; fchmod on the unbound socket makes that at most 0600 whatever the
/// umask is. Setting the umask instead would change it for the whole
/// process, threads included.
fn narrow_before_bind(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fchmod(2) on a socket we own.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), DEFAULT_MODE) })
}

fn bind(fd: &OwnedFd, path: &Path) -> Result<(), SocketError> {
    let (addr, len) = sockaddr(path)?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
    cvt(rc).map_err(|e| listen_error(path, e))
}

fn sockaddr(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t), SocketError> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // One byte stays for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(SocketError::BadPath { path: shown(path) });
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Runs before listen(2): no connection can slip in while the file still
/// has its 0600 from bind and the daemon's own group.
fn set_owner_and_mode(path: &Path, access: &SocketAccess) -> Result<(), SocketError> {
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| SocketError::Chown {
            path: shown(path),
            gid,
            source,
        })?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(access.mode)).map_err(|source| {
        SocketError::Chmod {
            path: shown(path),
            mode: access.mode,
            source,
        }
    })
}

/// A mode that lets every user connect is the operator's call, but not a
/// quiet one.
fn log_who_may_connect(path: &Path, access: &SocketAccess) {
    let path = path.display();
    let mode = access.mode;
    if mode & 0o002 == 0 {
        log::debug!("socket {path}: mode {mode:04o}, group {:?}", access.group);
    } else if access.allow.is_empty() {
        log::warn!(
            "socket {path} has mode {mode:04o}: every user on this host may connect and read \
             the decrypted disk; use --socket-group, or --allow-uid/--allow-gid"
        );
    } else {
        log::info!(
            "socket {path} has mode {mode:04o}: every user may connect, only --allow-uid/--allow-gid peers are served"
        );
    }
}

fn listen_error(path: &Path, source: io::Error) -> SocketError {
    SocketError::Listen {
        path: shown(path),
        source,
    }
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The socket's name in its directory, held through an O_PATH fd on that
/// directory: the daemon removes its socket at exit with unlinkat on this
/// fd, and the sandbox allows unlinkat on this fd alone.
pub struct SocketFile {
    dir: OwnedFd,
    name: std::ffi::CString,
}

impl SocketFile {
    pub fn open(path: &Path) -> Result<Self, SocketError> {
        let dir = directory_of(path);
        let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| listen_error(path, io::Error::other(e)))?;
        let name = path
            .file_name()
            .map(|n| std::ffi::CString::new(n.as_bytes()))
            .ok_or_else(|| {
                listen_error(path, io::Error::other("the socket path has no file name"))
            })?
            .map_err(|e| listen_error(path, io::Error::other(e)))?;
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        // SAFETY: open(2) with a valid C string; the fd is ours on success.
        let fd = unsafe { libc::open(c_dir.as_ptr(), flags) };
        cvt(fd).map_err(|e| listen_error(path, e))?;
        // SAFETY: a fresh descriptor nothing else owns.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SocketFile { dir, name })
    }

    /// The directory fd, for the sandbox's unlinkat rule.
    pub fn dir_fd(&self) -> std::os::fd::RawFd {
        self.dir.as_raw_fd()
    }

    /// Removes the socket (at exit); a socket already gone is fine.
    pub fn remove(&self) {
        // SAFETY: unlinkat(2) on our directory fd with a valid C string.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn socket_gets_the_asked_mode_and_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = listen(&path, &SocketAccess::default()).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        drop(first);
        let access = SocketAccess {
            mode: 0o640,
            ..Default::default()
        };
        let _second = listen(&path, &access).unwrap();
        assert_eq!(mode_of(&path), 0o640);
        let file = dir.path().join("image");
        fs::write(&file, b"data").unwrap();
        assert!(matches!(
            listen(&file, &access),
            Err(SocketError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&file).unwrap(), b"data", "a file was replaced");
    }

    #[test]
    fn only_a_world_writable_directory_without_sticky_bit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        for (mode, refused) in [(0o777, true), (0o1777, false), (0o775, false)] {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
            let result = check_directory(&path);
            assert_eq!(result.is_err(), refused, "{mode:o}");
        }
    }

    #[test]
    fn paths_that_do_not_fit_sun_path_are_refused() {
        assert!(sockaddr(Path::new(&"x".repeat(107))).is_ok());
        assert!(sockaddr(Path::new(&"x".repeat(108))).is_err());
        assert!(sockaddr(Path::new("")).is_err());
    }
}
