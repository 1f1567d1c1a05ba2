//! LUKS2: binary header pair + JSON metadata, keyslots with PBKDF2 or
//! Argon2, one pbkdf2 digest of the volume key.

pub mod binary;
pub mod meta;

use crate::device::Device;
#[cfg(test)]
use std::fs::File;

use base64::Engine;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::hash::{ct_eq, HashAlg};
use super::kdf::Kdf;
use super::{area, random, LuksError};
use meta::{Meta, B64};

pub const MAX_SLOTS: usize = 32;
pub const STRIPES: usize = 4000;
/// cryptsetup's defaults: 16 KiB per header copy, data at 16 MiB.
pub const DEFAULT_HDR_SIZE: u64 = 0x4000;
pub const DEFAULT_DATA_OFFSET: u64 = 16 << 20;

#[derive(Debug, Clone)]
pub struct Luks2 {
    pub copy: binary::Copy,
    pub value: Value,
    pub meta: Meta,
}

impl Luks2 {
    pub fn read(file: &dyn Device) -> Result<Self, LuksError> {
        let copy = binary::read_best(file)?;
        let value: Value = serde_json::from_str(&copy.json)
            .map_err(|e| LuksError::Corrupt(format!("LUKS2 JSON metadata does not parse: {e}")))?;
        let meta = meta::parse(&value)?;
        if meta.json_size + binary::BIN_SIZE as u64 != copy.hdr_size {
            return Err(LuksError::Corrupt(
                "LUKS2 json_size disagrees with the header size".into(),
            ));
        }
        let h = Luks2 { copy, value, meta };
        h.check_areas()?;
        Ok(h)
    }

