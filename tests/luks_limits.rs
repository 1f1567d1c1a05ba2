//! Forged LUKS headers: real cryptsetup headers edited the way a forger
//! would (LUKS2 checksums recomputed, so the header itself looks intact).
//! Each is refused before a costly KDF runs or anything big is allocated;
//! each test also shows that the unedited header, or the legitimate
//! variant closest to the forgery, still opens.

mod support;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryptblk::luks::{check_header, unlock, unlock_image, LuksError, Unlocked};
use serde_json::{json, Value};
use support::luks::*;

const ARGON2: &[&str] = &[
    "--pbkdf",
    "argon2id",
    "--pbkdf-force-iterations",
    "4",
    "--pbkdf-memory",
    "32",
    "--pbkdf-parallel",
    "1",
];
const WRONG: &[u8] = b"not the passphrase";

/// Far more than the checks need (microseconds), far less than any of the
/// forged costs would take to compute.
const QUICK: Duration = Duration::from_secs(1);

struct Fixture {
    dir: tempfile::TempDir,
    pw: String,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pw = write_file(&dir.path().join("pw"), PASS);
        Fixture { dir, pw }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A cryptsetup image that opens (the positive control for its edits).
    fn image(&self, name: &str, args: &[&str]) -> PathBuf {
        let img = self.path(name);
        cryptsetup_format(&img, &self.pw, args);
        let key = cryptsetup_volume_key(&img, Path::new(&self.pw));
        assert_eq!(unlock(&img, PASS, None).unwrap().key.bytes(), key);
        assert!(check_header(&img).is_ok());
        img
    }

    /// A copy of `img` with its LUKS2 JSON edited.
    fn forged(&self, img: &Path, name: &str, edit: impl Fn(&mut Value)) -> PathBuf {
        let copy = self.path(name);
        std::fs::copy(img, &copy).unwrap();
        edit_luks2_json(&copy, edit);
        copy
    }

    /// A copy of the LUKS1 `img` with the big-endian u32 at `at` set.
    fn forged_luks1(&self, img: &Path, name: &str, at: u64, value: u32) -> PathBuf {
        let copy = self.path(name);
        std::fs::copy(img, &copy).unwrap();
        patch(&copy, at, &value.to_be_bytes());
        copy
    }
}

/// Runs `f` on its own thread and returns what it returns within `limit`.
/// Without the caps `f` would run a KDF for minutes or for ever: the test
/// then fails on the timeout instead of hanging (the thread is left behind).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let out = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("not refused within {limit:?}: the KDF ran"));
    assert!(start.elapsed() < limit);
    out
}

/// The error unlocking `img` with `pass` gives, quickly.
fn refused(img: &Path, pass: &'static [u8]) -> LuksError {
    let img = img.to_path_buf();
    let r: Result<Unlocked, LuksError> = within(QUICK, move || unlock(&img, pass, None));
    r.expect_err("a forged header must not unlock")
}

/// Unlock and `check_header` (what the fuzz target runs) both refuse `img`
/// for a cost over a cap, naming the cost.
fn over_limit(img: &Path, mentions: &[&str]) {
    let err = refused(img, PASS);
    let msg = err.to_string();
    assert!(matches!(err, LuksError::OverLimit(_)), "{msg}");
    for m in mentions {
        assert!(msg.contains(m), "{msg:?} does not mention {m:?}");
    }
    let path = img.to_path_buf();
    let checked = within(QUICK, move || check_header(&path));
    assert!(
        matches!(checked, Err(LuksError::OverLimit(_))),
        "{checked:?}"
    );
}

fn set_kdf(field: &'static str, value: u64) -> impl Fn(&mut Value) {
    move |v| v["keyslots"]["0"]["kdf"][field] = json!(value)
}

#[test]
fn argon2_memory_above_4_gib_is_refused_at_once() {
    let f = Fixture::new();
    let img = f.image("argon2.img", ARGON2);
    for (i, memory) in [(4u64 << 20) + 1, u32::MAX as u64].into_iter().enumerate() {
        let forged = f.forged(&img, &format!("m{i}"), set_kdf("memory", memory));
        over_limit(
            &forged,
            &["key slot 0", &memory.to_string(), "4 GiB", "tampered"],
        );
    }
}

