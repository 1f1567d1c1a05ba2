//! The ciphertext on a Ceph RBD image (`--image rbd:POOL/IMAGE`, issue #16):
//! the real daemon on the single-node cluster of integration/ceph.sh, driven
//! by libblkio; the image read back with `rbd export` holds dm-crypt's
//! ciphertext and no plaintext.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::ceph::{cluster, serve_args, Cluster};
use support::luks::{cryptsetup_opens, decrypt_payload, format_dump_and_add_key, PASS, PBKDF2};
use support::*;

/// Serves a new 16 MiB image encrypted (payload 8 sectors in, IVs + 16) on
/// `queues` queues with `extra` options; writes, reads back, zeroes,
/// flushes on every queue; then checks the exported image.
fn round_trip(queues: usize, extra: &[&str]) {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let (spec, name) = c.create("rt", 16);
    let image = serve_args(c, &spec);
    let (cipher, written) = serve_16m_round_trip(dir.path(), &image, queues, extra);
    check_16m_export(&c.export(&name, dir.path()), &cipher, &written);
}

#[test]
fn one_queue_inline() {
    round_trip(1, &["--crypto", "inline"]);
}

#[test]
fn two_queues_inline() {
    round_trip(2, &["--crypto", "inline"]);
}

/// Landlock too: librados' connections to the monitor and the OSD are
/// TCP connects to ports the cluster map gives.
#[test]
fn two_queues_under_the_full_sandbox() {
    round_trip(2, &["--sandbox", "full"]);
}

#[test]
fn two_queues_workers() {
    round_trip(2, &["--crypto", "workers", "--split-threshold", "64K"]);
}

/// The way to Ceph of issue #15, as README shows it: qemu-storage-daemon
/// serves the RBD image (its rbd driver) as an NBD export, cryptblk serves
/// that export. The data round-trips on two queues, and the RBD image, read
/// back with `rbd export`, holds dm-crypt's ciphertext and no plaintext.
#[test]
fn through_qemu_storage_daemons_nbd_export() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let (_, name) = c.create("qsd-nbd", 16);
    let blockdev = format!(
        "driver=rbd,node-name=disk,pool=rbd,image={name},conf={}",
        c.conf_str()
    );
    let mut server =
        support::nbd::NbdServer::qsd(dir.path(), support::nbd::Transport::Unix, &blockdev);
    let (cipher, written) = serve_16m_round_trip(dir.path(), &["--image", &server.uri], 2, &[]);
    // qemu-storage-daemon flushes librbd's cache on its way out.
    server.terminate();
    check_16m_export(&c.export(&name, dir.path()), &cipher, &written);
}

/// `cryptblk ARGS` (format, key, dump) on the test cluster, reached with
/// `--ceph-conf` (and not through $CEPH_CONF, which `dump_finds_the_cluster`
/// checks).
fn cryptblk_on(c: &Cluster, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--ceph-conf", c.conf_str()])
        .env_remove("CEPH_CONF")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `dump` finds the cluster through $CEPH_CONF as the rbd tool does, or
/// through `--ceph-conf`, which wins: a configuration file that is not
/// there is an error that names it, also with a good $CEPH_CONF.
#[test]
fn dump_finds_the_cluster_by_flag_or_environment() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let (spec, _) = c.create("dump-conf", 16);
    let (pw, _) = passphrases(dir.path());
    let format = [
        "format",
        "--type",
        "luks1",
        "--image",
        &spec,
        "--size",
        "8M",
        "--key-file",
    ];
    let out = cryptblk_on(c, &[&format[..], &[pw.to_str().unwrap()], PBKDF2].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = |extra: &[&str]| {
        Command::new(BIN)
            .args(["dump", "--image", &spec])
            .args(extra)
            .env("CEPH_CONF", &c.conf)
            .output()
            .unwrap()
    };
    let by_env = dump(&[]);
    assert!(
        by_env.status.success(),
        "{}",
        String::from_utf8_lossy(&by_env.stderr)
    );
    assert!(String::from_utf8_lossy(&by_env.stdout).contains("Version:        1"));
    let missing = dir.path().join("nowhere.conf");
    let by_flag = dump(&["--ceph-conf", missing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&by_flag.stderr);
    assert!(!by_flag.status.success());
    assert!(err.contains("nowhere.conf"), "{err}");
}

/// `cryptblk serve` that must refuse to start: its stderr.
fn serve_refused(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "serve {args:?} started");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dir.join("refused.sock").exists());
    err
}

fn passphrases(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let pw = dir.join("pw");
    std::fs::write(&pw, PASS).unwrap();
    let pw2 = dir.join("pw2");
    std::fs::write(&pw2, b"battery staple").unwrap();
    for p in [&pw, &pw2] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    (pw, pw2)
}

