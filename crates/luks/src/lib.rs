//! LUKS1 and LUKS2 headers, compatible with cryptsetup 2.6 and qemu-img:
//! unlock (passphrase → volume key), format, key slot management, dump.
//!
//! Only aes-xts-plain64 with one data segment is supported; anything else
//! (other ciphers, integrity, re-encryption in progress) is refused by name.
//! Secrets (passphrases, derived keys, volume keys) live in zeroizing buffers
//! and never reach a log line, an error message or `Debug` output.

mod af;
mod area;
pub mod cli;
pub mod device;
mod dump;
mod error;
mod format;
mod hash;
mod header;
mod kdf;
mod keyops;
mod luks1;
mod luks2;
mod passphrase;
mod random;

use std::path::Path;

use device::Device;

pub use error::LuksError;
pub use passphrase::read_passphrase;

use cryptblk_crypto::XtsKey;
use header::Header;

/// The first six bytes of every LUKS header.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// Whether `path` starts with the LUKS magic (either version).
pub fn is_luks(path: &Path) -> std::io::Result<bool> {
    let mut magic = [0u8; 6];
    let f = device::open(path, false)?;
    match f.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(&magic == MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// An opened LUKS volume: everything the data path needs.
#[derive(Debug)]
pub struct Unlocked {
    /// 1 or 2.
    pub version: u8,
    /// e.g. "aes-xts-plain64".
    pub cipher: String,
    /// The volume key.
    pub key: XtsKey,
    /// Encryption sector size (LUKS1: 512).
    pub sector_size: usize,
    /// Bytes from the start of the data device.
    pub payload_offset: u64,
    /// False for everything cryptsetup makes (IVs count 512-byte units).
    pub iv_large_sectors: bool,
    /// Payload bytes when the header fixes them (a LUKS2 segment with a
    /// size); None = up to the end of the data device.
    pub payload_size: Option<u64>,
}

fn open_header(path: &Path, write: bool) -> Result<(Box<dyn Device>, Header), LuksError> {
    let name = path.display().to_string();
    let file = device::open(path, write).map_err(LuksError::io(format!("cannot open {name}")))?;
    let header = Header::read(&*file, &name)?;
    Ok((file, header))
}

/// Parses the LUKS1 or LUKS2 header at `path` without unlocking anything
/// and returns its version: for the fuzz targets in fuzz/. Every active key
/// slot's costs are checked against the caps (kdf.rs) as an unlock would
/// before deriving anything, so the fuzzer reaches those checks; it never
/// runs a KDF itself, which even within the caps can take minutes.
pub fn check_header(path: &Path) -> Result<u8, LuksError> {
    let (_, h) = open_header(path, false)?;
    let _ = (h.cipher(), h.sector_size(), h.uuid(), h.check_embedded());
    for slot in h.active_slots() {
        h.check_costs(slot)?;
    }
    Ok(h.version())
}

/// Opens the LUKS image at `image`, whose header is at its start, with
/// `passphrase` (only `key_slot` if given).
pub fn unlock(
    image: &Path,
    passphrase: &[u8],
    key_slot: Option<usize>,
) -> Result<Unlocked, LuksError> {
    unlock_image(image, None, passphrase, key_slot)
}

/// Opens `image` with the header in `header` if given (a detached header,
/// as `cryptsetup --header`), else at the start of `image`. A header in the
/// image (`header` naming the image itself counts) must end before the data.
pub fn unlock_image(
    image: &Path,
    header: Option<&Path>,
    passphrase: &[u8],
    key_slot: Option<usize>,
) -> Result<Unlocked, LuksError> {
    let detached = header.filter(|h| !same_file(h, image));
    let path = detached.unwrap_or(image);
    let (file, h) = open_header(path, false)?;
    if detached.is_none() {
        // Before any KDF runs: an image that cannot be served is refused
        // at once.
        h.check_embedded()?;
    }
    let (slot, key) = h.unlock(&*file, passphrase, key_slot)?;
    log::info!(
        "{}: LUKS{} key slot {slot} unlocked",
        path.display(),
        h.version()
    );
    Ok(Unlocked {
        version: h.version(),
        cipher: h.cipher(),
        key: XtsKey::from_bytes(&key)?,
        sector_size: h.sector_size(),
        payload_offset: h.payload_offset(),
        iv_large_sectors: false,
        payload_size: h.payload_size(),
    })
}

/// Whether `a` and `b` are one file (same device and inode); false if
/// either cannot be read, so a missing image counts as another file.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}
