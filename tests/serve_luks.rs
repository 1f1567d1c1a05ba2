//! `cryptblk serve` on LUKS images made by qemu-img and cryptsetup, checked
//! through the socket and against those tools' own views of the image.

mod support;
use std::path::PathBuf;

use cryptblk::crypto::{IvRule, SectorCipher, XtsKey};
use support::luks::{cryptsetup_volume_key, ok, tool};
use support::{pattern, Client, Daemon};

/// A LUKS1 image made by `qemu-img create -f luks` (fast KDF): returns the
/// passphrase file, the image and the `--object secret` that opens it.
fn qemu_img_luks1(
    dir: &std::path::Path,
    passphrase: &[u8],
    size: &str,
) -> (PathBuf, PathBuf, String) {
    let pass = dir.join("pass");
    std::fs::write(&pass, passphrase).unwrap();
    let img = dir.join("disk.luks");
    let secret = format!("secret,id=sec0,file={}", pass.display());
    ok(tool("qemu-img")
        .args(["create", "-q", "-f", "luks", "--object", &secret])
        .args(["-o", "key-secret=sec0,iter-time=10"])
        .arg(&img)
        .arg(size));
    (pass, img, secret)
}

#[test]
fn luks1_from_qemu_img_round_trips_and_qemu_img_reads_what_we_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (pass, img, secret) = qemu_img_luks1(dir.path(), b"correct horse", "16M");

    let d = Daemon::start(
        dir.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--key-file",
            pass.to_str().unwrap(),
            "--queues",
            "2",
        ],
    );
    let mut c = Client::connect(&d.socket, 2);
    assert_eq!(c.capacity(), 16 << 20);
    let data = pattern(5, 1 << 20, 512 * 1024);
    assert_eq!(c.write(1, 1 << 20, &data), 0);
    assert_eq!(c.read(0, 1 << 20, data.len()).unwrap(), data);
    drop(c);
    assert!(d.terminate().success());

    let raw = dir.path().join("plain.raw");
    ok(tool("qemu-img")
        .args(["convert", "--object", &secret, "--image-opts"])
        .arg(format!(
            "driver=luks,key-secret=sec0,file.filename={}",
            img.display()
        ))
        .args(["-O", "raw"])
        .arg(&raw));
    let plain = std::fs::read(&raw).unwrap();
    assert_eq!(
        &plain[1 << 20..(1 << 20) + data.len()],
        &data[..],
        "qemu-img sees other data"
    );
}

#[test]
fn luks2_4k_from_cryptsetup_stores_what_its_volume_key_decrypts() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, b"luks2 pass").unwrap();
    let img = dir.path().join("disk.luks2");
    std::fs::write(&img, vec![0u8; 32 << 20]).unwrap();
    ok(tool("cryptsetup")
        .args([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
        ])
        .args([
            "--pbkdf-force-iterations",
            "1000",
            "--sector-size",
            "4096",
            "--key-file",
        ])
        .arg(&pass)
        .arg(&img));
    let key = cryptsetup_volume_key(&img, &pass);

    let d = Daemon::start(
        dir.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--key-file",
            pass.to_str().unwrap(),
            "--queues",
            "1",
        ],
    );
    let mut c = Client::connect(&d.socket, 1);
    let data = pattern(8, 0, 64 * 1024);
    assert_eq!(c.write(0, 8192, &data), 0);
    assert_eq!(c.read(0, 8192, data.len()).unwrap(), data);
    assert!(
        c.read(0, 512, 512).is_err(),
        "4 KiB sectors: a 512-byte read must be refused"
    );
    drop(c);
    assert!(d.terminate().success());

    // The payload starts where `cryptsetup luksDump` says; IVs count 512-byte units.
    let dump = ok(tool("cryptsetup").arg("luksDump").arg(&img));
    let text = String::from_utf8_lossy(&dump.stdout);
    let offset: u64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("offset:")
                .map(|v| v.trim().split(' ').next().unwrap().parse().unwrap())
        })
        .expect("segment offset in luksDump");
    let raw = std::fs::read(&img).unwrap();
    let start = (offset + 8192) as usize;
    let mut plain = raw[start..start + data.len()].to_vec();
    let cipher = SectorCipher::new(
        Some(&XtsKey::from_bytes(&key).unwrap()),
        IvRule {
            sector_size: 4096,
            large_sectors: false,
            skip: 0,
        },
    );
    cipher.decrypt(2, &mut plain);
    assert_eq!(plain, data);
}

