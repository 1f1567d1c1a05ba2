//! `cryptblk serve --type luks…`: the daemon unlocks LUKS images made by
//! cryptsetup and qemu-img and serves their plaintext over vhost-user.

mod common;
mod luks_common;

use std::path::Path;

use common::{Client, Daemon};
use luks_common::{ok, pattern, tool, write_file, PASS};

const MIB: usize = 1 << 20;

fn read_all(c: &mut Client, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for off in (0..len).step_by(MIB) {
        out.extend(c.read(0, off as u64, MIB).unwrap());
    }
    out
}

fn serve_fails(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cryptblk"))
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("never.sock"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "serve {args:?} should fail: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn serves_cryptsetup_luks2_plaintext_and_writes_what_cryptsetup_decrypts() {
    let dir = tempfile::tempdir().unwrap();
    let plain = pattern(4 * MIB, 3);
    let img = dir.path().join("l2.img");
    std::fs::write(&img, &plain).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len((4 + 32) << 20)
        .unwrap();
    let pw = write_file(&dir.path().join("pw"), PASS);
    ok(tool("cryptsetup")
        .args([
            "reencrypt",
            "--encrypt",
            "--type",
            "luks2",
            "--reduce-device-size",
            "32M",
            "--batch-mode",
            "--key-file",
            &pw,
        ])
        .args([
            "--pbkdf",
            "argon2id",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "32",
            "--sector-size",
            "4096",
        ])
        .arg(&img));
    let i = img.to_str().unwrap();
    let d = Daemon::start(
        dir.path(),
        &[
            "--type",
            "luks",
            "--image",
            i,
            "--key-file",
            &pw,
            "--queues",
            "1",
        ],
    );
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.capacity(), 20 << 20, "payload = file − 16 MiB header");
    assert!(
        read_all(&mut c, 4 * MIB) == plain,
        "the guest sees cryptsetup's plaintext"
    );
    let new = pattern(MIB, 9);
    assert_eq!(c.write(0, 8 << 20, &new), 0);
    assert_eq!(c.flush(0), 0);
    drop(c);
    assert!(d.terminate().success());
    // What we wrote is dm-crypt ciphertext under cryptsetup's volume key.
    let u = cryptblk::luks::unlock(&img, PASS, None).unwrap();
    assert_eq!(
        u.key.bytes(),
        luks_common::cryptsetup_volume_key(&img, Path::new(&pw))
    );
    let back = luks_common::decrypt_payload(&img, &u, 9 * MIB);
    assert!(back[8 * MIB..] == new[..]);
}

#[test]
fn serves_qemu_img_luks1_and_qemu_img_reads_what_we_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let plain = pattern(2 * MIB, 5);
    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, &plain).unwrap();
    let pwfile = dir.path().join("pw");
    let pw = write_file(&pwfile, b"XXsecretYY");
    let img = dir.path().join("q.luks");
    ok(tool("qemu-img")
        .args([
            "convert",
            "-O",
            "luks",
            "--object",
            "secret,id=s0,data=secret",
            "-o",
            "key-secret=s0,iter-time=10",
        ])
        .arg(&raw)
        .arg(&img));
    let i = img.to_str().unwrap();
    let args = [
        "--type",
        "luks1",
        "--image",
        i,
        "--key-file",
        &pw,
        "--keyfile-offset",
        "2",
        "--keyfile-size",
        "6",
        "--key-slot",
        "0",
        "--queues",
        "2",
    ];
    let d = Daemon::start(dir.path(), &args);
    let mut c = Client::connect(&d.socket, 2);
    assert_eq!(c.capacity(), 2 * MIB as u64);
    assert!(read_all(&mut c, 2 * MIB) == plain);
    let new = pattern(MIB, 11);
    assert_eq!(c.write(1, MIB as u64, &new), 0);
    assert_eq!(c.flush(1), 0);
    drop(c);
    assert!(d.terminate().success());
    let out = dir.path().join("out.raw");
    ok(tool("qemu-img")
        .args([
            "convert",
            "--object",
            "secret,id=s0,data=secret",
            "--image-opts",
        ])
        .arg(format!("driver=luks,key-secret=s0,file.filename={i}"))
        .args(["-O", "raw"])
        .arg(&out));
    let back = std::fs::read(&out).unwrap();
    assert!(back[..MIB] == plain[..MIB] && back[MIB..] == new[..]);
}

#[test]
fn detached_luks2_header_from_cryptsetup() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(&dir.path().join("pw"), PASS);
    let (hdr, data) = (dir.path().join("hdr"), dir.path().join("data"));
    std::fs::File::create(&hdr)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    std::fs::File::create(&data)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    ok(tool("cryptsetup")
        .args([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--key-file",
            &pw,
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--header",
        ])
        .arg(&hdr)
        .arg(&data));
    let args = [
        "--type",
        "luks2",
        "--image",
        data.to_str().unwrap(),
        "--header",
        hdr.to_str().unwrap(),
        "--key-file",
        &pw,
        "--queues",
        "1",
    ];
    let d = Daemon::start(dir.path(), &args);
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(
        c.capacity(),
        8 << 20,
        "a detached header leaves the whole file to the payload"
    );
    let new = pattern(MIB, 1);
    assert_eq!(c.write(0, 0, &new), 0);
    assert_eq!(c.read(0, 0, MIB).unwrap(), new);
    drop(c);
    assert!(d.terminate().success());
    let raw = std::fs::read(&data).unwrap();
    assert!(raw[..MIB] != new[..], "the data file holds ciphertext");
}

#[test]
fn serve_refuses_bad_luks_setups_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(&dir.path().join("pw"), PASS);
    let bad = write_file(&dir.path().join("bad"), b"wrong");
    let img = dir.path().join("img");
    ok(std::process::Command::new(env!("CARGO_BIN_EXE_cryptblk"))
        .args([
            "format",
            "--type",
            "luks1",
            "--size",
            "1M",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            &pw,
            "--image",
        ])
        .arg(&img));
    let i = img.to_str().unwrap();
    let d = dir.path();
    let err = serve_fails(d, &["--type", "luks", "--image", i, "--key-file", &bad]);
    assert!(err.contains("no key slot opens"), "{err}");
    let err = serve_fails(d, &["--type", "luks2", "--image", i, "--key-file", &pw]);
    assert!(err.contains("the header is LUKS1"), "{err}");
    let err = serve_fails(
        d,
        &[
            "--type",
            "luks",
            "--image",
            i,
            "--key-file",
            &pw,
            "--offset",
            "4096",
        ],
    );
    assert!(
        err.contains("--offset") && err.contains("LUKS header decides"),
        "{err}"
    );
    let err = serve_fails(d, &["--image", i, "--key-file", &pw, "--key-slot", "1"]);
    assert!(err.contains("needs --type luks"), "{err}");
    let err = serve_fails(
        d,
        &[
            "--type",
            "luks",
            "--image",
            i,
            "--key-file",
            &pw,
            "--key-slot",
            "3",
        ],
    );
    assert!(err.contains("key slot 3 is not in use"), "{err}");
    assert!(!d.join("never.sock").exists());
}
