//! Landlock for `--sandbox full`: once serving, the daemon may touch the
//! image (already open) and remove its socket (if it created one: an
//! inherited socket is not its to remove); every other path is denied,
//! as are TCP bind/connect (but a connect to an NBD server's port, when
//! lost NBD connections are made again, and then reading the TLS
//! credentials a handshake opens), abstract unix sockets and
//! signals to other processes. Applies to the calling thread and the threads it creates
//! later, so it runs before the serve loop spawns any.

use std::path::Path;

use landlock::{
    Access, AccessFs, AccessNet, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::SandboxError;

/// The newest ABI this rule set knows (Linux 6.12: scopes); older kernels
/// get the best subset they support.
const ABI_TARGET: ABI = ABI::V6;

/// Which TCP connects stay allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpConnect {
    None,
    /// The port lost NBD connections are made again to.
    Port(u16),
    /// Any port: a Ceph cluster's monitors and OSDs (ports the cluster
    /// map gives at run time). TCP bind stays denied.
    Any,
}

/// `reads`: files, or directories of files, that stay readable (the TLS
/// credentials an NBD reconnect's handshake opens).
pub fn restrict(
    image: &Path,
    sockets: &[&Path],
    readonly: bool,
    connect: TcpConnect,
    reads: &[&Path],
) -> Result<RulesetStatus, SandboxError> {
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let socket_dirs = sockets.iter().map(|socket| match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    });
    let image_access = if readonly {
        AccessFs::ReadFile.into()
    } else {
        AccessFs::ReadFile | AccessFs::WriteFile
    };
    let path_fd = |p: &Path| {
        PathFd::new(p).map_err(|e| SandboxError::Landlock(format!("{}: {e}", p.display())))
    };
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_TARGET))
        .map_err(err)?
        .handle_access(if connect == TcpConnect::Any {
            AccessNet::from_all(ABI_TARGET) & !AccessNet::ConnectTcp
        } else {
            AccessNet::from_all(ABI_TARGET)
        })
        .map_err(err)?
        .scope(Scope::from_all(ABI_TARGET))
        .map_err(err)?
        .create()
        .map_err(err)?;
    // An NBD or RBD image is a connection made before the sandbox, not a
    // path.
    if !crate::store::is_nbd_uri(image) && !crate::store::is_rbd_spec(image) {
        ruleset = ruleset
            .add_rule(PathBeneath::new(path_fd(image)?, image_access))
            .map_err(err)?;
    }
    if let TcpConnect::Port(port) = connect {
        ruleset = ruleset
            .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
            .map_err(err)?;
    }
    for path in reads {
        // A rule on a file may carry file rights only.
        let access = if path.is_dir() {
            AccessFs::ReadFile | AccessFs::ReadDir
        } else {
            AccessFs::ReadFile.into()
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(path_fd(path)?, access))
            .map_err(err)?;
    }
    for dir in socket_dirs {
        // The socket files are unlinked at exit.
        ruleset = ruleset
            .add_rule(PathBeneath::new(path_fd(dir)?, AccessFs::RemoveFile))
            .map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    Ok(status.ruleset)
}
