//! Tests of the crypto layer. Oracles: IEEE 1619 vectors (`vectors`),
//! OpenSSL and xts-mode on random data (`oracles`), and the kernels against
//! each other (`kernels`).

use super::*;

mod kernels;
mod oracles;
mod vectors;

/// Every kernel this machine can run, by name. The VAES kernel is required
/// on x86_64 unless `CRYPTBLK_TEST_NO_VAES=1` says this CPU lacks it: a
/// missing fast path fails loudly instead of being skipped.
pub(super) fn kernels(key: &XtsKey) -> Vec<(&'static str, Xts)> {
    let mut all = vec![
        ("auto", Xts::new(key)),
        ("portable", Xts::new_portable(key)),
    ];
    match Xts::new_vaes(key) {
        Some(fast) => all.push(("vaes", fast)),
        None => assert!(
            cfg!(not(target_arch = "x86_64")) || std::env::var_os("CRYPTBLK_TEST_NO_VAES").is_some(),
            "this CPU cannot run the VAES kernel; set CRYPTBLK_TEST_NO_VAES=1 to test only the portable one"
        ),
    }
    all
}

/// Deterministic pseudo-random bytes (xorshift64*): large inputs without
/// proptest having to shrink megabytes.
pub(super) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn key(bytes: usize, seed: u8) -> XtsKey {
    let k: Vec<u8> = (0..bytes)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    XtsKey::from_bytes(&k).unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

pub(crate) fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn iv_counts_512_byte_units_unless_large_sectors() {
    let small = IvRule {
        sector_size: 4096,
        large_sectors: false,
        skip: 16,
    };
    assert_eq!(small.iv(3), 3 * 8 + 16);
    let large = IvRule {
        sector_size: 4096,
        large_sectors: true,
        skip: 16,
    };
    assert_eq!(large.iv(3), 3 + 2);
}

/// The shared-memory path (guest buffers) computes exactly what the slice
/// path does, on every kernel: the fused one takes the pointers as they
/// are, the portable one goes through a stack buffer sector by sector.
#[test]
fn shared_memory_variants_match_the_slice_variants_on_every_kernel() {
    for bytes in [32, 64] {
        let key = key(bytes, 7);
        for (name, xts) in kernels(&key) {
            for size in SECTOR_SIZES {
                let plain = noise(size as u64, size * 3);
                let mut expected = vec![0u8; plain.len()];
                xts.encrypt_sectors_to(11, 8, size, &plain, &mut expected);
                let mut got = vec![0u8; plain.len()];
                xts.encrypt_sectors_shared(
                    11,
                    8,
                    size,
                    SharedRef::from_ref(&plain),
                    SharedMut::from_mut(&mut got),
                );
                assert_eq!(got, expected, "{name}, {bytes}-byte key, {size}: encrypt");
                let mut back = vec![0u8; plain.len()];
                xts.decrypt_sectors_shared(
                    11,
                    8,
                    size,
                    SharedRef::from_ref(&expected),
                    SharedMut::from_mut(&mut back),
                );
                assert_eq!(back, plain, "{name}, {bytes}-byte key, {size}: decrypt");
            }
        }
    }
}

#[test]
fn round_trip_every_sector_size_and_copy_variants_agree() {
    for size in SECTOR_SIZES {
        for bytes in [32, 64] {
            let rule = IvRule {
                sector_size: size,
                large_sectors: false,
                skip: 0,
            };
            let c = SectorCipher::new(Some(&key(bytes, 5)), rule);
            let plain = pattern(size * 3);
            let mut inplace = plain.clone();
            c.encrypt(9, &mut inplace);
            assert_ne!(inplace, plain);
            let mut copied = vec![0u8; plain.len()];
            c.encrypt_to(9, &plain, &mut copied);
            assert_eq!(copied, inplace);
            let mut back = vec![0u8; plain.len()];
            c.decrypt_to(9, &copied, &mut back);
            assert_eq!(back, plain);
            c.decrypt(9, &mut inplace);
            assert_eq!(inplace, plain);
            let mut shared = vec![0u8; plain.len()];
            c.encrypt_from_shared(9, SharedRef::from_ref(&plain), &mut shared);
            assert_eq!(shared, copied);
            c.decrypt_to_shared(9, &copied, SharedMut::from_mut(&mut back));
            assert_eq!(back, plain);
        }
    }
}

#[test]
fn sectors_encrypt_independently_of_request_boundaries() {
    let rule = IvRule {
        sector_size: 512,
        large_sectors: false,
        skip: 0,
    };
    let c = SectorCipher::new(Some(&key(64, 1)), rule);
    let plain = pattern(512 * 4);
    let mut whole = plain.clone();
    c.encrypt(100, &mut whole);
    let mut parts = plain.clone();
    let (a, b) = parts.split_at_mut(1024);
    c.encrypt(100, a);
    c.encrypt(102, b);
    assert_eq!(whole, parts);
}

#[test]
fn plaintext_cipher_is_identity() {
    let rule = IvRule {
        sector_size: 512,
        large_sectors: false,
        skip: 0,
    };
    let c = SectorCipher::new(None, rule);
    let plain = pattern(1024);
    let mut d = plain.clone();
    c.encrypt(0, &mut d);
    assert_eq!(d, plain);
}

#[test]
fn key_debug_is_redacted_and_lengths_checked() {
    let k = key(64, 0);
    assert_eq!(format!("{k:?}"), "XtsKey(512 bits, redacted)");
    assert!(XtsKey::from_bytes(&[0u8; 48]).is_err());
}
