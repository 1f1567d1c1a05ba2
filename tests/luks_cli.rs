//! `cryptblk format | key | dump` through the real binary, checked with
//! cryptsetup; and the failures a user can cause: clear message, exit 1.

mod support;
use std::path::{Path, PathBuf};

use cryptblk::luks::{read_passphrase, unlock};
use support::luks::*;

const ARGON: &[&str] = &[
    "--pbkdf",
    "argon2id",
    "--pbkdf-force-iterations",
    "4",
    "--pbkdf-memory",
    "32",
];

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn key(&self, name: &str, pass: &[u8]) -> String {
        write_file(&self.path(name), pass)
    }
    fn format(&self, name: &str, kind: &str, pw: &str, extra: &[&str]) -> PathBuf {
        let img = self.path(name);
        ok(cryptblk()
            .args([
                "format",
                "--type",
                kind,
                "--size",
                "1M",
                "--key-file",
                pw,
                "--image",
            ])
            .arg(&img)
            .args(extra));
        img
    }
}

fn key_cmd(action: &str, img: &Path, args: &[&str]) {
    ok(cryptblk()
        .args(["key", action, "--image"])
        .arg(img)
        .args(args));
}

fn round_trip(kind: &str, kdf: &[&str]) {
    let f = Fixture::new();
    let (a, b, c) = (
        f.key("a", b"alpha"),
        f.key("b", b"bravo"),
        f.key("c", b"charlie"),
    );
    let img = f.format("img", kind, &a, kdf);
    let key = cryptsetup_volume_key(&img, Path::new(&a));

    // add: a new slot, picked or first free; cryptsetup agrees.
    key_cmd(
        "add",
        &img,
        &[
            &["--key-file", &a, "--new-key-file", &b, "--key-slot", "6"],
            kdf,
        ]
        .concat(),
    );
    assert_eq!(unlock(&img, b"bravo", Some(6)).unwrap().key.bytes(), key);
    assert_eq!(cryptsetup_volume_key(&img, Path::new(&b)), key);

    // change: bravo → charlie; bravo no longer opens, charlie does.
    key_cmd(
        "change",
        &img,
        &[&["--key-file", &b, "--new-key-file", &c], kdf].concat(),
    );
    assert!(!cryptsetup_opens(&img, Path::new(&b)));
    assert_eq!(cryptsetup_volume_key(&img, Path::new(&c)), key);
    assert_eq!(unlock(&img, b"charlie", None).unwrap().key.bytes(), key);

    // remove: the slot alpha opens; charlie still works, alpha does not.
    key_cmd("remove", &img, &["--key-file", &a]);
    assert!(!cryptsetup_opens(&img, Path::new(&a)));
    assert!(unlock(&img, b"alpha", None).is_err());
    assert_eq!(cryptsetup_volume_key(&img, Path::new(&c)), key);

    // The last slot is never removed.
    let err = cryptblk_fails(&[
        "key",
        "remove",
        "--image",
        img.to_str().unwrap(),
        "--key-file",
        &c,
    ]);
    assert!(err.contains("last one"), "{err}");

    // cryptsetup adds a key to our image; we open with it and remove it.
    let d = f.key("d", b"delta");
    ok(tool("cryptsetup")
        .args(["luksAddKey", "--batch-mode", "--key-file", &c])
        .args(kdf)
        .arg(&img)
        .arg(&d));
    assert_eq!(unlock(&img, b"delta", None).unwrap().key.bytes(), key);
    key_cmd("remove", &img, &["--key-file", &d]);
    assert!(!cryptsetup_opens(&img, Path::new(&d)));
    assert!(cryptsetup_opens(&img, Path::new(&c)));
}

#[test]
fn luks2_argon2id_key_add_change_remove_round_trip() {
    round_trip("luks2", ARGON);
}

#[test]
fn luks2_pbkdf2_key_add_change_remove_round_trip() {
    round_trip("luks2", PBKDF2);
}

#[test]
fn luks1_key_add_change_remove_round_trip() {
    round_trip("luks1", &["--pbkdf-force-iterations", "1000"]);
}

