//! Shared by the tests/bench_*.rs suites: vhost-user-blk targets to aim
//! `cryptblk bench` at.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A raw image served by qemu-storage-daemon as vhost-user-blk. The daemon
/// is killed when this is dropped.
pub struct Qsd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
}

impl Qsd {
    /// Serves a fresh zeroed raw image of `size` bytes with `queues` queues.
    pub fn raw(size: u64, queues: u32) -> Self {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("create the raw image");
        let socket = dir.path().join("vhost.sock");
        let mut command = Command::new("qemu-storage-daemon");
        command
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},\
                 writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start qemu-storage-daemon ({e}): install it with \
                 integration/install-deps.sh"
            )
        });
        let mut qsd = Self { dir, socket, child };
        qsd.wait_for_socket();
        qsd
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn image(&self) -> PathBuf {
        self.dir.path().join("disk.raw")
    }

    fn wait_for_socket(&mut self) {
        wait_for_socket(&self.socket, &mut self.child, "qemu-storage-daemon");
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `socket` exists, failing early if `child` exits.
pub fn wait_for_socket(socket: &Path, child: &mut Child, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                use std::io::Read;
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("{name} exited with {status} before creating its socket: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not create {} within 20 s",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