    /// Keyslot areas must lie in the keyslots area (as cryptsetup checks):
    /// we wipe them on removal, so a bad offset must never reach the data.
    fn check_areas(&self) -> Result<(), LuksError> {
        let start = 2 * self.copy.hdr_size;
        let end = start.saturating_add(self.meta.keyslots_size);
        if self.meta.segment.offset != 0 && self.meta.segment.offset < end {
            return Err(LuksError::Corrupt(
                "LUKS2 data segment overlaps the keyslots area".into(),
            ));
        }
        for (id, ks) in &self.meta.keyslots {
            if let Ok(ks) = ks {
                let area_end = ks.area_offset.saturating_add(ks.area_size);
                if ks.area_offset < start || area_end > end {
                    return Err(LuksError::Corrupt(format!(
                        "LUKS2 keyslot {id} area lies outside the keyslots area"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Keyslot `id` and its digest, once both KDFs are known to be within
    /// the caps (kdf.rs): nothing may be allocated or derived before this.
    pub fn usable_slot(&self, id: usize) -> Result<(&meta::Keyslot, &meta::VkDigest), LuksError> {
        let ks = match self.meta.keyslots.get(&id) {
            Some(Ok(ks)) => ks,
            Some(Err(why)) => return Err(LuksError::Unsupported(format!("keyslot {id}: {why}"))),
            None => return Err(LuksError::SlotInactive { slot: id }),
        };
        let digest = self
            .meta
            .digests
            .iter()
            .find(|d| d.keyslots.contains(&id))
            .ok_or_else(|| LuksError::Corrupt(format!("keyslot {id} has no digest")))?;
        digest_kdf(digest).check_costs(&format!("the volume key digest of key slot {id}"))?;
        ks.kdf.check_costs(&format!("key slot {id}"))?;
        Ok((ks, digest))
    }

    /// Tries one slot: the volume key if the passphrase opens it.
    pub fn open_slot(
        &self,
        file: &dyn Device,
        id: usize,
        passphrase: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, LuksError> {
        let (ks, digest) = self.usable_slot(id)?;
        // area_key_size is 32 or 64 (meta.rs), so this is small.
        let mut derived = Zeroizing::new(vec![0u8; ks.area_key_size]);
        ks.kdf.derive(passphrase, &ks.salt, &mut derived)?;
        let key = area::open(
            file,
            ks.area_offset,
            &derived,
            ks.key_size,
            ks.stripes,
            ks.af_hash,
        )?;
        Ok(verify_digest(digest, &key)?.then_some(key))
    }

    /// Slot ids in the order cryptsetup tries them: priority 2 first, then 1;
    /// priority 0 only when named with --key-slot.
    pub fn try_order(&self) -> Vec<usize> {
        let prio = |id: &usize| match self.meta.keyslots.get(id) {
            Some(Ok(ks)) => ks.priority,
            _ => 1,
        };
        let mut ids: Vec<usize> = self
            .meta
            .keyslots
            .keys()
            .copied()
            .filter(|i| prio(i) > 0)
            .collect();
        ids.sort_by_key(|i| std::cmp::Reverse(prio(i)));
        ids
    }

    /// First offset in the keyslots area with `len` free bytes (4 KiB aligned).
    fn allocate(&self, len: u64) -> Result<u64, LuksError> {
        let start = 2 * self.copy.hdr_size;
        let end = start + self.meta.keyslots_size;
        let mut used: Vec<(u64, u64)> = self
            .value
            .get("keyslots")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(_, ks)| {
                let a = ks.get("area")?;
                let off = a.get("offset")?.as_str()?.parse().ok()?;
                let size: u64 = a.get("size")?.as_str()?.parse().ok()?;
                Some((off, off + size))
            })
            .collect();
        used.sort();
        let mut at = start;
        for (s, e) in used {
            if at + len <= s {
                break;
            }
            at = at.max(e.div_ceil(4096) * 4096);
        }
        if at + len > end {
            return Err(LuksError::NoFreeSlot);
        }
        Ok(at)
    }

    /// Writes key material for a new keyslot into free area space and returns
    /// its JSON; nothing refers to that space until the header is committed.
    fn build_keyslot(
        &self,
        file: &dyn Device,
        passphrase: &[u8],
        key: &[u8],
        kdf: Kdf,
        af_hash: HashAlg,
    ) -> Result<Value, LuksError> {
        let size = (area::material_len(key.len(), STRIPES) as u64).div_ceil(4096) * 4096;
        let offset = self.allocate(size)?;
        let mut salt = [0u8; 32];
        random::fill(&mut salt)?;
        let mut derived = Zeroizing::new(vec![0u8; key.len()]);
        kdf.derive(passphrase, &salt, &mut derived)?;
        area::store(file, offset, &derived, key, STRIPES, af_hash)?;
        let kdf_json = match kdf {
            Kdf::Pbkdf2 { hash, iterations } => json!({
                "type": "pbkdf2", "hash": hash.name(), "iterations": iterations, "salt": B64.encode(salt)
            }),
            Kdf::Argon2 {
                kind,
                time,
                memory_kib,
                cpus,
            } => json!({
                "type": kind.name(), "time": time, "memory": memory_kib, "cpus": cpus, "salt": B64.encode(salt)
            }),
        };
        Ok(json!({
            "type": "luks2",
            "key_size": key.len(),
            "af": { "type": "luks1", "stripes": STRIPES, "hash": af_hash.name() },
            "area": {
                "type": "raw", "offset": offset.to_string(), "size": size.to_string(),
                "encryption": area::AREA_CIPHER, "key_size": key.len()
            },
            "kdf": kdf_json
        }))
    }

    fn digest_id_for(&self, key: &[u8]) -> Result<String, LuksError> {
        let digests = self.value.get("digests").and_then(Value::as_object);
        for (id, d) in digests.into_iter().flatten() {
            let parsed = meta::parse_digest(d, id);
            if parsed.is_ok_and(|p| matches!(verify_digest(&p, key), Ok(true))) {
                return Ok(id.clone());
            }
        }
        Err(LuksError::Corrupt(
            "no digest matches the volume key".into(),
        ))
    }

    fn commit(&mut self, file: &dyn Device) -> Result<(), LuksError> {
        self.meta = meta::parse(&self.value)?;
        self.copy.json = serde_json::to_string(&self.value).expect("JSON values serialize");
        binary::write_both(file, &mut self.copy)
    }

    /// Adds keyslot `id` for `key` (area first, then the headers).
    pub fn add_slot(
        &mut self,
        file: &dyn Device,
        id: usize,
        passphrase: &[u8],
        key: &[u8],
        kdf: Kdf,
        af_hash: HashAlg,
    ) -> Result<(), LuksError> {
        if id >= MAX_SLOTS {
            return Err(LuksError::SlotOutOfRange {
                slot: id,
                count: MAX_SLOTS,
            });
        }
        if self.value["keyslots"].get(id.to_string()).is_some() {
            return Err(LuksError::SlotInUse { slot: id });
        }
        let digest = self.digest_id_for(key)?;
        let ks = self.build_keyslot(file, passphrase, key, kdf, af_hash)?;
        self.value["keyslots"][id.to_string()] = ks;
        if let Some(list) = self.value["digests"][&digest]["keyslots"].as_array_mut() {
            list.push(Value::String(id.to_string()));
        }
        self.commit(file)
    }

    /// Replaces keyslot `id` with one for a new passphrase in a fresh area,
    /// switched over by one header commit; the old area is wiped after.
    pub fn change_slot(
        &mut self,
        file: &dyn Device,
        id: usize,
        passphrase: &[u8],
        key: &[u8],
        kdf: Kdf,
        af_hash: HashAlg,
    ) -> Result<(), LuksError> {
        let old = self.area_of(id)?;
        let mut ks = self.build_keyslot(file, passphrase, key, kdf, af_hash)?;
        if let Some(p) = self.value["keyslots"][id.to_string()].get("priority") {
            ks["priority"] = p.clone();
        }
        self.value["keyslots"][id.to_string()] = ks;
        self.commit(file)?;
        area::wipe(file, old.0, old.1 as usize)
    }

    /// Drops keyslot `id` from the metadata (committed), then wipes its area.
    pub fn remove_slot(&mut self, file: &dyn Device, id: usize) -> Result<(), LuksError> {
        let old = self.area_of(id)?;
        if let Some(map) = self.value["keyslots"].as_object_mut() {
            map.remove(&id.to_string());
        }
        let name = Value::String(id.to_string());
        for section in ["digests", "tokens"] {
            if let Some(map) = self.value[section].as_object_mut() {
                for d in map.values_mut() {
                    if let Some(list) = d.get_mut("keyslots").and_then(Value::as_array_mut) {
                        list.retain(|x| *x != name);
                    }
                }
            }
        }
        self.commit(file)?;
        area::wipe(file, old.0, old.1 as usize)
    }

    fn area_of(&self, id: usize) -> Result<(u64, u64), LuksError> {
        match self.meta.keyslots.get(&id) {
            Some(Ok(ks)) => Ok((ks.area_offset, ks.area_size)),
            Some(Err(why)) => Err(LuksError::Unsupported(format!("keyslot {id}: {why}"))),
            None => Err(LuksError::SlotInactive { slot: id }),
        }
    }
}

fn digest_kdf(d: &meta::VkDigest) -> Kdf {
    Kdf::Pbkdf2 {
        hash: d.hash,
        iterations: d.iterations,
    }
}

/// Whether `key` is the volume key `d` describes (its length is checked
/// in meta.rs: never empty or short).
fn verify_digest(d: &meta::VkDigest, key: &[u8]) -> Result<bool, LuksError> {
    let mut out = Zeroizing::new(vec![0u8; d.digest.len()]);
    digest_kdf(d).derive(key, &d.salt, &mut out)?;
    Ok(ct_eq(&out, &d.digest))
}

/// What `format` needs besides the key and passphrase.
pub struct NewHeader<'a> {
    pub uuid: String,
    pub label: &'a str,
    pub sector_size: usize,
    pub kdf: Kdf,
    pub af_hash: HashAlg,
    pub digest_iterations: u32,
}

/// Writes a new LUKS2 header with keyslot 0 into `file` (a new image).
pub fn format(
    file: &dyn Device,
    key: &[u8],
    passphrase: &[u8],
    p: &NewHeader,
) -> Result<(), LuksError> {
    let mut dsalt = [0u8; 32];
    random::fill(&mut dsalt)?;
    // As long as the hash's output, as cryptsetup writes it.
    let mut digest = vec![0u8; p.af_hash.size()];
    p.af_hash
        .pbkdf2(key, &dsalt, p.digest_iterations, &mut digest);
    let json_size = DEFAULT_HDR_SIZE - binary::BIN_SIZE as u64;
    let value = json!({
        "keyslots": {},
        "tokens": {},
        "segments": { "0": {
            "type": "crypt", "offset": DEFAULT_DATA_OFFSET.to_string(), "size": "dynamic",
            "iv_tweak": "0", "encryption": area::AREA_CIPHER, "sector_size": p.sector_size
        }},
        "digests": { "0": {
            "type": "pbkdf2", "keyslots": [], "segments": ["0"], "hash": p.af_hash.name(),
            "iterations": p.digest_iterations, "salt": B64.encode(dsalt), "digest": B64.encode(digest)
        }},
        "config": {
            "json_size": json_size.to_string(),
            "keyslots_size": (DEFAULT_DATA_OFFSET - 2 * DEFAULT_HDR_SIZE).to_string()
        }
    });
    let mut salt = [0u8; 64];
    random::fill(&mut salt)?;
    let mut h = Luks2 {
        copy: binary::Copy {
            hdr_size: DEFAULT_HDR_SIZE,
            seqid: 0,
            label: p.label.to_string(),
            salt,
            uuid: p.uuid.clone(),
            subsystem: String::new(),
            json: String::new(),
        },
        meta: meta::parse(&value)?,
        value,
    };
    h.add_slot(file, 0, passphrase, key, p.kdf, p.af_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_image() -> (tempfile::TempDir, File, Luks2) {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("img"))
            .unwrap();
        file.set_len(DEFAULT_DATA_OFFSET + 4096).unwrap();
        let p = NewHeader {
            uuid: "0b5c3f0e-96a1-4b8e-8f2c-1d2e3f4a5b6c".into(),
            label: "t",
            sector_size: 512,
            kdf: Kdf::Pbkdf2 {
                hash: HashAlg::Sha256,
                iterations: 1000,
            },
            af_hash: HashAlg::Sha256,
            digest_iterations: 1000,
        };
        format(&file, &[7u8; 64], b"pw", &p).unwrap();
        let h = Luks2::read(&file).unwrap();
        (dir, file, h)
    }

    #[test]
    fn a_keyslot_area_outside_the_keyslots_area_is_refused() {
        let (_dir, file, mut h) = small_image();
        assert_eq!(h.copy.seqid, 1);
        assert_eq!(
            &h.open_slot(&file, 0, b"pw").unwrap().unwrap()[..],
            &[7u8; 64]
        );
        // Point keyslot 0 into the data segment: reading it back must fail,
        // so a later remove could never wipe payload.
        h.value["keyslots"]["0"]["area"]["offset"] = Value::String(DEFAULT_DATA_OFFSET.to_string());
        h.commit(&file).unwrap();
        let err = Luks2::read(&file).unwrap_err().to_string();
        assert!(err.contains("outside the keyslots area"), "{err}");
    }

    #[test]
    fn the_newer_copy_wins_and_a_torn_primary_falls_back() {
        let (_dir, file, mut h) = small_image();
        h.copy.label = "second".into();
        h.commit(&file).unwrap();
        assert_eq!(Luks2::read(&file).unwrap().copy.seqid, 2);
        // A crash halfway through the next primary write: the secondary
        // (seqid 2) is used.
        use std::os::unix::fs::FileExt;
        FileExt::write_all_at(&file, &[0xff; 100], 5000).unwrap();
        let back = Luks2::read(&file).unwrap();
        assert_eq!((back.copy.seqid, back.copy.label.as_str()), (2, "second"));
    }
}
