//! Image locking through the real daemon: one writer per image, any number
//! of readers, and QEMU's tools see a serving cryptblk as QEMU sees one of
//! its own (the same lock bytes; crates/core/src/volume/lock.rs).

mod support;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::{pattern, write_key, Client, Daemon, BIN};

fn serve_args<'a>(image: &'a Path, key: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--image",
        image.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--queues",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

/// `cryptblk serve` expected to refuse to start: its output.
fn refused(dir: &Path, image: &Path, key: &Path, extra: &[&str]) -> Output {
    let socket = dir.join("second.sock");
    let mut args = vec!["serve", "--socket", socket.to_str().unwrap()];
    args.extend(serve_args(image, key, extra));
    let out = Command::new(BIN).args(&args).output().unwrap();
    assert!(
        !out.status.success(),
        "a second daemon started on an image in use"
    );
    assert!(!socket.exists(), "the refused daemon left a socket");
    out
}

/// `qemu-img convert` of the image to a file: it wants a consistent read,
/// so it needs nobody else writing (`qemu-img info` takes no lock at all).
fn qemu_img_copy(image: &Path, force_share: bool) -> Output {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("convert");
    if force_share {
        cmd.arg("-U");
    }
    let out = image.with_extension("copy");
    let _ = std::fs::remove_file(&out);
    cmd.args(["-f", "raw", "-O", "raw"])
        .arg(image)
        .arg(out)
        .output()
        .expect("qemu-img (package qemu-utils): run integration/install-deps.sh")
}

#[test]
fn a_second_writer_is_refused_and_the_first_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let (key, _) = write_key(dir.path(), 64);
    let first = Daemon::start(dir.path(), &serve_args(&image, &key, &["--size", "8M"]));

    for extra in [&[][..], &["--readonly"], &["--direct"]] {
        let out = refused(dir.path(), &image, &key, extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is in use") && err.contains(image.to_str().unwrap()),
            "{extra:?}: {err}"
        );
        // It names the holder (found in /proc/PID/fdinfo).
        assert!(err.contains(&format!("pid {}", first.pid)), "{err}");
    }
    // The first daemon was not disturbed.
    let mut c = Client::connect(&first.socket, 1);
    let data = pattern(3, 4096, 64 << 10);
    assert_eq!(c.write(0, 4096, &data), 0);
    assert_eq!(c.read(0, 4096, data.len()).unwrap(), data);
    drop(c);

    // QEMU's tools see it as QEMU would see a VM using the image.
    let busy = qemu_img_copy(&image, false);
    assert!(!busy.status.success(), "qemu-img opened an image in use");
    let text = String::from_utf8_lossy(&busy.stderr);
    assert!(
        text.contains("Failed to get shared \"write\" lock"),
        "{text}"
    );
    assert!(qemu_img_copy(&image, true).status.success(), "qemu-img -U");

    // Gone with the daemon, however it ends: SIGKILL leaves no lock behind.
    first.signal(libc::SIGKILL);
    let mut first = first;
    first.wait_exit(Duration::from_secs(10));
    assert!(qemu_img_copy(&image, false).status.success());
    let again = Daemon::start(dir.path(), &serve_args(&image, &key, &[]));
    drop(again);
}

#[test]
fn read_only_daemons_share_an_image_and_keep_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let (key, _) = write_key(dir.path(), 64);
    let sub = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let (d1, d2) = (sub("one"), sub("two"));
    let r1 = Daemon::start(&d1, &serve_args(&image, &key, &["--readonly"]));
    let r2 = Daemon::start(&d2, &serve_args(&image, &key, &["--readonly"]));
    let out = refused(dir.path(), &image, &key, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("write"), "{err}");
    for d in [&r1, &r2] {
        let mut c = Client::connect_with(&d.socket, 1, true);
        assert_eq!(c.read(0, 0, 4096).unwrap().len(), 4096);
    }
}