#[test]
fn luks1_change_with_every_slot_full_works_in_place() {
    let f = Fixture::new();
    let a = f.key("a", b"alpha");
    let img = f.format("img", "luks1", &a, &["--pbkdf-force-iterations", "1000"]);
    for i in 1..8 {
        let k = f.key(&format!("k{i}"), format!("key{i}").as_bytes());
        key_cmd(
            "add",
            &img,
            &[
                "--key-file",
                &a,
                "--new-key-file",
                &k,
                "--pbkdf-force-iterations",
                "1000",
            ],
        );
    }
    let z = f.key("z", b"zulu");
    let err = cryptblk_fails(&[
        "key",
        "add",
        "--image",
        img.to_str().unwrap(),
        "--key-file",
        &a,
        "--new-key-file",
        &z,
    ]);
    assert!(err.contains("no free key slot"), "{err}");
    key_cmd(
        "change",
        &img,
        &[
            "--key-file",
            &a,
            "--new-key-file",
            &z,
            "--pbkdf-force-iterations",
            "1000",
        ],
    );
    assert!(unlock(&img, b"zulu", Some(0)).is_ok());
    assert!(!cryptsetup_opens(&img, Path::new(&a)));
    assert!(cryptsetup_opens(&img, Path::new(&z)));
}

#[test]
fn keyfile_offset_and_size_match_cryptsetup() {
    let f = Fixture::new();
    let pw = f.key("pw", b"XXXXsecretYYYY");
    let img = f.format(
        "img",
        "luks2",
        &pw,
        &[PBKDF2, &["--keyfile-offset", "4", "--keyfile-size", "6"]].concat(),
    );
    assert_eq!(
        &read_passphrase(Some(&pw), 4, Some(6)).unwrap()[..],
        b"secret"
    );
    assert!(unlock(&img, b"secret", None).is_ok());
    ok(tool("cryptsetup")
        .args([
            "open",
            "--test-passphrase",
            "--batch-mode",
            "--keyfile-offset",
            "4",
            "--keyfile-size",
            "6",
            "--key-file",
            &pw,
        ])
        .arg(&img));
    assert!(
        read_passphrase(Some(&pw), 4, Some(100)).is_err(),
        "a short key file is an error"
    );
    assert!(read_passphrase(Some("/nonexistent/key"), 0, None).is_err());
    let big = f.key("big", &vec![b'x'; (8 << 20) + 1]);
    let err = read_passphrase(Some(&big), 0, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("larger than 8 MiB"), "{err}");
    assert_eq!(
        read_passphrase(Some(&big), 0, Some(9 << 20))
            .map(|p| p.len())
            .ok(),
        None,
        "short"
    );
    assert_eq!(
        read_passphrase(Some(&big), 0, Some(100)).unwrap().len(),
        100
    );
}

#[test]
fn dump_shows_the_header_and_no_secret() {
    let f = Fixture::new();
    let pw = f.key("pw", PASS);
    let uuid = "0b5c3f0e-96a1-4b8e-8f2c-1d2e3f4a5b6c";
    let img = f.format(
        "img",
        "luks2",
        &pw,
        &[
            ARGON,
            &["--uuid", uuid, "--label", "mydisk", "--sector-size", "4096"],
        ]
        .concat(),
    );
    let out = String::from_utf8(ok(cryptblk().args(["dump", "--image"]).arg(&img)).stdout).unwrap();
    for want in [
        "Version:        2",
        uuid,
        "mydisk",
        "aes-xts-plain64",
        "Sector size:    4096",
        "16777216",
        "argon2id",
    ] {
        assert!(out.contains(want), "dump lacks {want:?}:\n{out}");
    }
    let key = unlock(&img, PASS, None).unwrap();
    let hex: String = key.key.bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert!(!out.contains(&hex[..16]) && !out.contains("salt"), "{out}");
    assert!(
        !format!("{key:?}").contains(&hex[..16]),
        "Debug shows no key"
    );
    // --header reads a (detached) header file instead of the image.
    let other = f.format("l1", "luks1", &pw, &["--pbkdf-force-iterations", "1000"]);
    let out = String::from_utf8(
        ok(cryptblk()
            .args(["dump", "--image"])
            .arg(&img)
            .arg("--header")
            .arg(&other))
        .stdout,
    )
    .unwrap();
    assert!(
        out.contains("Version:        1") && out.contains("0: ENABLED"),
        "{out}"
    );
}

