//! The real daemon driven through its unix socket by libblkio.

mod support;
use support::hostile::{
    range_segment, RawGuest, DATA, RANGE, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_IN, T_OUT,
    T_WRITE_ZEROES,
};
use support::*;

/// Runs a scenario once per I/O path (`--io mmap` and `--io pread`).
macro_rules! on_both_io_paths {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[test]
            fn mmap() {
                super::$name("mmap")
            }
            #[test]
            fn pread() {
                super::$name("pread")
            }
        })*
    };
}

/// `cryptblk serve --io IO --image DIR/disk.img --size SIZE --key-file K
/// --queues Q EXTRA...` with a 64-byte key; returns the daemon, the image
/// path and the key.
fn serve_encrypted(
    dir: &std::path::Path,
    io: &str,
    size: &str,
    queues: &str,
    extra: &[&str],
) -> (Daemon, std::path::PathBuf, Vec<u8>) {
    let (key_path, key) = write_key(dir, 64);
    let img = dir.join("disk.img");
    let mut args = vec![
        "--io",
        io,
        "--image",
        img.to_str().unwrap(),
        "--size",
        size,
        "--key-file",
        key_path.to_str().unwrap(),
        "--queues",
        queues,
    ];
    args.extend_from_slice(extra);
    (Daemon::start(dir, &args), img, key)
}

on_both_io_paths!(
    writes_read_back_and_the_image_holds_dm_crypt_ciphertext,
    several_queues_in_parallel_and_4k_sectors,
    data_survives_reconnects_and_daemon_restarts,
    sigterm_while_connected_exits_cleanly_and_keeps_acknowledged_writes,
    readonly_disk_refuses_writes_and_plaintext_mode_stores_plaintext,
    split_requests_on_workers_round_trip,
);

fn writes_read_back_and_the_image_holds_dm_crypt_ciphertext(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--offset", "8", "--skip", "16"];
    let (d, img, key) = serve_encrypted(dir.path(), io, "16M", "1", &extra);
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.capacity(), 16 << 20);
    let data = pattern(1, 65536, 256 * 1024);
    assert_eq!(c.write(0, 65536, &data), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read(0, 65536, data.len()).unwrap(), data);
    drop(c);
    assert!(d.terminate().success());

    // dm-crypt's view: payload after 8 sectors, IV = sector + 16.
    let raw = std::fs::read(&img).unwrap();
    let mut expect = data.clone();
    plain_cipher(&key, 512, 16).encrypt(65536 / 512, &mut expect);
    assert_eq!(&raw[4096 + 65536..4096 + 65536 + data.len()], &expect[..]);
    assert!(
        !raw.windows(32).any(|w| w == &data[..32]),
        "plaintext found in the image"
    );
}

fn several_queues_in_parallel_and_4k_sectors(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (key_path, _) = write_key(dir.path(), 32);
    let img = dir.path().join("disk.img");
    let d = Daemon::start(
        dir.path(),
        &[
            "--io",
            io,
            "--image",
            img.to_str().unwrap(),
            "--size",
            "8M",
            "--key-file",
            key_path.to_str().unwrap(),
            "--key-size",
            "256",
            "--sector-size",
            "4096",
            "--queues",
            "4",
        ],
    );
    let mut c = Client::connect(&d.socket, 4);
    for q in 0..4 {
        let off = q as u64 * (1 << 20);
        assert_eq!(c.write(q, off, &pattern(q as u64, off, 65536)), 0);
    }
    for q in 0..4 {
        let off = q as u64 * (1 << 20);
        // read each region back through another queue
        assert_eq!(
            c.read((q + 1) % 4, off, 65536).unwrap(),
            pattern(q as u64, off, 65536)
        );
    }
    // A read that is not a multiple of the 4 KiB block size is refused.
    assert!(c.read(0, 0, 512).is_err());
    assert_eq!(c.write_zeroes(0, 0, 8192), 0);
    assert_eq!(c.read(1, 0, 8192).unwrap(), vec![0u8; 8192]);
    drop(c);
    assert!(d.terminate().success());
}

