//! A listening socket handed over by whoever started the daemon, instead
//! of one it creates itself:
//!
//! - `--fd N`: the vhost-user backend convention (QEMU's
//!   docs/interop/vhost-user.rst, virtiofsd's `--fd`, qemu-storage-daemon's
//!   `addr.type=fd`): the parent bound and listens, the daemon accepts.
//! - systemd socket activation (sd_listen_fds(3)): `LISTEN_PID` names this
//!   process, `LISTEN_FDS` counts the descriptors passed from fd 3 on, and
//!   `LISTEN_FDNAMES` optionally names them. cryptblk serves one socket, so
//!   exactly one descriptor is expected.
//!
//! Such a socket belongs to the parent: cryptblk never unlinks its file,
//! never changes its mode, and never shuts it down (a listening socket
//! shut down refuses connections for good, also to the next instance
//! systemd would start on it).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use super::SocketError;

/// sd_listen_fds(3): passed descriptors start here.
pub const LISTEN_FDS_START: RawFd = 3;

/// Who handed the socket over, for logs and errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--fd N` on the command line (or `fd = N` in the config file).
    Flag,
    /// systemd socket activation, with the name from LISTEN_FDNAMES if any.
    Systemd { name: Option<String> },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag => write!(f, "--fd"),
            Origin::Systemd { name: Some(n) } => write!(f, "systemd socket activation, {n}"),
            Origin::Systemd { name: None } => write!(f, "systemd socket activation"),
        }
    }
}

/// What socket activation handed over: one descriptor, maybe named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    pub fd: RawFd,
    pub name: Option<String>,
}

const ENV_PID: &str = "LISTEN_PID";
const ENV_FDS: &str = "LISTEN_FDS";
const ENV_NAMES: &str = "LISTEN_FDNAMES";

/// Reads socket activation from the environment, as sd_listen_fds(3) with
/// `unset_environment` set: the variables are removed whatever they say,
/// so nothing this process starts could take them for its own. `None`
/// when the daemon was not socket-activated (no LISTEN_PID, or another
/// process's).
///
/// Call it once at start-up, before any thread starts: it changes the
/// process environment.
pub fn activation_from_env() -> Result<Option<Activation>, SocketError> {
    let var = |name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let (pid, fds, names) = (var(ENV_PID), var(ENV_FDS), var(ENV_NAMES));
    for name in [ENV_PID, ENV_FDS, ENV_NAMES] {
        std::env::remove_var(name);
    }
    parse_activation(
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
        std::process::id(),
    )
}

/// sd_listen_fds(3)'s rules over the variables' values.
fn parse_activation(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    our_pid: u32,
) -> Result<Option<Activation>, SocketError> {
    let bad = |why: String| Err(SocketError::Activation(why));
    let Some(pid) = pid else {
        return Ok(None);
    };
    match pid.trim().parse::<u32>() {
        Ok(p) if p == our_pid => {}
        // Meant for the process that exec'd us, not for us.
        Ok(_) => return Ok(None),
        Err(_) => return bad(format!("LISTEN_PID={pid:?} is not a process id")),
    }
    let count = match fds.map(|f| f.trim().parse::<u32>()) {
        None => return bad("LISTEN_PID is set but LISTEN_FDS is not".into()),
        Some(Err(_)) => return bad(format!("LISTEN_FDS={:?} is not a number", fds.unwrap())),
        Some(Ok(n)) => n,
    };
    match count {
        0 => Ok(None),
        1 => Ok(Some(Activation {
            fd: LISTEN_FDS_START,
            name: names
                .and_then(|n| n.split(':').next())
                .filter(|n| !n.is_empty())
                .map(String::from),
        })),
        n => bad(format!(
            "{n} sockets were passed (LISTEN_FDS={n}) but cryptblk serves exactly one; give \
             the .socket unit a single ListenStream= (one unit and one cryptblk per disk)"
        )),
    }
}