#[test]
fn format_refuses_to_overwrite_and_checks_its_arguments() {
    let f = Fixture::new();
    let pw = f.key("pw", PASS);
    let img = f.format("img", "luks2", &pw, PBKDF2);
    let before = std::fs::read(&img).unwrap();
    let i = img.to_str().unwrap();
    let base = ["format", "--image", i, "--size", "1M", "--key-file", &pw];
    let err = cryptblk_fails(&base);
    assert!(err.contains("never overwritten"), "{err}");
    assert!(std::fs::read(&img).unwrap() == before);
    let new = f.path("new").to_str().unwrap().to_string();
    for (args, want) in [
        (vec!["--cipher", "aes-cbc-essiv:sha256"], "aes-cbc-essiv"),
        (vec!["--type", "luks1", "--pbkdf", "argon2id"], "pbkdf2"),
        (vec!["--sector-size", "1000"], "sector-size"),
        (vec!["--key-size", "128"], "key-size"),
        (vec!["--uuid", "nope"], "not a UUID"),
    ] {
        let err = cryptblk_fails(
            &[
                &["format", "--image", &new, "--size", "1M", "--key-file", &pw],
                &args[..],
            ]
            .concat(),
        );
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!Path::new(&new).exists(), "a failed format leaves no image");
    }
}

#[test]
fn plain_format_creates_a_private_key_file_and_a_sparse_image() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let f = Fixture::new();
    let key = f.path("raw.key");
    let img = f.path("plain.img");
    ok(cryptblk()
        .args([
            "format",
            "--type",
            "plain",
            "--size",
            "64M",
            "--key-size",
            "256",
            "--image",
        ])
        .arg(&img)
        .arg("--key-file")
        .arg(&key));
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let im = std::fs::metadata(&img).unwrap();
    assert_eq!(im.len(), 64 << 20);
    assert!(im.blocks() * 512 < 1 << 20, "sparse");
    // An existing key file is reused, and must have the right length.
    let img2 = f.path("plain2.img");
    ok(cryptblk()
        .args([
            "format",
            "--type",
            "plain",
            "--size",
            "1M",
            "--key-size",
            "256",
            "--image",
        ])
        .arg(&img2)
        .arg("--key-file")
        .arg(&key));
    let err = cryptblk_fails(&[
        "format",
        "--type",
        "plain",
        "--size",
        "1M",
        "--key-size",
        "512",
        "--image",
        f.path("p3").to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert!(err.contains("key"), "{err}");
}

#[test]
fn user_errors_are_clear_and_exit_1() {
    let f = Fixture::new();
    let pw = f.key("pw", PASS);
    let bad = f.key("bad", b"wrong");
    let l2 = f.format("l2", "luks2", &pw, PBKDF2);
    let l1 = f.format("l1", "luks1", &pw, &["--pbkdf-force-iterations", "1000"]);
    let (s2, s1) = (l2.to_str().unwrap(), l1.to_str().unwrap());

    for img in [s1, s2] {
        let err = cryptblk_fails(&[
            "key",
            "add",
            "--image",
            img,
            "--key-file",
            &bad,
            "--new-key-file",
            &pw,
        ]);
        assert!(
            err.contains("no key slot opens with this passphrase"),
            "{err}"
        );
    }

    // Not LUKS at all.
    let junk = f.path("junk");
    std::fs::write(&junk, vec![7u8; 1 << 20]).unwrap();
    let err = cryptblk_fails(&["dump", "--image", junk.to_str().unwrap()]);
    assert!(err.contains("not a LUKS image"), "{err}");

    // Truncated headers.
    for (src, len, want) in [
        (&l1, 300u64, "truncated"),
        (&l1, 8192, "truncated"),
        (&l2, 10000, "unusable"),
        (&l2, 20000, "truncated"),
    ] {
        let t = f.path("trunc");
        std::fs::copy(src, &t).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&t)
            .unwrap()
            .set_len(len)
            .unwrap();
        let err = cryptblk_fails(&[
            "key",
            "add",
            "--image",
            t.to_str().unwrap(),
            "--key-file",
            &pw,
            "--new-key-file",
            &bad,
        ]);
        assert!(err.contains(want), "{len}: {err}");
        let lib = unlock(&t, PASS, None).unwrap_err().to_string();
        assert!(lib.contains(want), "{lib}");
    }

    // A corrupted LUKS1 key slot (state word) and a wiped LUKS2 key area.
    let c1 = f.path("c1");
    std::fs::copy(&l1, &c1).unwrap();
    patch(&c1, 208, &[1, 2, 3, 4]);
    let err = cryptblk_fails(&["dump", "--image", c1.to_str().unwrap()]);
    assert!(
        err.contains("key slot 0 has an invalid state word"),
        "{err}"
    );
    let c2 = f.path("c2");
    std::fs::copy(&l2, &c2).unwrap();
    patch(&c2, 32768 + 1000, &[0u8; 4096]);
    assert!(
        unlock(&c2, PASS, None).is_err(),
        "a damaged key area does not give a key"
    );
}

