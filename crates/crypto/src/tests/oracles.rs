//! cryptblk against two independent XTS implementations on random data:
//! OpenSSL's EVP aes-{128,256}-xts (IV = little-endian sector number padded
//! to 16 bytes, set afresh per sector) and the `xts-mode` crate.

use super::*;
use aes::cipher::KeyInit;
use proptest::prelude::*;

/// One data unit through OpenSSL.
pub(super) fn openssl_sector(encrypt: bool, key: &[u8], iv: u64, data: &[u8]) -> Vec<u8> {
    use openssl::symm::{decrypt, encrypt as enc, Cipher};
    let cipher = if key.len() == 32 {
        Cipher::aes_128_xts()
    } else {
        Cipher::aes_256_xts()
    };
    let iv = (iv as u128).to_le_bytes();
    let out = if encrypt {
        enc(cipher, key, Some(&iv), data)
    } else {
        decrypt(cipher, key, Some(&iv), data)
    };
    out.expect("OpenSSL XTS")
}

/// One data unit through xts-mode, in place.
fn xts_mode_sector(encrypt: bool, key: &[u8], iv: u64, data: &mut [u8]) {
    use xts_mode::{get_tweak_default, Xts128};
    let (k1, k2) = key.split_at(key.len() / 2);
    let tweak = get_tweak_default(iv as u128);
    if key.len() == 32 {
        let x = Xts128::new(
            aes::Aes128::new_from_slice(k1).unwrap(),
            aes::Aes128::new_from_slice(k2).unwrap(),
        );
        if encrypt {
            x.encrypt_sector(data, tweak)
        } else {
            x.decrypt_sector(data, tweak)
        }
    } else {
        let x = Xts128::new(
            aes::Aes256::new_from_slice(k1).unwrap(),
            aes::Aes256::new_from_slice(k2).unwrap(),
        );
        if encrypt {
            x.encrypt_sector(data, tweak)
        } else {
            x.decrypt_sector(data, tweak)
        }
    }
}

/// dm-crypt's plain64 IV, written out independently of `IvRule::iv`.
fn plain64(rule: &IvRule, sector: u64) -> u64 {
    let per = (rule.sector_size / 512) as u64;
    if rule.large_sectors {
        sector.wrapping_add(rule.skip / per)
    } else {
        sector.wrapping_mul(per).wrapping_add(rule.skip)
    }
}

/// A whole run of sectors through an oracle, sector by sector.
fn reference(
    encrypt: bool,
    key: &[u8],
    rule: &IvRule,
    first: u64,
    data: &[u8],
    openssl: bool,
) -> Vec<u8> {
    let mut out = data.to_vec();
    for (i, sector) in out.chunks_mut(rule.sector_size).enumerate() {
        let iv = plain64(rule, first.wrapping_add(i as u64));
        if openssl {
            let c = openssl_sector(encrypt, key, iv, sector);
            sector.copy_from_slice(&c);
        } else {
            xts_mode_sector(encrypt, key, iv, sector);
        }
    }
    out
}

/// Every SectorCipher entry point (in place and copy, both directions) on
/// one run of sectors, against both oracles.
fn check_run(key: &[u8], rule: IvRule, first: u64, plain: &[u8]) {
    let what = format!("{} bits, {rule:?}, first {first}", key.len() * 8);
    let expected = reference(true, key, &rule, first, plain, true);
    assert_eq!(
        reference(true, key, &rule, first, plain, false),
        expected,
        "{what}: the oracles disagree"
    );
    let c = SectorCipher::new(Some(&XtsKey::from_bytes(key).unwrap()), rule);

    let mut inplace = plain.to_vec();
    c.encrypt(first, &mut inplace);
    assert_eq!(inplace, expected, "{what}: encrypt");
    let mut copied = vec![0u8; plain.len()];
    c.encrypt_to(first, plain, &mut copied);
    assert_eq!(copied, expected, "{what}: encrypt_to");

    c.decrypt(first, &mut inplace);
    assert_eq!(inplace, plain, "{what}: decrypt");
    c.decrypt_to(first, &expected, &mut copied);
    assert_eq!(copied, plain, "{what}: decrypt_to");
    assert_eq!(
        reference(false, key, &rule, first, &expected, true),
        plain,
        "{what}: OpenSSL decrypt"
    );
}