/// Takes over `fd`, which must be a listening AF_UNIX SOCK_STREAM socket,
/// and marks it close-on-exec. From here on the descriptor is the
/// returned listener's: nothing else in the process may use or close it.
pub fn adopt(fd: RawFd, origin: &Origin) -> Result<UnixListener, SocketError> {
    let refuse = |why: String| SocketError::NotAListener {
        fd,
        origin: origin.to_string(),
        why,
    };
    if fd < 0 {
        return Err(refuse("a descriptor number is never negative".into()));
    }
    // SAFETY: fcntl(F_GETFD) only asks about the descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(refuse(format!(
            "it is not open ({}); the parent must pass it open and without close-on-exec",
            io::Error::last_os_error()
        )));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTSOCK) => refuse("it is not a socket".into()),
        _ => refuse(format!("cannot inspect it: {e}")),
    })?;
    if domain != libc::AF_UNIX {
        return Err(refuse(format!(
            "it is not a unix socket (address family {domain}); vhost-user runs over AF_UNIX"
        )));
    }
    let kind = sockopt(fd, libc::SO_TYPE).map_err(|e| refuse(format!("cannot inspect it: {e}")))?;
    if kind != libc::SOCK_STREAM {
        return Err(refuse(format!(
            "it is not a stream socket (type {kind}); use ListenStream= in the .socket unit"
        )));
    }
    let listening =
        sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| refuse(format!("cannot inspect it: {e}")))?;
    if listening == 0 {
        return Err(refuse(
            "it is not listening; the parent must bind(2) and listen(2) before passing it".into(),
        ));
    }
    // SAFETY: F_SETFD on an open descriptor (checked above).
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        let e = io::Error::last_os_error();
        return Err(refuse(format!("cannot mark it close-on-exec: {e}")));
    }
    // SAFETY: the descriptor is open and is a listening socket (checked
    // above); by the --fd and sd_listen_fds conventions the parent handed
    // it to this process to serve on, and the caller adopts each number
    // once, so nothing else here owns it.
    Ok(UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The path the socket is bound to, for the log (None if unnamed or abstract).
pub fn bound_path(listener: &UnixListener) -> Option<PathBuf> {
    let addr = listener.local_addr().ok()?;
    addr.as_pathname()
        .filter(|p| !p.as_os_str().as_bytes().is_empty())
        .map(PathBuf::from)
}

fn sockopt(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value is a c_int and len says so.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::net::{UnixDatagram, UnixStream};

    #[test]
    fn activation_follows_sd_listen_fds() {
        let parse = |pid, fds, names| parse_activation(pid, fds, names, 42);
        assert_eq!(parse(None, Some("1"), None).unwrap(), None);
        assert_eq!(
            parse(Some("41"), Some("1"), None).unwrap(),
            None,
            "another pid's"
        );
        assert_eq!(parse(Some("42"), Some("0"), None).unwrap(), None);
        let one = parse(Some("42"), Some("1"), None).unwrap().unwrap();
        assert_eq!(one, Activation { fd: 3, name: None });
        let named = parse(Some("42"), Some("1"), Some("vm1.socket")).unwrap();
        assert_eq!(named.unwrap().name.as_deref(), Some("vm1.socket"));
        for (pid, fds) in [("x", "1"), ("42", "two"), ("42", "2")] {
            assert!(parse(Some(pid), Some(fds), None).is_err(), "{pid} {fds}");
        }
        let two = parse(Some("42"), Some("2"), None).unwrap_err().to_string();
        assert!(two.contains("exactly one"), "{two}");
        assert!(parse(Some("42"), None, None).is_err());
    }

    fn refusal(fd: RawFd) -> String {
        adopt(fd, &Origin::Flag).err().unwrap().to_string()
    }

    #[test]
    fn only_a_listening_unix_stream_socket_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        assert!(refusal(file.as_raw_fd()).contains("not a socket"));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(refusal(a.as_raw_fd()).contains("not listening"));
        let (d, _e) = UnixDatagram::pair().unwrap();
        assert!(refusal(d.as_raw_fd()).contains("not a stream socket"));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(refusal(tcp.as_raw_fd()).contains("not a unix socket"));
        assert!(refusal(-1).contains("negative"));
        let listener = UnixListener::bind(dir.path().join("s.sock")).unwrap();
        let fd = listener.into_raw_fd();
        let adopted = adopt(fd, &Origin::Flag).unwrap();
        assert_eq!(bound_path(&adopted), Some(dir.path().join("s.sock")));
        // A number no descriptor has (far above any RLIMIT_NOFILE): a closed
        // one could be reused by another test's thread at any moment.
        let closed = refusal(i32::MAX - 1);
        assert!(
            closed.contains("not open") && closed.contains("--fd"),
            "{closed}"
        );
    }
}