#[test]
fn unsupported_ciphers_and_reencryption_are_refused_by_name() {
    let f = Fixture::new();
    let pw = f.key("pw", PASS);
    for (kind, cipher) in [
        ("luks1", "aes-cbc-essiv:sha256"),
        ("luks2", "aes-xts-plain"),
        ("luks2", "aes-cbc-essiv:sha256"),
    ] {
        let img = f.path(&format!("{kind}-{}", cipher.replace(':', "_")));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(20 << 20)
            .unwrap();
        ok(tool("cryptsetup")
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                kind,
                "--cipher",
                cipher,
                "--key-file",
                &pw,
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
            ])
            .arg(&img));
        let err = unlock(&img, PASS, None).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{cipher:?}")) && err.contains("only aes-xts-plain64"),
            "{err}"
        );
        let err = cryptblk_fails(&["dump", "--image", img.to_str().unwrap()]);
        assert!(err.contains("only aes-xts-plain64"), "{err}");
    }
    // An interrupted cryptsetup re-encryption leaves a requirement flag.
    let img = f.path("reenc");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    ok(tool("cryptsetup")
        .args([
            "reencrypt",
            "--encrypt",
            "--init-only",
            "--type",
            "luks2",
            "--reduce-device-size",
            "32M",
            "--batch-mode",
            "--key-file",
            &pw,
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ])
        .arg(&img));
    let err = unlock(&img, PASS, None).unwrap_err().to_string();
    assert!(err.contains("re-encryption is in progress"), "{err}");
}

#[test]
fn kdf_costs_follow_iter_time_when_not_forced() {
    let f = Fixture::new();
    let pw = f.key("pw", PASS);
    let dump = |img: &Path| {
        String::from_utf8(ok(cryptblk().args(["dump", "--image"]).arg(img)).stdout).unwrap()
    };
    // The number that follows `marker` in the dump.
    let number_after = |out: &str, marker: &str| -> u64 {
        out.split(marker)
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // 10 ms cannot afford 1 GiB even at the minimum time cost: less memory.
    let img = f.format(
        "a",
        "luks2",
        &pw,
        &[
            "--pbkdf",
            "argon2id",
            "--iter-time",
            "10",
            "--pbkdf-memory",
            "1048576",
        ],
    );
    let out = dump(&img);
    let mem = number_after(&out, "memory ");
    assert!(out.contains("argon2id (time 4,") && mem < 1048576, "{out}");
    assert!(cryptsetup_opens(&img, Path::new(&pw)));
    // pbkdf2 measured, never below cryptsetup's minimum.
    let img = f.format("b", "luks1", &pw, &["--iter-time", "20"]);
    let out = dump(&img);
    let iters = number_after(&out, "sha256, ");
    assert!(iters >= 1000, "{out}");
    assert!(cryptsetup_opens(&img, Path::new(&pw)));
}
