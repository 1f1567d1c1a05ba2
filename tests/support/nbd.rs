//! NBD servers for the tests: nbdkit (plugins and filters) and qemu-nbd,
//! over a unix socket or TCP on 127.0.0.1, killed when dropped. A server
//! that is not installed fails the test (integration/install-deps.sh
//! installs them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

pub struct NbdServer {
    child: Child,
    pub uri: String,
    /// Where the unix socket is (or would be), for restarts.
    pub socket: PathBuf,
    pub port: u16,
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl NbdServer {
    /// `nbdkit ARGS` (plugin, filters, parameters).
    pub fn nbdkit(dir: &Path, transport: Transport, args: &[&str]) -> NbdServer {
        Self::start(dir, transport, |t, sock, port| {
            let mut c = Command::new("nbdkit");
            c.args(["--foreground", "--exit-with-parent"]);
            match t {
                Transport::Unix => c.arg("--unix").arg(sock),
                Transport::Tcp => c.args(["--ipaddr", "127.0.0.1", "--port", &port.to_string()]),
            };
            c.args(args);
            c
        })
    }

    /// `qemu-nbd` serving `file` (raw), persistent, for up to `clients`
    /// connections at once (more than one: it advertises multi-conn).
    pub fn qemu_nbd(dir: &Path, transport: Transport, file: &Path, clients: u32) -> NbdServer {
        Self::start(dir, transport, |t, sock, port| {
            let mut c = Command::new("qemu-nbd");
            c.args(["--persistent", "--format=raw", "--cache=writeback"]);
            c.arg(format!("--shared={clients}"));
            match t {
                Transport::Unix => c.arg("--socket").arg(sock),
                Transport::Tcp => c.args(["--bind", "127.0.0.1", "--port", &port.to_string()]),
            };
            c.arg(file);
            c
        })
    }

    fn start(
        dir: &Path,
        transport: Transport,
        command: impl Fn(Transport, &Path, u16) -> Command,
    ) -> NbdServer {
        let socket = dir.join(format!("nbd-{}.sock", free_port()));
        for _ in 0..5 {
            let port = free_port();
            let mut c = command(transport, &socket, port);
            c.stdin(Stdio::null()).stdout(Stdio::null());
            let program = c.get_program().to_string_lossy().into_owned();
            let mut child = c.spawn().unwrap_or_else(|e| {
                panic!("{program} cannot run ({e}): integration/install-deps.sh installs it")
            });
            let uri = match transport {
                Transport::Unix => format!("nbd+unix:///?socket={}", socket.display()),
                Transport::Tcp => format!("nbd://127.0.0.1:{port}/"),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    eprintln!("{program} exited early ({status}); retrying on another port");
                    break;
                }
                if Self::listening(transport, &socket, port) {
                    return NbdServer {
                        child,
                        uri,
                        socket,
                        port,
                    };
                }
                assert!(Instant::now() < deadline, "{program} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("the NBD server did not start");
    }

    /// Probes by the file or port appearing: a probing connection would
    /// count as one of qemu-nbd's clients.
    fn listening(transport: Transport, socket: &Path, port: u16) -> bool {
        match transport {
            Transport::Unix => socket.exists(),
            Transport::Tcp => std::fs::read_to_string("/proc/net/tcp")
                .map(|t| {
                    let hex = format!(":{port:04X} ");
                    t.lines()
                        .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
                })
                .unwrap_or(false),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The whole export, raw (ciphertext), read with nbdcopy into `dir`.
pub fn copy_raw(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("raw-{}.img", free_port()));
    let status = Command::new("nbdcopy")
        .arg(uri)
        .arg(&out)
        .status()
        .expect("nbdcopy (libnbd-bin) cannot run: integration/install-deps.sh installs it");
    assert!(status.success(), "nbdcopy {uri}: {status}");
    std::fs::read(&out).unwrap()
}
