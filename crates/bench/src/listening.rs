//! Whether a vhost-user socket has a listener yet, asked without connecting.
//!
//! A socket file appears at bind(2), a moment before listen(2): a frontend
//! that connects in between gets ECONNREFUSED, so "the file exists" is not
//! "the daemon is ready". Connecting to find out is no better, since the
//! backend would see a VMM that came and went. Linux lists every unix socket
//! in /proc/net/unix, and marks the listening ones with the `__SO_ACCEPTCON`
//! flag.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// The Flags column of a listening socket in /proc/net/unix: `__SO_ACCEPTCON`,
/// the only flag the kernel prints there.
const LISTENING_FLAGS: &[u8] = b"00010000";

/// True once some socket of this network namespace listens on `path`, as
/// the listener spelled it (the kernel keeps the path given to bind(2), so a
/// relative path matches only the same relative spelling).
pub fn is_listening(path: &Path) -> io::Result<bool> {
    let table = std::fs::read("/proc/net/unix")?;
    Ok(listens_in(&table, path.as_os_str()))
}

/// How waiting for a freshly started daemon's socket ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    Listening,
    Exited(ExitStatus),
    TimedOut,
}

/// Polls until `daemon` listens on `path`, exits, or `limit` passes.
pub fn wait_for_listener(path: &Path, daemon: &mut Child, limit: Duration) -> io::Result<Startup> {
    let deadline = Instant::now() + limit;
    loop {
        if is_listening(path)? {
            return Ok(Startup::Listening);
        }
        if let Some(status) = daemon.try_wait()? {
            return Ok(Startup::Exited(status));
        }
        if Instant::now() > deadline {
            return Ok(Startup::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `is_listening` over the text of /proc/net/unix.
fn listens_in(table: &[u8], path: &OsStr) -> bool {
    // The first line is the header.
    table.split(|&b| b == b'\n').skip(1).any(|line| {
        let (columns, bound) = columns_and_path(line);
        columns[3] == LISTENING_FLAGS && bound == Some(path.as_bytes())
    })
}

/// Splits a /proc/net/unix line into its seven columns (Num RefCount
/// Protocol Flags Type St Inode, separated by runs of spaces: the inode is
/// padded) and the path after them, which may itself contain spaces.
fn columns_and_path(line: &[u8]) -> ([&[u8]; 7], Option<&[u8]>) {
    let mut columns: [&[u8]; 7] = [&[]; 7];
    let mut rest = line;
    for column in &mut columns {
        let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
        rest = &rest[start..];
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        (*column, rest) = rest.split_at(end);
    }
    (columns, rest.strip_prefix(b" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const TABLE: &[u8] = b"Num       RefCount Protocol Flags    Type St Inode Path\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 31337 /run/a.sock\n\
        0000000000000000: 00000002 00000000 00000000 0001 01 31338 /run/b.sock\n\
        0000000000000000: 00000003 00000000 00000000 0001 03 31339\n\
        0000000000000000: 00000002 00000000 00010000 0001 01   999 /run/my dir/c.sock\n";

    #[test]
    fn only_a_listening_entry_for_the_same_path_counts() {
        assert!(listens_in(TABLE, OsStr::new("/run/a.sock")));
        assert!(!listens_in(TABLE, OsStr::new("/run/b.sock")), "bound only");
        assert!(!listens_in(TABLE, OsStr::new("/run/a")), "a prefix");
        assert!(!listens_in(TABLE, OsStr::new("/run/c.sock")), "absent");
        assert!(
            listens_in(TABLE, OsStr::new("/run/my dir/c.sock")),
            "a padded inode and a path with a space"
        );
        assert!(!listens_in(TABLE, OsStr::new("/run/my")), "half a path");
    }

    #[test]
    fn a_bound_socket_listens_only_after_listen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a probe.sock");
        let bound = bind_without_listening(&path);
        assert!(path.exists(), "bind created the file");
        assert!(!is_listening(&path).unwrap(), "bound, not listening");
        // SAFETY: listen(2) on the socket this test owns.
        assert_eq!(unsafe { libc::listen(bound, 1) }, 0);
        assert!(is_listening(&path).unwrap(), "after listen(2)");
        // SAFETY: closing the fd this test owns, once.
        unsafe { libc::close(bound) };
        assert!(!is_listening(&path).unwrap(), "closed");

        std::fs::remove_file(&path).unwrap();
        let listener = UnixListener::bind(&path).unwrap();
        assert!(is_listening(&path).unwrap(), "std's bind listens too");
        drop(listener);
    }

    fn bind_without_listening(path: &Path) -> libc::c_int {
        // SAFETY: a new socket; the address is a zeroed sockaddr_un whose
        // path (shorter than sun_path, checked below) is copied in whole.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = path.as_os_str().as_bytes();
            assert!(bytes.len() < addr.sun_path.len());
            for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
                *dst = src as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            assert_eq!(
                libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len),
                0
            );
            fd
        }
    }
}
