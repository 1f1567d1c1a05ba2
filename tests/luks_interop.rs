//! cryptblk ↔ cryptsetup 2.6 / qemu-img 10: images made by each tool open
//! in the other, to the same volume key and the same plaintext.

mod support;
use std::path::Path;

use cryptblk::luks::{unlock, LuksError};
use support::luks::*;
use support::pattern;

const DATA: usize = 4 << 20;

/// A LUKS2 image whose payload is `plain`, made by cryptsetup's userspace
/// re-encryption (no device-mapper needed).
fn cryptsetup_encrypt_luks2(dir: &Path, plain: &[u8], kdf: &[&str]) -> std::path::PathBuf {
    let img = dir.join("reenc.img");
    std::fs::write(&img, plain).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(plain.len() as u64 + (32 << 20)).unwrap();
    let pw = write_file(&dir.join("pw"), PASS);
    ok(tool("cryptsetup")
        .args([
            "reencrypt",
            "--encrypt",
            "--type",
            "luks2",
            "--reduce-device-size",
            "32M",
        ])
        .args(["--batch-mode", "--key-file", &pw])
        .args(kdf)
        .arg(&img));
    img
}

fn check_reencrypted(kdf: &[&str], sector_size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let plain = pattern(sector_size as u64, 0, DATA);
    let img = cryptsetup_encrypt_luks2(dir.path(), &plain, kdf);
    let u = unlock(&img, PASS, None).expect("cryptblk opens cryptsetup's LUKS2");
    assert_eq!(u.version, 2);
    assert_eq!(u.cipher, "aes-xts-plain64");
    assert_eq!(u.sector_size, sector_size);
    assert_eq!(u.payload_offset, 16 << 20);
    assert!(!u.iv_large_sectors);
    assert_eq!(
        u.key.bytes(),
        cryptsetup_volume_key(&img, &dir.path().join("pw"))
    );
    assert!(
        decrypt_payload(&img, &u, DATA) == plain,
        "payload does not decrypt to the plaintext"
    );
}

#[test]
fn luks2_argon2id_4096_byte_sectors_from_cryptsetup() {
    check_reencrypted(
        &[
            "--pbkdf",
            "argon2id",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "32",
            "--sector-size",
            "4096",
        ],
        4096,
    );
}

#[test]
fn luks2_pbkdf2_sha512_512_byte_sectors_from_cryptsetup() {
    check_reencrypted(
        &[
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--hash",
            "sha512",
            "--sector-size",
            "512",
        ],
        512,
    );
}

#[test]
fn luks2_argon2i_aes128_from_cryptsetup() {
    check_reencrypted(
        &[
            "--pbkdf",
            "argon2i",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "64",
            "--key-size",
            "256",
        ],
        512,
    );
}

#[test]
fn luks1_from_qemu_img_decrypts_to_the_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let plain = pattern(7, 0, DATA);
    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, &plain).unwrap();
    let pw = write_file(&dir.path().join("pw"), PASS);
    let img = dir.path().join("q.luks");
    ok(tool("qemu-img")
        .args(["convert", "-O", "luks", "--object"])
        .arg(format!("secret,id=sec0,file={pw}"))
        .args(["-o", "key-secret=sec0,iter-time=10"])
        .arg(&raw)
        .arg(&img));
    let u = unlock(&img, PASS, None).expect("cryptblk opens qemu-img's LUKS1");
    assert_eq!((u.version, u.sector_size), (1, 512));
    assert_eq!(u.payload_offset, 4040 * 512, "qemu-img's layout");
    assert_eq!(u.key.bytes(), cryptsetup_volume_key(&img, Path::new(&pw)));
    assert!(decrypt_payload(&img, &u, DATA) == plain);
}

#[test]
fn luks1_from_cryptsetup_for_each_hash() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(&dir.path().join("pw"), PASS);
    for (hash, bits) in [("sha1", "512"), ("sha256", "256"), ("sha512", "512")] {
        let img = dir.path().join(format!("{hash}.img"));
        cryptsetup_format(
            &img,
            &pw,
            &[
                "--type",
                "luks1",
                "--hash",
                hash,
                "--key-size",
                bits,
                "--pbkdf-force-iterations",
                "1000",
            ],
        );
        let u = unlock(&img, PASS, None).unwrap();
        assert_eq!((u.version, u.payload_offset), (1, 4096 * 512));
        assert_eq!(u.key.bits().to_string(), bits);
        assert_eq!(
            u.key.bytes(),
            cryptsetup_volume_key(&img, Path::new(&pw)),
            "{hash}"
        );
    }
}