/// Serves `spec` with the passphrase in `pw` on 2 queues, runs `f`. The
/// daemon may take up to 90 s to listen: a LUKS1 slot made by `rbd
/// encryption format` has ~4.4M PBKDF2 iterations (about 20 s in a debug
/// build here).
fn with_luks_daemon(c: &Cluster, dir: &Path, spec: &str, pw: &Path, f: impl FnOnce(&mut Client)) {
    let mut args = serve_args(c, spec);
    args.extend(["--key-file", pw.to_str().unwrap(), "--queues", "2"]);
    let socket = dir.join("s.sock");
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(&args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started =
        cryptblk::bench::listening::wait_for_listener(&socket, &mut child, Duration::from_secs(90));
    assert!(
        matches!(started, Ok(cryptblk::bench::listening::Startup::Listening)),
        "{started:?}"
    );
    let d = Daemon::adopt(child, socket);
    let mut cl = Client::connect(&d.socket, 2);
    f(&mut cl);
    drop(cl);
    assert!(d.terminate().success());
}

/// `cryptblk format` LUKS1/LUKS2 on an RBD image, `dump` and `key add`
/// through librbd, `serve` (the header found on the image); librbd's own
/// encryption (python3-rbd encryption_load) reads what cryptblk wrote and
/// writes what cryptblk then reads; cryptsetup opens the exported image
/// with both passphrases and the LUKS oracle decrypts the guest's data.
fn cryptblk_format_opens_in_librbd(kind: &str) {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (spec, name) = c.create(kind, 32);
    let (pw, pw2) = passphrases(d);
    let dump = format_dump_and_add_key(kind, &spec, &pw, &pw2, |args| cryptblk_on(c, args));
    assert!(
        dump.contains(&format!("Version:        {}", &kind[4..])),
        "{dump}"
    );

    let data = pattern(9, 1 << 20, 256 * 1024);
    with_luks_daemon(c, d, &spec, &pw, |cl| {
        assert!(cl.capacity() >= 16 << 20);
        assert_eq!(cl.write(1, 1 << 20, &data), 0);
        assert_eq!(cl.flush(0), 0);
        assert_eq!(cl.read(0, 1 << 20, data.len()).unwrap(), data);
    });
    // librbd's encryption reads it, with either passphrase...
    assert!(c.librbd_read(&name, kind, &pw2, 1 << 20, data.len()) == data);
    // ... and writes what cryptblk reads.
    let theirs = pattern(10, 4 << 20, 128 * 1024);
    c.librbd_write(&name, kind, &pw, 4 << 20, &theirs);
    with_luks_daemon(c, d, &spec, &pw2, |cl| {
        assert!(cl.read(1, 4 << 20, theirs.len()).unwrap() == theirs);
        assert!(cl.read(0, 1 << 20, data.len()).unwrap() == data);
    });

    // The cluster holds ciphertext only; cryptsetup and the oracle agree.
    let raw = c.export(&name, d);
    let copy = d.join("copy.img");
    std::fs::write(&copy, &raw).unwrap();
    assert!(no_plaintext_in(&raw, &data), "plaintext in the cluster");
    assert!(no_plaintext_in(&raw, &theirs), "plaintext in the cluster");
    assert!(cryptsetup_opens(&copy, &pw) && cryptsetup_opens(&copy, &pw2));
    let u = cryptblk::luks::unlock_image(&copy, None, PASS, None).unwrap();
    let plain = decrypt_payload(&copy, &u, (1 << 20) + data.len());
    assert!(
        plain[1 << 20..] == data[..],
        "the oracle decrypts the guest's data"
    );
}

#[test]
fn luks2_formatted_by_cryptblk_opens_in_librbd_and_cryptsetup() {
    cryptblk_format_opens_in_librbd("luks2");
}

#[test]
fn luks1_formatted_by_cryptblk_opens_in_librbd_and_cryptsetup() {
    cryptblk_format_opens_in_librbd("luks1");
}

/// `rbd encryption format IMAGE KIND PASSFILE`: cryptblk unlocks it with
/// the passphrase and serves it; librbd's encryption and cryptblk read
/// each other's data. LUKS2 there is argon2id with about 420 MiB and 4
/// passes (formatting takes ~10 s here, each unlock a few seconds).
fn rbd_encryption_format_served(kind: &str) {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (spec, name) = c.create(&format!("rbd-{kind}"), 32);
    let (pw, _) = passphrases(d);
    let t = Instant::now();
    c.rbd(&[
        "encryption",
        "format",
        &format!("rbd/{name}"),
        kind,
        pw.to_str().unwrap(),
    ]);
    eprintln!(
        "rbd encryption format {kind}: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let theirs = pattern(21, 0, 64 * 1024);
    c.librbd_write(&name, kind, &pw, 0, &theirs);
    let ours = pattern(22, 2 << 20, 512 * 1024);
    with_luks_daemon(c, d, &spec, &pw, |cl| {
        assert!(
            cl.read(0, 0, theirs.len()).unwrap() == theirs,
            "librbd's data"
        );
        assert_eq!(cl.write(1, 2 << 20, &ours), 0);
        assert_eq!(cl.flush(1), 0);
    });
    assert!(c.librbd_read(&name, kind, &pw, 2 << 20, ours.len()) == ours);
    let raw = c.export(&name, d);
    assert!(no_plaintext_in(&raw, &ours), "plaintext in the cluster");
}

#[test]
fn luks1_by_rbd_encryption_format_is_served() {
    rbd_encryption_format_served("luks1");
}

#[test]
fn luks2_by_rbd_encryption_format_is_served() {
    rbd_encryption_format_served("luks2");
}

/// librbd's layered encryption marks a clone's headers RBDL instead of
/// LUKS. Ceph 16 cannot make one (`rbd encryption format` refuses clones),
/// so the image is a LUKS2 header with that magic, imported: cryptblk
/// refuses it, LUKS or plain, and says to flatten it.
#[test]
fn an_rbdl_clone_is_refused_with_flatten_first() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (pw, _) = passphrases(d);
    let img = d.join("luks.img");
    let out = Command::new(BIN)
        .args([
            "format",
            "--type",
            "luks2",
            "--size",
            "4M",
            "--image",
            img.to_str().unwrap(),
            "--key-file",
        ])
        .arg(&pw)
        .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Control: as LUKS it is served.
    let name = c.image_name("luks-import");
    c.rbd(&[
        "import",
        "--no-progress",
        img.to_str().unwrap(),
        &format!("rbd/{name}"),
    ]);
    let spec = format!("rbd:rbd/{name}");
    with_luks_daemon(c, d, &spec, &pw, |cl| assert!(cl.capacity() > 0));
    // Both header copies (LUKS2: at 0 and 16 KiB) say RBDL.
    support::luks::patch(&img, 0, b"RBDL");
    support::luks::patch(&img, 16384, b"RBDL");
    let name = c.image_name("rbdl");
    c.rbd(&[
        "import",
        "--no-progress",
        img.to_str().unwrap(),
        &format!("rbd/{name}"),
    ]);
    let spec = format!("rbd:rbd/{name}");
    for extra in [&[][..], &["--type", "plain", "--cipher", "none"][..]] {
        let mut args = serve_args(c, &spec);
        args.extend(["--key-file", pw.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let err = serve_refused(d, &args);
        assert!(err.contains("RBDL") && err.contains("flatten"), "{err}");
    }
    let err = cryptblk_on(c, &["dump", "--image", &spec]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("flatten"));
}

/// The image's exclusive lock: a second writable daemon on the same image
/// is refused, naming the holder; a --readonly one is served beside it
/// (and takes no lock); the first keeps serving. An image without the
/// exclusive-lock feature is refused writable, served --readonly.
#[test]
fn a_second_writer_is_refused_by_the_exclusive_lock() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (spec, _) = c.create("lock", 16);
    let mut args = serve_args(c, &spec);
    args.extend(["--type", "plain", "--cipher", "none"]);
    let first = Daemon::start(d, &args);
    let mut cl = Client::connect(&first.socket, 1);
    let data = pattern(31, 0, 65536);
    assert_eq!(cl.write(0, 0, &data), 0);
    assert_eq!(cl.flush(0), 0);

    let other = tempfile::tempdir().unwrap();
    let err = serve_refused(other.path(), &args);
    assert!(
        err.contains("in use") && err.contains("exclusive lock") && err.contains("--readonly"),
        "{err}"
    );
    let mut ro = args.clone();
    ro.push("--readonly");
    let reader = Daemon::start(other.path(), &ro);
    // Read-only, each queue has an image handle of its own.
    let mut rc = Client::connect_with(&reader.socket, 2, true);
    assert!(rc.blkio_read_only());
    assert!(rc.read(0, 0, data.len()).unwrap() == data);
    assert!(rc.read(1, 0, data.len()).unwrap() == data);
    drop(rc);
    assert!(reader.terminate().success());
    // The first still writes: the read-only daemon took nothing from it.
    assert_eq!(cl.write(0, 65536, &data), 0);
    assert_eq!(cl.flush(0), 0);
    drop(cl);
    assert!(first.terminate().success());
    // Once it is gone the next writer gets the lock.
    let next = Daemon::start(other.path(), &args);
    assert!(next.terminate().success());

    let name = c.image_name("nolock");
    c.rbd(&[
        "create",
        "--size",
        "16M",
        "--image-feature",
        "layering",
        &format!("rbd/{name}"),
    ]);
    let spec = format!("rbd:rbd/{name}");
    let mut args = serve_args(c, &spec);
    args.extend(["--type", "plain", "--cipher", "none"]);
    let err = serve_refused(d, &args);
    assert!(
        err.contains("exclusive-lock") && err.contains("rbd feature enable"),
        "{err}"
    );
    args.push("--readonly");
    let reader = Daemon::start(d, &args);
    assert!(reader.terminate().success());
}

/// A snapshot is served read-only (VIRTIO_BLK_F_RO) with the data it
/// froze; DISCARD needs --allow-discards.
#[test]
fn snapshots_are_read_only_and_discard_needs_allow_discards() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (spec, name) = c.create("snap", 16);
    let (key_path, _) = write_key(d, 64);
    let mut args = serve_args(c, &spec);
    args.extend(["--key-file", key_path.to_str().unwrap()]);
    let data = pattern(41, 1 << 20, 131072);
    {
        let daemon = Daemon::start(d, &args);
        let mut cl = Client::connect(&daemon.socket, 1);
        assert_eq!(cl.write(0, 1 << 20, &data), 0);
        assert_eq!(cl.flush(0), 0);
        // Not offered: DISCARD fails.
        assert_ne!(cl.discard(0, 4 << 20, 1 << 20), 0);
        drop(cl);
        assert!(daemon.terminate().success());
    }
    c.rbd(&["snap", "create", &format!("rbd/{name}@frozen")]);
    let mut with_discard = args.clone();
    with_discard.push("--allow-discards");
    {
        let daemon = Daemon::start(d, &with_discard);
        let mut cl = Client::connect(&daemon.socket, 1);
        assert_eq!(cl.discard(0, 4 << 20, 1 << 20), 0);
        assert_eq!(cl.write(0, 1 << 20, &pattern(42, 1 << 20, 131072)), 0);
        assert_eq!(cl.flush(0), 0);
        drop(cl);
        assert!(daemon.terminate().success());
    }
    let snap = format!("{spec}@frozen");
    let mut args = serve_args(c, &snap);
    args.extend(["--key-file", key_path.to_str().unwrap(), "--queues", "2"]);
    let daemon = Daemon::start(d, &args);
    let mut cl = Client::connect_with(&daemon.socket, 2, true);
    assert!(cl.blkio_read_only(), "a snapshot is offered read-only");
    for q in 0..2 {
        assert!(
            cl.read(q, 1 << 20, data.len()).unwrap() == data,
            "the snapshot's data"
        );
    }
    drop(cl);
    assert!(daemon.terminate().success());
}

/// Another client breaks the daemon's exclusive lock (`rbd lock rm`, which
/// blocklists the holder, as a failover does): the daemon's requests fail
/// with IOERR, it says once why, and it stays up.
#[test]
fn a_blocklisted_daemon_fails_requests_and_says_why() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (spec, name) = c.create("fenced", 16);
    let mut args = serve_args(c, &spec);
    args.extend(["--type", "plain", "--cipher", "none"]);
    let log_path = d.join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut daemon = Daemon::start_with_stderr(d, &args, Stdio::from(log));
    let mut cl = Client::connect(&daemon.socket, 1);
    // Control: served before the lock is broken.
    assert_eq!(cl.write(0, 0, &pattern(51, 0, 65536)), 0);
    assert_eq!(cl.flush(0), 0);

    let locks: serde_json::Value =
        serde_json::from_str(&c.rbd(&["lock", "ls", "--format", "json", &format!("rbd/{name}")]))
            .unwrap();
    let lock = locks
        .as_array()
        .and_then(|a| a.first())
        .unwrap_or_else(|| panic!("no lock on the image: {locks}"));
    let (id, locker) = (
        lock["id"].as_str().unwrap(),
        lock["locker"].as_str().unwrap(),
    );
    c.rbd(&["lock", "rm", &format!("rbd/{name}"), id, locker]);

    let t = Instant::now();
    let write = cl.write(0, 4 << 20, &pattern(52, 4 << 20, 65536));
    let flush = cl.flush(0);
    assert!(write != 0 || flush != 0, "a fenced daemon still writes");
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(daemon.alive(), "the daemon died when fenced");
    drop(cl);
    daemon.stop();
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.contains("blocklisted") && text.contains("restart cryptblk"),
        "{text}"
    );
    assert_eq!(
        text.matches("has blocklisted this client").count(),
        1,
        "{text}"
    );
}