#[test]
fn argon2_time_lanes_and_total_work_above_the_caps_are_refused_at_once() {
    let f = Fixture::new();
    let img = f.image("argon2.img", ARGON2);
    // (copy name, kdf fields to set, what the message must name)
    type Case = (&'static str, &'static [(&'static str, u64)], &'static str);
    let cases: &[Case] = &[
        ("t-max", &[("time", u32::MAX as u64)], "time cost"),
        ("t-cap", &[("time", (1 << 24) + 1)], "time cost"),
        ("lanes", &[("cpus", 5), ("memory", 64)], "5 Argon2 lanes"),
        ("lanes-max", &[("cpus", u32::MAX as u64)], "Argon2 lanes"),
        // 2^20 passes over 4 MiB: each within its own cap, 2^32 KiB-passes
        // (an hour or more) together.
        ("work", &[("time", 1 << 20), ("memory", 4096)], "KiB-passes"),
    ];
    for (name, fields, mention) in cases {
        let forged = f.forged(&img, name, |v| {
            for (field, value) in *fields {
                v["keyslots"]["0"]["kdf"][field] = json!(value);
            }
        });
        over_limit(&forged, &["key slot 0", mention]);
    }
}

#[test]
fn pbkdf2_iterations_above_the_cap_are_refused_at_once() {
    let f = Fixture::new();
    let img = f.image("luks2.img", PBKDF2);
    for (i, n) in [100_000_001u64, u32::MAX as u64].into_iter().enumerate() {
        let forged = f.forged(&img, &format!("k{i}"), set_kdf("iterations", n));
        over_limit(&forged, &["key slot 0", &format!("{n} PBKDF2 iterations")]);
    }
    // The digest runs after the key slot's KDF: it is checked before it.
    let forged = f.forged(&img, "digest", |v| {
        v["digests"]["0"]["iterations"] = json!(u32::MAX)
    });
    over_limit(&forged, &["digest", "PBKDF2 iterations"]);

    let l1 = f.image("luks1.img", &[&["--type", "luks1"], PBKDF2].concat());
    let slot = f.forged_luks1(&l1, "l1-slot", luks1_slot_iterations(0), u32::MAX);
    over_limit(&slot, &["key slot 0", "PBKDF2 iterations"]);
    let digest = f.forged_luks1(&l1, "l1-digest", LUKS1_MK_DIGEST_ITERATIONS, u32::MAX);
    over_limit(&digest, &["master key digest", "PBKDF2 iterations"]);
}

#[test]
fn key_sizes_other_than_32_or_64_bytes_are_refused_before_allocation() {
    let f = Fixture::new();
    let img = f.image("luks2.img", PBKDF2);
    for (name, edit) in [
        ("area", "area"),
        ("slot", ""), // the volume key size of the key slot itself
    ] {
        let forged = f.forged(&img, name, |v| {
            let ks = &mut v["keyslots"]["0"];
            let target = if edit.is_empty() { ks } else { &mut ks[edit] };
            target["key_size"] = json!(1u64 << 30);
        });
        let err = refused(&forged, PASS).to_string();
        assert!(
            err.contains("key_size is 1073741824") && err.contains("32 or 64 bytes"),
            "{err}"
        );
    }
    // The area key need not be the volume key's size: cryptsetup's
    // --keyslot-key-size sets it on its own, and such headers still open.
    f.image(
        "area-key-256.img",
        &[
            PBKDF2,
            &[
                "--keyslot-cipher",
                "aes-xts-plain64",
                "--keyslot-key-size",
                "256",
            ],
        ]
        .concat(),
    );
}

#[test]
fn keyslot_ids_from_32_up_or_spelt_twice_are_refused() {
    let f = Fixture::new();
    let img = f.image("luks2.img", PBKDF2);
    let move_slot = |to: &'static str| {
        move |v: &mut Value| {
            let ks = v["keyslots"].as_object_mut().unwrap().remove("0").unwrap();
            v["keyslots"][to] = ks;
            v["digests"]["0"]["keyslots"] = json!([to]);
        }
    };
    // The highest id LUKS2 has still opens: the control for the edit.
    let last = f.forged(&img, "31", move_slot("31"));
    assert!(unlock(&last, PASS, None).is_ok());
    for id in ["32", "40", "4294967296", "01", "+1"] {
        let forged = f.forged(&img, &format!("id{id}"), move_slot(id));
        let err = refused(&forged, PASS);
        let msg = err.to_string();
        assert!(matches!(err, LuksError::Corrupt(_)), "{msg}");
        assert!(msg.contains("keyslot id"), "{msg}");
    }
}

#[test]
fn a_short_or_empty_digest_never_accepts_a_wrong_passphrase() {
    let f = Fixture::new();
    let img = f.image("luks2.img", PBKDF2);
    assert!(matches!(
        unlock(&img, WRONG, None),
        Err(LuksError::WrongPassphrase)
    ));
    for (name, field, value) in [
        ("empty", "digest", String::new()),
        (
            "short",
            "digest",
            "AAAAAAAAAAAAAAAAAAAAAAAAAA==".to_string(),
        ), // 19 bytes
        ("no-salt", "salt", String::new()),
    ] {
        let forged = f.forged(&img, name, |v| v["digests"]["0"][field] = json!(value));
        for pass in [WRONG, PASS] {
            let err = refused(&forged, pass);
            assert!(matches!(err, LuksError::Corrupt(_)), "{name}: {err}");
        }
    }
    // `cryptsetup convert` keeps LUKS1's 20-byte digest under sha256: still
    // a full-strength check, and such headers open.
    let l1 = f.image("conv.img", &[&["--type", "luks1"], PBKDF2].concat());
    ok(tool("cryptsetup")
        .args(["convert", "--batch-mode", "--type", "luks2"])
        .arg(&l1));
    let key = cryptsetup_volume_key(&l1, Path::new(&f.pw));
    assert_eq!(unlock(&l1, PASS, None).unwrap().key.bytes(), key);
    assert!(matches!(
        unlock(&l1, WRONG, None),
        Err(LuksError::WrongPassphrase)
    ));
}

#[test]
fn a_data_offset_inside_an_embedded_header_is_refused() {
    let f = Fixture::new();
    let img = f.image("luks2.img", PBKDF2);
    let forged = f.forged(&img, "zero", |v| v["segments"]["0"]["offset"] = json!("0"));
    let l1 = f.image("luks1.img", &[&["--type", "luks1"], PBKDF2].concat());
    let forged1 = f.forged_luks1(&l1, "zero1", LUKS1_PAYLOAD_OFFSET, 0);
    // LUKS2: both header copies and the keyslots area, 16 MiB in all;
    // LUKS1: the header and its eight key slot areas, about 2 MiB.
    for (img, header_end) in [
        (&forged, 16u64 << 20..=16 << 20),
        (&forged1, 1 << 20..=2 << 20),
    ] {
        // A "detached" header that is the image itself is no better.
        for header in [None, Some(img.as_path())] {
            let err = unlock_image(img, header, PASS, None).unwrap_err();
            let msg = err.to_string();
            match err {
                LuksError::PayloadOverlapsHeader {
                    offset: 0,
                    header_end: end,
                } if header_end.contains(&end) => {}
                _ => panic!("{}: {msg}", img.display()),
            }
            assert!(msg.contains("--header"), "{msg}");
        }
    }
    // Offset 0 is what cryptsetup writes for a detached header, which is
    // where such headers belong.
    for kind in ["luks2", "luks1"] {
        let (hdr, data) = (
            f.path(&format!("{kind}.hdr")),
            f.path(&format!("{kind}.data")),
        );
        std::fs::File::create(&data)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        ok(tool("cryptsetup")
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                kind,
                "--key-file",
                &f.pw,
            ])
            .args(PBKDF2)
            .arg("--header")
            .arg(&hdr)
            .arg(&data));
        let u = unlock_image(&data, Some(&hdr), PASS, None).unwrap();
        assert_eq!(u.payload_offset, 0);
        assert_eq!(u.key.bytes(), cryptsetup_volume_key(&hdr, Path::new(&f.pw)));
    }
}