/// Every kernel against OpenSSL: sector by sector, and as one run
/// (`encrypt_sectors` and friends, the path SectorCipher takes).
fn check_kernels(key: &[u8], rule: IvRule, first: u64, plain: &[u8]) {
    let expected = reference(true, key, &rule, first, plain, true);
    let (iv, step) = (plain64(&rule, first), plain64(&rule, first.wrapping_add(1)));
    let step = step.wrapping_sub(iv);
    let size = rule.sector_size;
    for (kernel, xts) in kernels(&XtsKey::from_bytes(key).unwrap()) {
        let what = format!("{kernel} kernel, {rule:?}, first {first}");
        let mut data = plain.to_vec();
        for (i, sector) in data.chunks_mut(size).enumerate() {
            xts.encrypt_sector(plain64(&rule, first.wrapping_add(i as u64)), sector);
        }
        assert_eq!(data, expected, "{what}: sector by sector");

        let mut data = plain.to_vec();
        xts.encrypt_sectors(iv, step, size, &mut data);
        assert_eq!(data, expected, "{what}: encrypt_sectors");
        xts.decrypt_sectors(iv, step, size, &mut data);
        assert_eq!(data, plain, "{what}: decrypt_sectors");
        let mut out = vec![0u8; plain.len()];
        xts.encrypt_sectors_to(iv, step, size, plain, &mut out);
        assert_eq!(out, expected, "{what}: encrypt_sectors_to");
        xts.decrypt_sectors_to(iv, step, size, &expected, &mut out);
        assert_eq!(out, plain, "{what}: decrypt_sectors_to");
    }
}

fn random_key(bytes: usize, seed: u64) -> Vec<u8> {
    let k = noise(seed, bytes);
    assert_ne!(k[..bytes / 2], k[bytes / 2..]);
    k
}

/// The full grid once, deterministically: every sector size, both key sizes,
/// every IV rule shape.
#[test]
fn every_sector_size_key_size_and_iv_rule_matches_openssl_and_xts_mode() {
    let mut seed = 1;
    for sector_size in SECTOR_SIZES {
        let per = (sector_size / 512) as u64;
        for bytes in [32, 64] {
            for large_sectors in [false, true] {
                for skip in [0, 3 * per, 1000 * per] {
                    seed += 1;
                    let key = random_key(bytes, seed);
                    let rule = IvRule {
                        sector_size,
                        large_sectors,
                        skip,
                    };
                    let plain = noise(seed * 7, sector_size * (1 + seed as usize % 9));
                    check_run(&key, rule, 5 + seed, &plain);
                    check_kernels(&key, rule, 5 + seed, &plain);
                }
            }
        }
    }
}

fn any_rule() -> impl Strategy<Value = IvRule> {
    (0..SECTOR_SIZES.len(), any::<bool>(), 0u64..1 << 20).prop_map(|(i, large_sectors, n)| {
        let sector_size = SECTOR_SIZES[i];
        // dm-crypt refuses a skip that is not a whole number of sectors.
        let skip = n * (sector_size / 512) as u64;
        IvRule {
            sector_size,
            large_sectors,
            skip,
        }
    })
}

fn any_first() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..1 << 32, any::<u64>(), Just(u64::MAX)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_runs_match_openssl_and_xts_mode(
        big in any::<bool>(),
        key_seed in any::<u64>(),
        rule in any_rule(),
        first in any_first(),
        sectors in 1usize..=9,
        data_seed in any::<u64>(),
    ) {
        let key = noise(key_seed, if big { 64 } else { 32 });
        prop_assume!(key[..key.len() / 2] != key[key.len() / 2..]);
        let plain = noise(data_seed, rule.sector_size * sectors);
        check_run(&key, rule, first, &plain);
        check_kernels(&key, rule, first, &plain);
    }
}
