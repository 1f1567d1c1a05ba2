//! Typed, validated views of the LUKS2 JSON metadata. The `serde_json::Value`
//! stays the source of truth so that fields we do not know (tokens, flags,
//! priorities) survive our updates untouched.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::Value;

use crate::hash::HashAlg;
use crate::kdf::{Argon2Type, Kdf};
use crate::LuksError;

use super::MAX_SLOTS;

pub const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// cryptsetup's LUKS_SALTSIZE, for keyslots and digests alike.
const SALT_LEN: usize = 32;
const LUKS1_DIGEST_LEN: usize = 20;

fn bad(what: &str) -> LuksError {
    LuksError::Corrupt(format!("LUKS2 metadata: {what}"))
}

fn obj<'a>(
    v: &'a Value,
    key: &str,
    ctx: &str,
) -> Result<&'a serde_json::Map<String, Value>, LuksError> {
    v.get(key)
        .and_then(Value::as_object)
        .ok_or_else(|| bad(&format!("{ctx} has no \"{key}\" object")))
}

fn string<'a>(v: &'a Value, key: &str, ctx: &str) -> Result<&'a str, LuksError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(&format!("{ctx} has no \"{key}\" string")))
}

/// LUKS2 stores 64-bit sizes and offsets as decimal strings.
fn u64_str(v: &Value, key: &str, ctx: &str) -> Result<u64, LuksError> {
    string(v, key, ctx)?
        .parse()
        .map_err(|_| bad(&format!("{ctx}.{key} is not a decimal number")))
}

fn num(v: &Value, key: &str, ctx: &str) -> Result<u32, LuksError> {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| bad(&format!("{ctx}.{key} is not a small number")))
}

fn b64(v: &Value, key: &str, ctx: &str) -> Result<Vec<u8>, LuksError> {
    B64.decode(string(v, key, ctx)?)
        .map_err(|_| bad(&format!("{ctx}.{key} is not base64")))
}

/// Reads a key size that must fit aes-xts-plain64 (the only cipher of
/// segments and keyslot areas here): checked before anything of that size
/// is allocated.
fn xts_key_size(v: &Value, key: &str, ctx: &str) -> Result<usize, LuksError> {
    match num(v, key, ctx)? {
        n @ (32 | 64) => Ok(n as usize),
        n => Err(bad(&format!(
            "{ctx}.{key} is {n}; aes-xts-plain64 keys are 32 or 64 bytes"
        ))),
    }
}

/// A salt of the one size cryptsetup writes and accepts.
fn salt(v: &Value, ctx: &str) -> Result<Vec<u8>, LuksError> {
    let salt = b64(v, "salt", ctx)?;
    if salt.len() != SALT_LEN {
        return Err(bad(&format!(
            "{ctx}.salt is {} bytes, not {SALT_LEN}",
            salt.len()
        )));
    }
    Ok(salt)
}

fn ids(v: &Value, key: &str, ctx: &str) -> Result<Vec<usize>, LuksError> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| bad(&format!("{ctx} has no \"{key}\" list")))?
        .iter()
        .map(|x| x.as_str().and_then(|s| s.parse().ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad(&format!("{ctx}.{key} holds something that is not an id")))
}

/// An openable (type "luks2") keyslot.
#[derive(Debug, Clone)]
pub struct Keyslot {
    pub key_size: usize,
    pub kdf: Kdf,
    pub salt: Vec<u8>,
    pub stripes: usize,
    pub af_hash: HashAlg,
    pub area_offset: u64,
    pub area_size: u64,
    pub area_key_size: usize,
    /// 0 = ignore unless named, 1 = normal, 2 = try first.
    pub priority: u32,
}

