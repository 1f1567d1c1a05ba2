//! Accepting connections and serving only admitted peers.
//!
//! The kernel records who connected (SO_PEERCRED: pid, uid, gid at
//! connect(2) time; SO_PEERGROUPS: supplementary groups), so the check
//! needs nothing from the peer and happens before the vhost-user handler
//! reads a single message. Both are getsockopt(2), which the seccomp
//! allowlist already has.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Allowlist;

/// At most one refusal is logged at warn level per interval: a local user
/// looping on connect() cannot flood the log.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Supplementary groups asked for first; more are read if the peer has them.
const GROUPS_GUESS: usize = 64;

/// Who is at the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups; read only when `--allow-gid` needs them.
    pub groups: Vec<u32>,
}

/// The listening socket, handing out only connections from admitted peers.
pub struct Gate {
    listener: UnixListener,
    allow: Allowlist,
    refusals: RefusalLog,
    stop: Stopper,
}

/// Wakes a [`Gate::accept`] that waits, and makes every later one return
/// at once: an eventfd that accept polls beside the listener. The
/// listening socket itself is left alone, so an inherited one (systemd's,
/// the parent's) still works for whoever owns it after this daemon.
#[derive(Clone)]
pub struct Stopper(Arc<OwnedFd>);

impl Stopper {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) with constant arguments; the fd is ours on success.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(Stopper(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Async-signal-safe: one write(2).
    pub fn stop(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd. A full
        // counter (EAGAIN) would still be readable, which is all we need.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

impl Gate {
    /// Fails only if no eventfd can be made (out of descriptors).
    pub fn new(listener: UnixListener, allow: Allowlist) -> io::Result<Self> {
        Ok(Gate {
            listener,
            allow,
            refusals: RefusalLog::default(),
            stop: Stopper::new()?,
        })
    }

    /// A handle that ends [`Gate::accept`] from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stop.clone()
    }

    /// Blocks until an admitted peer connects. Refused peers are closed and
    /// logged; an error means the listener is unusable, or the stopper was
    /// used (`ErrorKind::Interrupted` then, whatever the listener's state).
    pub fn accept(&mut self) -> io::Result<UnixStream> {
        loop {
            if !self.wait_for_peer()? {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "stopped while waiting for a connection",
                ));
            }
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                // Interrupted by a signal, the peer gave up first, or a
                // non-blocking inherited socket had nothing after all.
                Err(e) if retry(&e) => continue,
                Err(e) => return Err(e),
            };
            if self.allow.is_empty() {
                return Ok(stream);
            }
            match peer_of(&stream, !self.allow.gids.is_empty()) {
                Ok(peer) if self.allow.admits(&peer) => {
                    log::info!(
                        "admitted pid {} (uid {}, gid {})",
                        peer.pid,
                        peer.uid,
                        peer.gid
                    );
                    return Ok(stream);
                }
                Ok(peer) => self.refusals.log(&peer),
                // Fail closed: a peer we cannot identify is not served.
                Err(e) => log::warn!("refused a connection: cannot read its credentials: {e}"),
            }
        }
    }
}

impl Gate {
    /// Waits until a connection is pending (true) or the stopper was used
    /// (false).
    fn wait_for_peer(&self) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.stop.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: fds is a live array of two pollfd.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if fds[0].revents != 0 {
            return Ok(false);
        }
        if fds[1].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(io::Error::other("the listening socket failed"));
        }
        Ok(true)
    }
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::WouldBlock
    )
}

/// The connection's credentials, with supplementary groups if `groups`.
pub fn peer_of(stream: &UnixStream, groups: bool) -> io::Result<Peer> {
    let fd = stream.as_raw_fd();
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    getsockopt(fd, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len)?;
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        groups: if groups {
            supplementary_groups(fd)?
        } else {
            Vec::new()
        },
    })
}

/// SO_PEERGROUPS answers ERANGE with the size it needs when the buffer is
/// too small.
fn supplementary_groups(fd: RawFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; GROUPS_GUESS];
    loop {
        let mut len = size_of_val(groups.as_slice()) as libc::socklen_t;
        match getsockopt(
            fd,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        ) {
            Ok(()) => {
                groups.truncate(len as usize / size_of::<libc::gid_t>());
                return Ok(groups);
            }
            Err(e)
                if e.raw_os_error() == Some(libc::ERANGE)
                    && len as usize > size_of_val(groups.as_slice()) =>
            {
                groups.resize(len as usize / size_of::<libc::gid_t>(), 0);
            }
            Err(e) => return Err(e),
        }
    }
}

fn getsockopt(
    fd: RawFd,
    option: libc::c_int,
    value: *mut libc::c_void,
    len: &mut libc::socklen_t,
) -> io::Result<()> {
    // SAFETY: the caller passes a buffer of at least *len bytes.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, option, value, len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The first refusal of an interval is a warning naming the peer; the rest
/// are debug lines, counted in the next warning.
#[derive(Default)]
struct RefusalLog {
    last_warning: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    fn log(&mut self, peer: &Peer) {
        let msg = format!(
            "refused a connection from pid {} (uid {}, gid {}): not in --allow-uid/--allow-gid",
            peer.pid, peer.uid, peer.gid
        );
        let due = self
            .last_warning
            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL);
        if !due {
            self.suppressed += 1;
            log::debug!("{msg}");
            return;
        }
        self.last_warning = Some(Instant::now());
        match std::mem::take(&mut self.suppressed) {
            0 => log::warn!("{msg}"),
            n => log::warn!("{msg} ({n} more refused since the last warning)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socketpair_peer_is_this_process_with_its_groups() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = peer_of(&a, true).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
        // SAFETY: getuid/getgid cannot fail.
        assert_eq!(peer.uid, unsafe { libc::getuid() });
        // SAFETY: as above.
        assert_eq!(peer.gid, unsafe { libc::getgid() });
        assert!(peer_of(&a, false).unwrap().groups.is_empty());
    }

    #[test]
    fn the_stopper_ends_a_waiting_accept_and_leaves_the_socket_listening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut gate = Gate::new(UnixListener::bind(&path).unwrap(), Allowlist::default()).unwrap();
        let stopper = gate.stopper();
        let waiter = std::thread::spawn(move || {
            let e = gate.accept().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Interrupted);
            // Every later accept returns at once too.
            assert!(gate.accept().is_err());
            gate
        });
        std::thread::sleep(Duration::from_millis(50));
        stopper.stop();
        let gate = waiter.join().unwrap();
        // Not shut down: a connection still reaches the listener.
        UnixStream::connect(&path).unwrap();
        drop(gate);
    }

    #[test]
    fn refusals_within_an_interval_are_counted_not_warned() {
        let mut log = RefusalLog::default();
        let peer = Peer {
            pid: 1,
            uid: 2,
            gid: 3,
            groups: vec![],
        };
        log.log(&peer);
        log.log(&peer);
        log.log(&peer);
        assert_eq!(log.suppressed, 2);
        log.last_warning = Some(Instant::now() - REFUSAL_LOG_INTERVAL);
        log.log(&peer);
        assert_eq!(log.suppressed, 0);
    }
}
