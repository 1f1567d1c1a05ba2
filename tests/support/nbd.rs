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

type MakeCommand = Box<dyn Fn(Transport, &Path, u16) -> Command + Send>;

pub struct NbdServer {
    child: Child,
    make: MakeCommand,
    transport: Transport,
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
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::start(dir, transport, move |t, sock, port| {
            let mut c = Command::new("nbdkit");
            c.args(["--foreground", "--exit-with-parent"]);
            match t {
                Transport::Unix => c.arg("--unix").arg(sock),
                Transport::Tcp => c.args(["--ipaddr", "127.0.0.1", "--port", &port.to_string()]),
            };
            c.args(&args);
            c
        })
    }

    /// `qemu-nbd` serving `file` (raw), persistent, for up to `clients`
    /// connections at once (more than one: it advertises multi-conn).
    pub fn qemu_nbd(dir: &Path, transport: Transport, file: &Path, clients: u32) -> NbdServer {
        let file = file.to_path_buf();
        Self::start(dir, transport, move |t, sock, port| {
            let mut c = Command::new("qemu-nbd");
            c.args(["--persistent", "--format=raw", "--cache=writeback"]);
            c.arg(format!("--shared={clients}"));
            match t {
                Transport::Unix => c.arg("--socket").arg(sock),
                Transport::Tcp => c.args(["--bind", "127.0.0.1", "--port", &port.to_string()]),
            };
            c.arg(&file);
            c
        })
    }

    /// qemu-storage-daemon serving `blockdev` (a `--blockdev` whose node is
    /// named `disk`) as a writable NBD export, as README's example does;
    /// the export's name is the node's, and `uri` names it (QEMU 10
    /// advertises multi-conn on it, and has no option for it).
    pub fn qsd(dir: &Path, transport: Transport, blockdev: &str) -> NbdServer {
        let blockdev = blockdev.to_string();
        let mut server = Self::start(dir, transport, move |t, sock, port| {
            let mut c = Command::new("qemu-storage-daemon");
            c.args(["--blockdev", &blockdev, "--nbd-server"]);
            match t {
                Transport::Unix => c.arg(format!("addr.type=unix,addr.path={}", sock.display())),
                Transport::Tcp => c.arg(format!(
                    "addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
                )),
            };
            c.args(["--export", "type=nbd,id=e0,node-name=disk,writable=on"]);
            c
        });
        server.uri = server.uri.replacen(":///", ":///disk", 1);
        server
    }

    /// `tests/support/hostile_nbd.py ARGS`: an NBD server that breaks the
    /// protocol as its `--mode` says (see the script), logging what it
    /// does to `log`. python3 must be installed.
    pub fn hostile(dir: &Path, transport: Transport, log: &Path, args: &[&str]) -> NbdServer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/hostile_nbd.py");
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--log".to_string(), log.display().to_string()]);
        Self::start(dir, transport, move |t, sock, port| {
            let mut c = Command::new("python3");
            c.arg(script);
            match t {
                Transport::Unix => c.arg("--unix").arg(sock),
                Transport::Tcp => c.args(["--port", &port.to_string()]),
            };
            c.args(&args);
            c
        })
    }

    fn start(
        dir: &Path,
        transport: Transport,
        command: impl Fn(Transport, &Path, u16) -> Command + Send + 'static,
    ) -> NbdServer {
        let socket = dir.join(format!("nbd-{}.sock", free_port()));
        let make: MakeCommand = Box::new(command);
        for _ in 0..5 {
            let port = free_port();
            let Some(child) = Self::spawn(&make, transport, &socket, port) else {
                continue;
            };
            let uri = match transport {
                Transport::Unix => format!("nbd+unix:///?socket={}", socket.display()),
                Transport::Tcp => format!("nbd://127.0.0.1:{port}/"),
            };
            return NbdServer {
                child,
                make,
                transport,
                uri,
                socket,
                port,
            };
        }
        panic!("the NBD server did not start");
    }

    /// Runs the server and waits until it listens; None if it exited first
    /// (a port taken meanwhile).
    fn spawn(make: &MakeCommand, transport: Transport, socket: &Path, port: u16) -> Option<Child> {
        let mut c = make(transport, socket, port);
        c.stdin(Stdio::null()).stdout(Stdio::null());
        let program = c.get_program().to_string_lossy().into_owned();
        let mut child = c.spawn().unwrap_or_else(|e| {
            panic!("{program} cannot run ({e}): integration/install-deps.sh installs it")
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("{program} exited early ({status})");
                return None;
            }
            if Self::listening(transport, socket, port) {
                return Some(child);
            }
            assert!(Instant::now() < deadline, "{program} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again, same command, same socket or port (after
    /// `kill`): what a restarted server looks like to its clients.
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if let Some(child) = Self::spawn(&self.make, self.transport, &self.socket, self.port) {
                self.child = child;
                return;
            }
            // The port may still be held by the old process's sockets.
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the NBD server did not start again");
    }

    /// Whether the server process still runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
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

    /// SIGTERM: a graceful shutdown (nbdkit answers the requests it still
    /// holds with ESHUTDOWN), then waits for the exit.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.kill();
    }

    /// SIGKILL, and the socket file removed.
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
