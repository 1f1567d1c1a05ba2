//! LUKS1 (on-disk format spec 1.2.3): a 592-byte big-endian header with eight
//! fixed keyslots, PBKDF2 only, and a PBKDF2 digest of the master key.

use crate::device::Device;

use zeroize::Zeroizing;

use super::hash::{ct_eq, HashAlg};
use super::header::{put_text, text};
use super::kdf::Kdf;
use super::{area, random, LuksError, MAGIC};

pub const PHDR_SIZE: usize = 592;
pub const SLOTS: usize = 8;
pub const STRIPES: u32 = 4000;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
const SLOTS_AT: usize = 208;
const SLOT_LEN: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// In 512-byte sectors from the start of the header.
    pub offset: u32,
    pub stripes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash: HashAlg,
    /// In 512-byte sectors.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_digest_salt: [u8; SALT_LEN],
    pub mk_digest_iterations: u32,
    pub uuid: String,
    pub slots: [Slot; SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Header {
    pub fn parse(b: &[u8; PHDR_SIZE]) -> Result<Self, LuksError> {
        if &b[..6] != MAGIC || u16::from_be_bytes([b[6], b[7]]) != 1 {
            return Err(LuksError::Corrupt("not a LUKS1 header".into()));
        }
        let hash_name = text(&b[72..104]);
        let hash = HashAlg::from_name(&hash_name)?;
        let mut slots = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS {
            let s = &b[SLOTS_AT + i * SLOT_LEN..SLOTS_AT + (i + 1) * SLOT_LEN];
            let active = match be32(s, 0) {
                SLOT_ACTIVE => true,
                SLOT_DISABLED => false,
                other => {
                    return Err(LuksError::Corrupt(format!(
                        "LUKS1 key slot {i} has an invalid state word {other:#010x}"
                    )))
                }
            };
            slots.push(Slot {
                active,
                iterations: be32(s, 4),
                salt: s[8..40].try_into().expect("32 bytes"),
                offset: be32(s, 40),
                stripes: be32(s, 44),
            });
        }
        let h = Header {
            cipher_name: text(&b[8..40]),
            cipher_mode: text(&b[40..72]),
            hash,
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: b[112..132].try_into().expect("20 bytes"),
            mk_digest_salt: b[132..164].try_into().expect("32 bytes"),
            mk_digest_iterations: be32(b, 164),
            uuid: text(&b[168..208]),
            slots: slots.try_into().expect("8 slots"),
        };
        h.check()?;
        Ok(h)
    }

    /// Refuses what we cannot open correctly, naming it.
    fn check(&self) -> Result<(), LuksError> {
        let cipher = self.cipher();
        if cipher != area::AREA_CIPHER {
            return Err(LuksError::Unsupported(format!(
                "cipher {cipher:?}; only aes-xts-plain64 is supported"
            )));
        }
        if self.key_bytes != 32 && self.key_bytes != 64 {
            return Err(LuksError::Unsupported(format!(
                "a {}-bit key for aes-xts-plain64 (256 or 512 expected)",
                u64::from(self.key_bytes) * 8
            )));
        }
        // Every slot, used or not: we write new key material where a free
        // slot points, so its area must lie between the header and the data.
        let payload = self.payload_offset as u64 * 512;
        for (i, s) in self.slots.iter().enumerate() {
            let end = s.offset as u64 * 512
                + area::material_len(self.key_bytes as usize, s.stripes as usize) as u64;
            if s.stripes == 0
                || s.stripes > 100_000
                || s.offset == 0
                || (payload != 0 && end > payload)
            {
                return Err(LuksError::Corrupt(format!(
                    "LUKS1 key slot {i} has an invalid layout (offset {}, stripes {})",
                    s.offset, s.stripes
                )));
            }
        }
        Ok(())
    }

    pub fn cipher(&self) -> String {
        format!("{}-{}", self.cipher_name, self.cipher_mode)
    }

    pub fn serialize(&self) -> [u8; PHDR_SIZE] {
        let mut b = [0u8; PHDR_SIZE];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b[8..40], &self.cipher_name);
        put_text(&mut b[40..72], &self.cipher_mode);
        put_text(&mut b[72..104], self.hash.name());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iterations.to_be_bytes());
        put_text(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = SLOTS_AT + i * SLOT_LEN;
            let state = if s.active { SLOT_ACTIVE } else { SLOT_DISABLED };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    pub fn read(file: &dyn Device) -> Result<Self, LuksError> {
        let mut b = [0u8; PHDR_SIZE];
        file.read_exact_at(&mut b, 0)
            .map_err(LuksError::io("reading the LUKS1 header (592 bytes)"))?;
        Header::parse(&b)
    }

    /// Writes the header in one 592-byte write (inside the first 4 KiB block,
    /// so a crash leaves either the old or the new one) and fsyncs.
    pub fn write(&self, file: &dyn Device) -> Result<(), LuksError> {
        file.write_all_at(&self.serialize(), 0)
            .and_then(|_| file.sync_data())
            .map_err(LuksError::io("writing the LUKS1 header"))
    }

    fn digest_kdf(&self) -> Kdf {
        Kdf::Pbkdf2 {
            hash: self.hash,
            iterations: self.mk_digest_iterations,
        }
    }

    fn slot_kdf(&self, slot: usize) -> Kdf {
        Kdf::Pbkdf2 {
            hash: self.hash,
            iterations: self.slots[slot].iterations,
        }
    }

    fn digest_of(&self, key: &[u8]) -> Result<[u8; DIGEST_LEN], LuksError> {
        let mut d = [0u8; DIGEST_LEN];
        self.digest_kdf()
            .derive(key, &self.mk_digest_salt, &mut d)?;
        Ok(d)
    }

    /// Refuses slot `slot` if it or the master key digest costs more than
    /// the caps (kdf.rs), before either KDF runs.
    pub fn check_costs(&self, slot: usize) -> Result<(), LuksError> {
        self.digest_kdf()
            .check_costs("the LUKS1 master key digest")?;
        self.slot_kdf(slot).check_costs(&format!("key slot {slot}"))
    }

    /// Bytes from the start of the header's file that the header and every
    /// key slot area take: data in the same file must start after them.
    pub fn metadata_end(&self) -> u64 {
        let key_len = self.key_bytes as usize;
        self.slots
            .iter()
            .map(|s| s.offset as u64 * 512 + area::material_len(key_len, s.stripes as usize) as u64)
            .fold(PHDR_SIZE as u64, u64::max)
    }

    /// Tries one slot: the volume key if the passphrase opens it.
    pub fn open_slot(
        &self,
        file: &dyn Device,
        slot: usize,
        passphrase: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, LuksError> {
        self.check_costs(slot)?;
        let s = &self.slots[slot];
        let key_len = self.key_bytes as usize;
        let mut derived = Zeroizing::new(vec![0u8; key_len]);
        self.slot_kdf(slot)
            .derive(passphrase, &s.salt, &mut derived)?;
        let offset = s.offset as u64 * 512;
        let key = area::open(
            file,
            offset,
            &derived,
            key_len,
            s.stripes as usize,
            self.hash,
        )?;
        Ok(ct_eq(&self.digest_of(&key)?, &self.mk_digest).then_some(key))
    }

    /// Where slot `i`'s area lies in cryptsetup's layout: areas aligned to
    /// 4 KiB, the first at 4 KiB.
    pub fn default_slot_offset(key_bytes: usize, i: usize) -> u32 {
        let per = area::material_len(key_bytes, STRIPES as usize).div_ceil(4096) * 8;
        (8 + i * per) as u32
    }

    /// A fresh header for `key` with every slot disabled.
    pub fn new(
        key: &[u8],
        hash: HashAlg,
        digest_iterations: u32,
        uuid: String,
    ) -> Result<Self, LuksError> {
        let mut salt = [0u8; SALT_LEN];
        random::fill(&mut salt)?;
        let slots: Vec<Slot> = (0..SLOTS)
            .map(|i| Slot {
                active: false,
                iterations: 0,
                salt: [0; SALT_LEN],
                offset: Header::default_slot_offset(key.len(), i),
                stripes: STRIPES,
            })
            .collect();
        // The payload starts on a 1 MiB boundary after the last area.
        let end = Header::default_slot_offset(key.len(), SLOTS) as u64 * 512;
        let payload = end.div_ceil(1 << 20) * (1 << 20) / 512;
        let mut h = Header {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash,
            payload_offset: payload as u32,
            key_bytes: key.len() as u32,
            mk_digest: [0; DIGEST_LEN],
            mk_digest_salt: salt,
            mk_digest_iterations: digest_iterations,
            uuid,
            slots: slots.try_into().expect("8 slots"),
        };
        h.mk_digest = h.digest_of(key)?;
        Ok(h)
    }

    /// Fills slot `i` (which must be free): key material first, fsynced, then
    /// the header that makes it active, so a crash leaves the slot unused.
    pub fn add_slot(
        &mut self,
        file: &dyn Device,
        i: usize,
        passphrase: &[u8],
        key: &[u8],
        iterations: u32,
    ) -> Result<(), LuksError> {
        let mut salt = [0u8; SALT_LEN];
        random::fill(&mut salt)?;
        let mut derived = Zeroizing::new(vec![0u8; key.len()]);
        Kdf::Pbkdf2 {
            hash: self.hash,
            iterations,
        }
        .derive(passphrase, &salt, &mut derived)?;
        let s = &mut self.slots[i];
        area::store(
            file,
            s.offset as u64 * 512,
            &derived,
            key,
            s.stripes as usize,
            self.hash,
        )?;
        s.active = true;
        s.iterations = iterations;
        s.salt = salt;
        self.write(file)
    }

    /// Disables slot `i` (header first, so a crash never leaves a half-wiped
    /// active slot), then destroys its key material.
    pub fn remove_slot(&mut self, file: &dyn Device, i: usize) -> Result<(), LuksError> {
        let s = &mut self.slots[i];
        s.active = false;
        s.iterations = 0;
        s.salt = [0; SALT_LEN];
        let (offset, stripes) = (s.offset as u64 * 512, s.stripes as usize);
        self.write(file)?;
        area::wipe(
            file,
            offset,
            area::material_len(self.key_bytes as usize, stripes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_bad_slot_layouts_are_refused() {
        let h = Header::new(&[1u8; 64], HashAlg::Sha256, 1000, "u".into()).unwrap();
        assert_eq!(h.payload_offset, 4096);
        assert_eq!(
            h.slots[1].offset, 512,
            "cryptsetup's layout for a 512-bit key"
        );
        let bytes = h.serialize();
        assert_eq!(Header::parse(&bytes).unwrap(), h);
        let mut bad = h.clone();
        bad.slots[7].offset = 4000; // runs into the payload at 4096
        let err = Header::parse(&bad.serialize()).unwrap_err().to_string();
        assert!(err.contains("key slot 7 has an invalid layout"), "{err}");
        let mut bytes = h.serialize();
        bytes[40..51].copy_from_slice(b"cbc-essiv:s");
        let err = Header::parse(&bytes).unwrap_err().to_string();
        assert!(err.contains("only aes-xts-plain64"), "{err}");
    }

    /// Found by fuzz/luks_header: a key size of 2^29 bytes or more made the
    /// error message itself overflow (a panic in debug builds).
    #[test]
    fn huge_key_size_is_refused_without_overflow() {
        let key = [7u8; 64];
        let h = Header::new(
            &key,
            HashAlg::from_name("sha256").unwrap(),
            1000,
            "u".into(),
        )
        .unwrap();
        let mut b = h.serialize();
        assert!(Header::parse(&b).is_ok());
        for bad in [0u32, 48, 0x2000_0000, u32::MAX] {
            b[108..112].copy_from_slice(&bad.to_be_bytes());
            assert!(
                matches!(Header::parse(&b), Err(LuksError::Unsupported(_))),
                "{bad}"
            );
        }
    }
}
