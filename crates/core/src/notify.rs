//! The service manager's readiness protocol (sd_notify(3)), spoken
//! directly: newline-separated `KEY=value` lines in one datagram to the
//! unix socket named by `NOTIFY_SOCKET` (a path, or an abstract name when
//! it starts with '@'). Nothing else of libsystemd is needed, so it is
//! not linked.
//!
//! The socket is created and connected at start-up, before the sandbox:
//! afterwards only send(2) runs (sendto, in the seccomp allowlist), and a
//! connected socket needs no path lookup that Landlock could refuse. It is
//! non-blocking: a service manager that stops reading can never stall the
//! daemon.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const ENV: &str = "NOTIFY_SOCKET";

/// Where readiness and status go; does nothing without `NOTIFY_SOCKET`.
#[derive(Clone, Default)]
pub struct Notifier {
    socket: Option<Arc<UnixDatagram>>,
    /// One warning for failed sends, not one per state change.
    warned: Arc<AtomicBool>,
}

impl Notifier {
    /// Connects to `NOTIFY_SOCKET` if it is set, and removes it from the
    /// environment (nothing this process starts should notify in its
    /// name). A socket that cannot be reached is a warning, not an error:
    /// the daemon serves all the same, and the service manager reports the
    /// missing READY=1 itself.
    ///
    /// Call it once at start-up, before any thread starts: it changes the
    /// process environment.
    pub fn from_env() -> Notifier {
        let Some(target) = std::env::var_os(ENV) else {
            return Notifier::default();
        };
        std::env::remove_var(ENV);
        let target = target.to_string_lossy().into_owned();
        match connect(&target) {
            Ok(socket) => {
                log::debug!("{ENV}={target}: readiness and status go there");
                Notifier {
                    socket: Some(Arc::new(socket)),
                    warned: Arc::default(),
                }
            }
            Err(e) => {
                log::warn!(
                    "cannot reach {ENV}={target}: {e}; the service manager will not hear that \
                     cryptblk is ready (a Type=notify unit then times out): check the unit's \
                     NotifyAccess= and that nothing confines the daemon before start-up"
                );
                Notifier::default()
            }
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// READY=1 with a status line: the socket listens, the key is loaded.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// STATUS=...: what `systemctl status` shows.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// STOPPING=1 with a status line: shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    fn send(&self, message: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        if let Err(e) = socket.send(message.as_bytes()) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!("cannot notify the service manager: {e}");
            }
        }
    }
}

/// A datagram socket connected to `target`: a path, or `@name` for the
/// abstract namespace.
fn connect(target: &str) -> io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.connect_addr(&addr)?;
        }
        None if target.starts_with('/') => socket.connect(target)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@...)",
            ))
        }
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn notifier(target: &str) -> Notifier {
        Notifier {
            socket: Some(Arc::new(connect(target).unwrap())),
            warned: Arc::default(),
        }
    }

    fn received(listener: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn messages_reach_a_path_or_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = notifier(path.to_str().unwrap());
        n.ready("waiting for a VMM");
        assert_eq!(received(&listener), "READY=1\nSTATUS=waiting for a VMM");
        n.stopping("stopping");
        assert_eq!(received(&listener), "STOPPING=1\nSTATUS=stopping");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("cryptblk-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        notifier(&format!("@{name}")).status("serving a VMM (connection 1)");
        assert_eq!(
            received(&abstract_listener),
            "STATUS=serving a VMM (connection 1)"
        );
    }

    #[test]
    fn a_relative_or_absent_target_is_refused_and_no_target_is_silent() {
        assert!(connect("relative/notify").is_err());
        assert!(connect("/nonexistent/cryptblk/notify").is_err());
        let off = Notifier::default();
        assert!(!off.enabled());
        off.ready("nothing happens");
    }
}