#[test]
fn luks_refuses_layout_flags_and_wrong_passphrases() {
    let dir = tempfile::tempdir().unwrap();
    let (pass, img, _) = qemu_img_luks1(dir.path(), b"right", "4M");
    let serve = |extra: &[&str], key: &std::path::Path| {
        std::process::Command::new(support::BIN)
            .args(["serve", "--socket"])
            .arg(dir.path().join("s.sock"))
            .args([
                "--image",
                img.to_str().unwrap(),
                "--key-file",
                key.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = serve(&["--offset", "8"], &pass);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--offset"));
    let out = serve(&["--type", "luks2"], &pass);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the header is LUKS1"), "{err}");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, b"wrong").unwrap();
    let out = serve(&[], &wrong);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no key slot opens"), "{err}");
    assert!(
        !err.contains("wrong\n") && !err.contains("right"),
        "passphrase leaked: {err}"
    );
}

/// dm-crypt compatibility: a LUKS1 image of known plaintext (qemu-img
/// convert), served in *plain* mode with the volume key cryptsetup dumps and
/// --offset at the payload, reads back that plaintext.
#[test]
fn luks1_payload_in_plain_mode_with_the_dumped_volume_key() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, b"plain mode").unwrap();
    let raw = dir.path().join("known.raw");
    let known = pattern(11, 0, 4 << 20);
    std::fs::write(&raw, &known).unwrap();
    let img = dir.path().join("disk.luks");
    let secret = format!("secret,id=sec0,file={}", pass.display());
    ok(tool("qemu-img")
        .args(["convert", "-q", "--object", &secret, "-O", "luks"])
        .args(["-o", "key-secret=sec0,iter-time=10"])
        .arg(&raw)
        .arg(&img));
    let key = cryptsetup_volume_key(&img, &pass);
    let key_file = dir.path().join("volume.key");
    std::fs::write(&key_file, &key).unwrap();
    let dump = ok(tool("cryptsetup").arg("luksDump").arg(&img));
    let text = String::from_utf8_lossy(&dump.stdout);
    let offset = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("Payload offset:")
                .map(|v| v.trim().to_string())
        })
        .expect("Payload offset in luksDump");
    let bits = (key.len() * 8).to_string();

    let d = Daemon::start(
        dir.path(),
        &[
            "--type",
            "plain",
            "--image",
            img.to_str().unwrap(),
            "--key-file",
            key_file.to_str().unwrap(),
            "--key-size",
            &bits,
            "--offset",
            &offset,
            "--queues",
            "1",
            "--readonly",
        ],
    );
    let mut c = Client::connect_with(&d.socket, 1, true);
    assert_eq!(c.read(0, 0, 1 << 20).unwrap(), &known[..1 << 20]);
    assert_eq!(c.read(0, 3 << 20, 1 << 20).unwrap(), &known[3 << 20..]);
    drop(c);
    assert!(d.terminate().success());
}

/// A header whose data offset is 0 (what `cryptsetup --header` writes)
/// belongs in a file of its own. As a detached --header it serves the whole
/// data file; at the start of the image it is refused, since the guest would
/// read the key slots and could overwrite the header.
#[test]
fn data_offset_0_serves_with_a_detached_header_and_is_refused_inside_the_image() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, b"detached").unwrap();
    let (hdr, data) = (dir.path().join("hdr"), dir.path().join("data"));
    std::fs::File::create(&data)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    ok(tool("cryptsetup")
        .args(["luksFormat", "--batch-mode", "--type", "luks2"])
        .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .arg("--key-file")
        .arg(&pass)
        .arg("--header")
        .arg(&hdr)
        .arg(&data));
    let args = |image: &std::path::Path| {
        vec![
            "--image".to_string(),
            image.display().to_string(),
            "--key-file".to_string(),
            pass.display().to_string(),
        ]
    };
    let mut detached = args(&data);
    detached.extend(["--header".to_string(), hdr.display().to_string()]);
    let detached: Vec<&str> = detached.iter().map(String::as_str).collect();
    let d = Daemon::start(dir.path(), &detached);
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.capacity(), 4 << 20);
    let block = pattern(3, 0, 4096);
    assert_eq!(c.write(0, 0, &block), 0);
    assert_eq!(c.read(0, 0, block.len()).unwrap(), block);
    drop(c);
    assert!(d.terminate().success());

    // The same header at the start of an image: its data would start at 0.
    let img = dir.path().join("embedded");
    std::fs::copy(&hdr, &img).unwrap();
    let child = std::process::Command::new(support::BIN)
        .args(["serve", "--socket"])
        .arg(dir.path().join("e.sock"))
        .args(args(&img))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut d = Daemon::adopt(child, dir.path().join("e.sock"));
    // Without the check it would serve: wait_exit then fails the test.
    let status = d.wait_exit(std::time::Duration::from_secs(20));
    let mut err = String::new();
    d.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("inside the LUKS header") && err.contains("--header"),
        "{err}"
    );
}
