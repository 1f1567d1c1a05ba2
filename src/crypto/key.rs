//! Volume keys: raw bytes that live only in zeroizing memory.

use std::fmt;
use std::io::Read;
use zeroize::Zeroizing;

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

/// An XTS key: two AES keys of equal length (32 bytes = AES-128-XTS, 64 bytes
/// = AES-256-XTS). Zeroized on drop; `Debug` never shows the bytes.
#[derive(Clone)]
pub struct XtsKey(Zeroizing<Vec<u8>>);

impl XtsKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        match bytes.len() {
            32 | 64 => Ok(XtsKey(Zeroizing::new(bytes.to_vec()))),
            n => Err(KeyError::WrongLength { got: n, bits: 512 }),
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
        let mut buf = Zeroizing::new(Vec::with_capacity(bits / 8 + 1));
        if path == "-" {
            std::io::stdin()
                .take(bits as u64 / 8 + 1)
                .read_to_end(&mut buf)
                .map_err(read_err)?;
        } else {
            std::fs::File::open(path)
                .and_then(|f| f.take(bits as u64 / 8 + 1).read_to_end(&mut buf))
                .map_err(read_err)?;
        }
        if buf.len() != bits / 8 {
            return Err(KeyError::WrongLength {
                got: buf.len(),
                bits,
            });
        }
        Ok(XtsKey(buf))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn bits(&self) -> usize {
        self.0.len() * 8
    }
}

impl fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "XtsKey({} bits, redacted)", self.bits())
    }
}
