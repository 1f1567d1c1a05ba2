//! The hashes LUKS names in its headers: for PBKDF2, the AF splitter and the
//! master-key digest.

use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

use super::LuksError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlg {
    pub fn from_name(name: &str) -> Result<Self, LuksError> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Ok(HashAlg::Sha1),
            "sha256" => Ok(HashAlg::Sha256),
            "sha512" => Ok(HashAlg::Sha512),
            other => Err(LuksError::Unsupported(format!(
                "hash {other:?} (supported: sha1, sha256, sha512)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn size(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
            HashAlg::Sha512 => 64,
        }
    }

    /// PBKDF2-HMAC with this hash, filling all of `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }

    /// Hash of the concatenation of `parts`, written to the start of `out`
    /// (`out.len()` may be shorter than the digest: the AF splitter's last block).
    pub fn hash_into(self, parts: &[&[u8]], out: &mut [u8]) {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            let d = h.finalize();
            let n = out.len();
            out.copy_from_slice(&d[..n]);
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts, out),
            HashAlg::Sha256 => run::<Sha256>(parts, out),
            HashAlg::Sha512 => run::<Sha512>(parts, out),
        }
    }
}

/// Compares two secrets-derived values without an early exit. Empty input
/// is never equal: a digest check over nothing would accept any key.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    !a.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::ct_eq;

    #[test]
    fn ct_eq_never_accepts_empty_input() {
        assert!(!ct_eq(&[], &[]));
        assert!(!ct_eq(&[1], &[]));
        assert!(!ct_eq(&[1, 2], &[1, 3]));
        assert!(ct_eq(&[1, 2], &[1, 2]));
    }
}
