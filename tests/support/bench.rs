//! Shared by the tests/bench_*.rs suites: vhost-user-blk targets to aim
//! `cryptblk bench` at, and LUKS1 images made by qemu-img.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running vhost-user-blk daemon: the kit's one launcher.
pub use super::Daemon as Target;

/// Starts a target with a fresh socket path, its output silenced and its
/// stderr kept for the message if it exits before listening.
fn spawn(mut command: Command, socket: PathBuf, name: &'static str) -> Target {
    let _ = std::fs::remove_file(&socket);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Target::spawn(command, socket, name)
}

/// A vhost-user-blk export by qemu-storage-daemon of `--blockdev` nodes;
/// the last node is exported.
pub fn qsd(dir: &Path, name: &str, blockdevs: &[String], extra: &[&str], queues: u32) -> Target {
    let socket = dir.join(format!("{name}.sock"));
    let node = blockdevs
        .last()
        .and_then(|b| b.split(',').find_map(|kv| kv.strip_prefix("node-name=")))
        .expect("a blockdev with a node-name");
    let mut command = Command::new("qemu-storage-daemon");
    command.args(extra);
    for blockdev in blockdevs {
        command.arg("--blockdev").arg(blockdev);
    }
    command.arg("--export").arg(format!(
        "type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,addr.path={},\
         writable=on,num-queues={queues}",
        socket.display()
    ));
    spawn(command, socket, "qemu-storage-daemon")
}

/// A temp dir with a zeroed raw image served by qemu-storage-daemon.
pub struct Qsd {
    pub dir: tempfile::TempDir,
    pub target: Target,
}

impl Qsd {
    pub fn raw(size: u64, queues: u32) -> Self {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("create the raw image");
        let file = format!("driver=file,filename={},node-name=file0", image.display());
        let target = qsd(dir.path(), "raw", &[file], &[], queues);
        Self { dir, target }
    }

    pub fn socket(&self) -> &Path {
        &self.target.socket
    }

    pub fn pid(&self) -> u32 {
        self.target.pid
    }

    pub fn image(&self) -> PathBuf {
        self.dir.path().join("disk.raw")
    }
}

/// `cryptblk serve` (the binary under test) with `args` after the socket.
pub fn serve(dir: &Path, name: &str, args: &[&str]) -> Target {
    let socket = dir.join(format!("{name}.sock"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_cryptblk"));
    command.arg("serve").arg("--socket").arg(&socket).args(args);
    spawn(command, socket, "cryptblk serve")
}

/// A LUKS1 image made by qemu-img, and what plain mode needs to open it.
pub struct Luks {
    pub image: PathBuf,
    pub passphrase: PathBuf,
    pub volume_key: PathBuf,
    /// Payload offset in 512-byte sectors.
    pub payload_offset: u64,
}

impl Luks {
    pub fn create(dir: &Path, size: &str) -> Self {
        let image = dir.join("image.luks");
        let passphrase = dir.join("passphrase");
        std::fs::write(&passphrase, "bench-test-passphrase").unwrap();
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "luks", "--object"])
            .arg(format!("secret,id=sec0,file={}", passphrase.display()))
            .args(["-o", "key-secret=sec0,iter-time=10"])
            .arg(&image)
            .arg(size));
        let dump = run(Command::new("cryptsetup").arg("luksDump").arg(&image));
        let payload_offset = dump
            .lines()
            .find_map(|l| l.strip_prefix("Payload offset:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a LUKS1 payload offset");
        let keys = run(Command::new("cryptsetup")
            .args([
                "luksDump",
                "--batch-mode",
                "--dump-volume-key",
                "--key-file",
            ])
            .arg(&passphrase)
            .arg(&image));
        let hex = &keys[keys.find("MK dump:").expect("an MK dump") + 8..];
        let key: Vec<u8> = hex
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex key bytes"))
            .collect();
        assert_eq!(key.len(), 64, "AES-256-XTS volume key");
        let volume_key = dir.join("volume.key");
        std::fs::write(&volume_key, key).unwrap();
        Self {
            image,
            passphrase,
            volume_key,
            payload_offset,
        }
    }

    /// qemu-storage-daemon's luks driver over this image.
    pub fn qsd(&self, dir: &Path, queues: u32) -> Target {
        let secret = format!("secret,id=sec0,file={}", self.passphrase.display());
        let blockdevs = [
            format!(
                "driver=file,filename={},node-name=file0",
                self.image.display()
            ),
            "driver=luks,file=file0,key-secret=sec0,node-name=luks0".to_string(),
        ];
        qsd(dir, "qsd-luks", &blockdevs, &["--object", &secret], queues)
    }

    /// cryptblk serve in plain mode over this image's payload.
    pub fn cryptblk(&self, dir: &Path, queues: u32) -> Target {
        let offset = self.payload_offset.to_string();
        let queues = queues.to_string();
        serve(
            dir,
            "cryptblk-luks",
            &[
                "--type",
                "plain",
                "--image",
                self.image.to_str().unwrap(),
                "--key-file",
                self.volume_key.to_str().unwrap(),
                "--key-size",
                "512",
                "--cipher",
                "aes-xts-plain64",
                "--offset",
                &offset,
                "--queues",
                &queues,
            ],
        )
    }
}

/// Runs a tool to completion and returns its stdout; panics naming the
/// install script when the tool is missing.
fn run(command: &mut Command) -> String {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().unwrap_or_else(|e| {
        panic!("cannot run {program} ({e}): install it with integration/install-deps.sh")
    });
    assert!(
        output.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// A bench run that saw no error and no mismatch, and measured something.
pub fn assert_clean(report: &cryptblk::bench::Report) {
    assert_eq!(report.error_count(), 0, "errors: {:?}", report.errors);
    assert_eq!(report.mismatches(), 0, "{}", report.to_table());
    assert!(report.total.iops > 0.0);
    assert!(report.total.latency_us.max >= report.total.latency_us.p50);
}