fn data_survives_reconnects_and_daemon_restarts(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (key_path, _) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    let args = [
        "--io",
        io,
        "--image",
        img.to_str().unwrap(),
        "--size",
        "4M",
        "--key-file",
        key_path.to_str().unwrap(),
        "--queues",
        "2",
    ];
    let mut d = Daemon::start(dir.path(), &args);
    for round in 0..5u64 {
        let mut c = Client::connect(&d.socket, 2);
        if round > 0 {
            assert_eq!(
                c.read(0, round * 8192 - 8192, 8192).unwrap(),
                pattern(round - 1, 0, 8192)
            );
        }
        assert_eq!(
            c.write((round % 2) as usize, round * 8192, &pattern(round, 0, 8192)),
            0
        );
        drop(c); // VMM goes away; the daemon must serve the next one
    }
    assert!(d.alive());
    let status = d.terminate();
    assert!(status.success(), "{status}");
    assert!(!dir.path().join("s.sock").exists(), "socket left behind");

    let d = Daemon::start(dir.path(), &args);
    let mut c = Client::connect(&d.socket, 2);
    for round in 0..5u64 {
        assert_eq!(
            c.read(1, round * 8192, 8192).unwrap(),
            pattern(round, 0, 8192)
        );
    }
    drop(c);
    assert!(d.terminate().success());
}

fn sigterm_while_connected_exits_cleanly_and_keeps_acknowledged_writes(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (d, img, key) = serve_encrypted(dir.path(), io, "4M", "1", &[]);
    let mut c = Client::connect(&d.socket, 1);
    let data = pattern(9, 0, 1 << 20);
    assert_eq!(c.write(0, 0, &data), 0);
    let status = d.terminate(); // client still connected
    assert!(status.success(), "{status}");
    drop(c);
    let raw = std::fs::read(&img).unwrap();
    let mut expect = data.clone();
    plain_cipher(&key, 512, 0).encrypt(0, &mut expect);
    assert_eq!(&raw[..data.len()], &expect[..]);
}

/// A write, a WRITE_ZEROES and a DISCARD of the first 4 KiB, sent through
/// a raw frontend (libblkio refuses to send writes to a read-only disk);
/// returns their status bytes.
fn raw_writes(socket: &std::path::Path) -> [u8; 3] {
    let mut g = RawGuest::connect(socket, 16);
    g.mem.write(DATA, &pattern(4, 0, 4096));
    g.mem.write(RANGE, &range_segment(0, 8, 0));
    let write = g.request(T_OUT, 0, &[(DATA, 4096)], false);
    let zeroes = g.request(T_WRITE_ZEROES, 0, &[(RANGE, 16)], false);
    let discard = g.request(T_DISCARD, 0, &[(RANGE, 16)], false);
    // The same frontend still reads.
    assert_eq!(g.request(T_IN, 0, &[(DATA, 4096)], true), S_OK);
    [write, zeroes, discard]
}

fn readonly_disk_refuses_writes_and_plaintext_mode_stores_plaintext(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let data = pattern(3, 0, 65536);
    let mut content = data.clone();
    content.resize(1 << 20, 0);
    let serve = |readonly: bool| {
        std::fs::write(&img, &content).unwrap();
        let mut args = vec![
            "--io",
            io,
            "--image",
            img.to_str().unwrap(),
            "--cipher",
            "none",
            // Offered unless the disk is read-only: DISCARD must still fail.
            "--allow-discards",
            "--queues",
            "1",
        ];
        if readonly {
            args.push("--readonly");
        }
        Daemon::start(dir.path(), &args)
    };

    // Control: the same requests on a writable disk change the image, so
    // the refusals below are not a broken frontend.
    let d = serve(false);
    assert_eq!(raw_writes(&d.socket), [S_OK; 3], "writable disk");
    assert!(d.terminate().success());
    assert_ne!(
        std::fs::read(&img).unwrap(),
        content,
        "control: nothing written"
    );

    let d = serve(true);
    let [write, zeroes, discard] = raw_writes(&d.socket);
    assert_eq!(write, S_IOERR, "write to a read-only disk");
    assert_eq!(zeroes, S_IOERR, "WRITE_ZEROES on a read-only disk");
    // DISCARD is not offered on a read-only disk.
    assert_eq!(discard, S_UNSUPP, "DISCARD on a read-only disk");
    let mut c = Client::connect_with(&d.socket, 1, true);
    assert_eq!(c.read(0, 0, 65536).unwrap(), data);
    assert!(c.blkio_read_only(), "device did not offer VIRTIO_BLK_F_RO");
    drop(c);
    assert!(d.terminate().success());
    assert!(
        std::fs::read(&img).unwrap() == content,
        "the read-only image changed"
    );
}