impl Keyslot {
    pub fn parse(v: &Value, ctx: &str) -> Result<Self, LuksError> {
        let kdf_v = v
            .get("kdf")
            .ok_or_else(|| bad(&format!("{ctx} has no kdf")))?;
        let kctx = format!("{ctx}.kdf");
        let kdf = match string(kdf_v, "type", &kctx)? {
            "pbkdf2" => Kdf::Pbkdf2 {
                hash: HashAlg::from_name(string(kdf_v, "hash", &kctx)?)?,
                iterations: num(kdf_v, "iterations", &kctx)?,
            },
            t @ ("argon2i" | "argon2id") => Kdf::Argon2 {
                kind: if t == "argon2i" {
                    Argon2Type::I
                } else {
                    Argon2Type::Id
                },
                time: num(kdf_v, "time", &kctx)?,
                memory_kib: num(kdf_v, "memory", &kctx)?,
                cpus: num(kdf_v, "cpus", &kctx)?,
            },
            other => return Err(LuksError::Unsupported(format!("{ctx}: KDF {other:?}"))),
        };
        let af = v
            .get("af")
            .ok_or_else(|| bad(&format!("{ctx} has no af")))?;
        if string(af, "type", ctx)? != "luks1" {
            return Err(LuksError::Unsupported(format!(
                "{ctx}: AF type other than luks1"
            )));
        }
        let area = v
            .get("area")
            .ok_or_else(|| bad(&format!("{ctx} has no area")))?;
        let actx = format!("{ctx}.area");
        if string(area, "type", &actx)? != "raw" {
            return Err(LuksError::Unsupported(format!(
                "{ctx}: area type other than raw"
            )));
        }
        let enc = string(area, "encryption", &actx)?;
        if enc != crate::area::AREA_CIPHER {
            return Err(LuksError::Unsupported(format!(
                "{ctx}: keyslot cipher {enc:?}; only aes-xts-plain64 is supported"
            )));
        }
        // The area key may differ from the volume key: cryptsetup's
        // --keyslot-key-size sets it on its own.
        let ks = Keyslot {
            key_size: xts_key_size(v, "key_size", ctx)?,
            kdf,
            salt: salt(kdf_v, &kctx)?,
            stripes: num(af, "stripes", ctx)? as usize,
            af_hash: HashAlg::from_name(string(af, "hash", ctx)?)?,
            area_offset: u64_str(area, "offset", &actx)?,
            area_size: u64_str(area, "size", &actx)?,
            area_key_size: xts_key_size(area, "key_size", &actx)?,
            priority: v.get("priority").and_then(Value::as_u64).unwrap_or(1) as u32,
        };
        let need = crate::area::material_len(ks.key_size, ks.stripes) as u64;
        if ks.stripes == 0 || ks.stripes > 100_000 || need > ks.area_size {
            return Err(bad(&format!("{ctx}: key material does not fit its area")));
        }
        Ok(ks)
    }
}

/// The single data segment we support.
#[derive(Debug, Clone)]
pub struct Segment {
    pub offset: u64,
    /// None = "dynamic" (up to the end of the device).
    pub size: Option<u64>,
    pub encryption: String,
    pub sector_size: usize,
}

/// A pbkdf2 digest of the volume key.
#[derive(Debug, Clone)]
pub struct VkDigest {
    pub keyslots: Vec<usize>,
    pub hash: HashAlg,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub digest: Vec<u8>,
}

/// Everything we read from the metadata.
#[derive(Debug, Clone)]
pub struct Meta {
    pub keyslots: BTreeMap<usize, Result<Keyslot, String>>,
    pub segment: Segment,
    pub digests: Vec<VkDigest>,
    pub json_size: u64,
    pub keyslots_size: u64,
}

pub fn parse(v: &Value) -> Result<Meta, LuksError> {
    let config = v.get("config").ok_or_else(|| bad("no config"))?;
    refuse_requirements(config)?;
    let segment = parse_segment(v)?;
    let mut keyslots = BTreeMap::new();
    for (id, ks) in obj(v, "keyslots", "metadata")? {
        let n = keyslot_id(id)?;
        let ctx = format!("keyslot {n}");
        let parsed = match string(ks, "type", &ctx)? {
            "luks2" => Keyslot::parse(ks, &ctx).map_err(|e| e.to_string()),
            other => Err(format!("keyslot type {other:?} cannot be opened")),
        };
        keyslots.insert(n, parsed);
    }
    let mut digests = Vec::new();
    for (id, d) in obj(v, "digests", "metadata")? {
        digests.push(parse_digest(d, id)?);
    }
    Ok(Meta {
        keyslots,
        segment,
        digests,
        json_size: u64_str(config, "json_size", "config")?,
        keyslots_size: u64_str(config, "keyslots_size", "config")?,
    })
}

/// Keyslot ids are "0" to "31": cryptsetup looks no further, and a second
/// spelling of one number ("01", "+1") would let one slot hide another.
fn keyslot_id(id: &str) -> Result<usize, LuksError> {
    let n: usize = id
        .parse()
        .ok()
        .filter(|n: &usize| n.to_string() == id)
        .ok_or_else(|| bad(&format!("keyslot id {id:?} is not a plain decimal number")))?;
    if n >= MAX_SLOTS {
        return Err(bad(&format!(
            "keyslot id {n} is out of range (LUKS2 has keyslots 0 to {}); \
             cryptsetup never writes it, so the header was tampered with",
            MAX_SLOTS - 1
        )));
    }
    Ok(n)
}

