//! Sector encryption with the meaning of dm-crypt's `aes-xts-plain64`.
//!
//! Pure functions over byte slices: no I/O, no virtio. The volume layer hands a
//! whole contiguous run of sectors to one call, so per-call overhead (tweak
//! setup, dispatch) is paid once per request, not once per sector or block.

mod key;
pub mod secrets;
mod shared;
mod xts;

pub use key::{KeyError, XtsKey};
pub use shared::{SharedMut, SharedRef};
pub use xts::Xts;

/// Sizes dm-crypt accepts for `--sector-size`.
pub const SECTOR_SIZES: [usize; 4] = [512, 1024, 2048, 4096];

/// How a payload sector number becomes an IV, as in dm-crypt's plain64 with
/// `iv_large_sectors` and `skip` (`iv_offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IvRule {
    /// Encryption unit in bytes (512..=4096, a power of two).
    pub sector_size: usize,
    /// The IV counts `sector_size` units instead of 512-byte units.
    pub large_sectors: bool,
    /// Added to every IV, in 512-byte units (cryptsetup's `--skip`).
    pub skip: u64,
}

impl IvRule {
    /// The IV of payload sector `sector` (in `sector_size` units).
    pub fn iv(&self, sector: u64) -> u64 {
        let units = if self.large_sectors {
            sector
        } else {
            sector.wrapping_mul((self.sector_size / 512) as u64)
        };
        // dm-crypt adds iv_offset in 512-byte units even with iv_large_sectors
        // (it divides by sector_size/512 first and refuses a remainder); both
        // end up as a plain addition in the unit the IV counts.
        let skip = if self.large_sectors {
            self.skip / (self.sector_size / 512) as u64
        } else {
            self.skip
        };
        units.wrapping_add(skip)
    }

    /// `iv(s + 1) - iv(s)`: IVs of consecutive sectors are evenly spaced
    /// (wrapping), so a run of sectors needs only its first IV.
    fn iv_step(&self) -> u64 {
        if self.large_sectors {
            1
        } else {
            (self.sector_size / 512) as u64
        }
    }
}

/// A sector cipher: either AES-XTS or the identity (`--cipher none`).
pub struct SectorCipher {
    xts: Option<Xts>,
    rule: IvRule,
}

impl SectorCipher {
    pub fn new(key: Option<&XtsKey>, rule: IvRule) -> Self {
        assert!(SECTOR_SIZES.contains(&rule.sector_size));
        SectorCipher {
            xts: key.map(Xts::new),
            rule,
        }
    }

    pub fn sector_size(&self) -> usize {
        self.rule.sector_size
    }

    pub fn is_plaintext(&self) -> bool {
        self.xts.is_none()
    }

    /// Encrypts whole sectors in place; `first` is the payload sector number
    /// of `data[0]`. `data.len()` must be a multiple of the sector size.
    pub fn encrypt(&self, first: u64, data: &mut [u8]) {
        if let Some((xts, iv, step)) = self.run(first, data.len()) {
            xts.encrypt_sectors(iv, step, self.rule.sector_size, data)
        }
    }

    /// Decrypts whole sectors in place (see [`SectorCipher::encrypt`]).
    pub fn decrypt(&self, first: u64, data: &mut [u8]) {
        if let Some((xts, iv, step)) = self.run(first, data.len()) {
            xts.decrypt_sectors(iv, step, self.rule.sector_size, data)
        }
    }

    /// Encrypts `src` into `dst` (same length) without touching `src`: the
    /// copy and the cipher are one pass over the data. Every kernel stores
    /// only finished ciphertext into `dst`, never plaintext or an
    /// intermediate, so `dst` may be a shared mapping of the image.
    pub fn encrypt_to(&self, first: u64, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len());
        match self.run(first, src.len()) {
            Some((xts, iv, step)) => {
                xts.encrypt_sectors_to(iv, step, self.rule.sector_size, src, dst)
            }
            None => dst.copy_from_slice(src),
        }
    }

    /// Decrypts `src` into `dst` (same length) in one pass.
    pub fn decrypt_to(&self, first: u64, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len());
        match self.run(first, src.len()) {
            Some((xts, iv, step)) => {
                xts.decrypt_sectors_to(iv, step, self.rule.sector_size, src, dst)
            }
            None => dst.copy_from_slice(src),
        }
    }

    /// Decrypts `src` into memory someone else may change meanwhile (a
    /// guest's read buffer), in one pass; only finished plaintext is stored
    /// into `dst`.
    pub fn decrypt_to_shared(&self, first: u64, src: &[u8], dst: SharedMut<'_>) {
        assert_eq!(src.len(), dst.len());
        match self.run(first, src.len()) {
            Some((xts, iv, step)) => xts.decrypt_sectors_shared(
                iv,
                step,
                self.rule.sector_size,
                SharedRef::from_ref(src),
                dst,
            ),
            None => dst.write(src),
        }
    }

    /// Encrypts memory someone else may change meanwhile (a guest's write
    /// buffer) into `dst`, in one pass. A guest that changes its buffer
    /// during the call gets some mix of old and new sectors written, as a
    /// disk would; each sector's ciphertext is that of what was read.
    pub fn encrypt_from_shared(&self, first: u64, src: SharedRef<'_>, dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len());
        match self.run(first, src.len()) {
            Some((xts, iv, step)) => xts.encrypt_sectors_shared(
                iv,
                step,
                self.rule.sector_size,
                src,
                SharedMut::from_mut(dst),
            ),
            None => src.read(dst),
        }
    }

    /// The cipher, the IV of sector `first` and the IV step between
    /// consecutive sectors; `None` for `--cipher none`. The whole request
    /// goes to the kernel in one call (it overlaps the sectors' tweaks).
    fn run(&self, first: u64, len: usize) -> Option<(&Xts, u64, u64)> {
        assert!(
            len.is_multiple_of(self.rule.sector_size),
            "crypto on a partial sector"
        );
        let xts = self.xts.as_ref()?;
        Some((xts, self.rule.iv(first), self.rule.iv_step()))
    }
}

#[cfg(test)]
mod tests;