#[test]
fn bad_options_fail_with_a_message_and_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let img = dir.path().join("missing.img");
    let out = std::process::Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(&socket)
        .args(["--image", img.to_str().unwrap(), "--cipher", "none"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--size"), "{err}");
    assert!(!socket.exists(), "a refused start left its socket behind");
    assert!(!img.exists(), "a refused start created the image");
    let (key_path, _) = write_key(dir.path(), 48);
    let out = std::process::Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(&socket)
        .args([
            "--image",
            "/dev/null",
            "--key-file",
            key_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("48 bytes"), "{err}");
    assert!(!socket.exists(), "a refused start left its socket behind");
    // Control: the same socket path with valid options does get a socket,
    // so the checks above look where a socket would be.
    let d = Daemon::start(
        dir.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--size",
            "1M",
            "--cipher",
            "none",
        ],
    );
    assert!(
        d.socket.exists(),
        "control: no socket at {}",
        d.socket.display()
    );
    assert!(d.terminate().success());
}

/// `--crypto workers` cuts large requests into parts that workers run in
/// parallel: every part lands in its place, with dm-crypt's ciphertext.
fn split_requests_on_workers_round_trip(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let extra = [
        "--crypto",
        "workers",
        "--workers",
        "2",
        "--split-threshold",
        "64K",
    ];
    let (d, img, key) = serve_encrypted(dir.path(), io, "8M", "2", &extra);
    let mut c = Client::connect(&d.socket, 2);
    let big = pattern(7, 1 << 20, 1 << 20);
    assert_eq!(c.write(0, 1 << 20, &big), 0);
    let small = pattern(8, 4096, 4096);
    assert_eq!(c.write(1, 4096, &small), 0);
    assert_eq!(c.read(1, 1 << 20, 1 << 20).unwrap(), big);
    assert_eq!(
        c.read(0, (1 << 20) + 65536, 8192).unwrap(),
        big[65536..65536 + 8192]
    );
    assert_eq!(c.read(0, 4096, 4096).unwrap(), small);
    assert_eq!(c.flush(1), 0);
    drop(c);
    assert!(d.terminate().success());
    let raw = std::fs::read(&img).unwrap();
    let mut expect = big.clone();
    plain_cipher(&key, 512, 0).encrypt((1 << 20) / 512, &mut expect);
    assert_eq!(&raw[1 << 20..2 << 20], &expect[..]);
}

/// The image shrinks under a daemon serving it through a mapping: the guest
/// gets an I/O error for the vanished part (a SIGBUS inside the daemon), the
/// daemon keeps serving the rest.
#[test]
fn truncating_a_mapped_image_gives_io_errors_not_a_dead_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, img, _) = serve_encrypted(dir.path(), "mmap", "4M", "2", &[]);
    let mut c = Client::connect(&d.socket, 2);
    let data = pattern(5, 0, 65536);
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.write(1, 2 << 20, &data), 0);
    let file = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    file.set_len(1 << 20).unwrap();
    assert!(c.read(1, 2 << 20, 65536).is_err(), "read past the new end");
    assert!(d.alive(), "SIGBUS killed the daemon");
    assert_eq!(c.read(0, 0, 65536).unwrap(), data);
    assert_eq!(c.flush(0), 0);
    drop(c);
    assert!(d.terminate().success());
}
