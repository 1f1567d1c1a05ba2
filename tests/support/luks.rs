//! Helpers shared by the LUKS interop tests: the real tools (cryptsetup,
//! qemu-img) as oracles, known plaintext, small KDF costs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cryptblk::crypto::{IvRule, SectorCipher};

pub const PASS: &[u8] = b"correct horse battery staple";

/// cryptsetup's options for a key slot that opens fast: PBKDF2 at the
/// 1000 iterations it accepts at the least.
pub const PBKDF2: &[&str] = &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

/// A tool the tests need; missing means a broken test machine, not a skip.
pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(name).is_file();
    assert!(
        found,
        "{name} is not installed: run integration/install-deps.sh"
    );
    let path = if Path::new("/usr/sbin").join(name).is_file() {
        PathBuf::from("/usr/sbin").join(name)
    } else {
        PathBuf::from(name)
    };
    Command::new(path)
}

pub fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("the tool starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn cryptblk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cryptblk"))
}

/// Runs cryptblk expecting failure; returns stderr (checked to be no panic).
pub fn cryptblk_fails(args: &[&str]) -> String {
    let out = cryptblk().args(args).output().expect("cryptblk starts");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "cryptblk {args:?} should fail");
    assert_eq!(out.status.code(), Some(1), "cryptblk {args:?}: {err}");
    assert!(
        !err.contains("panicked"),
        "cryptblk {args:?} panicked: {err}"
    );
    err
}

pub fn write_file(path: &Path, data: &[u8]) -> String {
    std::fs::write(path, data).unwrap();
    path.to_str().unwrap().to_string()
}

/// cryptsetup's own view of the volume key.
pub fn cryptsetup_volume_key(image: &Path, key_file: &Path) -> Vec<u8> {
    let vk = image.with_extension("vk");
    let _ = std::fs::remove_file(&vk);
    ok(tool("cryptsetup")
        .args([
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--volume-key-file",
        ])
        .arg(&vk)
        .arg("--key-file")
        .arg(key_file)
        .arg(image));
    let key = std::fs::read(&vk).unwrap();
    std::fs::remove_file(&vk).unwrap();
    key
}

/// The LUKS commands on an image of a network store (`image`: an NBD URI,
/// an RBD spec), each run by `run` (the arguments to cryptblk; its
/// output): `format` KIND with a 16 MiB payload and the passphrase in
/// `pw`, then `dump`, then `key add` of the passphrase in `pw2`; then
/// `format` again is refused, the volume never overwritten. Returns what
/// `dump` printed.
pub fn format_dump_and_add_key(
    kind: &str,
    image: &str,
    pw: &Path,
    pw2: &Path,
    run: impl Fn(&[&str]) -> Output,
) -> String {
    let succeeds = |args: &[&str]| {
        let out = run(args);
        assert!(
            out.status.success(),
            "cryptblk {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pw = pw.to_str().unwrap();
    let format = [
        "format",
        "--type",
        kind,
        "--image",
        image,
        "--size",
        "16M",
        "--key-file",
        pw,
    ];
    succeeds(&[&format[..], PBKDF2].concat());
    let dump = succeeds(&["dump", "--image", image]);
    let add = [
        "key",
        "add",
        "--image",
        image,
        "--key-file",
        pw,
        "--new-key-file",
        pw2.to_str().unwrap(),
    ];
    succeeds(&[&add[..], PBKDF2].concat());
    let again = run(&format);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));
    dump
}

/// Whether cryptsetup accepts `key_file` for `image`.
pub fn cryptsetup_opens(image: &Path, key_file: &Path) -> bool {
    tool("cryptsetup")
        .args(["open", "--test-passphrase", "--batch-mode", "--key-file"])
        .arg(key_file)
        .arg(image)
        .output()
        .unwrap()
        .status
        .success()
}

/// Decrypts `len` payload bytes of `image` with what `unlock` returned.
pub fn decrypt_payload(image: &Path, u: &cryptblk::luks::Unlocked, len: usize) -> Vec<u8> {
    let data = std::fs::read(image).unwrap();
    let start = u.payload_offset as usize;
    let mut buf = data[start..start + len].to_vec();
    let cipher = SectorCipher::new(
        Some(&u.key),
        IvRule {
            sector_size: u.sector_size,
            large_sectors: u.iv_large_sectors,
            skip: 0,
        },
    );
    cipher.decrypt(0, &mut buf);
    buf
}

/// `cryptsetup luksFormat` on a new 20 MiB file (pass small KDF costs).
pub fn cryptsetup_format(img: &Path, pw: &str, args: &[&str]) {
    std::fs::File::create(img)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    ok(tool("cryptsetup")
        .args(["luksFormat", "--batch-mode", "--key-file", pw])
        .args(args)
        .arg(img));
}

pub fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Rewrites the JSON metadata of both LUKS2 header copies of `img` with
/// `edit` and recomputes each copy's sha256 checksum, as a forger would:
/// the result passes every integrity check of the header itself.
pub fn edit_luks2_json(img: &Path, edit: impl Fn(&mut serde_json::Value)) {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut size = [0u8; 8];
    f.read_exact_at(&mut size, 8).unwrap();
    let hdr_size = u64::from_be_bytes(size);
    for at in [0, hdr_size] {
        let mut copy = vec![0u8; hdr_size as usize];
        f.read_exact_at(&mut copy, at).unwrap();
        let (bin, area) = copy.split_at_mut(4096);
        let end = area.iter().position(|&b| b == 0).unwrap();
        let mut json: serde_json::Value = serde_json::from_slice(&area[..end]).unwrap();
        edit(&mut json);
        let text = serde_json::to_vec(&json).unwrap();
        area.fill(0);
        area[..text.len()].copy_from_slice(&text);
        bin[448..512].fill(0);
        let sum = Sha256::new()
            .chain_update(&*bin)
            .chain_update(&*area)
            .finalize();
        bin[448..480].copy_from_slice(&sum);
        f.write_all_at(&copy, at).unwrap();
    }
}

/// LUKS1 header fields (big-endian u32), as the on-disk format spec lays them out.
pub const LUKS1_PAYLOAD_OFFSET: u64 = 104;
pub const LUKS1_MK_DIGEST_ITERATIONS: u64 = 164;
pub fn luks1_slot_iterations(slot: u64) -> u64 {
    208 + 48 * slot + 4
}
