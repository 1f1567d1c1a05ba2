//! `--key-keyring`: the plain-mode key or the LUKS passphrase from the
//! kernel keyring. Each daemon runs in a session keyring of its own
//! (`keyctl session -`) that a shell fills with `keyctl padd` before it
//! execs cryptblk, so tests never see each other's keys. The data written
//! with a keyring key is read back with the same bytes given as
//! --key-file.
//!
//! Needs keyutils (integration/install-deps.sh).

mod support;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cryptblk::crypto::{IvRule, SectorCipher, XtsKey};
use support::luks::{cryptsetup_format, tool, PBKDF2};
use support::*;

/// Adds the key ($1 type, $2 description, $3 file with its payload) to the
/// new session keyring, then becomes the command that follows.
const WITH_KEY: &str =
    "keyctl padd \"$1\" \"$2\" @s < \"$3\" > /dev/null || exit 99; shift 3; exec \"$@\"";

/// A key description no other test (or test run) uses.
fn description(name: &str) -> String {
    format!("cryptblk-test:{}:{name}", std::process::id())
}

/// `keyctl session - sh -c WITH_KEY sh TYPE DESC FILE cryptblk serve
/// --socket DIR/s.sock ARGS...`; cryptblk ends up with the shell's pid.
fn in_session(kind: &str, desc: &str, payload: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = tool("keyctl");
    cmd.args(["session", "-", "sh", "-c", WITH_KEY, "sh", kind, desc])
        .arg(payload)
        .arg(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .args(args)
        .env("RUST_LOG", "info");
    cmd
}

/// Starts the daemon as `in_session` says and waits for its socket.
fn serve_with_key(kind: &str, desc: &str, payload: &Path, dir: &Path, args: &[&str]) -> Daemon {
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut command = in_session(kind, desc, payload, dir, args);
    command.stdout(Stdio::null()).stderr(log);
    let mut d = Daemon::spawn_unwaited(command, dir.join("s.sock"), "cryptblk");
    if let Err(status) = d.listening() {
        panic!(
            "cryptblk exited with {status} before listening:\n{}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap()
        );
    }
    d
}

/// Runs the daemon as `in_session` says, expecting it to refuse to start;
/// returns its stderr.
fn refused(kind: &str, desc: &str, payload: &Path, dir: &Path, args: &[&str]) -> String {
    let out: Output = in_session(kind, desc, payload, dir, args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

fn image_args(img: &Path) -> Vec<String> {
    ["--image", img.to_str().unwrap(), "--queues", "1"]
        .map(String::from)
        .to_vec()
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Writes a pattern through the socket and returns it.
fn write_pattern(socket: &Path, seed: u64) -> Vec<u8> {
    let mut c = Client::connect(socket, 1);
    let data = pattern(seed, 1 << 20, 64 * 1024);
    assert_eq!(c.write(0, 1 << 20, &data), 0);
    assert_eq!(c.flush(0), 0);
    data
}

fn read_back(socket: &Path, len: usize) -> Vec<u8> {
    Client::connect(socket, 1).read(0, 1 << 20, len).unwrap()
}

#[test]
fn a_plain_key_from_the_keyring_is_the_key_files_key() {
    let dir = tempfile::tempdir().unwrap();
    let (key_path, key) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    let desc = description("plain");
    let mut args = image_args(&img);
    args.extend(["--size", "16M", "--key-keyring"].map(String::from));
    args.push(format!("%user:{desc}"));
    let d = serve_with_key("user", &desc, &key_path, dir.path(), &as_strs(&args));
    let data = write_pattern(&d.socket, 1);
    assert!(d.terminate().success());

    // The image holds dm-crypt ciphertext under exactly those key bytes.
    let raw = std::fs::read(&img).unwrap();
    let mut expect = data.clone();
    let xts = XtsKey::from_bytes(&key).unwrap();
    SectorCipher::new(
        Some(&xts),
        IvRule {
            sector_size: 512,
            large_sectors: false,
            skip: 0,
        },
    )
    .encrypt((1 << 20) / 512, &mut expect);
    assert_eq!(&raw[1 << 20..(1 << 20) + data.len()], &expect[..]);

    // The same bytes as --key-file read it back; another key does not.
    let mut by_file = image_args(&img);
    by_file.extend(["--key-file".to_string(), key_path.to_str().unwrap().into()]);
    let d = Daemon::start(dir.path(), &as_strs(&by_file));
    assert_eq!(read_back(&d.socket, data.len()), data);
    assert!(d.terminate().success());
    let other = dir.path().join("other.key");
    std::fs::write(&other, [0x5a; 64]).unwrap();
    let mut by_other = image_args(&img);
    by_other.extend(["--key-file".to_string(), other.to_str().unwrap().into()]);
    let d = Daemon::start(dir.path(), &as_strs(&by_other));
    assert_ne!(read_back(&d.socket, data.len()), data, "control");
    assert!(d.terminate().success());
}

#[test]
fn a_luks_passphrase_from_the_keyring_unlocks_as_the_key_file_does() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, b"keyring passphrase").unwrap();
    let img = dir.path().join("disk.luks2");
    cryptsetup_format(
        &img,
        pass.to_str().unwrap(),
        &[&["--type", "luks2"], PBKDF2].concat(),
    );
    let desc = description("luks");
    let mut args = image_args(&img);
    args.extend(["--key-keyring".to_string(), desc.clone()]);
    let d = serve_with_key("user", &desc, &pass, dir.path(), &as_strs(&args));
    let data = write_pattern(&d.socket, 2);
    assert!(d.terminate().success());

    let mut by_file = image_args(&img);
    by_file.extend(["--key-file".to_string(), pass.to_str().unwrap().into()]);
    let d = Daemon::start(dir.path(), &as_strs(&by_file));
    assert_eq!(read_back(&d.socket, data.len()), data);
    assert!(d.terminate().success());

    // Control: a wrong passphrase in the keyring opens nothing.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, b"not the passphrase").unwrap();
    let err = refused("user", &desc, &wrong, dir.path(), &as_strs(&args));
    assert!(err.contains("passphrase"), "{err}");
}

/// Whether a key with this description is in /proc/keys (which lists the
/// keys this uid may view, in every session).
fn key_exists(desc: &str) -> bool {
    std::fs::read_to_string("/proc/keys")
        .unwrap()
        .lines()
        .any(|l| l.contains(&format!(" {desc}: ")))
}

fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn key_keyring_unlink_removes_the_key_once_read() {
    let dir = tempfile::tempdir().unwrap();
    let (key_path, _) = write_key(dir.path(), 64);
    let img = dir.path().join("disk.img");
    for unlink in [false, true] {
        let desc = description(&format!("unlink-{unlink}"));
        let mut args = image_args(&img);
        args.extend(["--size", "16M", "--key-keyring"].map(String::from));
        args.push(desc.clone());
        if unlink {
            args.push("--key-keyring-unlink".into());
        }
        let d = serve_with_key("user", &desc, &key_path, dir.path(), &as_strs(&args));
        if unlink {
            // Unlinked from its only keyring, the key is destroyed.
            assert!(wait_for(|| !key_exists(&desc)), "{desc} still exists");
        } else {
            // Control: without the flag it stays while the session lives.
            assert!(key_exists(&desc), "{desc} not listed in /proc/keys");
        }
        // Either way the daemon serves with it.
        write_pattern(&d.socket, 3);
        assert!(d.terminate().success());
    }
}

#[test]
fn a_key_in_the_user_keyring_is_found_and_unlinked_from_there() {
    // A systemd service's session keyring does not link the user keyring:
    // cryptblk searches @u itself. The session here is new and empty too.
    let dir = tempfile::tempdir().unwrap();
    let (key_path, _) = write_key(dir.path(), 64);
    let desc = description("user-keyring");
    let payload = std::fs::File::open(&key_path).unwrap();
    let out = tool("keyctl")
        .args(["padd", "user", &desc, "@u"])
        .stdin(payload)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let in_user_keyring = || {
        tool("keyctl")
            .args(["search", "@u", "user", &desc])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(in_user_keyring());
    let img = dir.path().join("disk.img");
    let empty = dir.path().join("unrelated");
    std::fs::write(&empty, b"another key").unwrap();
    let mut args = image_args(&img);
    args.extend(["--size", "16M", "--key-keyring"].map(String::from));
    args.extend([desc.clone(), "--key-keyring-unlink".into()]);
    // The session gets an unrelated key; ours is only in @u.
    let unrelated = description("unrelated");
    let d = serve_with_key("user", &unrelated, &empty, dir.path(), &as_strs(&args));
    write_pattern(&d.socket, 4);
    assert!(d.terminate().success());
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains(&format!("key %user:{desc} unlinked")), "{log}");
    let gone = !in_user_keyring();
    if !gone {
        let _ = tool("keyctl").args(["purge", "user", &desc]).output();
    }
    assert!(gone, "the key is still in @u");
}

#[test]
fn keyring_errors_name_the_key_and_never_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    // A recognisable payload, of the wrong length for a raw key.
    let secret = b"cryptblk-test-secret-content-0123456789";
    let payload = dir.path().join("payload");
    std::fs::write(&payload, secret).unwrap();
    let shown = String::from_utf8_lossy(secret).into_owned();
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let base = |spec: &str| {
        let mut args = image_args(&img);
        args.extend(["--size".into(), "16M".into(), "--key-keyring".into()]);
        args.push(spec.to_string());
        args
    };
    let never_the_secret = |err: &str| {
        assert!(!err.contains(&shown) && !err.contains(&hex), "{err}");
    };

    let desc = description("short");
    let err = refused("user", &desc, &payload, dir.path(), &as_strs(&base(&desc)));
    assert!(
        err.contains(&format!("key %user:{desc} holds {} bytes", secret.len())),
        "{err}"
    );
    never_the_secret(&err);

    let missing = description("missing");
    let err = refused(
        "user",
        &desc,
        &payload,
        dir.path(),
        &as_strs(&base(&missing)),
    );
    assert!(err.contains(&format!("no key %user:{missing}")), "{err}");
    assert!(err.contains("keyctl padd user"), "{err}");
    never_the_secret(&err);

    // Logon keys exist but user space cannot read them: said, with why.
    let logon = description("logon");
    let spec = format!("%logon:{logon}");
    let err = refused(
        "logon",
        &logon,
        &payload,
        dir.path(),
        &as_strs(&base(&spec)),
    );
    assert!(
        err.contains(&format!("key {spec} is a logon key")) && err.contains("EOPNOTSUPP"),
        "{err}"
    );
    never_the_secret(&err);

    let mut both = base(&desc);
    both.extend(["--key-file".into(), payload.to_str().unwrap().into()]);
    let err = refused("user", &desc, &payload, dir.path(), &as_strs(&both));
    assert!(err.contains("--key-file and --key-keyring"), "{err}");
    let err = refused(
        "user",
        &desc,
        &payload,
        dir.path(),
        &as_strs(&base("%big_key:x")),
    );
    assert!(err.contains("--key-keyring \"%big_key:x\""), "{err}");
}
