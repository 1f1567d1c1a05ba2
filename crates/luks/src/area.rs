//! Keyslot areas: AF-split key material encrypted with a passphrase-derived
//! key, aes-xts-plain64 over 512-byte sectors whose IVs start at 0 at the
//! start of the area (cryptsetup LUKS_encrypt_to_storage / luks2_encrypt_to_storage).

use crate::device::Device;

use zeroize::Zeroizing;

use super::af;
use super::hash::HashAlg;
use super::LuksError;
use cryptblk_crypto::{IvRule, SectorCipher, XtsKey};

pub const AREA_CIPHER: &str = "aes-xts-plain64";

/// Bytes of AF material for a key, rounded up to whole 512-byte sectors.
pub fn material_len(key_len: usize, stripes: usize) -> usize {
    (key_len * stripes).div_ceil(512) * 512
}

fn cipher(derived: &[u8]) -> Result<SectorCipher, LuksError> {
    let key = XtsKey::from_bytes(derived)?;
    Ok(SectorCipher::new(
        Some(&key),
        IvRule {
            sector_size: 512,
            large_sectors: false,
            skip: 0,
        },
    ))
}

/// Reads and decrypts a keyslot area, then merges it into the candidate key.
pub fn open(
    file: &dyn Device,
    offset: u64,
    derived: &[u8],
    key_len: usize,
    stripes: usize,
    hash: HashAlg,
) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let mut buf = Zeroizing::new(vec![0u8; material_len(key_len, stripes)]);
    file.read_exact_at(&mut buf, offset)
        .map_err(LuksError::io(format!(
            "reading the keyslot area at byte {offset} ({} bytes)",
            buf.len()
        )))?;
    cipher(derived)?.decrypt(0, &mut buf);
    Ok(af::merge(&buf, key_len, stripes, hash))
}

/// Splits, encrypts and writes `key` into the area at `offset` (then fsyncs).
pub fn store(
    file: &dyn Device,
    offset: u64,
    derived: &[u8],
    key: &[u8],
    stripes: usize,
    hash: HashAlg,
) -> Result<(), LuksError> {
    let split = af::split(key, stripes, hash)?;
    let mut buf = Zeroizing::new(vec![0u8; material_len(key.len(), stripes)]);
    buf[..split.len()].copy_from_slice(&split);
    cipher(derived)?.encrypt(0, &mut buf);
    file.write_all_at(&buf, offset)
        .and_then(|_| file.sync_data())
        .map_err(LuksError::io("writing the keyslot area"))
}

/// Overwrites an area with random bytes (then fsyncs): the key it held is gone.
pub fn wipe(file: &dyn Device, offset: u64, len: usize) -> Result<(), LuksError> {
    let mut buf = vec![0u8; len];
    super::random::fill(&mut buf)?;
    file.write_all_at(&buf, offset)
        .and_then(|_| file.sync_data())
        .map_err(LuksError::io("wiping the keyslot area"))
}
