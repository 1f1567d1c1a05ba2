//! `cryptblk format`: new LUKS1, LUKS2 or plain images with a fresh volume
//! key from the OS random source.

use crate::device::Device;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use super::hash::HashAlg;
use super::kdf::{pbkdf2_iterations_for, Kdf, KdfChoice, MIN_PBKDF2_ITERATIONS};
use super::{luks1, luks2, random, LuksError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Luks1,
    Luks2,
    Plain,
}

pub struct Params<'a> {
    pub kind: Kind,
    pub image: &'a Path,
    /// Payload bytes (the header comes on top).
    pub size: u64,
    pub key_bits: usize,
    pub sector_size: usize,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub kdf: KdfChoice,
}

/// Creates the image (never over an existing file) and writes the header;
/// a failed format removes the half-made image.
pub fn format(p: &Params, passphrase: Option<&[u8]>) -> Result<(), LuksError> {
    check(p)?;
    if crate::device::is_foreign(p.image) {
        return format_existing(p, passphrase);
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(p.image)
        .map_err(LuksError::io(format!(
            "cannot create {} (an existing image is never overwritten)",
            p.image.display()
        )))?;
    let result = write_image(&file, p, passphrase);
    if result.is_err() {
        let _ = std::fs::remove_file(p.image);
    }
    result
}

/// A device that exists already and cannot be created (an NBD export):
/// formatted in place, large enough for header and payload, and never over
/// a LUKS header (erase that first, as with a file).
fn format_existing(p: &Params, passphrase: Option<&[u8]>) -> Result<(), LuksError> {
    let name = p.image.display().to_string();
    if crate::is_luks(p.image).map_err(LuksError::io(format!("cannot read {name}")))? {
        return Err(LuksError::Invalid(format!(
            "{name} already holds a LUKS header; an existing image is never overwritten"
        )));
    }
    let dev =
        crate::device::open(p.image, true).map_err(LuksError::io(format!("cannot open {name}")))?;
    write_image(&*dev, p, passphrase)
}

fn check(p: &Params) -> Result<(), LuksError> {
    if p.key_bits != 256 && p.key_bits != 512 {
        return Err(LuksError::Invalid("--key-size must be 256 or 512".into()));
    }
    if !cryptblk_crypto::SECTOR_SIZES.contains(&p.sector_size) {
        return Err(LuksError::Invalid(
            "--sector-size must be 512, 1024, 2048 or 4096".into(),
        ));
    }
    if p.kind != Kind::Luks2 && p.sector_size != 512 {
        return Err(LuksError::Invalid(
            "--sector-size other than 512 needs --type luks2".into(),
        ));
    }
    if p.kind == Kind::Luks1 && p.kdf.pbkdf != "pbkdf2" {
        return Err(LuksError::Invalid(
            "LUKS1 supports only --pbkdf pbkdf2".into(),
        ));
    }
    if p.kind != Kind::Luks2 && p.label.is_some() {
        return Err(LuksError::Invalid("--label needs --type luks2".into()));
    }
    if p.size == 0 || !p.size.is_multiple_of(p.sector_size as u64) {
        return Err(LuksError::Invalid(format!(
            "--size must be a non-zero multiple of the sector size ({})",
            p.sector_size
        )));
    }
    if let Some(u) = &p.uuid {
        let ok = u.len() == 36
            && u.chars().enumerate().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
        if !ok {
            return Err(LuksError::Invalid(format!("--uuid {u:?} is not a UUID")));
        }
    }
    Ok(())
}

fn write_image(file: &dyn Device, p: &Params, passphrase: Option<&[u8]>) -> Result<(), LuksError> {
    let mut key = Zeroizing::new(vec![0u8; p.key_bits / 8]);
    random::fill(&mut key)?;
    let uuid = match &p.uuid {
        Some(u) => u.to_ascii_lowercase(),
        None => random::uuid_v4()?,
    };
    let pass =
        || passphrase.ok_or_else(|| LuksError::Invalid("LUKS formats need a passphrase".into()));
    let set_len = |len: u64| {
        file.set_len(len)
            .map_err(LuksError::io("cannot size the image"))
    };
    match p.kind {
        Kind::Plain => set_len(p.size),
        Kind::Luks1 => {
            let (iterations, digest_iterations) = luks1_costs(&p.kdf, key.len())?;
            let mut h = luks1::Header::new(&key, p.kdf.hash, digest_iterations, uuid)?;
            set_len(h.payload_offset as u64 * 512 + p.size)?;
            h.add_slot(file, 0, pass()?, &key, iterations)
        }
        Kind::Luks2 => {
            set_len(luks2::DEFAULT_DATA_OFFSET + p.size)?;
            let kdf = p.kdf.resolve(key.len())?;
            let params = luks2::NewHeader {
                uuid,
                label: p.label.as_deref().unwrap_or(""),
                sector_size: p.sector_size,
                kdf,
                af_hash: p.kdf.hash,
                digest_iterations: digest_iterations(&p.kdf, p.kdf.hash),
            };
            luks2::format(file, &key, pass()?, &params)
        }
    }
}

/// The master-key digest costs 1/8 of --iter-time, like cryptsetup; with
/// forced iterations it uses the minimum.
fn digest_iterations(choice: &KdfChoice, hash: HashAlg) -> u32 {
    if choice.forced_iterations.is_some() {
        MIN_PBKDF2_ITERATIONS
    } else {
        pbkdf2_iterations_for(hash, hash.size(), choice.iter_time_ms / 8)
    }
}

fn luks1_costs(choice: &KdfChoice, key_len: usize) -> Result<(u32, u32), LuksError> {
    match choice.resolve(key_len)? {
        Kdf::Pbkdf2 { iterations, .. } => Ok((iterations, digest_iterations(choice, choice.hash))),
        Kdf::Argon2 { .. } => Err(LuksError::Invalid(
            "LUKS1 supports only --pbkdf pbkdf2".into(),
        )),
    }
}

/// For plain mode: creates `path` with `bits / 8` random bytes, mode 0600,
/// unless it exists (then it must already hold a key of that length).
pub fn ensure_plain_key(path: &Path, bits: usize) -> Result<bool, LuksError> {
    if path.exists() {
        cryptblk_crypto::XtsKey::from_key_file(&path.to_string_lossy(), bits)?;
        return Ok(false);
    }
    let mut key = Zeroizing::new(vec![0u8; bits / 8]);
    random::fill(&mut key)?;
    let what = format!("cannot create the key file {}", path.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(LuksError::io(what.clone()))?;
    f.write_all(&key)
        .and_then(|_| f.sync_all())
        .map_err(LuksError::io(what))?;
    Ok(true)
}