#[test]
fn every_key_slot_unlocks_and_key_slot_picks_one() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(&dir.path().join("pw"), PASS);
    let pw3 = write_file(&dir.path().join("pw3"), b"three");
    let pw5 = write_file(&dir.path().join("pw5"), b"five");
    let img = dir.path().join("multi.img");
    cryptsetup_format(&img, &pw, &[&["--type", "luks2"], PBKDF2].concat());
    for (slot, file, kdf) in [
        ("3", &pw3, ["--pbkdf", "argon2i"]),
        ("5", &pw5, ["--pbkdf", "argon2id"]),
    ] {
        ok(tool("cryptsetup")
            .args([
                "luksAddKey",
                "--batch-mode",
                "--key-file",
                &pw,
                "--key-slot",
                slot,
            ])
            .args(kdf)
            .args([
                "--pbkdf-force-iterations",
                "4",
                "--pbkdf-memory",
                "32",
                &img.to_string_lossy(),
                file,
            ]));
    }
    let key = cryptsetup_volume_key(&img, Path::new(&pw));
    for (pass, slot) in [(PASS, 0), (&b"three"[..], 3), (&b"five"[..], 5)] {
        assert_eq!(unlock(&img, pass, None).unwrap().key.bytes(), key);
        assert_eq!(unlock(&img, pass, Some(slot)).unwrap().key.bytes(), key);
    }
    assert!(matches!(
        unlock(&img, b"three", Some(5)),
        Err(LuksError::WrongPassphraseForSlot { slot: 5 })
    ));
    assert!(matches!(
        unlock(&img, b"three", Some(4)),
        Err(LuksError::SlotInactive { slot: 4 })
    ));
    assert!(matches!(
        unlock(&img, b"three", Some(40)),
        Err(LuksError::SlotOutOfRange { .. })
    ));
    assert!(matches!(
        unlock(&img, b"nope", None),
        Err(LuksError::WrongPassphrase)
    ));
}

#[test]
fn damaged_primary_header_falls_back_to_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(&dir.path().join("pw"), PASS);
    let img = dir.path().join("d.img");
    cryptsetup_format(&img, &pw, &[&["--type", "luks2"], PBKDF2].concat());
    let key = cryptsetup_volume_key(&img, Path::new(&pw));
    // A flipped byte in the primary's JSON area: checksum mismatch.
    patch(&img, 4096 + 10, b"#");
    assert_eq!(unlock(&img, PASS, None).unwrap().key.bytes(), key);
    // The whole primary binary header gone, magic included.
    patch(&img, 0, &[0u8; 4096]);
    assert!(!cryptblk::luks::is_luks(&img).unwrap());
    assert_eq!(unlock(&img, PASS, None).unwrap().key.bytes(), key);
    // Both copies damaged: a clear error, no guess.
    patch(&img, 16384 + 4096 + 10, b"#");
    let err = unlock(&img, PASS, None).unwrap_err();
    assert!(
        matches!(err, LuksError::NotLuks(_) | LuksError::Corrupt(_)),
        "{err}"
    );
}

#[test]
fn cryptsetup_and_qemu_img_open_cryptblk_images() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(&dir.path().join("pw"), PASS);
    let cases: &[(&str, &[&str])] = &[
        (
            "luks2",
            &[
                "--pbkdf",
                "argon2id",
                "--pbkdf-force-iterations",
                "4",
                "--pbkdf-memory",
                "32",
                "--sector-size",
                "4096",
                "--label",
                "data",
            ],
        ),
        (
            "luks2",
            &[
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--hash",
                "sha512",
                "--key-size",
                "256",
            ],
        ),
        ("luks1", &["--pbkdf-force-iterations", "1000"]),
        (
            "luks1",
            &[
                "--pbkdf-force-iterations",
                "1000",
                "--hash",
                "sha1",
                "--key-size",
                "256",
            ],
        ),
    ];
    for (i, (kind, args)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("c{i}.img"));
        ok(cryptblk()
            .args([
                "format",
                "--type",
                kind,
                "--size",
                "4M",
                "--key-file",
                &pw,
                "--image",
            ])
            .arg(&img)
            .args(*args));
        assert!(cryptsetup_opens(&img, Path::new(&pw)), "case {i}");
        let u = unlock(&img, PASS, None).unwrap();
        assert_eq!(
            u.key.bytes(),
            cryptsetup_volume_key(&img, Path::new(&pw)),
            "case {i}"
        );
        let dump =
            String::from_utf8(ok(tool("cryptsetup").arg("luksDump").arg(&img)).stdout).unwrap();
        if args.contains(&"4096") {
            assert!(dump.contains("sector: 4096"), "{dump}");
            assert!(dump.contains("Label:         \tdata"), "{dump}");
        }
        assert_eq!(
            std::fs::metadata(&img).unwrap().len(),
            u.payload_offset + (4 << 20)
        );
        if *kind == "luks1" {
            qemu_reads_back(&img, &u, &pw, dir.path());
        }
    }
}

/// Writes known plaintext through our cipher, reads it back through qemu-img.
fn qemu_reads_back(img: &Path, u: &cryptblk::luks::Unlocked, pw: &str, dir: &Path) {
    use std::os::unix::fs::FileExt;
    let plain = pattern(99, 0, 1 << 20);
    let mut ct = plain.clone();
    cryptblk::crypto::SectorCipher::new(
        Some(&u.key),
        cryptblk::crypto::IvRule {
            sector_size: 512,
            large_sectors: false,
            skip: 0,
        },
    )
    .encrypt(0, &mut ct);
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .write_all_at(&ct, u.payload_offset)
        .unwrap();
    let out = dir.join("out.raw");
    ok(tool("qemu-img")
        .args(["convert", "--object"])
        .arg(format!("secret,id=sec0,file={pw}"))
        .args(["--image-opts"])
        .arg(format!(
            "driver=luks,key-secret=sec0,file.filename={}",
            img.display()
        ))
        .args(["-O", "raw"])
        .arg(&out));
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), 4 << 20);
    assert!(
        back[..plain.len()] == plain[..],
        "qemu-img decrypts what cryptblk encrypted"
    );
}
