//! The anti-forensic information splitter (LUKS1 spec §2.4; cryptsetup af.c):
//! a key of `n` bytes becomes `stripes` blocks of `n` bytes, all needed to
//! recover it, so wiping any part of a keyslot area destroys the key.

use zeroize::Zeroizing;

use super::hash::HashAlg;
use super::random;
use super::LuksError;

/// H applied block-wise: block i of the digest-sized blocks is
/// hash(be32(i) || block), the last partial block truncated.
fn diffuse(buf: &mut [u8], hash: HashAlg) {
    let ds = hash.size();
    for (i, chunk) in buf.chunks_mut(ds).enumerate() {
        let input = Zeroizing::new(chunk.to_vec());
        hash.hash_into(&[&(i as u32).to_be_bytes(), &input], chunk);
    }
}

fn xor_into(acc: &mut [u8], src: &[u8]) {
    for (a, s) in acc.iter_mut().zip(src) {
        *a ^= s;
    }
}

/// Recovers the key from `material` (`stripes * key_len` bytes or more).
pub fn merge(material: &[u8], key_len: usize, stripes: usize, hash: HashAlg) -> Zeroizing<Vec<u8>> {
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    for i in 0..stripes - 1 {
        xor_into(&mut acc, &material[i * key_len..(i + 1) * key_len]);
        diffuse(&mut acc, hash);
    }
    xor_into(
        &mut acc,
        &material[(stripes - 1) * key_len..stripes * key_len],
    );
    acc
}

/// Splits `key` into `stripes` blocks (random except the last).
pub fn split(key: &[u8], stripes: usize, hash: HashAlg) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    random::fill(&mut out[..n * (stripes - 1)])?;
    let mut acc = Zeroizing::new(vec![0u8; n]);
    for i in 0..stripes - 1 {
        xor_into(&mut acc, &out[i * n..(i + 1) * n]);
        diffuse(&mut acc, hash);
    }
    let last = &mut out[(stripes - 1) * n..];
    last.copy_from_slice(&acc);
    xor_into(last, key);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back_for_every_hash() {
        let key: Vec<u8> = (0..64u8).collect();
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let m = split(&key, 40, hash).unwrap();
            assert_eq!(&merge(&m, 64, 40, hash)[..], &key[..]);
            let mut damaged = m.to_vec();
            damaged[3] ^= 1;
            assert_ne!(&merge(&damaged, 64, 40, hash)[..], &key[..]);
        }
    }
}
