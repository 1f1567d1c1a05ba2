//! Who may connect to the vhost-user socket. Whoever connects drives the
//! device and reads the decrypted disk, so the socket is the access control:
//!
//! - [`listen`] creates it 0600 whatever the umask, gives it the operator's
//!   group and mode (`--socket-group`, `--socket-mode`) before it listens,
//!   and refuses a directory where others could replace it.
//! - [`Gate`] accepts connections and serves only peers whose credentials
//!   (SO_PEERCRED) are in `--allow-uid` / `--allow-gid`.
//! - [`ids`] turns user and group names into ids at start-up, before the
//!   sandbox forbids reading /etc/passwd and /etc/group.

pub mod ids;
pub mod inherited;
mod listen;
mod peer;

use std::os::fd::RawFd;
use std::path::PathBuf;

pub use inherited::{activation_from_env, Activation, Origin};
pub use listen::{listen, SocketFile};
pub use peer::{peer_of, Gate, Peer, Stopper};

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    /// A socket file cryptblk creates (`--socket`), and removes at exit.
    Path(PathBuf),
    /// A listening socket handed over by the parent (`--fd`) or by systemd
    /// (socket activation); cryptblk neither creates nor removes its file.
    Inherited { fd: RawFd, origin: Origin },
}

/// The socket file's mode when nothing else is asked for: the daemon's user only.
pub const DEFAULT_MODE: u32 = 0o600;
/// With `--socket-group` and no `--socket-mode`: the group may connect too.
pub const GROUP_MODE: u32 = 0o660;

/// How the socket file is created and which peers are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits of the socket file (connect(2) needs write permission).
    pub mode: u32,
    /// Group to give the socket file, if not the daemon's own.
    pub group: Option<u32>,
    pub allow: Allowlist,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: DEFAULT_MODE,
            group: None,
            allow: Allowlist::default(),
        }
    }
}

/// `--allow-uid` / `--allow-gid`. Empty means "whoever the file mode lets
/// connect"; otherwise a peer is served if its uid is listed or its primary
/// or a supplementary group is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Allowlist {
    pub fn is_empty(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    pub fn admits(&self, peer: &Peer) -> bool {
        self.is_empty()
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
            || peer.groups.iter().any(|g| self.gids.contains(g))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "{dir} (mode {mode:04o}) is writable by every user and not sticky: anyone could replace \
         the socket with their own and receive the VMM's connection. Put the socket in a \
         directory only cryptblk's (and the VMM's) user can write, e.g. `install -d -m 0750 \
         /run/cryptblk`, or make this one sticky (chmod +t, as /tmp is)"
    )]
    OpenDirectory { dir: String, mode: u32 },
    #[error("{path} exists and is not a socket; refusing to replace it: remove it or pick another --socket")]
    NotASocket { path: String },
    #[error("--socket {path}: a unix socket path must be 1 to 107 bytes without NUL; use a shorter path")]
    BadPath { path: String },
    #[error(
        "cannot listen on {path}: {source} (is the directory writable? another daemon on it?)"
    )]
    Listen {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot give {path} to group {gid}: {source}; run cryptblk as root or as a member of that group")]
    Chown {
        path: String,
        gid: u32,
        source: std::io::Error,
    },
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("cannot serve on fd {fd} (from {origin}): {why}")]
    NotAListener {
        fd: RawFd,
        origin: String,
        why: String,
    },
    #[error("cannot set mode {mode:04o} on {path}: {source}")]
    Chmod {
        path: String,
        mode: u32,
        source: std::io::Error,
    },
}

/// A socket path as errors show it.
fn shown(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// The directory a socket path is created in.
fn directory_of(path: &std::path::Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn allowlist_matches_uid_primary_or_supplementary_group() {
        let open = Allowlist::default();
        assert!(open.admits(&peer(1000, 1000, &[])));
        let list = Allowlist {
            uids: vec![107],
            gids: vec![36],
        };
        assert!(list.admits(&peer(107, 107, &[])));
        assert!(list.admits(&peer(1000, 36, &[])));
        assert!(list.admits(&peer(1000, 1000, &[5, 36])));
        assert!(!list.admits(&peer(1000, 1000, &[5])));
        assert!(!list.admits(&peer(0, 0, &[])), "root is not implied");
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(directory_of("s.sock".as_ref()), PathBuf::from("."));
        assert_eq!(
            directory_of("/run/x/s.sock".as_ref()),
            PathBuf::from("/run/x")
        );
    }
}
