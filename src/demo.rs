//! `cryptblk demo`: a first run with no VM. Makes a key and a sparse
//! encrypted image in a temporary directory, serves it with this binary,
//! drives it with the bench client (verified writes, then reads), shows
//! that the image holds ciphertext only, and cleans up.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Args;

use crate::bench::listening::{wait_for_listener, Startup};
use crate::bench::{self, JobSpec, Report, RwMode};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the directory with the image, key and socket afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Image size.
    #[arg(long, default_value = "256M")]
    pub size: String,
    /// Seconds for each benchmark phase.
    #[arg(long, default_value_t = 3)]
    pub runtime: u64,
    /// Where to put the demo directory (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup failed: {0}")]
    Setup(#[from] std::io::Error),
    #[error("the daemon did not start: {0}")]
    Daemon(String),
    #[error(transparent)]
    Bench(#[from] bench::BenchError),
    #[error("verification failed: {0} mismatching blocks, {1} I/O errors")]
    Verify(u64, u64),
    #[error("plaintext written by the guest was found in the image")]
    PlaintextInImage,
}

const QUEUES: u32 = 2;

pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("cryptblk-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, args);
    if args.keep {
        println!("\nkept {} (image, key, logs)", dir.display());
    } else {
        std::fs::remove_dir_all(&dir)?;
        println!("\ncleaned up {}", dir.display());
    }
    result
}

fn run_in(dir: &Path, args: &DemoArgs) -> Result<(), DemoError> {
    let key = dir.join("demo.key");
    let image = dir.join("demo.img");
    let socket = dir.join("demo.sock");
    write_random_key(&key)?;
    println!("1. made a random 512-bit key: {}", key.display());
    let mut daemon = start_daemon(dir, &socket, &image, &key, &args.size)?;
    println!(
        "2. serving an encrypted {} image (aes-xts-plain64, 4 KiB sectors, {QUEUES} queues) on {}",
        args.size,
        socket.display()
    );
    let outcome = benchmark(&socket, args.runtime, daemon.id());
    stop_daemon(&mut daemon);
    let (write, read) = outcome?;
    println!(
        "\n5. random 4 KiB writes with verification (QD 16 per queue):\n{}",
        write.to_table()
    );
    println!(
        "6. sequential 1 MiB reads (QD 4 per queue):\n{}",
        read.to_table()
    );
    if write.mismatches() != 0 || write.error_count() + read.error_count() != 0 {
        return Err(DemoError::Verify(
            write.mismatches(),
            write.error_count() + read.error_count(),
        ));
    }
    check_no_plaintext(&image)?;
    println!("7. the image holds no plaintext the client wrote (checked every 4 KiB block)");
    print_vmm_lines(&socket, &image, &key);
    Ok(())
}

fn write_random_key(path: &Path) -> std::io::Result<()> {
    let mut key = zeroize::Zeroizing::new([0u8; 64]);
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key[..])?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, &key[..])
}

fn start_daemon(
    dir: &Path,
    socket: &Path,
    image: &Path,
    key: &Path,
    size: &str,
) -> Result<Child, DemoError> {
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .args(["--socket".as_ref(), socket.as_os_str()])
        .args(["--image".as_ref(), image.as_os_str()])
        .args(["--key-file".as_ref(), key.as_os_str()])
        .args([
            "--size",
            size,
            "--sector-size",
            "4096",
            "--queues",
            &QUEUES.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    match wait_for_listener(socket, &mut child, Duration::from_secs(10))? {
        Startup::Listening => Ok(child),
        Startup::Exited(status) => {
            let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
            Err(DemoError::Daemon(format!("exited with {status}: {log}")))
        }
        Startup::TimedOut => {
            let _ = child.kill();
            Err(DemoError::Daemon("not listening after 10 s".into()))
        }
    }
}

fn benchmark(socket: &Path, secs: u64, pid: u32) -> Result<(Report, Report), DemoError> {
    let runtime = Some(Duration::from_secs(secs.max(1)));
    println!("3. writing random 4 KiB blocks for {secs} s, then reading every one back and comparing ...");
    let write = bench::run(&JobSpec {
        rw: RwMode::RandWrite,
        bs: 4096,
        iodepth: 16,
        queues: QUEUES,
        runtime,
        len: Some(64 << 20),
        verify: true,
        pid: Some(pid),
        ..JobSpec::new(socket)
    })?;
    println!("4. reading 1 MiB blocks sequentially for {secs} s ...");
    let read = bench::run(&JobSpec {
        rw: RwMode::Read,
        bs: 1 << 20,
        iodepth: 4,
        queues: QUEUES,
        runtime,
        pid: Some(pid),
        ..JobSpec::new(socket)
    })?;
    Ok((write, read))
}

fn stop_daemon(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// The bench's verify pattern carries (seed, offset) in every 512-byte
/// unit, so a plaintext block found in the image would show as a block of
/// the pattern. Look for any 4 KiB block equal to what the client wrote.
fn check_no_plaintext(image: &Path) -> Result<(), DemoError> {
    let data = std::fs::read(image)?;
    let mut expect = vec![0u8; 4096];
    for (i, block) in data.chunks(4096).enumerate().take(64 << 8) {
        bench::pattern::fill(&mut expect, 1, (i * 4096) as u64);
        if block == &expect[..] {
            return Err(DemoError::PlaintextInImage);
        }
    }
    Ok(())
}

/// `path` as one shell word, so that the printed lines can be pasted even
/// when `--dir` has spaces in it.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:@%".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        return text;
    }
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn print_vmm_lines(socket: &Path, image: &Path, key: &Path) {
    let (s, i, k) = (shell_word(socket), shell_word(image), shell_word(key));
    println!(
        "\nThe same daemon serves a VM:\n  cryptblk serve --socket {s} --image {i} --key-file {k} --sector-size 4096 --queues 4\n\
         QEMU:\n  qemu-system-x86_64 -smp 4 -m 2G -object memory-backend-memfd,id=mem,size=2G,share=on \\\n    \
         -machine q35,memory-backend=mem -chardev socket,id=c0,path={s} \\\n    \
         -device vhost-user-blk-pci,chardev=c0,num-queues=4 ...\n\
         cloud-hypervisor:\n  cloud-hypervisor --cpus boot=4 --memory size=2G,shared=on \\\n    \
         --disk vhost_user=true,socket={s},num_queues=4,queue_size=256 ...\n\
         and cryptsetup opens the image on any Linux host:\n  cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 \\\n    \
         --sector-size 4096 --key-file {k} {i} demo"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_paths_are_single_shell_words() {
        assert_eq!(
            shell_word(Path::new("/tmp/d-1/demo.sock")),
            "/tmp/d-1/demo.sock"
        );
        assert_eq!(shell_word(Path::new("/tmp/my dir/k")), "'/tmp/my dir/k'");
        assert_eq!(shell_word(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf %s {}",
                shell_word(Path::new("/a b/it's $HOME"))
            ))
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"/a b/it's $HOME");
    }
}
