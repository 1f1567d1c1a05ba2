//! Either header version behind one set of operations: read, try slots,
//! describe the data segment.

use crate::device::Device;

use zeroize::Zeroizing;

use super::{luks1, luks2, LuksError, MAGIC};

#[derive(Debug, Clone)]
pub enum Header {
    V1(luks1::Header),
    V2(luks2::Luks2),
}

impl Header {
    /// Reads a LUKS1 or LUKS2 header. A LUKS2 image whose primary header is
    /// destroyed (magic included) is still found through its secondary copy.
    pub fn read(file: &dyn Device, name: &str) -> Result<Self, LuksError> {
        let len = file
            .size()
            .map_err(LuksError::io(format!("cannot stat {name}")))?;
        if len < luks1::PHDR_SIZE as u64 {
            return Err(LuksError::Truncated(format!("{name} is only {len} bytes")));
        }
        let mut start = [0u8; 8];
        file.read_exact_at(&mut start, 0)
            .map_err(LuksError::io(format!("cannot read {name}")))?;
        let version = u16::from_be_bytes([start[6], start[7]]);
        match (&start[..6] == MAGIC, version) {
            (true, 1) => Ok(Header::V1(luks1::Header::read(file)?)),
            (true, 2) => Ok(Header::V2(luks2::Luks2::read(file)?)),
            (true, v) => Err(LuksError::Unsupported(format!("LUKS version {v}"))),
            (false, _) => match luks2::Luks2::read(file) {
                Ok(h) => Ok(Header::V2(h)),
                Err(LuksError::Corrupt(_)) => Err(LuksError::NotLuks(name.to_string())),
                Err(e) => Err(e),
            },
        }
    }

    pub fn version(&self) -> u8 {
        match self {
            Header::V1(_) => 1,
            Header::V2(_) => 2,
        }
    }

    pub fn slot_count(&self) -> usize {
        match self {
            Header::V1(_) => luks1::SLOTS,
            Header::V2(_) => luks2::MAX_SLOTS,
        }
    }

    pub fn is_active(&self, slot: usize) -> bool {
        match self {
            Header::V1(h) => h.slots.get(slot).is_some_and(|s| s.active),
            Header::V2(h) => h.meta.keyslots.contains_key(&slot),
        }
    }

    pub fn active_slots(&self) -> Vec<usize> {
        (0..self.slot_count())
            .filter(|&i| self.is_active(i))
            .collect()
    }

    fn try_order(&self) -> Vec<usize> {
        match self {
            Header::V1(_) => self.active_slots(),
            Header::V2(h) => h.try_order(),
        }
    }

    pub fn cipher(&self) -> String {
        match self {
            Header::V1(h) => h.cipher(),
            Header::V2(h) => h.meta.segment.encryption.clone(),
        }
    }

    pub fn sector_size(&self) -> usize {
        match self {
            Header::V1(_) => 512,
            Header::V2(h) => h.meta.segment.sector_size,
        }
    }

    pub fn payload_offset(&self) -> u64 {
        match self {
            Header::V1(h) => h.payload_offset as u64 * 512,
            Header::V2(h) => h.meta.segment.offset,
        }
    }

    pub fn payload_size(&self) -> Option<u64> {
        match self {
            Header::V1(_) => None,
            Header::V2(h) => h.meta.segment.size,
        }
    }

    pub fn uuid(&self) -> &str {
        match self {
            Header::V1(h) => &h.uuid,
            Header::V2(h) => &h.copy.uuid,
        }
    }

    /// Refuses `slot` if its KDF or its digest's costs more than the caps
    /// (kdf.rs), as an unlock would before deriving anything.
    pub fn check_costs(&self, slot: usize) -> Result<(), LuksError> {
        match self {
            Header::V1(h) => h.check_costs(slot),
            Header::V2(h) => h.usable_slot(slot).map(|_| ()),
        }
    }

    /// Bytes from the start of the header's file taken by the header copies
    /// and key slot areas.
    pub fn metadata_end(&self) -> u64 {
        match self {
            Header::V1(h) => h.metadata_end(),
            Header::V2(h) => (2 * h.copy.hdr_size).saturating_add(h.meta.keyslots_size),
        }
    }

    /// For a header at the start of the data file: the data must start past
    /// the header and key slots, or the guest could read the key material
    /// and overwrite the header. A data offset of 0 is what cryptsetup
    /// writes for detached headers, which this check is not for.
    pub fn check_embedded(&self) -> Result<(), LuksError> {
        let (offset, header_end) = (self.payload_offset(), self.metadata_end());
        if offset < header_end {
            return Err(LuksError::PayloadOverlapsHeader { offset, header_end });
        }
        Ok(())
    }

    fn open_slot(
        &self,
        file: &dyn Device,
        slot: usize,
        pass: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, LuksError> {
        match self {
            Header::V1(h) => h.open_slot(file, slot, pass),
            Header::V2(h) => h.open_slot(file, slot, pass),
        }
    }

    /// The volume key and the slot that gave it: only `slot` if given,
    /// otherwise every active slot in cryptsetup's order.
    pub fn unlock(
        &self,
        file: &dyn Device,
        pass: &[u8],
        slot: Option<usize>,
    ) -> Result<(usize, Zeroizing<Vec<u8>>), LuksError> {
        if let Some(s) = slot {
            if s >= self.slot_count() {
                return Err(LuksError::SlotOutOfRange {
                    slot: s,
                    count: self.slot_count(),
                });
            }
            if !self.is_active(s) {
                return Err(LuksError::SlotInactive { slot: s });
            }
            return match self.open_slot(file, s, pass)? {
                Some(k) => Ok((s, k)),
                None => Err(LuksError::WrongPassphraseForSlot { slot: s }),
            };
        }
        // A slot that could be tried and did not match makes "wrong
        // passphrase" the likely story; only if none could be tried is a
        // slot's own error (unsupported, truncated) the answer.
        let (mut first_error, mut mismatch) = (None, false);
        for s in self.try_order() {
            match self.open_slot(file, s, pass) {
                Ok(Some(k)) => return Ok((s, k)),
                Ok(None) => mismatch = true,
                Err(e) => {
                    log::warn!("key slot {s} cannot be tried: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if !mismatch => Err(e),
            _ => Err(LuksError::WrongPassphrase),
        }
    }
}

/// A text field of either version's binary header (cipher, hash, UUID,
/// label): its bytes up to the first NUL.
pub(crate) fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Writes `s` into a zeroed text field, cut to leave room for the NUL.
pub(crate) fn put_text(dst: &mut [u8], s: &str) {
    let n = s.len().min(dst.len() - 1);
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}
