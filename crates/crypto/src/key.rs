//! Volume keys: raw bytes that live only in zeroizing, mlock'ed memory.

use std::fmt;

use crate::secrets::{read_secret, Locked, RawStdin};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the key is {got} bytes but --key-size {bits} needs {} bytes; check --key-size and the key file", bits / 8)]
    WrongLength { got: usize, bits: usize },
    #[error("--key-size must be 256 (AES-128-XTS) or 512 (AES-256-XTS), not {0}")]
    UnsupportedSize(usize),
    #[error("cannot read the key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// The longest key: AES-256-XTS.
const MAX_KEY: usize = 64;

/// An XTS key: two AES keys of equal length (32 bytes = AES-128-XTS, 64 bytes
/// = AES-256-XTS). On mlock'ed pages of its own, wiped on drop; `Debug`
/// never shows the bytes.
pub struct XtsKey {
    bytes: Locked<[u8; MAX_KEY]>,
    len: usize,
}

impl Clone for XtsKey {
    fn clone(&self) -> Self {
        XtsKey::copy_of(self.bytes())
    }
}

impl XtsKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        match bytes.len() {
            32 | 64 => Ok(XtsKey::copy_of(bytes)),
            n => Err(KeyError::WrongLength { got: n, bits: 512 }),
        }
    }

    /// `bytes` is 32 or 64 bytes long (checked by the callers).
    fn copy_of(bytes: &[u8]) -> Self {
        let mut locked = Locked::<[u8; MAX_KEY]>::zeroed_bytes();
        locked[..bytes.len()].copy_from_slice(bytes);
        XtsKey {
            bytes: locked,
            len: bytes.len(),
        }
    }

    /// Reads exactly `bits / 8` bytes from `path` (`-` is standard input), as
    /// `cryptsetup open --type plain --key-file` does with a raw key.
    pub fn from_key_file(path: &str, bits: usize) -> Result<Self, KeyError> {
        if bits != 256 && bits != 512 {
            return Err(KeyError::UnsupportedSize(bits));
        }
        let read_err = |source| KeyError::Read {
            path: path.to_string(),
            source,
        };
        // One byte more than needed tells a too-long key file apart.
        let limit = bits as u64 / 8 + 1;
        let buf = if path == "-" {
            read_secret(RawStdin, limit).map_err(read_err)?
        } else {
            std::fs::File::open(path)
                .and_then(|f| read_secret(f, limit))
                .map_err(read_err)?
        };
        if buf.len() != bits / 8 {
            return Err(KeyError::WrongLength {
                got: buf.len(),
                bits,
            });
        }
        Ok(XtsKey::copy_of(&buf))
    }

    /// A `bits`-bit key written by `fill` straight into the locked page (no
    /// copy anywhere else), as the kernel keyring's KEYCTL_READ does.
    /// `fill` gets room for the longest key and returns the key's true
    /// length; any other length than `bits / 8` is refused (the page is
    /// wiped on the way out).
    pub fn filled_by<E: From<KeyError>>(
        bits: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<Self, E> {
        if bits != 256 && bits != 512 {
            return Err(KeyError::UnsupportedSize(bits).into());
        }
        let mut bytes = Locked::<[u8; MAX_KEY]>::zeroed_bytes();
        let got = fill(&mut bytes[..])?;
        if got != bits / 8 {
            return Err(KeyError::WrongLength { got, bits }.into());
        }
        Ok(XtsKey { bytes, len: got })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub fn bits(&self) -> usize {
        self.len * 8
    }
}

impl fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "XtsKey({} bits, redacted)", self.bits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_key_must_have_exactly_the_asked_length() {
        let key = XtsKey::filled_by(256, |buf: &mut [u8]| {
            buf[..32].fill(7);
            Ok::<_, KeyError>(32)
        })
        .unwrap();
        assert_eq!(key.bytes(), &[7u8; 32]);
        // Longer than the page holds, or shorter: refused by length.
        for got in [31, 64, 100] {
            let r = XtsKey::filled_by(256, |_: &mut [u8]| Ok::<_, KeyError>(got));
            assert!(matches!(r, Err(KeyError::WrongLength { got: g, bits: 256 }) if g == got));
        }
        let r = XtsKey::filled_by(384, |_: &mut [u8]| Ok::<_, KeyError>(48));
        assert!(matches!(r, Err(KeyError::UnsupportedSize(384))));
    }
}
