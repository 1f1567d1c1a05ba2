//! Confinement of a serving daemon (`--sandbox`): after start-up (image
//! open, key read, socket listening) it gives up what serving does not need.
//!
//! - `seccomp` (default): a system call allowlist ([`seccomp`]); anything
//!   else (exec, fork, open, bind, ptrace, ...) stops the daemon.
//! - `full`: seccomp plus Landlock ([`landlock`]): no path but the image and
//!   the socket's directory, no TCP, no abstract sockets, no signals out.
//! - `seccomp-log`: the allowlist in audit mode, for debugging: nothing is
//!   refused, the kernel logs calls outside the list.
//! - `none`: no confinement.

pub mod landlock;
pub mod seccomp;

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::ValueEnum;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot build the seccomp filter: {0}")]
    Seccomp(String),
    #[error(
        "cannot install the seccomp filter: {0}; use --sandbox none on kernels without seccomp"
    )]
    Install(String),
    #[error("cannot set up Landlock: {0}; use --sandbox seccomp if the kernel lacks Landlock")]
    Landlock(String),
    #[error("this kernel does not enforce Landlock (needs Linux 5.13+ with landlock in lsm=); use --sandbox seccomp")]
    LandlockUnavailable,
}

impl SandboxError {
    fn seccomp(e: impl std::fmt::Display) -> Self {
        SandboxError::Seccomp(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxMode {
    /// No confinement.
    None,
    /// System call allowlist.
    #[default]
    Seccomp,
    /// seccomp + Landlock file, network and scope restrictions.
    Full,
    /// Allow everything, log calls outside the allowlist to the kernel log.
    SeccompLog,
}

impl SandboxMode {
    /// The name `--sandbox` takes.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string())
    }
}

/// Where lost NBD connections are made again once serving (reconnecting
/// on): the socket family of the server's address found at start-up, and
/// its TCP port. The sandbox then allows exactly that: creating a stream
/// socket of that family and connecting it (seccomp), and with Landlock a
/// TCP connect to that port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdPeer {
    pub family: i32,
    pub tcp_port: Option<u16>,
    /// The connection uses TLS. libnbd reads the credentials (the PSK
    /// file, the certificates) anew in every handshake, so files may then
    /// be opened read-only (seccomp), and with Landlock those files only
    /// ([`Sandbox::tls_files`]).
    pub tls: bool,
}

/// What network access serving needs after the sandbox is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Lost NBD connections are made again, to that peer.
    Nbd(NbdPeer),
    /// librados talks to a Ceph cluster: its messenger threads connect
    /// to monitors and OSDs (whose addresses and ports the cluster map
    /// gives and changes at run time) with TCP stream sockets, again after
    /// a lost connection or when an OSD moves. The sandbox allows exactly
    /// that: TCP/IPv4 and TCP/IPv6 stream sockets, connect, their socket
    /// options and names, and uname (librados reads it when it reconnects);
    /// with Landlock, TCP connects to any port (never bind). librados' admin
    /// socket is switched off for the daemon (it would accept connections
    /// and unlink its file), and its configuration and keyring are read
    /// before the sandbox.
    Rbd,
}

/// What the sandbox must leave reachable.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub mode: SandboxMode,
    pub image: PathBuf,
    /// The socket file cryptblk created and removes at exit; None for an
    /// inherited socket (`--fd`, socket activation), which is not ours.
    pub socket: Option<PathBuf>,
    /// The control socket (`--control`), removed at exit too.
    pub control: Option<PathBuf>,
    pub readonly: bool,
    /// What a TLS handshake with an NBD server reads (`--tls-psk-file`,
    /// `--tls-certificates`): readable under Landlock when lost
    /// connections are made again over TLS.
    pub tls_files: Vec<PathBuf>,
}

impl Sandbox {
    /// The socket files the daemon removes at exit.
    fn removable(&self) -> Vec<&std::path::Path> {
        self.socket
            .iter()
            .chain(&self.control)
            .map(|p| p.as_path())
            .collect()
    }

    /// Confines the calling process. Call it once, before the serve loop
    /// starts threads (Landlock binds only the calling thread and its
    /// future children; seccomp is synchronised to all threads).
    ///
    /// `socket_dirs` are the directory fds the daemon removes its sockets
    /// (vhost-user and control) through at exit: the only places anything
    /// may be unlinked. None (an inherited socket, no control socket)
    /// allows no unlinking at all. `net`: the network access the image
    /// needs (NBD reconnects, a Ceph cluster), if any.
    pub fn apply(&self, socket_dirs: &[RawFd], net: Option<Network>) -> Result<(), SandboxError> {
        match self.mode {
            SandboxMode::None => {
                log::info!("sandbox: none");
                return Ok(());
            }
            SandboxMode::Full => {
                let connect = match net {
                    Some(Network::Nbd(NbdPeer {
                        tcp_port: Some(port),
                        ..
                    })) => landlock::TcpConnect::Port(port),
                    Some(Network::Rbd) => landlock::TcpConnect::Any,
                    _ => landlock::TcpConnect::None,
                };
                let reads: Vec<_> = match net {
                    Some(Network::Nbd(NbdPeer { tls: true, .. })) => {
                        self.tls_files.iter().map(|p| p.as_path()).collect()
                    }
                    _ => Vec::new(),
                };
                let status = landlock::restrict(
                    &self.image,
                    &self.removable(),
                    self.readonly,
                    connect,
                    &reads,
                )?;
                match status {
                    ::landlock::RulesetStatus::NotEnforced => {
                        return Err(SandboxError::LandlockUnavailable)
                    }
                    ::landlock::RulesetStatus::PartiallyEnforced => {
                        log::warn!("sandbox: this kernel enforces only part of the Landlock rules")
                    }
                    ::landlock::RulesetStatus::FullyEnforced => {}
                }
            }
            SandboxMode::Seccomp | SandboxMode::SeccompLog => {}
        }
        #[cfg(debug_assertions)]
        probe_open();
        let on_violation = if self.mode == SandboxMode::SeccompLog {
            seccomp::OnViolation::Log
        } else {
            seccomp::OnViolation::Trap
        };
        seccomp::install(on_violation, socket_dirs, net)?;
        log::info!(
            "sandbox: {} ({} system calls allowed{})",
            self.mode.name(),
            seccomp::allowed_count(net),
            match net {
                Some(Network::Nbd(NbdPeer { tls: true, .. })) => {
                    ", socket, connect and read-only opens for NBD reconnects over TLS"
                }
                Some(Network::Nbd(_)) => ", socket and connect for NBD reconnects",
                Some(Network::Rbd) => ", TCP sockets and connect for librados",
                None => "",
            }
        );
        Ok(())
    }
}

/// A test hook, in debug builds only (release builds do not contain it):
/// with `CRYPTBLK_TEST_PROBE_OPEN=PATH` in its environment the daemon opens
/// PATH read-only once Landlock binds it, and logs the outcome
/// (`sandbox probe: open PATH: ok` or the error), so that a test sees from
/// outside what Landlock refuses. It runs before the seccomp filter, which
/// would trap the open call itself in every mode.
#[cfg(debug_assertions)]
fn probe_open() {
    let Some(path) = std::env::var_os("CRYPTBLK_TEST_PROBE_OPEN") else {
        return;
    };
    let path = std::path::Path::new(&path);
    match std::fs::File::open(path) {
        Ok(_) => log::info!("sandbox probe: open {}: ok", path.display()),
        Err(e) => log::info!("sandbox probe: open {}: {e}", path.display()),
    }
}
