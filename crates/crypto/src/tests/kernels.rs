//! The fused VAES kernel and the portable one, explicitly, on the same
//! inputs: every data unit size the fused kernel takes, both key sizes, both
//! directions, in place and copy, IVs at the edges.

use super::*;
use proptest::prelude::*;

fn fast(key: &XtsKey) -> Xts {
    let all = kernels(key);
    let (_, fast) = all
        .into_iter()
        .find(|(name, _)| *name == "vaes")
        .expect("kernels() asserts the VAES kernel is present");
    fast
}

fn same_on_both(key: &[u8], iv: u64, plain: &[u8]) {
    let key = XtsKey::from_bytes(key).unwrap();
    let (portable, vaes) = (Xts::new_portable(&key), fast(&key));
    assert_eq!(portable.kernel_name(), "portable");
    assert_eq!(vaes.kernel_name(), "vaes-avx512");
    let what = format!("{} bits, iv {iv:#x}, {} bytes", key.bits(), plain.len());

    let (mut a, mut b) = (plain.to_vec(), plain.to_vec());
    portable.encrypt_sector(iv, &mut a);
    vaes.encrypt_sector(iv, &mut b);
    assert_eq!(a, b, "{what}: encrypt in place");
    let mut c = vec![0u8; plain.len()];
    vaes.encrypt_sector_to(iv, plain, &mut c);
    assert_eq!(a, c, "{what}: encrypt to");

    // Decrypt the ciphertext, and also the plaintext taken as ciphertext:
    // the inverse cipher must match on data it did not produce.
    for input in [&a[..], plain] {
        let (mut x, mut y) = (input.to_vec(), input.to_vec());
        portable.decrypt_sector(iv, &mut x);
        vaes.decrypt_sector(iv, &mut y);
        assert_eq!(x, y, "{what}: decrypt in place");
        vaes.decrypt_sector_to(iv, input, &mut c);
        assert_eq!(x, c, "{what}: decrypt to");
    }
}

#[test]
fn kernels_agree_on_edge_ivs_and_every_sector_size() {
    for bytes in [32, 64] {
        for size in SECTOR_SIZES {
            for iv in [0, 1, 0xff, 1 << 32, u64::MAX - 1, u64::MAX] {
                same_on_both(
                    &noise(iv ^ 0x5a5a, bytes),
                    iv,
                    &noise(iv.wrapping_add(3), size),
                );
            }
        }
    }
}

#[test]
fn fused_kernel_falls_back_on_short_units() {
    // 32-byte units (IEEE vectors 1-3) are not whole 512-byte chunks.
    same_on_both(&noise(9, 64), 7, &noise(10, 32));
    same_on_both(&noise(9, 32), 7, &noise(10, 496));
}

/// Runs of sectors in one call: the fused kernel starts four sectors'
/// tweaks at a time, so 1..=9 sectors cover full and partial groups.
fn runs_same_on_both(key: &[u8], iv: u64, step: u64, size: usize, plain: &[u8]) {
    let key = XtsKey::from_bytes(key).unwrap();
    let (portable, vaes) = (Xts::new_portable(&key), fast(&key));
    let what = format!("iv {iv:#x} step {step} size {size} len {}", plain.len());
    let (mut a, mut b) = (plain.to_vec(), plain.to_vec());
    portable.encrypt_sectors(iv, step, size, &mut a);
    vaes.encrypt_sectors(iv, step, size, &mut b);
    assert_eq!(a, b, "{what}: encrypt_sectors");
    let mut c = vec![0u8; plain.len()];
    vaes.decrypt_sectors_to(iv, step, size, &a, &mut c);
    assert_eq!(c, plain, "{what}: decrypt_sectors_to");
    portable.decrypt_sectors(iv, step, size, &mut b);
    assert_eq!(b, plain, "{what}: decrypt_sectors");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn kernels_agree_on_random_units(
        big in any::<bool>(),
        key_seed in any::<u64>(),
        iv in any::<u64>(),
        chunks in 1usize..=8,
        data_seed in any::<u64>(),
    ) {
        same_on_both(&noise(key_seed, if big { 64 } else { 32 }), iv, &noise(data_seed, 512 * chunks));
    }

    #[test]
    fn kernels_agree_on_random_runs(
        big in any::<bool>(),
        key_seed in any::<u64>(),
        iv in prop_oneof![any::<u64>(), Just(u64::MAX - 3)],
        step in prop_oneof![Just(0u64), Just(1u64), Just(8u64), any::<u64>()],
        size_index in 0usize..4,
        sectors in 1usize..=9,
        data_seed in any::<u64>(),
    ) {
        let size = SECTOR_SIZES[size_index];
        let key = noise(key_seed, if big { 64 } else { 32 });
        runs_same_on_both(&key, iv, step, size, &noise(data_seed, size * sectors));
    }
}