pub fn parse_digest(d: &Value, id: &str) -> Result<VkDigest, LuksError> {
    let ctx = format!("digest {id}");
    if string(d, "type", &ctx)? != "pbkdf2" {
        return Err(LuksError::Unsupported(format!(
            "{ctx}: digest type other than pbkdf2"
        )));
    }
    let hash = HashAlg::from_name(string(d, "hash", &ctx)?)?;
    let digest = b64(d, "digest", &ctx)?;
    if !digest_len_ok(hash, digest.len()) {
        return Err(bad(&format!(
            "{ctx} is {} bytes; a {} digest is {} bytes (or 20, as LUKS1 and cryptsetup convert write)",
            digest.len(),
            hash.name(),
            hash.size()
        )));
    }
    Ok(VkDigest {
        keyslots: ids(d, "keyslots", &ctx)?,
        hash,
        iterations: num(d, "iterations", &ctx)?,
        salt: salt(d, &ctx)?,
        digest,
    })
}

/// The lengths cryptsetup compares (luks2_digest_pbkdf2.c): the hash's
/// output, or LUKS1's 20 bytes kept by `cryptsetup convert`. Also 32, which
/// cryptblk wrote for every hash before it wrote the hash's length. A short
/// digest would let almost any passphrase through; an empty one, every one.
fn digest_len_ok(hash: HashAlg, len: usize) -> bool {
    len == hash.size() || len == LUKS1_DIGEST_LEN || len == 32
}

fn refuse_requirements(config: &Value) -> Result<(), LuksError> {
    let mandatory: Vec<&str> = config
        .get("requirements")
        .and_then(|r| r.get("mandatory"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if mandatory.is_empty() {
        return Ok(());
    }
    let reencrypt = mandatory.iter().any(|m| m.contains("reencrypt"));
    Err(LuksError::Unsupported(if reencrypt {
        format!("a LUKS2 re-encryption is in progress (requirements: {}); finish it with cryptsetup reencrypt first", mandatory.join(", "))
    } else {
        format!("LUKS2 mandatory requirements {}", mandatory.join(", "))
    }))
}

fn parse_segment(v: &Value) -> Result<Segment, LuksError> {
    let segs = obj(v, "segments", "metadata")?;
    if segs.len() != 1 {
        return Err(LuksError::Unsupported(format!(
            "{} data segments (exactly one is supported)",
            segs.len()
        )));
    }
    let (id, s) = segs.iter().next().expect("one segment");
    let ctx = format!("segment {id}");
    let kind = string(s, "type", &ctx)?;
    if kind != "crypt" {
        return Err(LuksError::Unsupported(format!("{ctx} of type {kind:?}")));
    }
    if s.get("integrity").is_some_and(|i| !i.is_null()) {
        return Err(LuksError::Unsupported(format!(
            "{ctx} uses integrity/AEAD (dm-integrity); only plain aes-xts-plain64 is supported"
        )));
    }
    let encryption = string(s, "encryption", &ctx)?.to_string();
    if encryption != crate::area::AREA_CIPHER {
        return Err(LuksError::Unsupported(format!(
            "cipher {encryption:?}; only aes-xts-plain64 is supported"
        )));
    }
    if u64_str(s, "iv_tweak", &ctx)? != 0 {
        return Err(LuksError::Unsupported(format!(
            "{ctx} with a non-zero iv_tweak"
        )));
    }
    let size = match string(s, "size", &ctx)? {
        "dynamic" => None,
        n => Some(
            n.parse()
                .map_err(|_| bad(&format!("{ctx}.size is not a number")))?,
        ),
    };
    let sector_size = num(s, "sector_size", &ctx)? as usize;
    if !cryptblk_crypto::SECTOR_SIZES.contains(&sector_size) {
        return Err(bad(&format!("{ctx}.sector_size {sector_size} is invalid")));
    }
    Ok(Segment {
        offset: u64_str(s, "offset", &ctx)?,
        size,
        encryption,
        sector_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyslot_ids_are_plain_numbers_below_32() {
        assert_eq!(keyslot_id("0").unwrap(), 0);
        assert_eq!(keyslot_id("31").unwrap(), 31);
        for bad in [
            "32",
            "40",
            "01",
            "+1",
            "-1",
            "",
            " 1",
            "1e1",
            "99999999999999999999999",
        ] {
            assert!(keyslot_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn digests_are_as_long_as_cryptsetup_writes_them() {
        use HashAlg::*;
        for (hash, len) in [
            (Sha1, 20),
            (Sha256, 32),
            (Sha512, 64),
            (Sha256, 20),
            (Sha512, 32),
        ] {
            assert!(digest_len_ok(hash, len), "{hash:?} {len}");
        }
        for (hash, len) in [
            (Sha256, 0),
            (Sha256, 1),
            (Sha256, 19),
            (Sha512, 48),
            (Sha1, 64),
        ] {
            assert!(!digest_len_ok(hash, len), "{hash:?} {len}");
        }
    }
}
